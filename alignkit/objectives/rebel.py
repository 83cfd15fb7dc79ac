"""REBEL / REFUEL: regress the difference of two samples' rewards with the difference of their
log-ratios to the sampling policy (Gao et al. 2024; REFUEL applies it to the future of a
multi-turn dialogue after a shared reset turn).

    l_theta(y) = sum_t [log pi_theta(y_t | s_t) - log pi_t(y_t | s_t)]       (trained tokens only)
    L = ( (l_theta(y1) - l_theta(y2)) - eta (R(y1) - R(y2)) )^2

pi_t is the policy that sampled the pair (its log-probs taken before the update). Pinned from
the official code (ZhaolinGao/REFUEL, setting_one/refuel.py): eta multiplies the reward
difference (`reg_diff = ratio_logprob - eta * (chosen_reward - reject_reward)`), default 1.0,
the loss is the mean of the squares over pairs. There are no ties to drop: equal rewards
regress the log-ratio difference to 0.
"""

from __future__ import annotations

from torch import Tensor


def rebel_loss(delta_first: Tensor, delta_second: Tensor, reward_first: Tensor, reward_second: Tensor,
               eta: float) -> Tensor:
    """(P,) squared regression errors from (P,) summed log-ratios l_theta and rewards.

    >>> import torch
    >>> rebel_loss(torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([1.0]), torch.tensor([0.0]), 0.3)
    tensor([0.0100])
    """
    return ((delta_first - delta_second) - eta * (reward_first - reward_second)) ** 2
