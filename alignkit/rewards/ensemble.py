"""Reward-model ensembles (Coste et al. 2023) and the multi-head Bayesian RM (BRME, Yan et al.
2024) as reward functions.

An ensemble directory (written by `alignkit train rm_ensemble`) holds `member_{i}/`, each a
plain sequence classifier that `AutoModelForSequenceClassification.from_pretrained` loads, and
`ensemble.json`:

    {"members": ["member_0", ...], "aggregation": "uwo", "uwo_lambda": 0.5,
     "unbiased_variance": false, "normalization": {"mean": [...], "std": [...]}, ...}

Scoring (ALGORITHMS.md §1.4, addendum §9): member scores r_i -> z_i = (r_i - m_i) / s_i
with each member's mean/std on a reference set -> aggregate with `mean`, `wco` (min) or
`uwo` (mean - lambda Var). DEVIATION from Coste et al.'s code: the reference code combines
raw member scores (its normalisation is commented out); we z-score each member first so the
min and the variance are not dominated by whichever member happens to have the lowest
offset or the largest scale. `normalize=False` reproduces the reference behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.objectives.reward_losses import ENSEMBLE_AGGREGATIONS, brme_reward
from alignkit.rewards.base import call_reward
from alignkit.rewards.scorer import RewardModelScorer

#: Coste et al.'s reference defaults (addendum §9): k = 5, UWO lambda 0.5 (best-of-n), 0.1 (PPO)
DEFAULT_MEMBERS = 5
UWO_LAMBDA_BON = 0.5
UWO_LAMBDA_PPO = 0.1


def member_statistics(member_scores: Tensor) -> tuple[list[float], list[float]]:
    """Per-member mean and (unbiased) std over a reference set: (N, k) -> ([k], [k])."""
    values = member_scores.double()
    std = values.std(dim=0) if values.shape[0] > 1 else torch.ones(values.shape[1])
    return values.mean(dim=0).tolist(), std.clamp(min=1e-6).tolist()


class EnsembleScorer:
    """k reward models scored together and aggregated into one reward per row.

    `source`: an ensemble directory, or a list of reward callables (each
    `(prompts, completions) -> (B,)`) for ensembles built in memory. `aggregation`,
    `uwo_lambda`, `unbiased_variance` default to what `ensemble.json` says (else mean, 0.5,
    False). `means`/`stds` override the saved per-member normalisation; `normalize=False`
    aggregates raw scores (the reference code's behaviour).
    """

    def __init__(
        self,
        source: str | Path | Sequence[Callable[..., Any]],
        *,
        aggregation: str | None = None,
        uwo_lambda: float | None = None,
        unbiased_variance: bool | None = None,
        normalize: bool = True,
        means: Sequence[float] | None = None,
        stds: Sequence[float] | None = None,
        **scorer_kwargs: Any,
    ) -> None:
        manifest: dict[str, Any] = {}
        if isinstance(source, str | Path):
            directory = Path(source)
            manifest_file = directory / "ensemble.json"
            if not manifest_file.is_file():
                raise FileNotFoundError(f"{directory} has no ensemble.json: not an ensemble dir")
            manifest = json.loads(manifest_file.read_text())
            self.members: list[Callable[..., Any]] = [
                RewardModelScorer(directory / name, **scorer_kwargs) for name in manifest["members"]
            ]
            self.__name__ = f"EnsembleScorer({directory})"
        else:
            self.members = list(source)
            self.__name__ = f"EnsembleScorer({len(self.members)} members)"
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        self.aggregation = aggregation or manifest.get("aggregation", "mean")
        if self.aggregation not in ENSEMBLE_AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {sorted(ENSEMBLE_AGGREGATIONS)}; got {self.aggregation!r}"
            )
        self.uwo_lambda = float(
            uwo_lambda if uwo_lambda is not None else manifest.get("uwo_lambda", UWO_LAMBDA_BON)
        )
        self.unbiased_variance = bool(
            unbiased_variance
            if unbiased_variance is not None
            else manifest.get("unbiased_variance", False)
        )
        saved = manifest.get("normalization") or {}
        self.normalize = normalize
        self.means = torch.tensor(
            list(means if means is not None else saved.get("mean", [0.0] * len(self.members)))
        )
        self.stds = torch.tensor(
            list(stds if stds is not None else saved.get("std", [1.0] * len(self.members)))
        )
        if self.means.numel() != len(self.members) or self.stds.numel() != len(self.members):
            raise ValueError(f"need one mean and one std per member ({len(self.members)})")

    def raw_member_scores(self, prompts: list[Any], completions: list[Any]) -> Tensor:
        """Unnormalised scores of every member: (B, k)."""
        columns = [
            call_reward(member, list(prompts), list(completions)).reshape(-1)
            for member in self.members
        ]
        return torch.stack(columns, dim=-1)

    def fit_reference(self, prompts: list[Any], completions: list[Any]) -> None:
        """Set each member's normalisation to its mean/std on a reference set."""
        means, stds = member_statistics(self.raw_member_scores(prompts, completions))
        self.means, self.stds = torch.tensor(means), torch.tensor(stds)

    def member_scores(self, prompts: list[Any], completions: list[Any]) -> Tensor:
        """Member scores after per-member normalisation (when on): (B, k)."""
        scores = self.raw_member_scores(prompts, completions)
        if self.normalize:
            scores = (scores - self.means.to(scores.dtype)) / self.stds.to(scores.dtype)
        return scores

    def aggregate(self, member_scores: Tensor) -> Tensor:
        """(B, k) -> (B,) with this ensemble's aggregation."""
        if self.aggregation == "uwo":
            return ENSEMBLE_AGGREGATIONS["uwo"](
                member_scores, uwo_lambda=self.uwo_lambda, unbiased=self.unbiased_variance
            )
        return ENSEMBLE_AGGREGATIONS[self.aggregation](member_scores)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        return self.aggregate(self.member_scores(prompts, completions))


class BayesRewardScorer:
    """A BRME multi-head reward model (written by `alignkit train rm_bayes`) as a reward.

    The directory holds a sequence classifier with 2H outputs, (mu_1..mu_H, log sigma_1..
    log sigma_H), and `brme.json` {"heads": H, "lambda_": ...}. The reward is
    lambda * mu_(argmin sigma) + (1 - lambda) * min_i mu_i (`brme_reward`). The training
    lambda is read from brme.json unless `lambda_` is given. Not pinned down (addendum §8):
    the paper's head count, lambda and head-training schedule.
    """

    def __init__(
        self, directory: str | Path, *, lambda_: float | None = None, **scorer_kwargs: Any
    ):
        directory = Path(directory)
        manifest = json.loads((directory / "brme.json").read_text())
        self.heads = int(manifest["heads"])
        self.lambda_ = float(lambda_ if lambda_ is not None else manifest["lambda_"])
        self.scorer = RewardModelScorer(directory, **scorer_kwargs)
        self.__name__ = f"BayesRewardScorer({directory})"

    def head_distributions(
        self, prompts: list[Any], completions: list[Any]
    ) -> tuple[Tensor, Tensor]:
        """(means (B, H), log_stds (B, H))."""
        outputs = self.scorer.raw_scores(prompts, completions).reshape(len(completions), -1)
        return outputs[:, : self.heads], outputs[:, self.heads :]

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        means, log_stds = self.head_distributions(prompts, completions)
        return brme_reward(means, log_stds, self.lambda_)
