"""Advantage estimators: plain-loop equivalence (float64), identities, worked examples and
properties over the whole registry (shapes, finiteness, masked positions ignored)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from alignkit.advantages import (
    ADVANTAGE_KINDS,
    ADVANTAGES,
    discounted_returns,
    gae,
    group_stats,
    grpo,
    masked_whiten,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
    token_level_rewards,
)


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def loop_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one row at a time, in Python floats."""
    advantages, returns = [], []
    for row, n in enumerate(lengths):
        r, v = rewards[row][:n], values[row][:n]
        adv = [0.0] * n
        running = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([a + b for a, b in zip(adv, v, strict=True)])
    return advantages, returns


def test_gae_matches_a_plain_python_loop_in_float64():
    torch.manual_seed(0)
    lengths, width = [5, 1, 3, 7], 7
    mask = ragged_mask(lengths, width)
    rewards = torch.randn(4, width, dtype=torch.float64)
    values = torch.randn(4, width, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected_adv, expected_ret = loop_gae(rewards.tolist(), values.tolist(), lengths, 0.9, 0.8)
    for row, n in enumerate(lengths):
        assert_close(advantages[row, :n], torch.tensor(expected_adv[row], dtype=torch.float64))
        assert_close(returns[row, :n], torch.tensor(expected_ret[row], dtype=torch.float64))
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_gae_with_gamma_lambda_one_is_return_to_go_minus_value():
    torch.manual_seed(1)
    mask = ragged_mask([4, 2], 4)
    rewards = torch.randn(2, 4, dtype=torch.float64)
    values = torch.randn(2, 4, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = discounted_returns(rewards, mask, 1.0)
    assert_close(advantages, torch.where(mask, to_go - values, 0.0))
    assert_close(returns, to_go)


def test_gae_worked_example():
    """r = (0, 1), V = (0.5, 0.25), gamma = 1, lam = 0.5:
    delta_1 = 1 - 0.25 = 0.75 ; delta_0 = 0 + 0.25 - 0.5 = -0.25 ;
    A_1 = 0.75 ; A_0 = -0.25 + 0.5 * 0.75 = 0.125 ; G = A + V = (0.625, 1.0)"""
    mask = torch.ones(1, 2, dtype=torch.bool)
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), mask, 1.0, 0.5)
    assert_close(advantages, torch.tensor([[0.125, 0.75]]))
    assert_close(returns, torch.tensor([[0.625, 1.0]]))


def test_rloo_is_n_over_n_minus_1_times_unscaled_grpo():
    torch.manual_seed(2)
    rewards = torch.randn(12, dtype=torch.float64)
    group_index = torch.arange(3).repeat_interleave(4)  # n = 4
    mask = ragged_mask([3] * 12, 5)
    assert_close(rloo(rewards, group_index, mask),
                 4 / 3 * grpo(rewards, group_index, mask, scale_by_std=False))


def test_grpo_worked_example():
    """group (1, 2, 3): mean 2, unbiased std 1 -> A = (-1, 0, 1) / (1 + eps); group (5, 5): A = 0."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0])
    group_index = torch.tensor([7, 7, 7, 2, 2])  # any integers name the groups
    mask = ragged_mask([2, 1, 2, 2, 2], 2)
    advantages = grpo(rewards, group_index, mask, eps=1e-4)
    expected = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]) / (1 + 1e-4)
    assert_close(advantages, torch.where(mask, expected, 0.0))


def test_kl_penalty_is_folded_into_the_sequence_reward_for_rloo_and_grpo():
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0])
    group_index = torch.tensor([0, 0, 1, 1])
    mask = ragged_mask([2, 3, 1, 3], 3)
    penalty = torch.rand(4, 3)
    folded = rewards - torch.where(mask, penalty, 0.0).sum(-1)
    for fn in (rloo, grpo):
        assert_close(fn(rewards, group_index, mask, kl_penalty=penalty), fn(folded, group_index, mask))


def test_remax_worked_example():
    """R = (1, 0), greedy R = (0.5, 0.5), clip 0.4, penalty 0.1 per token:
    A = (clip(0.5), clip(-0.5)) - 0.1 = (0.3, -0.5) on valid tokens."""
    mask = ragged_mask([2, 1], 2)
    advantages = remax(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), mask,
                       baseline_rewards=torch.tensor([0.5, 0.5]), clip=0.4, kl_penalty=torch.full((2, 2), 0.1))
    assert_close(advantages, torch.tensor([[0.3, 0.3], [-0.5, 0.0]]))


def test_reinforce_pp_is_whitened_return_to_go_including_the_kl_penalty():
    """r = (-0.1, -0.1 + 1) for row 0 (gamma 1): G = (0.8, 0.9); row 1 r = (-0.1 + 0): G = -0.1;
    then (G - mean) / std over the three valid tokens."""
    mask = ragged_mask([2, 1], 2)
    penalty = torch.full((2, 2), 0.1)
    advantages = reinforce_pp(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), mask, kl_penalty=penalty)
    returns = torch.tensor([0.8, 0.9, -0.1])
    expected = (returns - returns.mean()) / returns.var(unbiased=False).add(1e-8).sqrt()
    assert_close(advantages[mask], expected)
    assert advantages[1, 1] == 0


def test_reinforce_pp_baseline_centres_rewards_per_group_first():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    group_index = torch.tensor([0, 0, 1, 1])
    mask = ragged_mask([3, 2, 1, 3], 3)
    penalty = torch.rand(4, 3)
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    assert_close(reinforce_pp_baseline(rewards, group_index, mask, kl_penalty=penalty, gamma=0.9),
                 reinforce_pp(centred, group_index, mask, kl_penalty=penalty, gamma=0.9))


def test_group_stats_match_a_loop():
    values = torch.tensor([1.0, 4.0, 2.0, 8.0, 3.0])
    group_index = torch.tensor([3, 1, 3, 1, 3])
    sums, counts, std = group_stats(values, group_index)
    for i in range(5):
        members = values[group_index == group_index[i]]
        assert sums[i] == members.sum() and counts[i] == len(members)
        assert_close(std[i], members.std())


def test_token_level_rewards_put_the_outcome_on_the_last_valid_token():
    mask = ragged_mask([3, 1], 4)
    token_rewards = token_level_rewards(torch.tensor([2.0, -1.0]), mask, torch.full((2, 4), 0.5))
    assert_close(token_rewards, torch.tensor([[-0.5, -0.5, 1.5, 0.0], [-1.5, 0.0, 0.0, 0.0]]))


def test_masked_whiten_ignores_padding():
    mask = ragged_mask([2, 1], 3)
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, -50.0, 7.0]])
    whitened = masked_whiten(values, mask)
    assert_close(whitened[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert whitened[~mask].abs().sum() == 0


def _outcome_call(name, rewards, group_index, mask, penalty):
    extra = {"baseline_rewards": rewards.flip(0)} if name == "remax" else {}
    return ADVANTAGES[name](rewards, group_index, mask, kl_penalty=penalty, **extra)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_estimator_ignores_masked_positions_and_is_finite(name):
    torch.manual_seed(3)
    mask = ragged_mask([4, 2, 3, 1, 4, 2], 4)
    garbage = torch.where(mask, 0.0, 1e6)
    if ADVANTAGE_KINDS[name] == "critic":
        rewards, values = torch.randn(6, 4), torch.randn(6, 4)
        clean = ADVANTAGES[name](rewards, values, mask, 1.0, 0.95)
        dirty = ADVANTAGES[name](rewards + garbage, values - garbage, mask, 1.0, 0.95)
    else:
        rewards, group_index, penalty = torch.randn(6), torch.tensor([0, 0, 1, 1, 2, 2]), torch.rand(6, 4)
        clean = _outcome_call(name, rewards, group_index, mask, penalty)
        dirty = _outcome_call(name, rewards, group_index, mask, penalty + garbage)
        clean, dirty = (clean,), (dirty,)
    for a, b in zip(clean, dirty, strict=True):
        assert a.shape == mask.shape
        assert torch.isfinite(a).all()
        assert_close(a, b)
        assert a[~mask].abs().sum() == 0


def test_rloo_rejects_singleton_groups():
    with pytest.raises(AssertionError, match="at least 2 samples"):
        rloo(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), torch.ones(2, 1, dtype=torch.bool))
