"""Safe RLHF's PPO-Lagrangian (Dai et al. 2024, "Safe RLHF: Safe Reinforcement Learning from
Human Feedback"; PKU-Alignment/safe-rlhf `PPOLagTrainer`): the `safe_ppo` preset.

The constrained problem  max_theta J_R(theta)  s.t.  J_C(theta) <= d  (d = `cost_limit`) is
solved through its Lagrangian  min_{lambda >= 0} max_theta J_R - lambda (J_C - d):

- lambda is kept as log lambda (so it stays positive) and takes one gradient step per training
  step on  L_lambda = -(mean episode cost - d) lambda:  log lambda <- log lambda + lr (C - d) lambda
  (`lagrange_step`), C the mean cost of the last `cost_window` episodes (`CostWindow`), before
  this step's advantages (safe-rlhf's order). lambda grows while the cost is above the limit.
- two critics, one for the reward and one for the cost (`DualCritic`), each with its own GAE
  over per-token signals: reward  r_t = -beta KL_t + 1[t = last] R,  cost  c_t = +beta KL_t +
  1[t = last] C  (the KL enters the cost with the opposite sign, as in safe-rlhf).
- the policy's advantage mixes the two:  A = (A_R - lambda A_C) / (1 + lambda)  (`mix_advantages`).

Costs come from `--cost-model DIR` (a model trained with `alignkit train cost`: cost > 0 means
unsafe) or `--cost module:function` (the same conventions as a reward function).
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor, nn

from alignkit.advantages import gae, token_level_rewards


def lagrange_step(log_lambda: float, mean_cost: float, limit: float, lr: float,
                  lambda_max: float | None = None) -> float:
    """One gradient-descent step of log lambda on  L = -(C - d) exp(log lambda):

        log lambda' = log lambda + lr (C - d) exp(log lambda),   then lambda' <= lambda_max."""
    updated = log_lambda + lr * (mean_cost - limit) * math.exp(log_lambda)
    if lambda_max is not None:
        updated = min(updated, math.log(lambda_max))
    return updated


class CostWindow:
    """The episode costs of the last `size` samples (safe-rlhf's episode_cost window)."""

    def __init__(self, size: int) -> None:
        self.costs: deque[float] = deque(maxlen=size)

    def add(self, costs: list[float]) -> float:
        """Append a step's costs; returns the window's mean."""
        self.costs.extend(costs)
        return sum(self.costs) / len(self.costs)

    def state(self) -> list[float]:
        return list(self.costs)

    def load_state(self, costs: list[float]) -> None:
        self.costs.clear()
        self.costs.extend(float(c) for c in costs)


def mix_advantages(reward_advantages: Tensor, cost_advantages: Tensor, lam: float) -> Tensor:
    """A = (A_R - lambda A_C) / (1 + lambda): the Lagrangian's advantage, scaled to stay O(1)."""
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def lagrangian_advantages(rewards: Tensor, costs: Tensor, mask: Tensor, kl_penalty: Tensor | None,
                          values: Tensor, lam: float, gamma: float, lam_gae: float) -> tuple[Tensor, Tensor]:
    """(mixed advantages (N, L), returns (N, L, 2) of the reward and cost critics).

    rewards (N,), or dense (N, L) at their tokens (`token_level_rewards`); costs (N,);
    kl_penalty (N, L) = beta x KL_t or None; values (N, L, 2): V_R, V_C."""
    reward_tokens = token_level_rewards(rewards, mask, kl_penalty)
    cost_tokens = token_level_rewards(costs, mask, None if kl_penalty is None else -kl_penalty)
    reward_adv, reward_ret = gae(reward_tokens, values[..., 0], mask, gamma=gamma, lam=lam_gae)
    cost_adv, cost_ret = gae(cost_tokens, values[..., 1], mask, gamma=gamma, lam=lam_gae)
    return mix_advantages(reward_adv, cost_adv, lam), torch.stack([reward_ret, cost_ret], dim=-1)


class DualCritic(nn.Module):
    """The reward critic and the cost critic, two separate value models: `values` is (N, L, 2)
    (reward, cost), so one optimizer step trains both with the policy."""

    def __init__(self, reward_critic: nn.Module, cost_critic: nn.Module) -> None:
        super().__init__()
        self.reward_critic, self.cost_critic = reward_critic, cost_critic

    def values(self, batch) -> Tensor:
        return torch.stack([self.reward_critic.values(batch), self.cost_critic.values(batch)], dim=-1)
