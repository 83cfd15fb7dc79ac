"""PF-PPO's filter selection by R² (alignkit.eval.policy_filter): the linear fit's worked
example and identities, the filters per prompt group, and their R² table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.eval.policy_filter import (
    FILTERS,
    filter_r2,
    group_by_prompt,
    kept_rows,
    linear_fit,
)


def test_linear_fit_worked_example():
    """x = (0, 1, 2, 3), y = (1, 3, 2, 5): mean x 1.5, mean y 2.75, S_xx = 5, S_yy = 8.75,
    S_xy = (-1.5)(-1.75) + (-0.5)(0.25) + (0.5)(-0.75) + (1.5)(2.25) = 5.5
    slope = 5.5 / 5 = 1.1 ; intercept = 2.75 - 1.1 * 1.5 = 1.1
    fitted (1.1, 2.2, 3.3, 4.4) ; residuals (-0.1, 0.8, -1.3, 0.6) ; SS_res = 2.7
    R² = 1 - 2.7 / 8.75 = 0.691429 ; r = 5.5 / sqrt(5 * 8.75) = 0.831522"""
    fit = linear_fit([0, 1, 2, 3], [1, 3, 2, 5])
    assert fit.n == 4 and fit.note is None
    assert fit.slope == pytest.approx(1.1, rel=1e-12)
    assert fit.intercept == pytest.approx(1.1, rel=1e-12)
    assert fit.r2 == pytest.approx(1 - 2.7 / 8.75, rel=1e-12)
    assert fit.pearson == pytest.approx(5.5 / math.sqrt(43.75), rel=1e-12)


def test_linear_fit_matches_numpy_and_r2_is_pearson_squared():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50)
    y = 0.7 * x + rng.normal(size=50)
    fit = linear_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    assert fit.slope == pytest.approx(slope, rel=1e-10)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10)
    assert fit.pearson == pytest.approx(r, rel=1e-10)
    assert fit.r2 == pytest.approx(r**2, rel=1e-10)


def test_linear_fit_exact_line_and_negative_slope():
    """y = 3 - 2x exactly: R² = 1, r = -1, slope -2, intercept 3."""
    fit = linear_fit([1.0, 2.0, 4.0], [1.0, -1.0, -5.0])
    assert (fit.slope, fit.intercept) == pytest.approx((-2.0, 3.0), rel=1e-12)
    assert fit.r2 == pytest.approx(1.0, rel=1e-12) and fit.pearson == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.parametrize(
    "rewards, scores, needle",
    [
        ([0.1, 0.2, 0.3], [0.1, 0.1, 0.1], "true score is constant"),
        ([0.5, 0.5, 0.5], [0.0, 1.0, 0.5], "reward is constant"),
        ([0.5], [1.0], "at least 2"),
        ([], [], "at least 2"),
    ],
)
def test_linear_fit_undefined_cases_are_nan_with_a_note(rewards, scores, needle):
    fit = linear_fit(rewards, scores)
    assert math.isnan(fit.r2) and math.isnan(fit.pearson)
    assert needle in fit.note


def test_linear_fit_constant_score_still_fits_the_flat_line():
    """y = 0.1 everywhere: the best line is y = 0.1 (slope 0), even though R² is 0/0."""
    fit = linear_fit([0.1, 0.2, 0.3], [0.1, 0.1, 0.1])
    assert (fit.slope, fit.intercept) == (0.0, 0.1)


def test_group_by_prompt_by_value_in_first_seen_order():
    chat = [{"role": "user", "content": "hi"}]
    prompts = ["a", "b", "a", list(chat), "c", [dict(chat[0])], "b"]
    assert group_by_prompt(prompts) == [[0, 2], [1, 6], [3, 5], [4]]


REWARDS = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.7])
GROUPS = [[0, 1, 2], [3, 4], [5]]


def test_filters_worked_example():
    """rewards (0.1, 0.9, 0.5 | 0.3, 0.2 | 0.7): best of each group 1, 3, 5; worst 0, 4 (the
    lone sample 5 has no second)."""
    assert kept_rows("all", REWARDS, GROUPS) == [0, 1, 2, 3, 4, 5]
    assert kept_rows("best_of_n", REWARDS, GROUPS) == [1, 3, 5]
    assert kept_rows("best_worst", REWARDS, GROUPS) == [0, 1, 3, 4, 5]
    kept = kept_rows("best_random", REWARDS, GROUPS, seed=0)
    assert {1, 3, 5} <= set(kept) and len(kept) == 5
    assert len(set(kept) & {0, 2}) == 1 and 4 in kept  # one other of group 1; group 2's only other


def test_best_random_is_seeded_and_draws_every_other_sample():
    rewards = np.array([0.0, 1.0, 0.2, 0.4])
    groups = [[0, 1, 2, 3]]
    assert kept_rows("best_random", rewards, groups, seed=5) == kept_rows("best_random", rewards, groups, seed=5)
    drawn = {i for seed in range(60) for i in kept_rows("best_random", rewards, groups, seed=seed) if i != 1}
    assert drawn == {0, 2, 3}  # the best (1) is never drawn as "the other"


def test_ties_keep_the_first_best_and_a_distinct_worst():
    rewards = np.array([0.5, 0.5, 0.5])
    assert kept_rows("best_of_n", rewards, [[0, 1, 2]]) == [0]
    assert kept_rows("best_worst", rewards, [[0, 1, 2]]) == [0, 1]


def test_filter_r2_worked_example():
    """Four prompts of two samples; the best of each has (reward, score) = the linear-fit
    worked example (0, 1), (1, 3), (2, 2), (3, 5), each worst has reward best - 10 and score 0.
    best_of_n -> R² 0.691429, slope 1.1, intercept 1.1; best_worst keeps all 8 (groups of two);
    a fifth prompt with one sample is counted in groups_of_one."""
    best_x, best_y = [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 5.0]
    rewards, scores, prompts = [], [], []
    for k, (x, y) in enumerate(zip(best_x, best_y, strict=True)):
        rewards += [x - 10.0, x]
        scores += [0.0, y]
        prompts += [f"p{k}", f"p{k}"]
    result = filter_r2(rewards, scores, prompts, seed=0)
    assert (result["n_samples"], result["n_groups"], result["groups_of_one"]) == (8, 4, 0)
    bon = result["filters"]["best_of_n"]
    assert bon["n_kept"] == 4 and bon["note"] is None
    assert (bon["r2"], bon["slope"], bon["intercept"]) == pytest.approx((1 - 2.7 / 8.75, 1.1, 1.1), rel=1e-12)
    everything = linear_fit(rewards, scores)
    for name in ("all", "best_worst", "best_random"):  # groups of two: every filter keeps both
        assert result["filters"][name]["n_kept"] == 8
        assert result["filters"][name]["r2"] == pytest.approx(everything.r2, rel=1e-12)

    lonely = filter_r2([*rewards, 4.0], [*scores, 6.0], [*prompts, "alone"], seed=0)
    assert lonely["groups_of_one"] == 1 and lonely["filters"]["best_of_n"]["n_kept"] == 5
    for name in ("best_random", "best_worst"):
        assert "1 prompt group(s) of one sample" in lonely["filters"][name]["note"]
        assert lonely["filters"][name]["n_kept"] == 9
    assert lonely["filters"]["best_of_n"]["note"] is None and lonely["filters"]["all"]["note"] is None


def test_filter_r2_constant_score_is_nan_with_a_note_for_every_filter():
    result = filter_r2([0.1, 0.4, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0], ["a", "a", "b", "b"])
    assert set(result["filters"]) == set(FILTERS)
    for values in result["filters"].values():
        assert math.isnan(values["r2"]) and "constant" in values["note"]


def test_filter_r2_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="3 rewards, 2 scores and 3 prompts"):
        filter_r2([0.1, 0.2, 0.3], [1.0, 2.0], ["a", "a", "b"])
