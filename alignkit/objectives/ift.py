"""IFT, intuitive fine-tuning (Hua et al. 2024, "Intuitive Fine-Tuning: Towards Simplifying
Alignment into a Single Process"; ALGORITHMS.md §3.9). Reference: TsinghuaC3I/
Intuitive-Fine-Tuning `src/trainers.py` (`loss_config.name == 'ift'`, `get_cumsum_weight`) with
`config/loss/ift.yaml`: lambda 0.2 (no schedule), gamma 0.95, propagation type "loss", side
"left", norm "L1".

Temporal residual connection (done by the trainer, 2 forwards + 1 backward):
  1. no-grad forward on the ground truth; y_hat_t = argmax of the logits at t - 1;
  2. e~_t = (1 - lambda) e(y*_t) + lambda e(y_hat_t) on response positions (prompt unchanged);
  3. forward with gradients on `inputs_embeds = e~`; l_t = -log pi(y*_t | e~_<=t-1).

Relation propagation (this module): with n_b response tokens of sequence b and
u_t = l_t / n_b on response positions (0 elsewhere),

    w_t = sum_{s >= t} gamma^(s - t) u_s            (discounted cumulative FUTURE loss)
    w_t <- w_t * n_b / sum_t w_t                    (L1 norm, mean weight 1 per sequence)
    loss_b = sum_t w_t l_t / n_b                    (B,)

As in the reference code the weights are NOT detached: gradients also flow through w.
"""

from __future__ import annotations

import torch
from torch import Tensor


def discounted_cumsum_right(values: Tensor, gamma: float) -> Tensor:
    """y_t = sum_{s >= t} gamma^(s - t) x_s along the last dim: (B, T) -> (B, T).

    Vectorised as x @ G with G[s, t] = gamma^(s - t) for s >= t (O(T^2) memory, differentiable).
    """
    length = values.shape[-1]
    positions = torch.arange(length, device=values.device)
    offset = positions.unsqueeze(1) - positions.unsqueeze(0)  # (T, T): s - t
    decay = torch.where(
        offset >= 0,
        torch.as_tensor(gamma, dtype=values.dtype, device=values.device) ** offset.clamp(min=0),
        torch.zeros((), dtype=values.dtype, device=values.device),
    )
    return values @ decay


def relation_propagation_weights(token_logps: Tensor, response_mask: Tensor, gamma: float = 0.95) -> Tensor:
    """IFT token weights (see module docstring): (B, T) -> (B, T), mean 1 over each response."""
    mask = response_mask.to(token_logps.dtype)
    counts = mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    if gamma == 0:
        return mask
    per_token_loss = -token_logps * mask / counts
    weights = discounted_cumsum_right(per_token_loss, gamma) * mask
    return weights * counts / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def ift(token_logps: Tensor, response_mask: Tensor, gamma: float = 0.95) -> Tensor:
    """IFT (Hua et al. 2024): sum_t w_t * (-log pi(y*_t | mixed inputs)) / n_b.

    token_logps (B, T) from the forward on mixed embeddings (0 off the response),
    response_mask (B, T) bool -> per-sequence loss (B,).
    """
    mask = response_mask.to(token_logps.dtype)
    weights = relation_propagation_weights(token_logps, response_mask, gamma)
    return (-token_logps * weights * mask).sum(-1) / mask.sum(-1).clamp(min=1)
