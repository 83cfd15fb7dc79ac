"""Worked examples and identities for the reward-model losses and ensemble aggregations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alignkit.objectives.reward_losses import (
    ENSEMBLE_AGGREGATIONS,
    all_pairs_bradley_terry,
    brme_bradley_terry,
    brme_reward,
    cost_model_loss,
    ensemble_uwo,
    plackett_luce,
    preference_bce,
    segment_reward_loss,
    symmetrize_preference,
)
from alignkit.objectives.reward_model import bradley_terry


def nll(x: float) -> float:
    return -math.log(1 / (1 + math.exp(-x)))


def test_plackett_luce_worked_example():
    """r = (2, 1, 0), labels (3, 2, 1): -(2 - log(e^2+e+1)) - (1 - log(e+1)) = 0.7209"""
    loss = plackett_luce(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[3.0, 2.0, 1.0]]))
    expected = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    torch.testing.assert_close(loss, torch.tensor([expected]))
    assert expected == pytest.approx(0.7209, abs=1e-4)


def test_plackett_luce_is_order_free_and_reduces_to_bt_for_two():
    scores = torch.tensor([[0.3, -1.2, 2.0]])
    labels = torch.tensor([[1.0, 0.0, 2.0]])
    permuted = plackett_luce(scores[:, [2, 0, 1]], labels[:, [2, 0, 1]])
    torch.testing.assert_close(plackett_luce(scores, labels), permuted)
    pair = plackett_luce(torch.tensor([[1.5, 0.5]]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(pair, bradley_terry(torch.tensor([1.5]), torch.tensor([0.5])))


def test_plackett_luce_equals_explicit_product_and_ignores_masked_slots():
    """-log prod_k exp(r_(k)) / sum_{j>=k} exp(r_(j)) by a plain loop; a padded slot changes nothing."""
    scores = torch.tensor([0.4, 1.1, -0.7, 0.2])
    labels = torch.tensor([2.0, 4.0, 1.0, 3.0])
    ranked = scores[labels.argsort(descending=True)]
    expected = -sum(ranked[k] - torch.logsumexp(ranked[k:], 0) for k in range(4))
    padded = torch.cat([scores, torch.tensor([99.0])]).unsqueeze(0)
    mask = torch.tensor([[True] * 4 + [False]])
    got = plackett_luce(padded, torch.cat([labels, torch.tensor([9.0])]).unsqueeze(0), mask)
    torch.testing.assert_close(got, expected.reshape(1))


def test_plackett_luce_ties_share_a_denominator():
    """labels (1, 1, 0), r = (a, b, c): Breslow -> -(a - lse(a,b,c)) - (b - lse(a,b,c)) - 0"""
    scores = torch.tensor([[0.5, 0.1, -0.3]])
    got = plackett_luce(scores, torch.tensor([[1.0, 1.0, 0.0]]))
    lse = torch.logsumexp(scores[0], 0)
    torch.testing.assert_close(got, (-(scores[0, 0] - lse) - (scores[0, 1] - lse)).reshape(1))


def test_all_pairs_worked_example_and_loop_equivalence():
    """r = (2, 1, 0): (nll(1) + nll(2) + nll(1)) / 3 = 0.2512"""
    got = all_pairs_bradley_terry(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[3.0, 2.0, 1.0]]))
    assert got.item() == pytest.approx((nll(1) + nll(2) + nll(1)) / 3, abs=1e-6)
    assert got.item() == pytest.approx(0.2512, abs=1e-4)
    torch.manual_seed(0)
    scores, labels = torch.randn(3, 4), torch.tensor([[3.0, 1, 2, 0], [1, 1, 0, 2], [0, 0, 0, 0]])
    loop = []
    for b in range(3):
        terms = [
            nll(float(scores[b, i] - scores[b, j]))
            for i, j in itertools.permutations(range(4), 2)
            if labels[b, i] > labels[b, j]
        ]
        loop.append(sum(terms) / len(terms) if terms else 0.0)
    torch.testing.assert_close(all_pairs_bradley_terry(scores, labels), torch.tensor(loop))


def test_ensemble_aggregations_worked_example():
    """r = (1, 2, 6): mean 3, min 1, UWO(0.5) = 3 - 0.5 * 14/3 = 0.6667; unbiased 3 - 3.5 = -0.5"""
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert ENSEMBLE_AGGREGATIONS["mean"](r).item() == pytest.approx(3.0)
    assert ENSEMBLE_AGGREGATIONS["wco"](r).item() == pytest.approx(1.0)
    assert ensemble_uwo(r, uwo_lambda=0.5).item() == pytest.approx(3 - 7 / 3)
    assert ensemble_uwo(r, uwo_lambda=0.5, unbiased=True).item() == pytest.approx(-0.5)
    agreeing = torch.tensor([[2.0, 2.0, 2.0]])  # no disagreement: every objective is the mean
    for fn in ENSEMBLE_AGGREGATIONS.values():
        assert fn(agreeing).item() == pytest.approx(2.0)


def test_brme_worked_examples():
    """BT on samples mu + sigma eps: 1 + 0.5 - (0 - 0.5) = 2 -> nll(2) = 0.1269.
    Reward: mu (1, 3, 2), log sigma (0.5, -1, 0), lambda 0.5 -> 0.5 * 3 + 0.5 * 1 = 2."""
    one = torch.ones(1, 1)
    loss = brme_bradley_terry(one, 0 * one, 0 * one, 0 * one, 0.5 * one, -0.5 * one)
    assert loss.item() == pytest.approx(nll(2.0), abs=1e-6)
    reward = brme_reward(
        torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[0.5, -1.0, 0.0]]), lambda_=0.5
    )
    assert reward.item() == pytest.approx(2.0)
    with pytest.raises(TypeError):
        brme_reward(torch.zeros(1, 2), torch.zeros(1, 2))  # lambda_ has no default on purpose


def test_cost_model_worked_example_and_sign_convention():
    """C_s = -1 (safe), C_u = 1 (harmful): nll(2) + nll(1) + nll(1) = 0.7535"""
    loss = cost_model_loss(
        torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([True]), torch.tensor([False])
    )
    assert loss.item() == pytest.approx(nll(2) + 2 * nll(1), abs=1e-6)
    assert loss.item() == pytest.approx(0.7535, abs=1e-4)
    # Flipping the signs of the costs (harmful < 0) is penalised more: cost > 0 means harmful.
    flipped = cost_model_loss(
        torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([True]), torch.tensor([False])
    )
    assert flipped.item() > loss.item()
    with_reg = cost_model_loss(
        torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([1]), torch.tensor([0]), reg=0.1
    )
    assert with_reg.item() == pytest.approx(loss.item() + 0.2, abs=1e-6)


def test_preference_bce_and_symmetrisation():
    """l(w,l) = 2, l(l,w) = -1: (nll(2) + nll(1)) / 2 = 0.2201; p = (0.8 + 1 - 0.4) / 2 = 0.7"""
    got = preference_bce(torch.tensor([2.0]), torch.tensor([-1.0]))
    assert got.item() == pytest.approx((nll(2) + nll(1)) / 2, abs=1e-6)
    assert symmetrize_preference(torch.tensor(0.8), torch.tensor(0.4)).item() == pytest.approx(0.7)
    p_ab, p_ba = torch.rand(5), torch.rand(5)
    torch.testing.assert_close(
        symmetrize_preference(p_ab, p_ba), 1 - symmetrize_preference(p_ba, p_ab)
    )


def test_segment_loss_worked_example_ignores_unlabelled_tokens():
    """scores 0 and 2 at segment ends with labels 1, 0: (log 2 + log(1 + e^2)) / 2 = 1.41"""
    scores = torch.tensor([[5.0, 0.0, -3.0, 2.0]])
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, False, True]])
    got = segment_reward_loss(scores, labels, mask)
    assert got.item() == pytest.approx((math.log(2) + math.log(1 + math.e**2)) / 2, abs=1e-6)
    mse = segment_reward_loss(scores, labels, mask, kind="mse")
    assert mse.item() == pytest.approx((1 + 4) / 2)


@pytest.mark.parametrize(
    "name", ["plackett_luce", "all_pairs", "cost", "brme", "preference", "segment"]
)
def test_losses_are_finite_and_differentiable(name):
    torch.manual_seed(1)
    scores = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([[2.0, 1, 0]] * 4)
    calls = {
        "plackett_luce": lambda: plackett_luce(scores, labels),
        "all_pairs": lambda: all_pairs_bradley_terry(scores, labels),
        "cost": lambda: cost_model_loss(scores[:, 0], scores[:, 1], torch.ones(4), torch.zeros(4)),
        "brme": lambda: brme_bradley_terry(
            scores, scores * 0.1, -scores, scores * 0.0, torch.randn(4, 3), torch.randn(4, 3)
        ),
        "preference": lambda: preference_bce(scores[:, 0], scores[:, 1]),
        "segment": lambda: segment_reward_loss(scores, labels.clamp(max=1), labels > 0),
    }
    loss = calls[name]()
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
