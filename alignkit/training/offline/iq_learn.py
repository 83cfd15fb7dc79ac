"""`iq_learn`: IQ-Learn as TD-regularised MLE on SFT rows (prompt + completion, or messages);
see `alignkit.objectives.iq_learn` for the objective, the paper and what was checked.

Cost per step: one forward + backward like SFT; the head's logits are computed in chunks of
`logp_chunk_size` rows (recomputed in backward) so no (B, T, V) logits tensor stays alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alignkit.models.logprobs import _scatter, predictors_and_head
from alignkit.objectives.iq_learn import iq_learn_token_losses
from alignkit.training.offline.tasks import Metrics, SequenceData, check_hparams, scored_tokens
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.distributed import Weighted
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

IQ_LEARN_DEFAULTS = {"lambda_": 0.1, "gamma": 1.0, "temperature": 1.0}


def _chunk_q_and_value(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """hidden (n, H), targets (n,) -> Q(s, a) = logit of the target (n,), V(s) = tau lse(Q / tau) (n,)."""
    logits = head(hidden).float()  # (n, V), this chunk only
    taken = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return taken, temperature * (logits / temperature).logsumexp(-1)


def q_and_values(model, input_ids: Tensor, attention_mask: Tensor, predict_mask: Tensor, *,
                 chunk_size: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Q(s_t, y_t) and V(s_t) of each scored token, (B, T) each (position 0 and unscored
    positions 0), the logits at t - 1 being the Q values of the state that predicts token t."""
    targets = input_ids[:, 1:][predict_mask]  # (N,)
    predictors, head = predictors_and_head(model, input_ids, attention_mask, predict_mask)  # (N, H)
    needs_grad = torch.is_grad_enabled() and predictors.requires_grad
    taken, values = [], []
    for start in range(0, predictors.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if needs_grad:  # recompute the chunk's logits in backward instead of storing them
            q, v = checkpoint(_chunk_q_and_value, head, predictors[rows], targets[rows], temperature,
                              use_reentrant=False, preserve_rng_state=False)
        else:
            q, v = _chunk_q_and_value(head, predictors[rows], targets[rows], temperature)
        taken.append(q)
        values.append(v)
    if not taken:
        empty = predictors.new_zeros(0, dtype=torch.float32)
        return _scatter(empty, predict_mask), _scatter(empty, predict_mask)
    return _scatter(torch.cat(taken), predict_mask), _scatter(torch.cat(values), predict_mask)


@dataclass
class IQLearnTask(SequenceData):
    """IQ-Learn (Wulfmeier et al. 2024), offline: token mean over the micro-batch of
    -log pi(y_t | s_t) + lambda (Q(s_t, y_t) - gamma V(s_{t+1}))^2.

    `--set lambda_=0` is plain SFT (same loss to float precision); `gamma` in [0, 1];
    `temperature` tau > 0 is the soft-max temperature of pi = softmax(Q / tau): sample at the
    same temperature. Logs `nll` (the MLE term), `td/reward_mean` and `td/reward_sq` (the
    implicit reward r_t and its square, the regulariser before lambda).
    """

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft",)
    needs_reference: bool = False
    lambda_: float = field(init=False, default=0.1)
    gamma: float = field(init=False, default=1.0)
    temperature: float = field(init=False, default=1.0)
    hparams: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        check_hparams("iq_learn", self.config.hparams, IQ_LEARN_DEFAULTS)
        values = self.hparams = {**IQ_LEARN_DEFAULTS, **self.config.hparams}
        self.lambda_, self.gamma = float(values["lambda_"]), float(values["gamma"])
        self.temperature = float(values["temperature"])
        if self.lambda_ < 0:
            raise ValueError(f"iq_learn: lambda_ must be >= 0 (0 is plain SFT), got {self.lambda_}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"iq_learn: gamma must be in [0, 1], got {self.gamma}")
        if self.temperature <= 0:
            raise ValueError(f"iq_learn: temperature must be > 0, got {self.temperature}")

    loss_tokens = staticmethod(scored_tokens)  # a token mean, like SFT

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        if batch.get("pixel_inputs"):
            raise ValueError("iq_learn: rows with images are not supported (train a VLM with sft)")
        mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
        mask[:, 0] = False  # the first token has no state that predicts it
        taken_q, values = q_and_values(model, batch["input_ids"], batch["attention_mask"], mask[:, 1:],
                                       chunk_size=self.config.logp_chunk_size, temperature=self.temperature)
        per_token, rewards = iq_learn_token_losses(taken_q, values, mask, lambda_=self.lambda_, gamma=self.gamma,
                                                   temperature=self.temperature)
        count = mask.sum()
        tokens = count.clamp(min=1)
        loss = per_token.sum() / tokens
        nll = -((taken_q - values) / self.temperature * mask).sum() / tokens
        return loss, {"loss": loss.detach(), "nll": Weighted(nll.detach(), count),
                      "td/reward_mean": Weighted((rewards.sum() / tokens).detach(), count),
                      "td/reward_sq": Weighted((rewards.square().sum() / tokens).detach(), count)}


register_algorithm(AlgorithmSpec(
    "iq_learn", "sft", "prompt+completion | messages", "policy",
    "IQ-Learn as TD-regularised MLE (Wulfmeier et al. 2024, Imitating Language via Scalable Inverse RL)",
    IQLearnTask))
