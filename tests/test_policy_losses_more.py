"""GSPO, CISPO, SAPO, Clip-Cov, KL-Cov, the entropy bonus, the KL cap and DAPO's overlong
penalty: worked examples, the peers' formulas (TRL 1.16's GRPOTrainer._compute_loss, verl's
core_algos) side by side, and properties over the whole POLICY_LOSSES registry."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.objectives import KL
from alignkit.objectives.kl import capped
from alignkit.objectives.policy import AGGREGATIONS, POLICY_LOSSES
from alignkit.objectives.policy_more import cispo, clip_cov, gspo, kl_cov, sapo
from alignkit.training.online.steps import overlong_penalty


def _takes_mask(fn) -> bool:
    return "mask" in inspect.signature(fn).parameters


def _call(name, logp, old, advantages, mask):
    fn = POLICY_LOSSES[name]
    return fn(logp, old, advantages, **({"mask": mask} if _takes_mask(fn) else {}))


# ------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_on_policy_gradient_is_the_plain_policy_gradient(name):
    """At rho = 1 every loss's gradient w.r.t. logp_t is -A_t (before aggregation), except on
    the tokens it reports as clipped (Clip-Cov's dropped tokens: 0)."""
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) - 1).requires_grad_()
    advantages, mask = torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool)
    loss, clipped = _call(name, logp, logp.detach(), advantages, mask)
    loss.sum().backward()
    expected = torch.where(clipped & (name == "clip_cov"), 0.0, -advantages)
    assert_close(logp.grad, expected)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_padding_is_ignored(name):
    """Values at masked positions change neither the aggregated loss nor the gradient at real
    tokens (losses that need the mask take it)."""
    torch.manual_seed(1)
    logp, old, advantages = torch.randn(3, 5) - 1, torch.randn(3, 5) - 1, torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    results = []
    for fill in (0.0, 50.0):
        torch.manual_seed(2)  # clip_cov's draw
        lp = torch.where(mask, logp, fill).requires_grad_()
        loss, _ = _call(name, lp, torch.where(mask, old, -fill), torch.where(mask, advantages, fill), mask)
        total = AGGREGATIONS["token_mean"](loss, mask)
        total.backward()
        assert torch.isfinite(total)
        results.append((total.detach(), torch.where(mask, lp.grad, 0.0)))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_finite_at_extreme_ratios(name):
    logp = torch.tensor([[-0.1, -30.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-40.0, -0.1, -1.0]])
    loss, _ = _call(name, logp, old, torch.tensor([[2.0, -2.0, 0.5]]), torch.ones(1, 3, dtype=torch.bool))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()


# ------------------------------------------------------------------------------ GSPO


def trl_sequence_loss(logp, old, advantages, mask, eps_low, eps_high):
    """TRL 1.16 GRPOTrainer, importance_sampling_level="sequence", loss_type="grpo":
    log_w = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1), (B, 1); coef_1 = exp(log_w);
    coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high); L = -min(coef_1 A, coef_2 A), (B, 1);
    aggregated per sequence as ((L * mask).sum(-1) / mask.sum(-1)).mean()."""
    log_w = ((logp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    coef_1 = log_w.exp()
    coef_2 = coef_1.clamp(1 - eps_low, 1 + eps_high)
    per = -torch.min(coef_1 * advantages, coef_2 * advantages)
    return ((per * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.parametrize("spread", [1e-4, 3e-2])  # inside the clip range, and far outside it
def test_gspo_matches_trl_sequence_level_in_value_and_gradient(spread):
    torch.manual_seed(3)
    old = torch.randn(4, 7) - 2
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 4:] = mask[3, 2:] = False
    advantages = torch.tensor([[1.0], [-0.5], [2.0], [-1.5]])
    start = old + spread * torch.randn(4, 7)
    ours_lp, trl_lp = start.clone().requires_grad_(), start.clone().requires_grad_()
    loss, _ = gspo(ours_lp, old, advantages.expand(4, 7), mask=mask)
    ours = AGGREGATIONS["seq_mean_token_mean"](loss, mask)
    theirs = trl_sequence_loss(trl_lp, old, advantages, mask.float(), 3e-4, 4e-4)
    ours.backward()
    theirs.backward()
    assert_close(ours, theirs)
    assert_close(torch.where(mask, ours_lp.grad, 0.0), torch.where(mask, trl_lp.grad, 0.0))


def test_gspo_worked_example():
    """Row of log-ratios (0.0004, 0.0002) -> s = exp(0.0003) = 1.0003 (inside 1 +- 4e-4):
    L = -A s = -1.0003 on both tokens for A = 1; log-ratios (0.01, 0.01): s = e^0.01, clipped at
    1.0004 for A = 1."""
    old = torch.zeros(2, 2)
    logp = torch.tensor([[4e-4, 2e-4], [0.01, 0.01]])
    loss, clipped = gspo(logp, old, torch.ones(2, 2), mask=torch.ones(2, 2, dtype=torch.bool))
    assert_close(loss[0], torch.full((2,), -math.exp(3e-4)))
    assert_close(loss[1], torch.full((2,), -1.0004))
    assert clipped.tolist() == [[False, False], [True, True]]


# ------------------------------------------------------------------------------ CISPO, SAPO


def test_cispo_matches_trl():
    """TRL 1.16, loss_type="cispo": clamped = clamp(coef_1, max=epsilon_high).detach();
    L = -clamped A logp (epsilon_high = 5.0, ScaleRL's eps_max)."""
    torch.manual_seed(4)
    old = torch.randn(3, 4) - 1
    logp = (old + torch.randn(3, 4) * 2).requires_grad_()
    advantages = torch.randn(3, 4)
    loss, clipped = cispo(logp, old, advantages, cispo_max=5.0)
    coef = torch.exp(logp.detach() - old)
    assert_close(loss, -coef.clamp(max=5.0) * advantages * logp)
    assert clipped.tolist() == ((coef > 5.0) & (advantages > 0)).tolist()
    loss.sum().backward()
    assert_close(logp.grad, -coef.clamp(max=5.0) * advantages)  # the weight is a constant


def test_cispo_worked_example_with_a_lower_bound():
    """r = (e^2, 0.5, 1): weights (5, 0.8, 1) with bounds [0.8, 5]; logp = (-1, -2, -3), A = (1, -1, 2):
    L = (5, -1.6, 6); clipped: the first (upper bound, A > 0) and the second (lower, A < 0)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    old = logp - torch.tensor([[2.0, math.log(0.5), 0.0]])
    loss, clipped = cispo(logp, old, torch.tensor([[1.0, -1.0, 2.0]]), cispo_max=5.0, cispo_min=0.8)
    assert_close(loss, torch.tensor([[5.0, -1.6, 6.0]]))
    assert clipped.tolist() == [[True, True, False]]


def test_sapo_matches_trl_and_its_gate():
    """TRL 1.16, loss_type="sapo": tau = where(A > 0, 1.0, 1.05); L = -sigmoid(tau (r - 1)) 4 / tau A.
    At r = 1: L = -2 A / tau; dL/dr = -A."""
    torch.manual_seed(5)
    old = torch.randn(2, 5) - 1
    logp = old + torch.randn(2, 5)
    advantages = torch.randn(2, 5)
    loss, _ = sapo(logp, old, advantages)
    tau = torch.where(advantages > 0, 1.0, 1.05)
    assert_close(loss, -torch.sigmoid(tau * ((logp - old).exp() - 1)) * 4 / tau * advantages)
    at_one, clipped = sapo(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]))
    assert_close(at_one, torch.tensor([[-2.0, 2.0 / 1.05]]))
    assert not clipped.any()
    far, clipped = sapo(torch.tensor([[math.log(4.0)]]), torch.zeros(1, 1), torch.ones(1, 1))
    assert clipped.item()  # |tau (r - 1)| = 3 > 1.76: the gate's slope is below half


# ------------------------------------------------------------------------------ Clip-Cov, KL-Cov


def test_clip_cov_drops_one_high_covariance_token():
    """Four valid tokens, A = (3, -3, 0, 0), logp = (-1, -3, -2, -2): mean A 0, mean logp -2,
    cov = (3, 3, 0, 0). With bounds (1, 5) tokens 0 and 1 are candidates; cov_ratio 0.25 of 4
    tokens drops one of them (L = 0 there), the other keeps the PPO loss."""
    logp = torch.tensor([[-1.0, -3.0, -2.0, -2.0, 0.0]])
    advantages = torch.tensor([[3.0, -3.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, clipped = clip_cov(logp, logp.clone(), advantages, mask=mask, cov_ratio=0.25,
                             generator=torch.Generator().manual_seed(0))
    assert clipped.sum() == 1 and clipped[0, :2].any() and not clipped[0, 2:].any()
    dropped = int(clipped[0].nonzero()[0])
    kept = 1 - dropped
    assert loss[0, dropped] == 0 and loss[0, kept] == -advantages[0, kept]


def test_clip_cov_leaves_already_clipped_tokens_and_the_bounds_alone():
    """A = (3, 6, -9) (mean 0), logp = (ln 2, 0, 0) (mean 0.231): cov = (1.39, -1.39, 2.08).
    Token 0 is PPO-clipped already (A = 3, r = 2): not a candidate; token 1 is below lb; token 2
    is the only candidate and is dropped (cov_ratio 0.5 of 3 tokens: one)."""
    logp = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[3.0, 6.0, -9.0]])
    loss, clipped = clip_cov(logp, old, advantages, mask=torch.ones(1, 3, dtype=torch.bool), cov_ratio=0.5)
    assert clipped.tolist() == [[True, False, True]]
    assert_close(loss, torch.tensor([[-3.6, -6.0, 0.0]]))


def verl_kl_cov(logp, old, advantages, mask, ratio, coef):
    """verl core_algos.compute_policy_loss_kl_cov, per token before agg_loss."""
    neg_kl = logp - old
    losses = -advantages * neg_kl.exp()
    with_kl = losses + coef * neg_kl.abs()
    valid = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    a, lp = advantages[mask].reshape(-1), logp[mask].reshape(-1)
    cov = (a - a.mean()) * (lp - lp.mean())
    top = valid[torch.topk(cov, max(1, int(len(cov) * ratio))).indices]
    out = losses.clone().reshape(-1)
    out[top] = with_kl.reshape(-1)[top]
    return out.reshape(losses.shape)


def test_kl_cov_matches_verl():
    torch.manual_seed(6)
    old = torch.randn(4, 8) - 1
    logp = old + 0.3 * torch.randn(4, 8)
    advantages = torch.randn(4, 8)
    mask = torch.rand(4, 8) > 0.3
    loss, penalised = kl_cov(logp, old, advantages, mask=mask, cov_ratio=0.1)
    expected = verl_kl_cov(logp, old, advantages, mask, 0.1, 1.0)
    assert_close(torch.where(mask, loss, 0.0), torch.where(mask, expected, 0.0))
    assert penalised.sum() == max(1, int(mask.sum() * 0.1)) and not (penalised & ~mask).any()


# ------------------------------------------------------------------------------ KL cap, overlong


def test_kl_cap_bounds_k3():
    """k3 at u = logp - ref = -5 is e^5 - 1 - 5 = 142.4; capped at 10 it is 10 with no gradient."""
    logp = torch.tensor([[-5.0, -0.1]], requires_grad=True)
    values = KL["k3"](logp, torch.zeros(1, 2))
    assert_close(values[0, 0], torch.tensor(math.exp(5) - 6))
    bounded = capped(values, 10.0)
    bounded.sum().backward()
    assert bounded[0, 0] == 10.0 and logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    assert capped(values, None) is values


def test_overlong_penalty_worked_example():
    """L_max 16, buffer 4: lengths 12 -> 0, 13 -> -0.25, 16 -> -1 (times the factor 0.5)."""
    lengths = torch.tensor([5, 12, 13, 16])
    assert_close(overlong_penalty(lengths, 16, 4, 1.0), torch.tensor([0.0, 0.0, -0.25, -1.0]))
    assert_close(overlong_penalty(lengths, 16, 4, 0.5), torch.tensor([0.0, 0.0, -0.125, -0.5]))
