"""Alignment-tax maths: pooled NLL, ratio bootstraps, the Pareto front, the per-model summary."""

import numpy as np
import pytest

from alignkit.eval.tax import (
    nll_per_token,
    paired_ratio_diff_ci,
    pareto_front,
    ratio_bootstrap_ci,
    short_names,
    summarise_tax,
)


def test_nll_per_token_pools_tokens_not_passages():
    """(6 + 1) / (3 + 1) = 1.75, while the mean of per-passage NLLs would be (2 + 1) / 2 = 1.5"""
    assert nll_per_token([6.0, 1.0], [3, 1]) == pytest.approx(1.75)


def test_nll_per_token_refuses_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        nll_per_token([1.0, 2.0], [1])
    with pytest.raises(ValueError, match="positive total"):
        nll_per_token([1.0], [0])
    with pytest.raises(ValueError, match="NaN"):
        nll_per_token([float("nan")], [1])


def test_ratio_bootstrap_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 40, size=200).astype(float)
    sums = tokens * rng.normal(3.0, 0.5, size=200)
    point, low, high = ratio_bootstrap_ci(sums, tokens, seed=1)
    assert point == pytest.approx(sums.sum() / tokens.sum())
    assert low < point < high and high - low < 0.3
    _, low_small, high_small = ratio_bootstrap_ci(sums[:20], tokens[:20], seed=1)
    assert high_small - low_small > high - low  # 10x fewer passages: a wider interval


def test_ratio_bootstrap_of_a_constant_ratio_is_degenerate():
    """every passage has s / n = 2, so every resample does too"""
    assert ratio_bootstrap_ci([2.0, 4.0, 10.0], [1.0, 2.0, 5.0]) == (2.0, 2.0, 2.0)


def test_paired_difference_cancels_passage_difficulty():
    """model a = model b + 0.1 nats on every token: the paired interval is exactly [0.1, 0.1],
    although passage difficulty (1..5 nats per token) makes each model's own interval wide"""
    tokens = np.array([10.0, 20.0, 5.0, 8.0, 12.0])
    base_sums = tokens * np.array([1.0, 5.0, 2.0, 4.0, 3.0])
    point, low, high = paired_ratio_diff_ci(base_sums + 0.1 * tokens, tokens, base_sums, tokens)
    assert (point, low, high) == pytest.approx((0.1, 0.1, 0.1))
    _, own_low, own_high = ratio_bootstrap_ci(base_sums, tokens)
    assert own_high - own_low > 1.0


def test_paired_difference_with_different_tokenisations():
    """a: 3 nats/token over 1 and 2 tokens; b: 2 nats/token over 2 and 4 tokens -> 3 - 2 = 1"""
    assert paired_ratio_diff_ci([3.0, 6.0], [1.0, 2.0], [4.0, 8.0], [2.0, 4.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="paired items differ"):
        paired_ratio_diff_ci([1.0], [1.0], [1.0, 2.0], [1.0, 1.0])


def test_pareto_front_on_hand_points():
    """(tax, reward): (0, 0) base, (1, 2), (2, 1) dominated by (1, 2), (3, 3)"""
    assert pareto_front([0, 1, 2, 3], [0, 2, 1, 3]) == [True, True, False, True]


def test_pareto_front_ties_and_strict_domination():
    """(1, 1) twice: neither strictly better, both on the front; (1, 0.5) is dominated by them
    (same tax, less reward), (2, 1) too (more tax, same reward)"""
    assert pareto_front([1, 1, 1, 2], [1, 1, 0.5, 1]) == [True, True, False, False]


def test_pareto_front_of_a_monotone_trade_off_is_everyone():
    """each step buys reward with tax, as an interpolation sweep should"""
    assert pareto_front([0.0, 0.1, 0.3, 0.6], [0.1, 0.2, 0.25, 0.4]) == [True] * 4


def test_short_names_keep_enough_of_the_path():
    assert short_names(["smollm2-135m", "runs/grpo/final", "sweep/alpha-0.5"]) == [
        "smollm2-135m", "grpo/final", "alpha-0.5"]
    assert short_names(["a/x/m", "b/x/m"]) == ["a/x/m", "b/x/m"]


def _measurement(name, per_token, rewards, tokens=(4, 6)):
    tokens = np.array(tokens, float)
    return {"name": name, "nll_sums": tokens * np.array(per_token), "tokens": tokens, "chars": [20, 30],
            "rewards": np.array(rewards, float)}


def test_summarise_tax_rows_on_hand_numbers():
    """base 2 nats/token, aligned 2.5 on both passages (+0.5); rewards base [0, 0.2], aligned
    [0.6, 0.8] (+0.6); a third model with more tax and less reward is dominated"""
    rows = summarise_tax([_measurement("base", [2.0, 2.0], [0.0, 0.2]),
                          _measurement("aligned", [2.5, 2.5], [0.6, 0.8]),
                          _measurement("worse", [3.0, 3.0], [0.1, 0.3])],
                         ["fact", "code"], n_resamples=200)
    base, aligned, worse = rows
    assert base["nll"] == pytest.approx(2.0) and base["nll_increase"] == 0.0
    assert (aligned["nll_increase"], aligned["nll_increase_ci_low"], aligned["nll_increase_ci_high"]) == \
        pytest.approx((0.5, 0.5, 0.5))
    assert aligned["reward"] == pytest.approx(0.7) and aligned["reward_increase"] == pytest.approx(0.6)
    assert aligned["nll_per_char"] == pytest.approx(2.5 * 10 / 50)
    assert aligned["nll_by_category"] == pytest.approx({"fact": 2.5, "code": 2.5})
    assert aligned["tokens"] == 10
    assert [r["pareto"] for r in rows] == [True, True, False]
    two = summarise_tax([_measurement("base", [2.0, 2.0], [0.0, 0.2]),
                         _measurement("aligned", [2.5, 2.5], [0.6, 0.8])], ["fact", "code"], n_resamples=50)
    assert all("pareto" not in r for r in two)  # a front of two points says nothing
