"""`rm_vpl`: Variational Preference Learning (Poddar et al. 2024; github.com/WEIRDLabUW/vpl_llm),
a reward model r(x, y, z) conditioned on a latent user vector z inferred from a few labelled
pairs of the same user (model and deviations: `alignkit.rewards.vpl`).

Data: pairwise rows with a `user` column (`--set user_column=NAME`). Every training target
(x, y_w, y_l) of user u gets `context_size` OTHER pairs of u drawn at random (vpl_llm's
context_length, default 8) as its context C; the encoder maps C to q(z | C) = N(mu, s^2), a
reparameterised z conditions the reward head, and the loss is the negative ELBO

    L = mean_i -log sigma(r(x_i, y_w, z_i) - r(x_i, y_l, z_i)) + kl_weight * mean_i KL(q(z | C_i) || N(0, I))

(`gaussian_kl_standard_normal`; kl_weight default 0.01 = vpl_llm's kl_loss_weight, on our
per-example KL). The backbone is frozen: e(x, y) are its mean-pooled last hidden states,
computed once (vpl_llm's `fixed_llm_embeddings` mode); the encoder and the reward head train
by `train_pairwise` (AdamW, --lr default 1e-3, checkpoints, --resume; the stream of context
and z draws is checkpointed, so a resumed run equals an uninterrupted one). Defaults latent_dim=64,
hidden_dim=256: vpl_llm's defaults are 512/512 with the comment "todo: 64/256".

Held-out evaluation (--eval-data, rows with the same user column): for every pair of a user,
a context of `context_size` of that user's OTHER held-out pairs, chosen at random or, with
`query_selection=active`, the ones with the largest I(y; z) (`select_queries`, the paper's
active query selection: chosen before their labels are used); z = mu(context). Metrics:
eval/rewards/accuracies (with context), eval/rewards/accuracies_no_context (z = 0, the prior
mean) and both per user (eval/users/NAME/...).

final/ holds the frozen backbone, vpl.safetensors (encoder, reward head and the training users'
posteriors for active selection) and vpl_rm.json; `--reward rm:DIR,user_context=FILE` scores
for the user whose labelled pairs FILE holds (`VariationalRewardScorer`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.objectives.reward_losses import gaussian_kl_standard_normal
from alignkit.rewards.vpl import (
    VariationalPreferenceModel,
    mean_pooled_embeddings,
    save_vpl,
    select_queries,
)
from alignkit.training.offline.reward import register_reward_algorithms
from alignkit.training.offline.reward_runners import _Runner, pair_columns, train_pairwise

log = logging.getLogger("alignkit")
VPL_LR = 1e-3
QUERY_SELECTIONS = ("random", "active")


@dataclass
class VariationalRewardTask(_Runner):
    """VPL on frozen backbone features (see the module docstring)."""

    def __post_init__(self) -> None:
        self._resolve_hparams("rm_vpl", {"context_size": 8, "kl_weight": 0.01, "latent_dim": 64,
                                         "hidden_dim": 256, "query_selection": "random", "user_column": "user"})
        h = self.hparams
        if int(h["context_size"]) < 1 or float(h["kl_weight"]) < 0 or int(h["latent_dim"]) < 1 or int(h["hidden_dim"]) < 1:
            raise ValueError("rm_vpl: context_size, latent_dim and hidden_dim must be >= 1 and kl_weight >= 0")
        if h["query_selection"] not in QUERY_SELECTIONS:
            raise ValueError(f"rm_vpl: query_selection must be one of {QUERY_SELECTIONS}, got {h['query_selection']!r}")

    def _users(self, table, role: str) -> dict[Any, list[int]]:
        """Row indices per user; a row without the user column, or a user with fewer than
        context_size + 1 pairs, is a one-line error."""
        column, need = self.hparams["user_column"], int(self.hparams["context_size"]) + 1
        users: dict[Any, list[int]] = defaultdict(list)
        for i, row in enumerate(table.rows):
            if row.get(column) is None:
                raise table.error(i, f"rm_vpl needs a {column!r} column (who labelled the pair)")
            users[str(row[column])].append(i)
        for user, rows in users.items():
            if len(rows) < need:
                raise ValueError(f"{table.source}: user {user!r} has {len(rows)} {role} pairs; rm_vpl needs at least "
                                 f"context_size + 1 = {need} per user (--set context_size=... lowers it)")
        return users

    def run(self, model=None, tokenizer=None, data=None, eval_data=None, callbacks=()):
        from alignkit.models import save_pretrained_merged
        from alignkit.training.run.seed import seed_everything

        run_dir, c, h = self._begin(), self.config, self.hparams
        seed_everything(c.seed)
        table = self._table(data if data is not None else c.data, "training")
        users = self._users(table, "training")
        model, tokenizer = self._load(model, tokenizer, num_labels=1)
        scorer = self._scorer(model, tokenizer)
        prompts, chosen, rejected = pair_columns(table)
        chosen_x, rejected_x = mean_pooled_embeddings(scorer, prompts, chosen), mean_pooled_embeddings(scorer, prompts, rejected)
        vpl = VariationalPreferenceModel(chosen_x.shape[1], int(h["latent_dim"]), int(h["hidden_dim"])).train()
        user_of = [str(row[h["user_column"]]) for row in table.rows]
        context_size, kl_weight = int(h["context_size"]), float(h["kl_weight"])
        generator = torch.Generator().manual_seed(c.seed + 1)

        def contexts(indices: Tensor) -> Tensor:
            """(B, C) row indices: C other pairs of each target's user, drawn at random."""
            picked = []
            for i in indices.tolist():
                pool = [j for j in users[user_of[i]] if j != i]
                order = torch.randperm(len(pool), generator=generator)[:context_size]
                picked.append([pool[k] for k in order.tolist()])
            return torch.tensor(picked)

        def pair_scores(indices: Tensor):
            context = contexts(indices)
            mean, log_var = vpl.posterior(chosen_x[context], rejected_x[context])
            z = vpl.sample(mean, log_var, generator)
            kl = gaussian_kl_standard_normal(mean, log_var).mean()
            return vpl.reward(chosen_x[indices], z), vpl.reward(rejected_x[indices], z), {"kl": kl_weight * kl}

        writer, checkpoint = self._open_writer(run_dir)
        last = train_pairwise(list(vpl.parameters()), pair_scores, len(chosen_x), c, lr=self.user_lr or VPL_LR,
                              seed=c.seed, writer=writer, run_dir=run_dir, checkpoint=checkpoint, callbacks=callbacks,
                              generators={"contexts": generator})
        writer.close()
        vpl.eval()
        with torch.no_grad():  # the training users' posteriors, 4 random contexts each
            draws = torch.cat([contexts(torch.tensor([rows[0]] * 4)) for rows in users.values()])
            mean, log_var = vpl.posterior(chosen_x[draws], rejected_x[draws])
        population = torch.stack([mean, log_var], dim=1)  # (P, 2, L)
        final = save_pretrained_merged(model, tokenizer, run_dir / "final")
        save_vpl(vpl, population, final, {
            "context_size": context_size, "kl_weight": kl_weight, "training_users": len(users),
            "max_length": c.max_length, "max_prompt_length": c.max_prompt_length, "chat_template": c.chat_template,
            "embeddings": "backbone last hidden state, mean over prompt + response tokens (frozen)",
            "note": "score with --reward rm:DIR,user_context=FILE (that user's labelled pairs)"})
        eval_metrics = self._per_user_accuracy(eval_data, vpl, scorer, population)
        return self._result(run_dir, last, eval_metrics, tokenizer)

    def _per_user_accuracy(self, eval_data: Any, vpl: VariationalPreferenceModel, scorer, population: Tensor
                           ) -> dict[str, float]:
        """Held-out accuracy per user with a context of its other held-out pairs (random or
        active) and without context (z = 0); see the module docstring."""
        if eval_data is None and not self.config.eval_data:
            return {}
        table = self._table(eval_data if eval_data is not None else self.config.eval_data, "evaluation")
        users = self._users(table, "held-out")
        prompts, chosen, rejected = pair_columns(table)
        chosen_x, rejected_x = mean_pooled_embeddings(scorer, prompts, chosen), mean_pooled_embeddings(scorer, prompts, rejected)
        k, generator = int(self.hparams["context_size"]), torch.Generator().manual_seed(self.config.seed + 2)
        metrics, right, right_prior, total = {}, 0, 0, 0
        with torch.no_grad():
            for user, rows in users.items():
                if self.hparams["query_selection"] == "active":
                    ranked = [rows[j] for j in select_queries(vpl, chosen_x[rows], rejected_x[rows], population,
                                                              len(rows), seed=self.config.seed)]
                contexts = []
                for i in rows:
                    if self.hparams["query_selection"] == "active":
                        contexts.append([j for j in ranked if j != i][:k])
                    else:
                        pool = [j for j in rows if j != i]
                        contexts.append([pool[m] for m in torch.randperm(len(pool), generator=generator)[:k].tolist()])
                context, target = torch.tensor(contexts), torch.tensor(rows)
                mean, _ = vpl.posterior(chosen_x[context], rejected_x[context])
                with_context = vpl.reward(chosen_x[target], mean) > vpl.reward(rejected_x[target], mean)
                prior = torch.zeros_like(mean)
                without = vpl.reward(chosen_x[target], prior) > vpl.reward(rejected_x[target], prior)
                metrics[f"eval/users/{user}/accuracies"] = float(with_context.float().mean())
                metrics[f"eval/users/{user}/accuracies_no_context"] = float(without.float().mean())
                right, right_prior, total = right + int(with_context.sum()), right_prior + int(without.sum()), total + len(rows)
        metrics["eval/rewards/accuracies"] = right / total
        metrics["eval/rewards/accuracies_no_context"] = right_prior / total
        return metrics


def _register() -> None:
    register_reward_algorithms([
        (
            "rm_vpl",
            "prompt+chosen+rejected+user",
            "frozen backbone + VPL encoder + latent-conditioned reward head",
            "Variational Preference Learning, personalised RM (Poddar et al. 2024)",
            VariationalRewardTask,
        ),
    ])


_register()
