"""Several rewards in one online run: `--reward A --reward B --reward-weights 1,0.5`.

Each reward scores every sample; the loop trains on one scalar per sample, combined by
`--set reward_aggregation=`:

- `sum` (default; TRL's sum_then_normalize): r = sum_k w_k r_k, then the preset's advantage
  as for one reward.
- `normalize_then_sum` (GDPO, Liu et al. 2026, "Group reward-Decoupled Normalization Policy
  Optimization"; TRL's multi_objective_aggregation="normalize_then_sum"): each reward is
  normalised within its prompt group first, so a reward with a large scale cannot drown the
  others,

      z_k = (r_k - mean_group(r_k)) / (std_group(r_k) + 1e-4),   r = sum_k w_k z_k,

  std unbiased, as TRL's. GDPO then normalises r over the batch, not the group: this
  aggregation needs `--set advantage=batch_norm` (refused otherwise), which with it is
  exactly TRL's normalize_then_sum.

Every reward's raw mean is logged as `reward/NAME` (NAME: the function's name; repeated
names get _2, _3, ...).

Dense rewards (`alignkit.rewards.dense`; Fine-Grained RLHF's several reward models, each at
its own granularity, ALGORITHMS.md §1.8): when any reward is dense, `sum` adds them at their
tokens and the scalar ones on the last token,

    r_t = sum_{k dense} w_k r_{k,t} + 1[t = last] sum_{k scalar} w_k r_k,

so the per-sample sum is still sum_k w_k (sum_t r_{k,t}); reward/NAME logs each one's sum.
`normalize_then_sum` normalises one number per sample and refuses dense rewards.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from alignkit.advantages import token_level_rewards
from alignkit.rewards.dense import DenseRewards, Scores, sequence_scores

GDPO_EPS = 1e-4  # TRL's and GDPO's
REWARD_AGGREGATIONS = ("sum", "normalize_then_sum")


def reward_name(spec: Any) -> str:
    """A short name for a reward spec: `file.py:fn` / `module:fn` -> fn, `length:N` -> length,
    `vader` -> vader, a callable -> its __name__."""
    if callable(spec) and not isinstance(spec, str):
        return getattr(spec, "__name__", type(spec).__name__)
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and (head.endswith(".py") or "." in head or "/" in head) and tail.isidentifier():
        return tail
    return text.split(":", 1)[0]


def reward_names(specs: list[Any]) -> list[str]:
    """`reward_name` of each spec, repeated names numbered (_2, _3, ...)."""
    names: list[str] = []
    for spec in specs:
        base = name = reward_name(spec)
        count = 2
        while name in names:
            name, count = f"{base}_{count}", count + 1
        names.append(name)
    return names


def parse_weights(text: str | None, count: int) -> list[float]:
    """`--reward-weights 1,0.5` -> [1.0, 0.5]; None -> 1 each. Errors name the flag."""
    if text is None or str(text).strip() == "":
        return [1.0] * count
    try:
        weights = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--reward-weights {text}: expected comma-separated numbers") from None
    if len(weights) != count:
        raise ValueError(f"--reward-weights {text}: {len(weights)} weight(s) for {count} reward(s)")
    if not all(math.isfinite(weight) for weight in weights):
        raise ValueError(f"--reward-weights {text}: weights must be finite")
    return weights


def normalize_then_sum(per_reward: Tensor, weights: Tensor, group_size: int) -> Tensor:
    """GDPO's combination: (K, N) rewards, rows in prompt-major groups of `group_size` ->
    (N,) sum_k w_k (r_k - mean_g r_k) / (std_g r_k + 1e-4) (unbiased std; 0 for groups of 1)."""
    k, n = per_reward.shape
    if n % group_size:
        raise ValueError(f"{n} samples do not split into groups of {group_size}")
    grouped = per_reward.double().reshape(k, n // group_size, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    z = ((grouped - mean) / (std + GDPO_EPS)).reshape(k, n)
    return (weights.double().unsqueeze(-1) * z).sum(0).float()


class MultiReward:
    """The reward role over several reward roles (each `score(batch, prompts, completions,
    columns) -> ((N,), penalised)`), combined as the module docstring says."""

    def __init__(self, roles: list[Any], names: list[str], weights: list[float], aggregation: str,
                 group_size: int) -> None:
        if aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(f"reward_aggregation must be one of {REWARD_AGGREGATIONS}, got {aggregation!r}")
        if not len(roles) == len(names) == len(weights):
            raise ValueError("one name and one weight per reward")
        self.roles, self.names, self.aggregation, self.group_size = roles, names, aggregation, group_size
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self._pending: dict[str, list[Tensor]] = {name: [] for name in names}

    @property
    def name(self) -> str:
        return " + ".join(self.names)

    def score(self, batch, prompts, completions, columns) -> tuple[Scores, int]:
        results = [role.score(batch, prompts, completions, columns) for role in self.roles]
        penalised = sum(count for _, count in results)
        per_reward = torch.stack([sequence_scores(scores).float().reshape(-1).cpu() for scores, _ in results])  # (K, N)
        for name, scores in zip(self.names, per_reward, strict=True):
            self._pending[name].append(scores)
        dense = [name for name, (scores, _) in zip(self.names, results, strict=True) if isinstance(scores, DenseRewards)]
        if dense and self.aggregation != "sum":
            raise ValueError(f"reward {dense[0]} gives per-token rewards, but reward_aggregation={self.aggregation} "
                             "normalises one number per sample within its group: use reward_aggregation=sum")
        if dense:
            return self.dense_sum(results, batch.response_mask.cpu()), penalised
        if self.aggregation == "sum":
            combined = (self.weights.unsqueeze(-1) * per_reward).sum(0)
        else:
            combined = normalize_then_sum(per_reward, self.weights, self.group_size)
        return combined, penalised

    def dense_sum(self, results: list[tuple[Scores, int]], mask: Tensor) -> DenseRewards:
        """sum_k w_k r_{k,t}: dense rewards at their tokens, scalar ones on the last token (N, L)."""
        tokens = torch.zeros(mask.shape)
        for weight, (scores, _) in zip(self.weights.tolist(), results, strict=True):
            placed = scores.padded(mask.shape[1]).tokens.cpu() if isinstance(scores, DenseRewards) else (
                token_level_rewards(scores.float().reshape(-1).cpu(), mask))
            tokens = tokens + weight * placed
        return DenseRewards(tokens, mask.sum(-1))

    def drain(self) -> dict[str, Tensor]:
        """Every reward's raw scores since the last drain (all rounds of a step), by name, and
        whatever each reward's role logs beside its score (`FunctionReward.drain`: RLHS's
        rlhs/hindsight and rlhs/foresight)."""
        out = {name: torch.cat(parts) for name, parts in self._pending.items() if parts}
        for role in self.roles:
            drain = getattr(role, "drain", None)
            out.update(drain() if drain is not None else {})
        self._pending = {name: [] for name in self.names}
        return out


__all__ = ["REWARD_AGGREGATIONS", "MultiReward", "normalize_then_sum", "parse_weights", "reward_name", "reward_names"]
