"""Worked examples for the A-LoL, C-RLFT and IFT losses and the A-LoL value-head fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.objectives.alol import (
    ALOL,
    alol,
    alol_kl,
    alol_ref_free,
    alol_seq,
    fit_value_head,
    r_squared,
)
from alignkit.objectives.crlft import crlft
from alignkit.objectives.ift import discounted_cumsum_right, ift, relation_propagation_weights

# two examples, two response tokens each (position 0 is the prompt)
TOKENS = torch.tensor([[0.0, -1.0, -1.0], [0.0, -0.5, -0.5]])
MASK = torch.tensor([[False, True, True], [False, True, True]])
LN4, LN20 = math.log(4.0), math.log(20.0)


def test_alol_clips_the_sequence_ratio_to_point1_1point9():
    """ratios exp(ln 4) = 4 -> 1.9 and exp(-ln 20) = 0.05 -> 0.1; A = (0.5, 2); NLL = (2, 1)
    loss = (0.5 * 1.9 * 2, 2 * 0.1 * 1) = (1.9, 0.2)"""
    ref = torch.tensor([-2.0 - LN4, -1.0 + LN20])
    loss = alol(TOKENS, MASK, torch.tensor([0.5, 2.0]), ref_logps=ref)
    assert_close(loss, torch.tensor([1.9, 0.2]))


def test_alol_ratio_carries_no_gradient():
    """d/d logp_t of A * sg(w) * (-sum logp) = -A * w = -(0.5 * 1.9) on each response token"""
    tokens = TOKENS.clone().requires_grad_(True)
    alol(tokens, MASK, torch.tensor([0.5, 2.0]), ref_logps=torch.tensor([-2.0 - LN4, -1.0 + LN20])).sum().backward()
    assert_close(tokens.grad[0], torch.tensor([0.0, -0.95, -0.95]))
    assert_close(tokens.grad[1], torch.tensor([0.0, -0.2, -0.2]))


def test_alol_ref_free_and_kl():
    """ref-free: A * NLL = (0.5 * 2, 2 * 1) = (1, 2)
    KL: A * NLL + 0.1 * (logp - ref) = (1 + 0.1 ln 4, 2 - 0.1 ln 20)"""
    adv = torch.tensor([0.5, 2.0])
    assert_close(alol_ref_free(TOKENS, MASK, adv), torch.tensor([1.0, 2.0]))
    ref = torch.tensor([-2.0 - LN4, -1.0 + LN20])
    assert_close(alol_kl(TOKENS, MASK, adv, ref_logps=ref, kl_beta=0.1),
                 torch.tensor([1.0 + 0.1 * LN4, 2.0 - 0.1 * LN20]))


def test_alol_seq_clips_each_token():
    """token ratios (4, 0.5) -> (1.9, 0.5); sum w_t * nll_t = 1.9 * 1 + 0.5 * 1 = 2.4; x A = 0.5 -> 1.2"""
    tokens = TOKENS[:1]
    ref_tokens = torch.tensor([[0.0, -1.0 - LN4, -1.0 + math.log(2.0)]])
    loss = alol_seq(tokens, MASK[:1], torch.tensor([0.5]), ref_token_logps=ref_tokens)
    assert_close(loss, torch.tensor([1.2]))


def test_alol_family_ignores_masked_positions():
    noisy = TOKENS.clone()
    noisy[:, 0] = -100.0  # prompt position: must not count
    adv, ref = torch.tensor([0.5, 2.0]), torch.tensor([-2.5, -1.5])
    for name, fn in ALOL.items():
        kwargs = {"ref_logps": ref, "ref_token_logps": TOKENS - 0.25}
        assert_close(fn(noisy, MASK, adv, **kwargs), fn(TOKENS, MASK, adv, **kwargs), msg=name)


def test_crlft_weights_by_class_reward():
    """r = (1, 0.1), summed NLL = (2, 1) -> (2, 0.1)"""
    assert_close(crlft(TOKENS, MASK, torch.tensor([1.0, 0.1])), torch.tensor([2.0, 0.1]))


def test_discounted_cumsum_right_matches_a_loop():
    values = torch.randn(3, 7, dtype=torch.float64)
    expected = torch.zeros_like(values)
    running = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(7)):
        running = values[:, t] + 0.9 * running
        expected[:, t] = running
    assert_close(discounted_cumsum_right(values, 0.9), expected)


def test_ift_relation_propagation_worked_example():
    """losses l = (1, 2, 3), n = 3, u = l / 3, gamma = 0.5:
    w = (1/3 + 1/2 * 2/3 + 1/4 * 1, 2/3 + 1/2 * 1, 1) = (11/12, 14/12, 12/12), sum 37/12
    normalised to mean 1: (33, 42, 36) / 37; loss = (33 * 1 + 42 * 2 + 36 * 3) / 37 / 3 = 225/111"""
    logps = torch.tensor([[0.0, -1.0, -2.0, -3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, False]])
    weights = relation_propagation_weights(logps, mask, gamma=0.5)
    assert_close(weights, torch.tensor([[0.0, 33 / 37, 42 / 37, 36 / 37, 0.0]], dtype=torch.float64))
    assert_close(ift(logps, mask, gamma=0.5), torch.tensor([225 / 111], dtype=torch.float64))


def test_ift_with_gamma_zero_is_token_mean_nll():
    """gamma = 0: every weight is 1, loss = mean token NLL = (1 + 1)/2 and (0.5 + 0.5)/2"""
    assert_close(ift(TOKENS, MASK, gamma=0.0), torch.tensor([1.0, 0.5]))


def test_ift_gradient_flows_through_the_weights_too():
    """As in the reference code the weights are not detached: the gradient differs from
    the one with fixed weights."""
    logps = torch.tensor([[0.0, -1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True, True]])
    ift(logps, mask, gamma=0.5).sum().backward()
    fixed = relation_propagation_weights(logps.detach(), mask, gamma=0.5)
    assert not torch.allclose(logps.grad, -fixed / 3)


def test_value_head_ridge_recovers_a_linear_baseline():
    torch.manual_seed(0)
    features = torch.randn(200, 5) * torch.tensor([1.0, 10.0, 0.1, 1.0, 1.0]) + 3.0
    true_w = torch.tensor([0.5, -0.1, 4.0, 0.0, 1.0])
    targets = features @ true_w + 2.0
    weight, bias = fit_value_head(features, targets, ridge=1e-8)
    assert_close(weight, true_w, atol=1e-3, rtol=1e-3)
    assert float(bias) == pytest.approx(2.0, abs=1e-2)
    assert float(r_squared(features @ weight + bias, targets)) == pytest.approx(1.0, abs=1e-6)
    assert float(r_squared(torch.full((200,), float(targets.mean())), targets)) == pytest.approx(0.0, abs=1e-6)
