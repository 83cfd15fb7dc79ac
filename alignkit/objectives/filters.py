"""Sample filters: which of a step's scored samples the update trains on (`--set sample_filter`).

Applied after scoring (and after DAPO's dynamic sampling), before log-probs and advantages:

| filter       | keeps, per prompt group of G samples                        | used by            |
|--------------|-------------------------------------------------------------|--------------------|
| none         | every sample                                                | most presets       |
| best_of_n    | the highest-reward sample                                   | raft, superhf, pf_ppo BoN |
| best_random  | the best and one other sample drawn uniformly               | pf_ppo (BR)        |
| best_worst   | the best and the worst sample                               | pf_ppo (BW)        |
| top_fraction | the round(N x filter_fraction) highest rewards of the batch | raft's global top 1/K |
| at_least     | every sample with reward >= filter_min_reward (maybe none)  | expert_iteration   |

PF-PPO (Zhang et al. 2024, "Policy Filtration in RLHF to Fine-Tune LLM for Code Generation")
filters per prompt, as here; verl's `compute_pf_ppo_reweight_data` takes max/min over the
whole batch instead (ALGORITHMS.md 2.7). RAFT (Dong et al. 2023) keeps the best per prompt or
the global top 1/K of the batch. Expert Iteration (Anthony et al. 2017; Havrilla et al. 2024;
Zhao et al. 2025, Echo Chamber) keeps every correct sample (`at_least` with a 0/1 reward and
threshold 1); a step where it keeps none trains nothing. Ties go to the sample generated first, so a filter is a
function of (rewards, groups, seed) only and a resumed run keeps what the first run kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

PER_GROUP_FILTERS = ("best_of_n", "best_random", "best_worst")
"""The filters that choose within each prompt's group of samples (they need group_size >= 2)."""
SAMPLE_FILTERS = ("none", *PER_GROUP_FILTERS, "top_fraction", "at_least")


def group_members(group_index: Tensor) -> list[Tensor]:
    """The rows of each group, in group order: [(G_0,), (G_1,), ...], rows ascending."""
    return [(group_index == group).nonzero().squeeze(-1) for group in torch.unique(group_index).tolist()]


def best_of_n(rewards: Tensor, group_index: Tensor) -> Tensor:
    """argmax_i r_i within each group (first on ties): (groups,) rows."""
    return torch.stack([rows[rewards[rows].argmax()] for rows in group_members(group_index)])


def best_worst(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Best row of each group and the lowest-reward row among the others (the first on ties,
    so a group of equal rewards still gives two samples; one row when the group has one
    sample); sorted."""
    kept = []
    for rows in group_members(group_index):
        best = rows[rewards[rows].argmax()]
        others = rows[rows != best]
        kept.append(int(best))
        if len(others):
            kept.append(int(others[rewards[others].argmin()]))
    return torch.tensor(sorted(kept), dtype=torch.long, device=rewards.device)


def best_random(rewards: Tensor, group_index: Tensor, generator: torch.Generator) -> Tensor:
    """Best row of each group and one of its other rows drawn uniformly (`generator`); sorted."""
    kept = []
    for rows in group_members(group_index):
        best = int(rows[rewards[rows].argmax()])
        others = [int(r) for r in rows if int(r) != best]
        kept.append(best)
        if others:
            kept.append(others[int(torch.randint(len(others), (1,), generator=generator))])
    return torch.tensor(sorted(kept), dtype=torch.long, device=rewards.device)


def top_fraction(rewards: Tensor, fraction: float) -> Tensor:
    """The max(1, round(N x fraction)) highest rewards of the whole batch (stable on ties);
    sorted rows."""
    count = max(1, round(len(rewards) * fraction))
    order = torch.sort(rewards, descending=True, stable=True).indices
    return order[:count].sort().values


def at_least(rewards: Tensor, min_reward: float) -> Tensor:
    """Rows with r_i >= min_reward, ascending; empty when no sample reaches it."""
    return (rewards >= min_reward).nonzero().squeeze(-1)


def filter_rows(name: str, rewards: Tensor, group_index: Tensor, *, fraction: float, seed: int,
                min_reward: float = 1.0) -> Tensor:
    """The rows filter `name` keeps (ascending), rewards (N,) and group_index (N,)."""
    group_index = group_index.to(rewards.device)
    if name == "none":
        return torch.arange(len(rewards), device=rewards.device)
    if name == "best_of_n":
        return best_of_n(rewards, group_index).sort().values
    if name == "best_worst":
        return best_worst(rewards, group_index)
    if name == "best_random":
        return best_random(rewards, group_index, torch.Generator().manual_seed(seed))
    if name == "top_fraction":
        return top_fraction(rewards, fraction)
    if name == "at_least":
        return at_least(rewards, min_reward)
    raise ValueError(f"unknown sample_filter {name!r}; known: {SAMPLE_FILTERS}")
