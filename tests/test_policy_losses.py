"""Policy losses, aggregations and KL control: worked examples, the rho = 1 identities, masked
positions, micro-batch additivity."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from alignkit.objectives.policy import AGGREGATIONS, POLICY_LOSSES, dual_clip, ppo_clip, reinforce
from alignkit.training.online.kl_control import AdaptiveKL, RunningMeanStd, make_kl_controller


def test_clip_loss_at_ratio_one_is_minus_advantage():
    """The surrogates whose value at rho = 1 is -A (REINFORCE-style losses (reinforce, cispo)
    are -A logp there and SAPO's gate is 2 / tau: their gradients are checked over the whole
    registry in tests/test_policy_losses_more.py)."""
    logp = torch.randn(3, 4)
    advantages = torch.randn(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    for name in ("ppo_clip", "dual_clip", "gspo", "kl_cov"):
        fn = POLICY_LOSSES[name]
        extra = {"mask": mask} if "mask" in fn.__code__.co_varnames else {}
        loss, clipped = fn(logp, logp.clone(), advantages, **extra)
        assert_close(loss, -advantages)
        if name != "kl_cov":  # kl_cov flags its penalised tokens even at |log rho| = 0
            assert not clipped.any()


def test_ppo_clip_worked_examples():
    """eps = 0.2:
    A = +1, rho = 1.5 -> max(-1.5, -1.2) = -1.2, clipped ;
    A = -1, rho = 0.5 -> max(0.5, 0.8) = 0.8, clipped ;
    A = +1, rho = 0.5 -> max(-0.5, -0.8) = -0.5, not clipped ;
    A = -1, rho = 1.5 -> max(1.5, 1.2) = 1.5, not clipped."""
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = ppo_clip(ratio.log(), torch.zeros(1, 4), advantages)
    assert_close(loss, torch.tensor([[-1.2, 0.8, -0.5, 1.5]]))
    assert clipped.tolist() == [[True, True, False, False]]


def test_clip_higher_lets_positive_advantages_grow_further():
    """eps_low 0.2, eps_high 0.28: A = +1, rho = 1.25 -> -1.25 (not clipped); rho = 1.4 -> -1.28."""
    ratio = torch.tensor([[1.25, 1.4, 0.7]])
    loss, clipped = ppo_clip(ratio.log(), torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]),
                             eps_low=0.2, eps_high=0.28)
    assert_close(loss, torch.tensor([[-1.25, -1.28, 0.8]]))
    assert clipped.tolist() == [[False, True, True]]


def test_dual_clip_bounds_negative_advantages():
    """A = -1, rho = 5: PPO gives max(5, 1.2) = 5; the dual clip caps it at -A c = 3."""
    loss, clipped = dual_clip(torch.tensor([[5.0]]).log(), torch.zeros(1, 1), torch.tensor([[-1.0]]))
    assert_close(loss, torch.tensor([[3.0]]))
    assert clipped.item()
    # A > 0 is untouched by the dual clip.
    loss, _ = dual_clip(torch.tensor([[5.0]]).log(), torch.zeros(1, 1), torch.tensor([[1.0]]))
    assert_close(loss, torch.tensor([[-1.2]]))


def test_reinforce_is_minus_advantage_times_logp():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, clipped = reinforce(logp, torch.zeros(1, 2), torch.tensor([[0.5, -1.0]]))
    assert_close(loss, torch.tensor([[0.5, -2.0]]))
    assert not clipped.any()


def test_ppo_gradient_equals_reinforce_gradient_on_policy():
    torch.manual_seed(0)
    advantages, mask = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    grads = []
    for fn in (ppo_clip, reinforce):
        logp = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss, _ = fn(logp, logp.detach(), advantages)
        AGGREGATIONS["token_mean"](loss, mask).backward()
        grads.append(logp.grad)
    assert_close(grads[0], grads[1])


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -99.0]])
MASK = torch.tensor([[True, True, True], [True, False, False]])


@pytest.mark.parametrize(
    ("name", "expected", "norm"),
    [
        ("token_mean", 10 / 4, {}),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq_mean_token_mean", (2 + 4) / 2, {}),  # mean of per-sequence means (6/3, 4/1)
        ("seq_mean_token_sum", (6 + 4) / 2, {}),  # mean of per-sequence sums
        ("constant_norm", 10 / (2 * 4), {"max_len": 4}),  # sum / (G x L_max)
    ],
)
def test_aggregation_worked_examples(name, expected, norm):
    assert_close(AGGREGATIONS[name](LOSS, MASK, **norm), torch.tensor(expected))


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_aggregations_ignore_masked_positions(name):
    garbage = torch.where(MASK, 0.0, 1e4)
    assert_close(AGGREGATIONS[name](LOSS + garbage, MASK), AGGREGATIONS[name](LOSS, MASK))


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_micro_batch_losses_sum_to_the_minibatch_loss(name):
    torch.manual_seed(4)
    loss = torch.randn(6, 5)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([5, 2, 3, 1, 4, 5]).unsqueeze(1)
    norm = {"num_tokens": mask.sum(), "num_seqs": 6, "max_len": 5}
    whole = AGGREGATIONS[name](loss, mask, **norm)
    parts = sum(AGGREGATIONS[name](loss[rows], mask[rows], **norm) for rows in (slice(0, 2), slice(2, 6)))
    assert_close(parts, whole)


def test_adaptive_kl_controller_worked_example():
    """KL = 2 x target: error clip(1, -0.2, 0.2) = 0.2; beta = 0.1 (1 + 0.2 x 100 / 10000) = 0.1002."""
    controller = make_kl_controller(0.1, target=6.0, horizon=10000)
    assert isinstance(controller, AdaptiveKL)
    controller.update(12.0, 100)
    assert controller.value == pytest.approx(0.1002)
    controller.update(3.0, 100)  # KL = target / 2: error -0.5 clipped to -0.2
    assert controller.value == pytest.approx(0.1002 * (1 - 0.002))
    fixed = make_kl_controller(0.1, target=None, horizon=10000)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1


def test_running_mean_std_matches_the_full_sample():
    stats = RunningMeanStd()
    values = [1.0, 5.0, 2.0, 8.0, -3.0, 4.0, 0.5]
    stats.update(values[:3])
    stats.update(values[3:])
    tensor = torch.tensor(values, dtype=torch.float64)
    assert stats.mean == pytest.approx(tensor.mean().item())
    assert stats.var == pytest.approx(tensor.var(unbiased=False).item())
