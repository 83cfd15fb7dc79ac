"""Evaluation statistics: bootstrap intervals, win rate, distinct-n / EAD, table formatting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.eval import (
    bootstrap_ci,
    distinct_n,
    ead,
    format_table,
    intervals_overlap,
    mean_pass_at_k,
    ngrams,
    paired_bootstrap_diff,
    pass_at_k,
    wilson_interval,
    win_rate,
)

# ---------------------------------------------------------------- wilson


def test_wilson_interval_worked_examples():
    """8 of 10, z = 1.95996: centre = (0.8 + 0.19208) / 1.38415 = 0.71674, half = 1.41601 x
    sqrt(0.016 + 0.009604) = 0.22658 -> (0.4902, 0.9433). 0 of 20: centre = half = 0.08057,
    so (0, 0, 0.1611), not the bootstrap's degenerate (0, 0, 0)."""
    assert wilson_interval(8, 10) == pytest.approx((0.8, 0.49016, 0.94332), abs=1e-5)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.0, 0.16113), abs=1e-5)
    point, low, high = wilson_interval(20, 20)
    assert (point, high) == (1.0, 1.0) and low == pytest.approx(1 - 0.16113, abs=1e-5)
    assert wilson_interval(5, 10, confidence=0.5)[2] < wilson_interval(5, 10)[2]


@pytest.mark.parametrize("args", [(0, 0), (3, 2), (-1, 5)])
def test_wilson_interval_rejects_impossible_counts(args):
    with pytest.raises(ValueError, match="wilson_interval"):
        wilson_interval(*args)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_constant_array_has_zero_width():
    point, low, high = bootstrap_ci(np.full(50, 0.25))
    assert point == pytest.approx(0.25)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_bootstrap_normal_sample_width_matches_theory():
    """n = 400, sigma = 2: the 95% interval of the mean is about 2 * 1.96 * 2 / 20 = 0.392 wide."""
    rng = np.random.default_rng(123)
    sample = rng.normal(loc=3.0, scale=2.0, size=400)
    point, low, high = bootstrap_ci(sample, n_resamples=4000, seed=1)
    assert low < 3.0 < high
    assert low < point < high
    expected_width = 2 * 1.96 * sample.std(ddof=1) / math.sqrt(sample.size)
    assert (high - low) == pytest.approx(expected_width, rel=0.15)
    assert expected_width == pytest.approx(2 * 1.96 * 2.0 / 20.0, rel=0.15)


def test_bootstrap_is_reproducible_and_seed_dependent():
    sample = np.random.default_rng(0).exponential(size=100)
    assert bootstrap_ci(sample, seed=7) == bootstrap_ci(sample, seed=7)
    assert bootstrap_ci(sample, seed=7) != bootstrap_ci(sample, seed=8)


def test_bootstrap_confidence_and_statistic():
    sample = np.random.default_rng(0).normal(size=200)
    _, low90, high90 = bootstrap_ci(sample, confidence=0.90)
    _, low99, high99 = bootstrap_ci(sample, confidence=0.99)
    assert low99 < low90 < high90 < high99
    point, low, high = bootstrap_ci([1.0, 2.0, 3.0, 100.0], statistic=np.median)
    assert point == 2.5 and 1.0 <= low <= high <= 100.0


def test_bootstrap_blocks_match_one_shot(monkeypatch):
    """Drawing resamples in blocks consumes the generator identically to one big draw."""
    import alignkit.eval.stats as stats

    sample = np.random.default_rng(3).normal(size=30)
    whole = bootstrap_ci(sample, n_resamples=500, seed=4)
    monkeypatch.setattr(stats, "_BOOTSTRAP_BLOCK", 30 * 7)  # 7 rows per block
    assert bootstrap_ci(sample, n_resamples=500, seed=4) == pytest.approx(whole)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=95)


def test_paired_bootstrap_diff():
    """a = b + 0.1 + small noise: the paired interval is narrow around 0.1 and excludes 0,
    while the unpaired intervals of a and b overlap (item difficulty dominates)."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(scale=1.0, size=300)
    b = difficulty
    a = difficulty + 0.1 + rng.normal(scale=0.05, size=300)
    point, low, high = paired_bootstrap_diff(a, b)
    assert point == pytest.approx(np.mean(a - b))
    assert 0.0 < low < 0.1 < high < 0.12
    assert intervals_overlap(bootstrap_ci(a), bootstrap_ci(b))
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap_diff([1.0, 2.0], [1.0])


def test_intervals_overlap():
    assert intervals_overlap((0.0, 1.0), (1.0, 2.0))  # touching counts
    assert not intervals_overlap((0.0, 0.9), (1.0, 2.0))
    assert intervals_overlap((0.5, 0.0, 3.0), (1.0, 2.0))  # containment, mixed forms
    assert not intervals_overlap((5.0, 4.0, 6.0), (1.0, 0.0, 2.0))


# ---------------------------------------------------------------- win rate


def test_win_rate_with_ties():
    """wins: items 0, 3 ; tie: item 1 ; loss: item 2 -> (2 + 0.5) / 4 = 0.625."""
    assert win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 4.0]) == 0.625
    # with tolerance 1.0 every item is a tie -> 0.5
    assert win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 4.0], tie_tolerance=1.0) == 0.5
    assert win_rate([3.0], [1.0]) == 1.0 and win_rate([1.0], [3.0]) == 0.0
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=30))
def test_win_rate_is_antisymmetric(pairs):
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    assert 0.0 <= win_rate(a, b) <= 1.0


# ---------------------------------------------------------------- diversity


def test_ngrams_stay_inside_each_text():
    assert ngrams(["A b c", "d E"], 2) == [("a", "b"), ("b", "c"), ("d", "e")]
    assert ngrams(["one"], 2) == []


def test_distinct_n_hand_counted():
    texts = ["The cat sat on the mat", "the cat ran"]
    # unigrams: the cat sat on the mat the cat ran -> 9 total ; unique {the cat sat on mat ran} = 6
    assert distinct_n(texts, 1) == pytest.approx(6 / 9)
    # bigrams: (the cat)(cat sat)(sat on)(on the)(the mat) + (the cat)(cat ran) -> 7 total, 6 unique
    assert distinct_n(texts, 2) == pytest.approx(6 / 7)
    assert distinct_n(["same same same"], 1) == pytest.approx(1 / 3)
    assert distinct_n(["short"], 3) == 0.0


def test_ead_hand_counted():
    """["a b a"], n = 1, V = 3: unique 2, C = 3, E = 3 (1 - (2/3)^3) = 19/9 -> EAD = 18/19."""
    assert ead(["a b a"], 1, vocab_size=3) == pytest.approx(18 / 19)
    texts = ["The cat sat on the mat", "the cat ran"]
    # unigrams: unique 6, C = 9, V = 10: E = 10 (1 - 0.9^9)
    assert ead(texts, 1, vocab_size=10) == pytest.approx(6 / (10 * (1 - 0.9**9)))
    assert ead(["x"], 2, vocab_size=10) == 0.0


def test_ead_approaches_distinct_n_for_huge_vocab():
    """V >> C: V (1 - (1 - 1/V)^C) -> C, so EAD -> unique / C = distinct-n."""
    texts = ["a b c a b", "c d e"]
    assert ead(texts, 1, vocab_size=10**12) == pytest.approx(distinct_n(texts, 1), rel=1e-6)
    assert ead(texts, 1) > distinct_n(texts, 1)  # default V = 50257: slightly above


def test_ead_removes_length_bias_of_distinct_n():
    """Uniform random tokens from V: distinct-n falls with length, EAD stays near 1."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(500)]
    short = [" ".join(rng.choice(vocab, size=100))]
    long = [" ".join(rng.choice(vocab, size=2000))]
    assert distinct_n(long, 1) < 0.5 * distinct_n(short, 1)
    assert ead(short, 1, vocab_size=500) == pytest.approx(1.0, abs=0.08)
    assert ead(long, 1, vocab_size=500) == pytest.approx(1.0, abs=0.08)


# ---------------------------------------------------------------- table


def test_format_table_aligns_columns():
    rows = [
        {"model": "sft", "gold reward": 0.1234567, "n": 64, "win rate": (0.5, 0.4, 0.6)},
        {"model": "dpo-beta0.1", "gold reward": -0.25, "n": 128},
    ]
    table = format_table(rows, ["model", "gold reward", "n", "win rate"])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "gold", "reward", "n", "win", "rate"]
    assert set(lines[1]) <= {"-", " "}
    assert "0.1235" in lines[2] and "0.5000 [0.4000, 0.6000]" in lines[2]
    assert lines[3].rstrip().endswith("-")  # missing value
    # numeric columns are right-aligned: the numbers end at the same column
    assert lines[2].index("0.1235") + 6 == lines[3].index("-0.2500") + 7
    assert lines[2].index("  64") + 4 == lines[3].index("128") + 3
    assert format_table([], ["a"]).splitlines()[0] == "a"
    assert format_table([{"x": 1}, {"y": True}]).splitlines()[0].split() == ["x", "y"]


def test_pass_at_k_worked_examples():
    """n = 5 samples, c = 2 correct: pass@1 = 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4;
    pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7; none correct: 0; n - c < k: 1 (every draw of
    k samples holds a correct one)."""
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # two prompts: (0.4 + pass@1 of n=5, c=5 = 1) / 2
    assert mean_pass_at_k([2, 5], 5, 1) == pytest.approx(0.7)


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
@settings(max_examples=200, deadline=None)
def test_pass_at_k_equals_the_binomial_formula(nck):
    """The product form equals 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1), is in [0, 1]
    and grows with k; pass@1 = c / n."""
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert 0.0 <= pass_at_k(n, c, k) <= 1.0
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k) - 1e-12


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError, match="at least one prompt"):
        mean_pass_at_k([], 2, 1)
