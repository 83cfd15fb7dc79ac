"""Basic evaluation statistics: bootstrap intervals, win rates, pass@k, n-gram diversity, tables.

Everything here is plain numpy on small arrays (scores of a few hundred to a few thousand
completions), deterministic given `seed`, and has no knowledge of models or training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

Statistic = Callable[..., Any]
Interval = tuple[float, float, float]

# Bootstrap resamples are drawn in blocks of at most this many values, bounding memory at
# ~32 MB (float64) whatever n_resamples x n is.
_BOOTSTRAP_BLOCK = 4_000_000


def _as_1d(values: Iterable[float] | np.ndarray, name: str = "values") -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu()  # type: ignore[union-attr]
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf ({int((~np.isfinite(array)).sum())} entries)")
    return array


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    statistic: Statistic = np.mean,
) -> Interval:
    """Percentile bootstrap interval: (statistic(values), low, high).

    Draw `n_resamples` samples of size n with replacement (one (R, n) index matrix, in
    blocks), compute `statistic(sample, axis=1)` for each, and return the alpha/2 and
    1 - alpha/2 quantiles (alpha = 1 - confidence) of those R values (Efron & Tibshirani 1993,
    ch. 13). `statistic` must accept `axis=` like `np.mean` / `np.median`.

    >>> bootstrap_ci([2.0, 2.0, 2.0])
    (2.0, 2.0, 2.0)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    array = _as_1d(values)
    n = array.size
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BOOTSTRAP_BLOCK // n)
    resampled = []
    for start in range(0, n_resamples, rows_per_block):
        rows = min(rows_per_block, n_resamples - start)
        indices = rng.integers(0, n, size=(rows, n))  # (rows, n)
        resampled.append(np.asarray(statistic(array[indices], axis=1), dtype=np.float64))
    stats = np.concatenate(resampled)  # (R,)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    point = float(statistic(array))
    return point, float(low), float(high)


def paired_bootstrap_diff(
    a: Iterable[float] | np.ndarray,
    b: Iterable[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of mean(a - b) for paired samples (a[i], b[i] scored on item i).

    Resampling the per-item differences keeps the pairing, so item difficulty cancels and
    the interval is much tighter than comparing two independent intervals.
    An interval that excludes 0 means a and b differ at this confidence.

    >>> paired_bootstrap_diff([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    (2.0, 2.0, 2.0)
    """
    first, second = _as_1d(a, "a"), _as_1d(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"paired samples differ in length: {first.size} vs {second.size}")
    return bootstrap_ci(first - second, confidence=confidence, n_resamples=n_resamples, seed=seed)


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a binomial proportion: (p, low, high), p = successes / n.

        centre = (p + z^2 / 2n) / (1 + z^2 / n),
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2),

    z the 1 - alpha/2 normal quantile (Wilson 1927). Unlike the bootstrap of 0/1 values it is
    not degenerate at 0 or n successes: 0 of 20 gives (0.0, 0.0, 0.161).

    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.8, 0.4902, 0.9433]
    """
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1; got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n; got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def intervals_overlap(ci_a: Sequence[float], ci_b: Sequence[float]) -> bool:
    """True when two intervals share a point; each is (low, high) or (point, low, high).

    >>> intervals_overlap((0.5, 0.4, 0.6), (0.7, 0.6, 0.8))
    True
    >>> intervals_overlap((0.0, 1.0), (1.5, 2.0))
    False
    """
    low_a, high_a = ci_a[-2], ci_a[-1]
    low_b, high_b = ci_b[-2], ci_b[-1]
    return bool(low_a <= high_b and low_b <= high_a)


def win_rate(
    scores_a: Iterable[float] | np.ndarray,
    scores_b: Iterable[float] | np.ndarray,
    *,
    tie_tolerance: float = 0.0,
) -> float:
    """Fraction of items where A beats B, ties counting half: (wins + 0.5 ties) / N.

    Item i is a tie when |a_i - b_i| <= tie_tolerance, a win when a_i - b_i > tie_tolerance.

    >>> win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 3.95], tie_tolerance=0.1)
    0.5
    """
    first, second = _as_1d(scores_a, "scores_a"), _as_1d(scores_b, "scores_b")
    if first.shape != second.shape:
        raise ValueError(f"win_rate needs paired scores: {first.size} vs {second.size}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0; got {tie_tolerance}")
    diff = first - second
    ties = np.abs(diff) <= tie_tolerance
    wins = (diff > tie_tolerance) & ~ties
    return float((wins.sum() + 0.5 * ties.sum()) / diff.size)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", eq. 1): the chance that at least one of k samples drawn without
    replacement from n samples, c of them correct, is correct,

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),

    the product form being the paper's numerically stable one; 1 when n - c < k.

    Worked example: n = 5, c = 2: pass@1 = 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4,
    pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n; got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n; got n={n}, c={c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_counts: Iterable[int], n: int, k: int) -> float:
    """pass@k over prompts: the mean of `pass_at_k(n, c, k)` over each prompt's count c of
    correct samples out of n."""
    values = [pass_at_k(n, int(c), k) for c in correct_counts]
    if not values:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    return sum(values) / len(values)


def ngrams(texts: Iterable[str], n: int) -> list[tuple[str, ...]]:
    """All word n-grams of every text (lowercased, whitespace tokens); none cross texts."""
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.lower().split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over all texts; 0 if none.

    >>> distinct_n(["the cat sat", "the cat ran"], 1)  # 4 unique of 6 words
    0.6666666666666666
    """
    grams = ngrams(texts, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def ead(texts: Iterable[str], n: int, vocab_size: int = 50257) -> float:
    """Expectation-Adjusted Distinct-n (Liu et al. 2022, "Rethinking and Refining the
    Distinct Metric"), as used for diversity by Kirk et al. 2023.

        EAD = N_unique / E[N_unique],   E[N_unique] = V * (1 - ((V - 1) / V) ** C)

    where C is the total number of n-grams and V the vocabulary size: E[N_unique] is the
    expected number of distinct items when C tokens are drawn uniformly from V, so EAD
    removes distinct-n's bias against long texts (distinct-n falls as C grows even for
    uniformly random text). V = 50257 (GPT-2's vocabulary) is the default of Kirk et al.'s
    code. Computed as -V * expm1(C * log1p(-1/V)) for accuracy when V is large. 0 if C = 0.

    Worked example: ["a b a"], n=1, V=3: N_unique = 2, C = 3,
    E = 3 * (1 - (2/3)^3) = 3 * 19/27 = 19/9, so EAD = 2 / (19/9) = 18/19.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1; got {vocab_size}")
    grams = ngrams(texts, n)
    total = len(grams)
    if total == 0:
        return 0.0
    if vocab_size == 1:
        expected = 1.0
    else:
        expected = -vocab_size * math.expm1(total * math.log1p(-1.0 / vocab_size))
    return len(set(grams)) / expected


def _format_cell(value: Any, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return format(float(value), float_format)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, (int, float, np.number)) for v in value)
    ):  # (point, low, high) from bootstrap_ci
        point, low, high = (format(float(v), float_format) for v in value)
        return f"{point} [{low}, {high}]"
    return str(value)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def format_table(
    rows: list[dict[str, Any]],
    columns: list[str] | None = None,
    *,
    float_format: str = ".4f",
) -> str:
    """A plain-text table with aligned columns, for terminal output.

    Numbers are right-aligned, text left-aligned; floats use `float_format`; a
    (point, low, high) tuple prints as "point [low, high]"; a missing key or None prints "-".
    `columns` defaults to every key, in order of first appearance.

    >>> print(format_table([{"model": "sft", "reward": 0.25}, {"model": "dpo", "reward": 0.5}],
    ...                    ["model", "reward"]))
    model  reward
    -----  ------
    sft    0.2500
    dpo    0.5000
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format_cell(row.get(col), float_format) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[j]) for line in cells]) for j, col in enumerate(columns)]
    right = [
        bool(rows) and all(_is_numeric(row.get(col)) for row in rows if row.get(col) is not None)
        for col in columns
    ]

    def render(line: list[str]) -> str:
        parts = [
            text.rjust(width) if align_right else text.ljust(width)
            for text, width, align_right in zip(line, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    header = render(list(columns))
    separator = "  ".join("-" * width for width in widths)
    return "\n".join([header, separator] + [render(line) for line in cells])
