"""Advantage estimators for the online loop: pure functions of tensors, registered by name.

Two calling conventions, told apart by `ADVANTAGE_KINDS[name]`:

- "critic" (needs a value function), the public contract
      gae(token_rewards (N, T), values (N, T), mask (N, T), gamma, lam)
          -> (advantages (N, T), returns (N, T))
- "outcome" (one scalar reward per sample; the caller never special-cases an estimator)
      fn(rewards (N,), group_index (N,), mask (N, T), *, kl_penalty=None, **hparams)
          -> advantages (N, T)
  `group_index[i]` names the prompt sample i was drawn for (any integers; groups may differ
  in size); `kl_penalty` (N, T) is the per-token penalty beta * k(u_t) when the KL is placed
  in the reward (None or zeros when it is a loss term). Estimators that do not use groups or
  the penalty accept and ignore them.

Token axis T is the response only (position 0 = first generated token); `mask` is True on
generated tokens (the stop token included). Every output is 0 where `mask` is False, and
masked positions never change the values at unmasked ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ADVANTAGES: dict[str, Callable[..., object]] = {}
ADVANTAGE_KINDS: dict[str, str] = {}


def register_advantage(name: str, kind: str = "outcome"):
    """Decorator: register an estimator under `name` with calling convention `kind`."""
    if kind not in ("outcome", "critic"):
        raise ValueError(f"advantage kind must be 'outcome' or 'critic', got {kind!r}")

    def decorate(fn):
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGES[name] = fn
        ADVANTAGE_KINDS[name] = kind
        return fn

    return decorate


# --------------------------------------------------------------------------- helpers


def _check_token_shapes(mask: Tensor, *tensors: Tensor | None) -> None:
    assert mask.dim() == 2, f"mask must be (N, T), got {tuple(mask.shape)}"
    for tensor in tensors:
        if tensor is not None:
            assert tensor.shape == mask.shape, f"expected {tuple(mask.shape)}, got {tuple(tensor.shape)}"


def _check_outcome_shapes(rewards: Tensor, group_index: Tensor, mask: Tensor) -> None:
    assert rewards.dim() == 1, f"rewards must be (N,), got {tuple(rewards.shape)}"
    assert group_index.shape == rewards.shape, (
        f"group_index {tuple(group_index.shape)} must match rewards {tuple(rewards.shape)}"
    )
    assert mask.dim() == 2 and mask.shape[0] == rewards.shape[0], (
        f"mask must be (N, T) with N = {rewards.shape[0]}, got {tuple(mask.shape)}"
    )


def group_stats(values: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group sum, count and unbiased std: (N,), (N,) -> three (N,) tensors.

    sum_i = sum_{j in g(i)} v_j ; count_i = |g(i)| ; std_i = sqrt(sum (v_j - mean)^2 / (|g|-1))
    (std 0 for singleton groups).
    """
    _, inverse = torch.unique(group_index, return_inverse=True)
    groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = values.new_zeros(groups).index_add(0, inverse, values)
    counts = values.new_zeros(groups).index_add(0, inverse, torch.ones_like(values))
    means = sums / counts
    squares = values.new_zeros(groups).index_add(0, inverse, (values - means[inverse]) ** 2)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()
    return sums[inverse], counts[inverse], std[inverse]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """sum(m * v) / max(sum m, 1) over all positions: scalar."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(v - mean) / std over the valid tokens of the whole batch (mean kept if not `shift_mean`).

    mean and the (biased) variance are taken over positions where `mask` is True; the result
    is 0 elsewhere. PPO's advantage whitening and REINFORCE++'s global normalisation.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last valid token: (N, T) -> (N,) (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).amax(-1).clamp(min=0)


def token_level_rewards(rewards: Tensor, mask: Tensor, kl_penalty: Tensor | None = None) -> Tensor:
    """The per-token reward of PPO and REINFORCE++:

        scalar rewards R (N,):          r_t = -kl_penalty_t + 1[t = last] R
        dense rewards R_t (N, T):       r_t = -kl_penalty_t + R_t

    The dense form is Fine-Grained RLHF's (Wu et al. 2023, eq. 1; ALGORITHMS.md §1.8): each
    reward sits on its own token (a segment's reward on the segment's last token) instead of
    the whole reward on the last token; R on the last token alone is the scalar form exactly.

    Shapes: rewards (N,) or (N, T), mask (N, T), kl_penalty (N, T) or None -> (N, T), 0 off
    the mask.
    """
    assert rewards.dim() in (1, 2) and mask.dim() == 2 and mask.shape[0] == rewards.shape[0]
    mask = mask.bool()
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if kl_penalty is not None:
        _check_token_shapes(mask, kl_penalty)
        token_rewards = token_rewards - kl_penalty.to(rewards.dtype)
    if rewards.dim() == 2:
        _check_token_shapes(mask, rewards)
        return torch.where(mask, token_rewards + rewards, 0.0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_token = mask.any(-1)
    token_rewards[rows, last_token_index(mask)] += torch.where(has_token, rewards, 0.0)
    return torch.where(mask, token_rewards, 0.0)


def _broadcast(per_sample: Tensor, mask: Tensor) -> Tensor:
    """(N,) -> (N, T): the sample's value on each of its tokens, 0 off the mask."""
    return torch.where(mask.bool(), per_sample.unsqueeze(-1), 0.0)


def _sequence_reward(rewards: Tensor, mask: Tensor, kl_penalty: Tensor | None) -> Tensor:
    """R_i - sum_t kl_penalty_{i,t}: the KL folded into the sequence reward (RLOO, GRPO)."""
    if kl_penalty is None:
        return rewards
    _check_token_shapes(mask, kl_penalty)
    return rewards - torch.where(mask.bool(), kl_penalty, 0.0).sum(-1).to(rewards.dtype)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{l >= 0} gamma^l r_{t+l} over the row's valid tokens: (N, T) -> (N, T)."""
    _check_token_shapes(mask, token_rewards)
    mask = mask.bool()
    rewards = torch.where(mask, token_rewards, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return torch.where(mask, returns, 0.0)


# --------------------------------------------------------------------------- critic-based


@register_advantage("gae", kind="critic")
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), as in PPO for LMs.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  A_t = sum_l (gamma lam)^l delta_{t+l},
    returns G_t = A_t + V(s_t). V after the last valid token is 0 (the episode ends there:
    rewards and values after EOS are zeroed before the recursion).

    Shapes: token_rewards, values, mask (N, T) -> (advantages (N, T), returns (N, T)),
    0 where `mask` is False. No whitening here (the loop whitens, masked, if asked).
    """
    _check_token_shapes(mask, token_rewards, values)
    mask = mask.bool()
    rewards = torch.where(mask, token_rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lam * running, 0.0)
        next_value = torch.where(valid, values[:, t], 0.0)
        advantages[:, t] = running
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


# --------------------------------------------------------------------------- outcome-based


@register_advantage("grpo")
def grpo(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    kl_penalty: Tensor | None = None,
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """GRPO group-normalised outcome advantage (Shao et al. 2024, DeepSeekMath).

    A_i = (R_i - mean_{g(i)} R) / (std_{g(i)} R + eps) on every token of sample i; with
    `scale_by_std=False`, A_i = R_i - mean_{g(i)} R (Dr. GRPO, Liu et al. 2025, which removes
    the difficulty bias of the std). std is unbiased (as TRL and verl); eps as TRL. A group
    whose rewards are all equal gets A = 0. A KL penalty in the reward is folded in first:
    R_i <- R_i - sum_t kl_penalty_{i,t}.

    Shapes: rewards (N,), group_index (N,), mask (N, T) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    rewards = _sequence_reward(rewards, mask, kl_penalty)
    sums, counts, std = group_stats(rewards, group_index)
    advantage = rewards - sums / counts
    if scale_by_std:
        advantage = advantage / (std + eps)
    return _broadcast(advantage, mask)


@register_advantage("batch_norm")
def batch_norm(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    kl_penalty: Tensor | None = None,
    eps: float = 1e-4,
) -> Tensor:
    """Batch-normalised outcome advantage: A_i = (R_i - mean R) / (std R + eps) over every
    sample of the step (unbiased std, eps as TRL). GDPO's last step (Liu et al. 2026): with
    `reward_aggregation=normalize_then_sum`, R is already a sum of per-group normalised
    rewards, and GDPO normalises that sum over the batch, not the group (TRL's
    normalize_then_sum). `group_index` is accepted for the common signature and unused; a KL
    penalty in the reward is folded in first, as in `grpo`.

    Shapes: rewards (N,), group_index (N,), mask (N, T) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    rewards = _sequence_reward(rewards, mask, kl_penalty)
    std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    return _broadcast((rewards - rewards.mean()) / (std + eps), mask)


@register_advantage("rloo")
def rloo(
    rewards: Tensor, group_index: Tensor, mask: Tensor, *, kl_penalty: Tensor | None = None
) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

    A_i = R_i - (1 / (k - 1)) sum_{j in g(i), j != i} R_j = k / (k - 1) (R_i - mean_g R),
    with R_i = r_i - sum_t kl_penalty_{i,t} (KL folded in at sequence level). Every group
    needs k >= 2 samples.

    Shapes: rewards (N,), group_index (N,), mask (N, T) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    rewards = _sequence_reward(rewards, mask, kl_penalty)
    sums, counts, _ = group_stats(rewards, group_index)
    assert bool((counts >= 2).all()), "rloo needs at least 2 samples per prompt (group_size >= 2)"
    advantage = rewards - (sums - rewards) / (counts - 1)
    return _broadcast(advantage, mask)


@register_advantage("remax")
def remax(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    baseline_rewards: Tensor,
    kl_penalty: Tensor | None = None,
    clip: float | None = None,
) -> Tensor:
    """ReMax (Li et al. 2024): reward minus the reward of the greedy response to the prompt.

    A_{i,t} = clip(R_i - R(x_i, y_greedy), -c, c) - kl_penalty_{i,t}: the official code adds
    the *local* token KL penalty (not a return-to-go) and clips the difference.
    `baseline_rewards` (N,) is the greedy response's reward for each row's prompt, post-processed
    like `rewards`.

    Shapes: rewards (N,), group_index (N,), mask (N, T), baseline_rewards (N,) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    assert baseline_rewards.shape == rewards.shape, (
        f"baseline_rewards {tuple(baseline_rewards.shape)} must match rewards {tuple(rewards.shape)}"
    )
    difference = rewards - baseline_rewards
    if clip is not None:
        difference = difference.clamp(-clip, clip)
    advantages = _broadcast(difference, mask)
    if kl_penalty is not None:
        _check_token_shapes(mask, kl_penalty)
        advantages = advantages - torch.where(mask.bool(), kl_penalty, 0.0).to(advantages.dtype)
    return advantages


@register_advantage("reinforce_pp")
def reinforce_pp(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    kl_penalty: Tensor | None = None,
    gamma: float = 1.0,
    dense_rewards: Tensor | None = None,
) -> Tensor:
    """REINFORCE++ (Hu 2025): discounted return-to-go of token rewards, whitened globally.

    r_t = -kl_penalty_t + 1[t = last] R ;  G_t = sum_l gamma^l r_{t+l} ;
    A = (G - mean) / std, mean and std over every valid token of the batch (OpenRLHF
    `experience_maker.py`, estimator "reinforce"). `group_index` is unused.
    `dense_rewards` (N, T): per-token rewards whose per-sample sums are `rewards` (Fine-Grained
    RLHF); then r_t = -kl_penalty_t + R_t, so a token's return counts only the rewards at and
    after it.

    Shapes: rewards (N,), group_index (N,), mask (N, T), dense_rewards (N, T) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    placed = rewards if dense_rewards is None else dense_rewards
    returns = discounted_returns(token_level_rewards(placed, mask, kl_penalty), mask, gamma)
    return masked_whiten(returns, mask)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    kl_penalty: Tensor | None = None,
    gamma: float = 1.0,
    dense_rewards: Tensor | None = None,
) -> Tensor:
    """REINFORCE++-baseline (Hu 2025): subtract the prompt's group mean reward, then as
    REINFORCE++ (return-to-go with the token KL penalty, global-batch whitening).

    R'_i = R_i - mean_{g(i)} R ; r_t = -kl_penalty_t + 1[t = last] R'_i ; A = whiten(G).
    (OpenRLHF estimator "reinforce_baseline".) `dense_rewards` (N, T) whose per-sample sums
    are `rewards`: they stay on their tokens, and the baseline mean_{g(i)} R (of the sums) is
    subtracted on the last token.

    Shapes: rewards (N,), group_index (N,), mask (N, T), dense_rewards (N, T) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    sums, counts, _ = group_stats(rewards, group_index)
    centred = rewards - sums / counts
    if dense_rewards is not None:
        _check_token_shapes(mask, dense_rewards)
        dense_rewards = dense_rewards - token_level_rewards(sums / counts, mask)
    return reinforce_pp(centred, group_index, mask, kl_penalty=kl_penalty, gamma=gamma, dense_rewards=dense_rewards)


@register_advantage("return_to_go")
def return_to_go(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    kl_penalty: Tensor | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """Discounted return-to-go of the token rewards, with no baseline and no whitening:

        r_t = -kl_penalty_t + 1[t = last] R ;  A_t = sum_l gamma^l r_{t+l}.

    With beta x the k1 KL to a teacher as the penalty and gamma = 0, each token's advantage is
    beta (log pi_T(y_t) - log pi(y_t)), its own negative reverse-KL estimate: on-policy
    distillation (Agarwal et al. 2024, GKD; Thinking Machines 2025, discount 0). `group_index`
    is unused. Shapes: rewards (N,), group_index (N,), mask (N, T) -> (N, T).
    """
    _check_outcome_shapes(rewards, group_index, mask)
    return discounted_returns(token_level_rewards(rewards, mask, kl_penalty), mask, gamma)


@register_advantage("sequence_reward")
def sequence_reward(
    rewards: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    kl_penalty: Tensor | None = None,
) -> Tensor:
    """The sequence reward on every token, minus that token's own KL penalty:

        A_t = R - kl_penalty_t,

    REINFORCE with the KL by REINFORCE (TRL's Nash-MD: (p - 0.5) - beta sg(log pi - log pi_ref)
    per token). `group_index` is unused. Shapes: rewards (N,), mask (N, T) -> (N, T)."""
    _check_outcome_shapes(rewards, group_index, mask)
    advantages = _broadcast(rewards, mask)
    if kl_penalty is not None:
        _check_token_shapes(mask, kl_penalty)
        advantages = advantages - kl_penalty.to(advantages.dtype)
    return torch.where(mask.bool(), advantages, 0.0)


__all__ = [
    "ADVANTAGES",
    "ADVANTAGE_KINDS",
    "discounted_returns",
    "gae",
    "group_stats",
    "grpo",
    "last_token_index",
    "masked_mean",
    "masked_whiten",
    "register_advantage",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "return_to_go",
    "sequence_reward",
    "remax",
    "rloo",
    "token_level_rewards",
]
