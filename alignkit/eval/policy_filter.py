"""Choosing a policy filter by R² (PF-PPO: Zhang et al. 2024, "Policy Filtration in RLHF to
Fine-Tune LLM for Code Generation"; ALGORITHMS.md §2.7).

A reward model is more reliable in some reward ranges than in others, so PF-PPO trains only on
the samples a filter keeps from each prompt's group of N. To choose the filter, take held-out
samples with a ground-truth score (e.g. unit-test pass rate), score them with the reward model,
and for each filter fit the true score linearly on the reward over the samples it keeps: the
filter whose kept samples give the highest R² is the one whose rewards are most trustworthy.

Filters, applied per prompt group (every sample of the same prompt):
  all          every sample (no filter)
  best_of_n    the highest-reward sample
  best_random  the best and one other sample drawn at random (seeded)
  best_worst   the best and the lowest-reward sample

Ties go to the first sample in file order. A group of one sample keeps it under every filter;
best_random and best_worst cannot add a second one there, and the count of such groups is
reported. Everything here is pure: arrays in, indices and numbers out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FILTERS_NEEDING_TWO = ("best_random", "best_worst")


@dataclass(frozen=True)
class LinearFit:
    """score ~ slope * reward + intercept over `n` samples, with its R², the Pearson r and,
    when some of them are undefined (NaN), a note saying why."""

    n: int
    slope: float
    intercept: float
    r2: float
    pearson: float
    note: str | None = None


def linear_fit(rewards: Any, scores: Any) -> LinearFit:
    """Least-squares line of the true score y on the reward x, and its coefficient of
    determination:

        slope = S_xy / S_xx,   intercept = mean(y) - slope mean(x),
        R² = 1 - SS_res / SS_tot,   SS_res = sum (y - slope x - intercept)²,   SS_tot = S_yy,
        r = S_xy / sqrt(S_xx S_yy)     (with an intercept, R² = r²),

    where S_ab = sum (a - mean(a)) (b - mean(b)). Undefined values are NaN, with a note: fewer
    than 2 samples (no line); a constant reward (S_xx = 0: no slope, no R²); a constant score
    (S_yy = 0: slope 0 and intercept mean(y) fit exactly, but R² and r are 0/0).

    Worked example: x = (0, 1, 2, 3), y = (1, 3, 2, 5): S_xx = 5, S_xy = 5.5, S_yy = 8.75,
    slope = 1.1, intercept = 2.75 - 1.1 * 1.5 = 1.1, SS_res = 2.7, R² = 1 - 2.7 / 8.75 =
    0.6914, r = 5.5 / sqrt(43.75) = 0.8315.

    Shapes: rewards, scores (n,).
    """
    x = np.asarray(rewards, dtype=np.float64).reshape(-1)
    y = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} rewards but {y.size} scores")
    nan = float("nan")
    if x.size < 2:
        return LinearFit(int(x.size), nan, nan, nan, nan, f"{x.size} sample(s): a line needs at least 2")
    dx, dy = x - x.mean(), y - y.mean()
    s_xx, s_xy, s_yy = float(dx @ dx), float(dx @ dy), float(dy @ dy)
    # exact equality, not a tolerance: a mean of equal floats can leave ~1e-17 residues
    constant_x, constant_y = bool(np.all(x == x[0])), bool(np.all(y == y[0]))
    if constant_x:
        return LinearFit(int(x.size), nan, nan, nan, nan, "the reward is constant: no slope, R² undefined")
    slope = s_xy / s_xx
    intercept = float(y.mean() - slope * x.mean())
    if constant_y:
        return LinearFit(int(x.size), 0.0, float(y[0]), nan, nan, "the true score is constant: R² undefined")
    residual = y - (slope * x + intercept)
    r2 = 1.0 - float(residual @ residual) / s_yy
    return LinearFit(int(x.size), slope, intercept, r2, s_xy / math.sqrt(s_xx * s_yy))


def group_by_prompt(prompts: Sequence[Any]) -> list[list[int]]:
    """Indices of the samples of each prompt, groups in order of first appearance. Prompts
    are compared by value (a conversation, a list of messages, by its JSON text).

    >>> group_by_prompt(["a", "b", "a", "c", "b"])
    [[0, 2], [1, 4], [3]]
    """
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        key = prompt if isinstance(prompt, str) else "\0" + json.dumps(prompt, sort_keys=True)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


FILTERS = {"all": "none", "best_of_n": "best_of_n", "best_random": "best_random", "best_worst": "best_worst"}
"""This report's filter names -> the training loop's `sample_filter` names (the same code keeps
the samples here and in pf_ppo: alignkit.objectives.filters)."""


def kept_rows(name: str, rewards: np.ndarray, groups: list[list[int]], seed: int = 0) -> list[int]:
    """The samples filter `name` keeps (ascending), through `filters.filter_rows`.

    Worked example: rewards (0.1, 0.9, 0.5 | 0.3, 0.2), groups [[0, 1, 2], [3, 4]]: best_of_n
    -> [1, 3]; best_worst -> [0, 1, 3, 4].
    """
    import torch

    from alignkit.objectives.filters import filter_rows

    group_index = torch.zeros(len(rewards), dtype=torch.long)
    for number, members in enumerate(groups):
        group_index[members] = number
    kept = filter_rows(FILTERS[name], torch.as_tensor(rewards, dtype=torch.float64), group_index, fraction=1.0,
                       seed=seed)
    return kept.tolist()


def filter_r2(rewards: Any, scores: Any, prompts: Sequence[Any], *, seed: int = 0) -> dict[str, Any]:
    """R² of the true score on the reward over the samples each filter in `FILTERS` keeps.

    Returns {"n_samples", "n_groups", "groups_of_one", "filters": {name: {"r2", "pearson",
    "n_kept", "slope", "intercept", "note"}}}; `groups_of_one` counts the prompts with a single
    sample (best_random and best_worst keep just that one there, and their note says so).
    Shapes: rewards, scores, prompts (n,).
    """
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not rewards.size == scores.size == len(prompts):
        raise ValueError(f"{rewards.size} rewards, {scores.size} scores and {len(prompts)} prompts")
    groups = group_by_prompt(prompts)
    singles = sum(len(group) == 1 for group in groups)
    filters = {}
    for name in FILTERS:
        kept = kept_rows(name, rewards, groups, seed)
        fit = linear_fit(rewards[kept], scores[kept])
        notes = [fit.note] if fit.note else []
        if singles and name in FILTERS_NEEDING_TWO:
            notes.append(f"{singles} prompt group(s) of one sample: kept that sample alone")
        filters[name] = {"r2": fit.r2, "pearson": fit.pearson, "n_kept": fit.n, "slope": fit.slope,
                         "intercept": fit.intercept, "note": "; ".join(notes) or None}
    return {"n_samples": int(rewards.size), "n_groups": len(groups), "groups_of_one": singles,
            "filters": filters}


def r2_table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per filter of a `filter_r2` result, for `alignkit.eval.format_table`."""
    return [{"filter": name, "R2": values["r2"], "pearson_r": values["pearson"], "kept": values["n_kept"],
             "slope": values["slope"], "intercept": values["intercept"]}
            for name, values in result["filters"].items()]
