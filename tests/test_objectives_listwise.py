"""Listwise (PRO, Plackett-Luce DPO) and unpaired (KTO) losses: worked examples and identities."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.objectives import LISTWISE, PAIRWISE, UNPAIRED, PairLogps, kto_kl_estimate

LN2, LN3 = math.log(2), math.log(3)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_listwise_dpo_with_two_candidates_is_dpo():
    """K = 2, candidates in either order (the higher score is the chosen one) == dpo."""
    gen = torch.Generator().manual_seed(0)
    logps = (torch.randn(6, 2, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    ref_logps = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 5
    scores = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    chosen_index = scores.argmax(-1, keepdim=True)
    rejected_index = 1 - chosen_index
    pairs = PairLogps(
        chosen=logps.gather(-1, chosen_index).squeeze(-1),
        rejected=logps.gather(-1, rejected_index).squeeze(-1),
        chosen_tokens=torch.ones(6),
        rejected_tokens=torch.ones(6),
        ref_chosen=ref_logps.gather(-1, chosen_index).squeeze(-1),
        ref_rejected=ref_logps.gather(-1, rejected_index).squeeze(-1),
    )
    tokens = torch.ones_like(logps)
    listwise = LISTWISE["listwise_dpo"](logps, tokens, scores, ref_logps, beta=0.3)
    pairwise = PAIRWISE["dpo"](pairs, beta=0.3)
    torch.testing.assert_close(listwise, pairwise)
    grads = [torch.autograd.grad(loss.sum(), logps)[0] for loss in (listwise, pairwise)]
    torch.testing.assert_close(*grads)


def test_listwise_dpo_worked_example_with_padding():
    """beta 1, reference 0. Row 1, utilities in score order (ln2, 0, 0):
    -log[2/4] - log[1/2] = 2 ln2. Row 2: all zero, 3 candidates: ln3 + ln2; a 4th padded
    candidate (mask False, huge logp) changes nothing. Scores given out of order."""
    logps = t(0.0, LN2, 0.0, 50.0, 0.0, 0.0, 0.0, 50.0).view(2, 4)
    scores = t(1.0, 3.0, 2.0, 9.0, 0.1, 0.3, 0.2, 9.0).view(2, 4)
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    loss = LISTWISE["listwise_dpo"](
        logps, torch.ones_like(logps), scores, torch.zeros_like(logps), mask, beta=1.0
    )
    torch.testing.assert_close(loss, t(2 * LN2, LN3 + LN2))


def test_listwise_dpo_gradients_finite_with_padding():
    logps = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = LISTWISE["listwise_dpo"](
        logps, torch.ones_like(logps), torch.randn(3, 5), torch.zeros(3, 5), mask
    )
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[2].item() == 0.0 and (grad[~mask] == 0).all()


def test_pro_worked_example_two_candidates():
    """A: logp -3 over 1 token (s = -3), score 0.5; B: logp -2 over 2 tokens (s = -1),
    score 2.5. Ranked B > A, tau = 2.5 - 0.5 = 2 (tau_B^B = max = 2):
    L_rank = log(e^{-1*2} + e^{-3*2}) - (-1*2) = log(1 + e^-4);
    SFT: 0.05 * (2-1)^2 * (-logp_B) = 0.05 * 2 = 0.1."""
    loss = LISTWISE["pro"](t(-3.0, -2.0).view(1, 2), t(1, 2).view(1, 2), t(0.5, 2.5).view(1, 2))
    torch.testing.assert_close(loss, t(math.log1p(math.exp(-4)) + 0.1))


def test_pro_worked_example_three_candidates_and_padding():
    """s = (-1, -1, -1) (logps (-1, -2, -3) over (1, 2, 3) tokens), scores (3, 2, 0).
    k=1: tau^2 = 1, tau^3 = 3, tau^1 = 3: log(e^-3 + e^-1 + e^-3) + 3 = log(2 + e^2).
    k=2: tau^3 = 2 = tau^2: log(e^-2 + e^-2) + 2 = ln2.
    SFT: 0.05 * (3-1)^2 * 1 = 0.2. Row 2: the same three, shuffled, plus a padded candidate
    (mask False) with a large logp and the best score, which must change nothing."""
    logps = t(-1.0, -2.0, -3.0, 0.0, -3.0, -1.0, 5.0, -2.0).view(2, 4)
    tokens = t(1, 2, 3, 1, 3, 1, 1, 2).view(2, 4)
    scores = t(3.0, 2.0, 0.0, 0.0, 0.0, 3.0, 10.0, 2.0).view(2, 4)
    mask = torch.tensor([[True, True, True, False], [True, True, False, True]])
    loss = LISTWISE["pro"](logps, tokens, scores, mask=mask)
    expected = math.log(2 + math.e**2) + LN2 + 0.2
    torch.testing.assert_close(loss, t(expected, expected))


def test_pro_gradients_finite_and_push_the_top_response_up():
    logps = (-torch.rand(4, 3, dtype=torch.float64) * 20).requires_grad_()
    tokens = torch.randint(1, 10, (4, 3)).double()
    scores = torch.randn(4, 3, dtype=torch.float64)
    loss = LISTWISE["pro"](logps, tokens, scores)
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    assert torch.isfinite(grad).all()
    top = scores.argmax(-1, keepdim=True)
    assert (grad.gather(-1, top) < 0).all()


def test_kto_worked_example():
    """beta 1, h = (ln3, 0, ln3), labels (T, F, F), lambda_D 2, lambda_U 0.5.
    z0 = 0: (2(1 - s(ln3)), 0.5(1 - s(0)), 0.5(1 - s(-ln3))) = (0.5, 0.25, 0.375).
    z0 = ln3: (2(1 - s(0)), 0.5(1 - s(ln3)), 0.5(1 - s(0))) = (1, 0.125, 0.25).
    z0 = -1 is clamped to 0."""
    logps, ref_logps = t(LN3, -1.0, LN3 - 2), t(0.0, -1.0, -2.0)
    labels = torch.tensor([True, False, False])
    kto = UNPAIRED["kto"]
    weights = {"beta": 1.0, "desirable_weight": 2.0, "undesirable_weight": 0.5}
    torch.testing.assert_close(
        kto(logps, ref_logps, labels, t(0.0)[0], **weights), t(0.5, 0.25, 0.375)
    )
    torch.testing.assert_close(kto(logps, ref_logps, labels, LN3, **weights), t(1.0, 0.125, 0.25))
    torch.testing.assert_close(kto(logps, ref_logps, labels, -1.0, **weights), t(0.5, 0.25, 0.375))


def test_kto_no_gradient_through_the_kl_estimate():
    mismatched = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    kl = kto_kl_estimate(mismatched, torch.tensor([-4.0, -4.0], dtype=torch.float64))
    assert kl.item() == pytest.approx(2.0) and not kl.requires_grad
    assert kto_kl_estimate(mismatched, torch.zeros(2, dtype=torch.float64)).item() == 0.0
