"""The alignment tax (Lin et al. 2024, "Mitigating the Alignment Tax of RLHF"): what alignment
costs in general capability, measured against what it buys in reward. Pure numpy, no models.

Capability is the held-out next-token negative log-likelihood (NLL) of general text, pooled
over tokens. With passage i holding n_i scored tokens whose NLLs sum to s_i:

    NLL      = sum_i s_i / sum_i n_i                (nats per token, `nll_per_token`)
    tax(m)   = NLL(m) - NLL(base)                   (> 0: the model got worse at plain text)

Passages are the independent units, so intervals resample passages (`ratio_bootstrap_ci`), and
the tax resamples the same passages for both models (`paired_ratio_diff_ci`), which cancels
passage difficulty. The trade-off between tax (lower is better) and reward (higher is better)
is summarised by its Pareto front (`pareto_front`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from alignkit.eval.stats import Interval

# Resampled index matrices are built in blocks of at most this many entries (~32 MB of int64).
_BLOCK = 4_000_000


def _as_array(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def nll_per_token(nll_sums: Iterable[float] | np.ndarray, token_counts: Iterable[float] | np.ndarray) -> float:
    """Pooled per-token NLL: sum_i s_i / sum_i n_i (every token weighs the same, so a long
    passage counts more than a short one, as in a language model's reported perplexity).

    >>> nll_per_token([6.0, 2.0], [3, 1])  # (6 + 2) / (3 + 1)
    2.0
    """
    sums, counts = _as_array(nll_sums, "nll_sums"), _as_array(token_counts, "token_counts")
    if sums.shape != counts.shape:
        raise ValueError(f"nll_sums and token_counts differ in length: {sums.size} vs {counts.size}")
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError("token_counts must be >= 0 with a positive total")
    return float(sums.sum() / counts.sum())


def _resampled_ratios(
    pairs: list[tuple[np.ndarray, np.ndarray]], n_resamples: int, seed: int
) -> np.ndarray:
    """(len(pairs), R): sum(num[idx]) / sum(den[idx]) of each (num, den) pair for R index draws
    shared by every pair (so the pairs stay matched item by item)."""
    n = pairs[0][0].size
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BLOCK // n)
    out = []
    for start in range(0, n_resamples, rows_per_block):
        rows = min(rows_per_block, n_resamples - start)
        indices = rng.integers(0, n, size=(rows, n))  # (rows, n)
        out.append(np.stack([num[indices].sum(1) / np.maximum(den[indices].sum(1), 1e-300)
                             for num, den in pairs]))  # (pairs, rows)
    return np.concatenate(out, axis=1)


def _check_bootstrap(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")


def ratio_bootstrap_ci(
    numerators: Iterable[float] | np.ndarray,
    denominators: Iterable[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of a ratio of sums, R = sum_i a_i / sum_i b_i, over items i:
    (R, low, high). Each resample draws n items with replacement and keeps a_i with its b_i
    (a passage's NLL sum with its own token count).

    >>> ratio_bootstrap_ci([2.0, 4.0], [1.0, 2.0])  # every resample has R = 2
    (2.0, 2.0, 2.0)
    """
    _check_bootstrap(confidence, n_resamples)
    num, den = _as_array(numerators, "numerators"), _as_array(denominators, "denominators")
    if num.shape != den.shape:
        raise ValueError(f"numerators and denominators differ in length: {num.size} vs {den.size}")
    point = nll_per_token(num, den)
    ratios = _resampled_ratios([(num, den)], n_resamples, seed)[0]
    alpha = 1.0 - confidence
    low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)


def paired_ratio_diff_ci(
    num_a: Iterable[float] | np.ndarray,
    den_a: Iterable[float] | np.ndarray,
    num_b: Iterable[float] | np.ndarray,
    den_b: Iterable[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Bootstrap of R_a - R_b, R = sum num / sum den, with both ratios computed on the SAME
    resampled items (the NLL increase of model a over model b on the same passages): an
    interval that excludes 0 means the two models differ on this text. The denominators may
    differ (two tokenizers cut a passage into different token counts).

    >>> paired_ratio_diff_ci([3.0, 6.0], [1.0, 2.0], [2.0, 4.0], [1.0, 2.0])  # 3 - 2 always
    (1.0, 1.0, 1.0)
    """
    _check_bootstrap(confidence, n_resamples)
    arrays = [_as_array(v, name) for v, name in ((num_a, "num_a"), (den_a, "den_a"), (num_b, "num_b"),
                                                 (den_b, "den_b"))]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"paired items differ in length: {[a.size for a in arrays]}")
    point = nll_per_token(arrays[0], arrays[1]) - nll_per_token(arrays[2], arrays[3])
    ratios = _resampled_ratios([(arrays[0], arrays[1]), (arrays[2], arrays[3])], n_resamples, seed)
    diffs = ratios[0] - ratios[1]
    alpha = 1.0 - confidence
    low, high = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)


def pareto_front(costs: Iterable[float], rewards: Iterable[float]) -> list[bool]:
    """Which points are Pareto-optimal when the cost (the tax) should be low and the reward
    high: point i is on the front unless some j is at least as good on both and strictly
    better on one (cost_j <= cost_i, reward_j >= reward_i, one of them strict). Equal points
    are all on the front.

    Worked example: (cost, reward) = (0, 0), (1, 2), (2, 1), (3, 3): (2, 1) is dominated by
    (1, 2), so the front is [True, True, False, True].
    """
    cost, reward = _as_array(list(costs), "costs"), _as_array(list(rewards), "rewards")
    if cost.shape != reward.shape:
        raise ValueError(f"costs and rewards differ in length: {cost.size} vs {reward.size}")
    no_worse = (cost[None, :] <= cost[:, None]) & (reward[None, :] >= reward[:, None])  # [i, j]: j vs i
    better = (cost[None, :] < cost[:, None]) | (reward[None, :] > reward[:, None])
    return [not bool(row.any()) for row in no_worse & better]


def short_names(names: list[str]) -> list[str]:
    """The shortest distinct trailing path parts of each model name, for plot labels (a
    trailing `final` keeps its parent): "smollm2-135m" stays itself.

    >>> short_names(["runs/a/final", "/x/alpha-0.5", "/y/alpha-0.5", "base"])
    ['a/final', 'x/alpha-0.5', 'y/alpha-0.5', 'base']
    """
    parts = [[p for p in name.replace("\\", "/").split("/") if p] or [name] for name in names]
    # a run's generic `final` directory says nothing alone: keep the run's name with it
    depth = {i: min(len(p), 2 if p[-1] == "final" else 1) for i, p in enumerate(parts)}
    while True:
        labels = ["/".join(p[-depth[i]:]) for i, p in enumerate(parts)]
        clashes = {i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])}
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


def summarise_tax(
    measurements: list[dict],
    categories: list[str],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> list[dict]:
    """One row per model from its raw measurements, the first model being the base.

    `measurements[m]`: {"name", "nll_sums" (P,), "tokens" (P,), "chars" (P,), "rewards" (Q,)}
    over the same P passages (`categories[p]` names passage p's category) and Q prompts. Each
    row: nll [ci], nll_per_char, tokens, nll_increase [ci] over the base (paired over passages),
    nll_by_category, reward [ci] (mean over prompts), reward_increase [ci] (paired over prompts),
    and, with 3+ models, `pareto` (on the front of low nll_increase and high reward).
    """
    from alignkit.eval.stats import bootstrap_ci, paired_bootstrap_diff

    if not measurements:
        raise ValueError("summarise_tax needs at least one model")
    base = measurements[0]
    kwargs = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    rows = []
    for m in measurements:
        sums, tokens = np.asarray(m["nll_sums"], float), np.asarray(m["tokens"], float)
        nll, low, high = ratio_bootstrap_ci(sums, tokens, **kwargs)
        increase = paired_ratio_diff_ci(sums, tokens, base["nll_sums"], base["tokens"], **kwargs)
        reward = bootstrap_ci(m["rewards"], **kwargs)
        reward_gain = paired_bootstrap_diff(m["rewards"], base["rewards"], **kwargs)
        by_category = {c: nll_per_token(sums[[k == c for k in categories]], tokens[[k == c for k in categories]])
                       for c in dict.fromkeys(categories)}
        rows.append({
            "name": m["name"], "nll": nll, "nll_ci_low": low, "nll_ci_high": high,
            "nll_per_char": float(sums.sum() / np.sum(m["chars"])), "tokens": int(tokens.sum()),
            "nll_increase": increase[0], "nll_increase_ci_low": increase[1], "nll_increase_ci_high": increase[2],
            "nll_by_category": by_category,
            "reward": reward[0], "reward_ci_low": reward[1], "reward_ci_high": reward[2],
            "reward_increase": reward_gain[0], "reward_increase_ci_low": reward_gain[1],
            "reward_increase_ci_high": reward_gain[2],
        })
    if len(rows) >= 3:
        front = pareto_front([r["nll_increase"] for r in rows], [r["reward"] for r in rows])
        for row, on_front in zip(rows, front, strict=True):
            row["pareto"] = on_front
    return rows
