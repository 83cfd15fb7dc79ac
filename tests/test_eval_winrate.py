"""Win rate in both orders, ties half, position bias, and the length-controlled win rate."""

import numpy as np
import pytest
import torch

from alignkit.eval.winrate import (
    RewardJudge,
    judged_win_rate,
    length_controlled_win_rate,
    pair_outcomes,
)


class FirstPositionJudge:
    """Always prefers whatever is shown first: pure position bias."""

    def prob(self, prompts, a, b):
        return torch.ones(len(prompts))


class BiasedLengthJudge:
    """Prefers the longer response, but shows a bias toward the first position on ties."""

    def prob(self, prompts, a, b):
        return torch.tensor(
            [
                0.9 if len(x) > len(y) else (0.6 if len(x) == len(y) else 0.1)
                for x, y in zip(a, b, strict=True)
            ]
        )


def test_pair_outcomes_worked_example():
    """orders (ab, ba): (1, 0) -> A wins both = 1; (1, 1) -> position bias = 1/2;
    (0.5, 0.5) -> tie = 1/2; (0.5, 0) -> 3/4; (0, 1) -> B wins both = 0."""
    outcomes = pair_outcomes(np.array([1, 1, 0.5, 0.5, 0.0]), np.array([0, 1, 0.5, 0.0, 1.0]))
    np.testing.assert_allclose(outcomes, [1.0, 0.5, 0.5, 0.75, 0.0])


def test_position_biased_judge_gives_one_half_in_both_orders():
    prompts = ["p"] * 6
    result = judged_win_rate(FirstPositionJudge(), prompts, ["a"] * 6, ["b"] * 6)
    assert result["win_rate"] == 0.5
    assert result["first_position_rate"] == 1.0
    assert result["order_consistency"] == 0.0


def test_length_judge_with_first_position_tie_bias():
    """A longer in 2 of 4 pairs, equal in 2: wins 2, ties (biased 0.6 both orders) count half."""
    a, b = ["xxxx", "xxxx", "yy", "yy"], ["x", "x", "zz", "zz"]
    result = judged_win_rate(BiasedLengthJudge(), ["p"] * 4, a, b)
    assert result["win_rate"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert result["ties"] == pytest.approx(0.5)


def test_reward_judge_counts_ties_half_and_scores_each_text_once():
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return [float(len(c)) for c in completions]

    judge = RewardJudge(reward)
    result = judged_win_rate(judge, ["p", "q", "r"], ["aaa", "b", "cc"], ["a", "bbb", "dd"])
    assert result["win_rate"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert calls == [6]  # six distinct (prompt, text) pairs, scored once for both orders
    assert result["order_consistency"] == 1.0


def test_reward_judge_uses_the_scorer_it_is_given():
    """eval/ does not import rewards/: a caller passes its scorer (the lab passes score_safely)."""
    seen = []

    def score(fn, prompts, responses):
        seen.append(fn)
        return torch.tensor([[float(len(r)), 0.0] for r in responses])  # (B, K): first objective

    def reward(prompts, completions):
        raise AssertionError("the judge must score through `score`")

    judge = RewardJudge(reward, score=score)
    result = judged_win_rate(judge, ["p", "q"], ["aaa", "b"], ["a", "bbb"])
    assert result["win_rate"] == pytest.approx(0.5) and seen == [reward]


def test_reward_judge_default_scorer_refuses_non_finite_scores():
    def reward(prompts, completions):
        return [float("nan") if c == "bad" else 1.0 for c in completions]

    with pytest.raises(ValueError, match="non-finite score to row 1"):
        judged_win_rate(RewardJudge(reward), ["p", "q"], ["ok", "bad"], ["x", "y"])


def test_lab_reward_judge_names_the_failing_row():
    from alignkit.lab.generation_eval import safe_scores
    from alignkit.rewards import RewardError

    def reward(prompts, completions):
        if any(c == "bad" for c in completions):
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="boom"):
        judged_win_rate(
            RewardJudge(reward, score=safe_scores), ["p", "q"], ["ok", "bad"], ["x", "y"]
        )


def _planted(theta0, theta1, n, mean_shift, seed=0):
    rng = np.random.default_rng(seed)
    delta = rng.normal(loc=mean_shift, scale=20.0, size=n)  # A is longer on average
    x = np.tanh(delta / delta.std())
    p = 1 / (1 + np.exp(-(theta0 + theta1 * x)))
    outcomes = (rng.random(n) < p).astype(float)
    return outcomes, 100 + delta, np.full(n, 100.0)


def test_length_controlled_win_rate_recovers_planted_intercept():
    """y ~ Bernoulli(sigma(0.4 + 2.0 tanh(delta/s))), A longer on average: the raw win rate is
    inflated by length, the LC win rate recovers sigma(0.4) = 0.5987."""
    outcomes, len_a, len_b = _planted(0.4, 2.0, 8000, mean_shift=15.0)
    result = length_controlled_win_rate(outcomes, len_a, len_b)
    assert result["raw_win_rate"] > 0.7
    assert result["lc_win_rate"] == pytest.approx(1 / (1 + np.exp(-0.4)), abs=0.02)
    assert result["slope"] == pytest.approx(2.0, abs=0.2)
    linear = length_controlled_win_rate(outcomes, len_a, len_b, method="linear")
    assert linear["lc_win_rate"] == pytest.approx(0.5987, abs=0.04)


def test_length_controlled_win_rate_of_a_pure_length_judge_is_one_half():
    """The judge only prefers the longer answer: raw win rate ~0.8, LC ~0.5."""
    rng = np.random.default_rng(1)
    delta = rng.normal(loc=17.0, scale=20.0, size=4000)
    outcomes = (delta > 0).astype(float)  # perfectly separable: the L2 term keeps it finite
    result = length_controlled_win_rate(outcomes, delta, np.zeros_like(delta))
    assert result["raw_win_rate"] > 0.75
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=0.05)
    assert np.isfinite(result["slope"])


def test_length_controlled_degenerate_inputs():
    assert length_controlled_win_rate([1.0, 1.0], [3, 4], [1, 1])["lc_win_rate"] > 0.999
    same = length_controlled_win_rate([0.5, 1.0, 0.0], [2, 2, 2], [2, 2, 2])
    assert same["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError):
        length_controlled_win_rate([2.0], [1], [1])
