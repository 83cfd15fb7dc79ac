"""Variational Preference Learning (VPL; Poddar et al. 2024, "Personalizing Reinforcement
Learning from Human Feedback with Variational Preference Learning"; official code
github.com/WEIRDLabUW/vpl_llm, hidden_context/vae_utils.py): a reward r(x, y, z) conditioned
on a latent user vector z inferred from a few labelled pairs of that user.

Structure (matched to vpl_llm's `VAEModel` with `fixed_llm_embeddings`):

- e(x, y): the frozen LLM's last hidden state, mean-pooled over the tokens of prompt +
  response (vpl_llm's causal-LM path, `use_causal_lm`), computed once;
- pair encoder: MLP [e(x, y_w); e(x, y_l)] (2E) -> H -> H -> L, LeakyReLU(0.2);
- sequence encoder: one self-attention layer over the C context pairs of a user
  (softmax(q k^T / sqrt(L)) v, then the mean over the pairs), then two linear maps to the
  posterior mean mu (L) and log-variance log s^2 (L), both clamped to [-1, 1] as vpl_llm does;
- z = mu + s * eps, eps ~ N(0, I) (reparameterised) while training; z = mu at scoring time;
- decoder (reward head): MLP [e(x, y); z] (E + L) -> H -> H -> 1, LeakyReLU(0.2).

Loss (negative ELBO; its KL term is `gaussian_kl_standard_normal` in alignkit.objectives.reward_losses,
trained by `alignkit train rm_vpl`):
L = mean_i -log sigma(r(x_i, y_w, z_u) - r(x_i, y_l, z_u)) + kl_weight * mean_u KL(q(z|C_u) || N(0, I)).

OUR DEVIATIONS from vpl_llm: KL(N(mu, s^2) || N(0, I)) = 0.5 sum_d (mu^2 + s^2 - 1 - log s^2),
averaged over the users of the batch (vpl_llm sums -(1 + log s^2 - mu^2 - s^2) over the batch,
without the 0.5, so its kl_loss_weight w equals our kl_weight / (2 B)); the sampled z is used as
is (vpl_llm rescales it to norm sqrt(L) while training but scores with the raw mean, a scale
the decoder never saw in training); no KL annealing (vpl_llm's cyclical cosine annealer).

Active query selection (the paper's active learning of a new user's queries): among candidate
pairs (x, a, b), pick the ones whose label is most informative about z, the mutual information
I(y; z) = H[E_z p(y | z)] - E_z H[p(y | z)] with p(y = a | z) = sigma(r(x, a, z) - r(x, b, z))
and z drawn from the population of training users (their posteriors, saved with the model):
`select_queries`. NOT CHECKED AGAINST CODE: the vpl_llm repository holds no active-learning
code (its "survey" contexts are drawn at random from a fixed pool), and the paper's exact
estimator could not be read here; this is the standard BALD form of "maximise the information
the labels give about z". The paper scores query SETS; we rank single queries and take the
top k (greedy, ignoring redundancy between the chosen queries).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.data import load_rows, split_implicit_prompt
from alignkit.rewards.scorer import RewardModelScorer

MANIFEST = "vpl_rm.json"
WEIGHTS = "vpl.safetensors"


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                         nn.LeakyReLU(0.2), nn.Linear(hidden, outputs))


class VariationalPreferenceModel(nn.Module):
    """Pair encoder + attention sequence encoder -> q(z | context); decoder r(e, z)."""

    def __init__(self, embed_dim: int, latent_dim: int = 64, hidden_dim: int = 256) -> None:
        super().__init__()
        self.config = {"embed_dim": embed_dim, "latent_dim": latent_dim, "hidden_dim": hidden_dim}
        self.pair_encoder = _mlp(2 * embed_dim, hidden_dim, latent_dim)
        self.query = nn.Linear(latent_dim, latent_dim)
        self.key = nn.Linear(latent_dim, latent_dim)
        self.value = nn.Linear(latent_dim, latent_dim)
        self.mean_layer = nn.Linear(latent_dim, latent_dim)
        self.log_var_layer = nn.Linear(latent_dim, latent_dim)
        self.decoder = _mlp(embed_dim + latent_dim, hidden_dim, 1)

    def posterior(self, context_chosen: Tensor, context_rejected: Tensor, mask: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
        """(mu (U, L), log s^2 (U, L)) from U users' C context pairs: embeddings (U, C, E) each,
        `mask` (U, C) True where a context pair is real (None: all)."""
        pairs = self.pair_encoder(torch.cat([context_chosen, context_rejected], dim=-1))  # (U, C, L)
        mask = torch.ones(pairs.shape[:2], dtype=torch.bool, device=pairs.device) if mask is None else mask
        attention = self.query(pairs) @ self.key(pairs).transpose(1, 2) / math.sqrt(pairs.shape[-1])
        attention = attention.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1)  # (U, C, C)
        attended = attention @ self.value(pairs)  # (U, C, L)
        weights = mask.unsqueeze(-1).to(attended.dtype)
        pooled = (attended * weights).sum(1) / weights.sum(1).clamp(min=1)  # mean over real pairs
        return self.mean_layer(pooled).clamp(-1, 1), self.log_var_layer(pooled).clamp(-1, 1)

    @staticmethod
    def sample(mean: Tensor, log_var: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + (0.5 * log_var).exp() * noise

    def reward(self, embeddings: Tensor, z: Tensor) -> Tensor:
        """r(x, y, z): embeddings (N, E), z (N, L) -> (N,)."""
        return self.decoder(torch.cat([embeddings, z.to(embeddings.dtype)], dim=-1)).squeeze(-1)


def mean_pooled_embeddings(scorer: RewardModelScorer, prompts: list[Any], completions: list[Any]) -> Tensor:
    """e(x, y) (N, E): the backbone's last hidden state averaged over the real tokens of
    prompt + completion, tokenised as every alignkit reward model is (`scorer.encode`)."""
    sequences = scorer.encode(prompts, completions)
    device = next(scorer.model.parameters()).device
    parts = []
    with torch.no_grad():
        for start in range(0, len(sequences), scorer.batch_size):
            input_ids, mask = scorer._pad(sequences[start:start + scorer.batch_size], device)
            hidden = scorer.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            parts.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


def label_information(model: VariationalPreferenceModel, chosen: Tensor, rejected: Tensor, z: Tensor) -> Tensor:
    """I(y; z) per candidate pair (Q,), in nats: H[mean_s p_s] - mean_s H[p_s], p_s =
    sigma(r(a, z_s) - r(b, z_s)); `chosen`/`rejected` (Q, E) are the two responses (which is
    preferred is unknown), z (S, L) samples of the user population."""
    q, s = chosen.shape[0], z.shape[0]
    z_rows = z.unsqueeze(0).expand(q, s, z.shape[-1]).reshape(q * s, -1)
    a = model.reward(chosen.repeat_interleave(s, 0), z_rows)
    b = model.reward(rejected.repeat_interleave(s, 0), z_rows)
    p = torch.sigmoid(a - b).reshape(q, s).double().clamp(1e-12, 1 - 1e-12)

    def entropy(x: Tensor) -> Tensor:
        return -(x * x.log() + (1 - x) * (1 - x).log())

    return (entropy(p.mean(1)) - entropy(p).mean(1)).float()


def select_queries(model: VariationalPreferenceModel, chosen: Tensor, rejected: Tensor, population: Tensor,
                   k: int, samples: int = 64, seed: int = 0) -> list[int]:
    """Indices of the `k` candidate pairs with the largest I(y; z) (`label_information`), z
    drawn `samples` times from the population: `population` (P, 2, L) holds the training users'
    posterior (mu, log s^2); each sample picks a user at random and draws from its posterior."""
    generator = torch.Generator().manual_seed(seed)
    users = torch.randint(population.shape[0], (samples,), generator=generator)
    z = VariationalPreferenceModel.sample(population[users, 0], population[users, 1], generator)
    with torch.no_grad():
        information = label_information(model, chosen, rejected, z)
    return torch.argsort(information, descending=True)[:k].tolist()


def save_vpl(model: VariationalPreferenceModel, population: Tensor, directory: Path, extra: dict[str, Any]) -> None:
    """vpl.safetensors (the VPL heads, `population` the training users' (mu, log s^2)) and the
    vpl_rm.json manifest beside the backbone saved in `directory`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file({**tensors, "population": population.detach().contiguous()}, str(directory / WEIGHTS))
    (directory / MANIFEST).write_text(json.dumps({**model.config, **extra}, indent=2) + "\n")


def load_vpl(directory: Path) -> tuple[VariationalPreferenceModel, Tensor, dict[str, Any]]:
    from safetensors.torch import load_file

    manifest = json.loads((directory / MANIFEST).read_text())
    model = VariationalPreferenceModel(manifest["embed_dim"], manifest["latent_dim"], manifest["hidden_dim"])
    tensors = load_file(str(directory / WEIGHTS))
    population = tensors.pop("population")
    model.load_state_dict(tensors)
    return model.eval(), population, manifest


def load_user_pairs(source: Any, what: str = "user context") -> tuple[list[Any], list[Any], list[Any]]:
    """(prompts, chosen, rejected) of a user's labelled pairs (a JSONL/JSON file or rows)."""
    table = load_rows(source)
    rows = []
    for i, raw in enumerate(table.rows):
        row = split_implicit_prompt(raw)
        if not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise table.error(i, f"{what} rows need 'prompt', 'chosen' and 'rejected'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{what} {table.source}: no labelled pairs")
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


class VariationalRewardScorer:
    """A saved `rm_vpl` model as a reward for one user: `user_context` (a JSONL of that user's
    labelled pairs, or rows) -> z = the posterior mean mu -> r(x, y, z) per row.

    `select_queries(prompts, a, b, k)` ranks unlabelled candidate pairs for asking a new user
    (active query selection, see the module docstring)."""

    def __init__(self, path: str | Path, user_context: Any = None, *, batch_size: int = 16,
                 device: str | None = None, dtype: Any = None) -> None:
        from alignkit.models import load_model

        self.path = Path(path)
        self.vpl, self.population, manifest = load_vpl(self.path)
        backbone, tokenizer = load_model(str(self.path), kind="reward", device=device, dtype=dtype)
        self.embedder = RewardModelScorer(backbone, tokenizer, batch_size=batch_size,
                                          chat_template=manifest.get("chat_template"),
                                          max_length=int(manifest.get("max_length", 1024)),
                                          max_prompt_length=manifest.get("max_prompt_length"))
        self.z: Tensor | None = None
        if user_context is not None:
            self.set_user(user_context)
        self.__name__ = f"VariationalRewardScorer({path})"

    def embed(self, prompts: list[Any], completions: list[Any]) -> Tensor:
        return mean_pooled_embeddings(self.embedder, prompts, completions)

    def set_user(self, user_context: Any) -> Tensor:
        """z = mu(context) of the user's labelled pairs; returns it (L,)."""
        prompts, chosen, rejected = load_user_pairs(user_context, "user_context")
        with torch.no_grad():
            mean, _ = self.vpl.posterior(self.embed(prompts, chosen).unsqueeze(0), self.embed(prompts, rejected).unsqueeze(0))
        self.z = mean[0]
        return self.z

    def select_queries(self, prompts: list[Any], first: list[Any], second: list[Any], k: int, seed: int = 0) -> list[int]:
        return select_queries(self.vpl, self.embed(prompts, first), self.embed(prompts, second), self.population, k, seed=seed)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        if self.z is None:
            raise ValueError(f"{self.path}: a VPL reward model scores for one user: give its labelled pairs, "
                             "--reward rm:DIR,user_context=FILE")
        if len(completions) == 0:
            return torch.zeros(0)
        embeddings = self.embed(prompts, completions)
        with torch.no_grad():
            return self.vpl.reward(embeddings, self.z.expand(len(completions), -1)).float()


__all__ = ["VariationalPreferenceModel", "VariationalRewardScorer", "label_information", "select_queries",
           "mean_pooled_embeddings"]
