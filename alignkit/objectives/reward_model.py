"""Reward-model losses (ALGORITHMS.md §1.1). Pure functions of scores, per-pair values (B,)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley-Terry loss with optional margin and centering (InstructGPT; Llama 2; TRL).

    L = -log sigma(r_w - r_l - m) + c * (r_w + r_l)^2

    `m` (B,) is the per-pair margin (0 when None); `c` keeps scores centred near 0.
    Shapes: scores (B,); returns the per-pair loss (B,).
    """
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)
    if center_coef:
        loss = loss + center_coef * (chosen_scores + rejected_scores) ** 2
    return loss
