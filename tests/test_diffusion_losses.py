"""The per-step diffusion losses (alignkit.objectives.diffusion): worked examples, identities,
clipping and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.objectives.diffusion import (
    DIFFUSION,
    clipped_log_ratio,
    d3po_step_loss,
    prdp_step_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_registry_names_both_losses():
    assert DIFFUSION["d3po"] is d3po_step_loss and DIFFUSION["prdp"] is prdp_step_loss


def test_d3po_worked_example():
    """beta = 0.1, eps = 0.1. Pair 1: log-ratios 0.05 and -0.02 (inside the clip): logit
    0.1 x 0.07 = 0.007, loss log(1 + e^-0.007) = 0.6896533. Pair 2: 0.5 and -0.5 clip to
    log 1.1 = 0.0953102 and log 0.9 = -0.1053605: logit 0.0200671, loss 0.6831640."""
    zeros = t(0.0, 0.0)
    loss = d3po_step_loss(t(0.05, 0.5), zeros, t(-0.02, -0.5), zeros, beta=0.1, eps=0.1)
    assert_close(loss, t(0.6896533055, 0.6831639809))


def test_d3po_is_log_two_when_policy_equals_reference():
    logps = torch.randn(4, 3, dtype=torch.float64)
    loss = d3po_step_loss(logps, logps, logps.flip(0), logps.flip(0))
    assert_close(loss, torch.full((4, 3), math.log(2.0), dtype=torch.float64))


def test_d3po_clipped_ratios_get_no_gradient_and_inside_ones_do():
    chosen = t(0.5, 0.01).requires_grad_()
    rejected = t(-0.5, 0.0).requires_grad_()
    d3po_step_loss(chosen, t(0, 0), rejected, t(0, 0)).sum().backward()
    assert chosen.grad[0] == 0 and rejected.grad[0] == 0  # both outside [log 0.9, log 1.1]
    assert chosen.grad[1] < 0 < rejected.grad[1]  # descent raises the chosen, lowers the rejected


def test_clipped_log_ratio_bounds_and_rejects_bad_eps():
    assert_close(clipped_log_ratio(t(1.0, -1.0, 0.01), t(0, 0, 0), 0.2), t(math.log(1.2), math.log(0.8), 0.01))
    with pytest.raises(ValueError, match="eps must be in"):
        clipped_log_ratio(t(0.0), t(0.0), 1.5)


def test_prdp_worked_example():
    """T = 4, beta = 1, clip_eps = 0.1, r_a = 1.0, r_b = 0.2, so dr / T = 0.2. Step 1: log-ratios
    0.08 and -0.05: d = 0.13 inside the clip, loss (0.2 - 0.13)^2 = 0.0049. Step 2: 0.3 and -0.3:
    d = 0.6, d_clip = log 1.1 - log 0.9 = 0.2006707; loss max(0.16, 4.5e-7) = 0.16."""
    logps_a, logps_b = t(0.08, 0.3).reshape(1, 2), t(-0.05, -0.3).reshape(1, 2)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    loss = prdp_step_loss(logps_a, zeros, logps_b, zeros, t(1.0), t(0.2), num_steps=4, beta=1.0, clip_eps=0.1)
    assert_close(loss, t(0.0049, 0.16).reshape(1, 2))


def test_prdp_clip_binds_when_the_clipped_error_is_larger():
    """Log-ratios 0.3 and 0 overshoot: d = 0.3 (error 0.01) but d_clip = log 1.1 = 0.0953 (error
    0.010962): the max takes the clipped term, which gives no gradient (PPO's pessimism)."""
    logps_a = t(0.3).requires_grad_()
    loss = prdp_step_loss(logps_a, t(0.0), t(0.0), t(0.0), t(0.8), t(0.0), num_steps=4, beta=1.0, clip_eps=0.1)
    assert_close(loss, (0.2 - torch.log1p(t(0.1))) ** 2)
    loss.sum().backward()
    assert logps_a.grad.item() == 0.0


def test_prdp_gradient_at_the_old_policy_is_the_reward_weighted_score():
    """At theta = theta_old, d = 0 and dL/dlogp_a = -2 beta dr / T: the higher-reward image's
    likelihood is pushed up in proportion to the reward difference."""
    logps_a, logps_b = t(0.0, 0.0).requires_grad_(), t(0.0, 0.0).requires_grad_()
    loss = prdp_step_loss(logps_a, t(0, 0), logps_b, t(0, 0), t(1.0, 0.0), t(0.0, 0.5), num_steps=2, beta=2.0)
    loss.sum().backward()
    assert_close(logps_a.grad, t(-2 * 2.0 * 0.5, -2 * 2.0 * -0.25))
    assert_close(logps_b.grad, -logps_a.grad)


def test_prdp_is_zero_when_the_prediction_is_exact_and_finite_everywhere():
    # reward differences / (num_steps x beta) stay inside the clip (|d| / 1.5 <= 0.47 < 10/11); the
    # first version drew them at random and failed whenever one fell outside
    reward_a = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.4], dtype=torch.float64)
    reward_b = torch.tensor([-0.1, 0.2, 0.0, 0.1, 0.3], dtype=torch.float64)
    old = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_step = ((reward_a - reward_b) / 3 / 0.5).unsqueeze(1).expand(5, 3)
    loss = prdp_step_loss(old + per_step, old, old, old, reward_a, reward_b, num_steps=3, beta=0.5, clip_eps=10.0 / 11)
    assert torch.isfinite(loss).all()
    assert_close(loss, torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        prdp_step_loss(old, old, old, old, reward_a, reward_b, num_steps=0)
