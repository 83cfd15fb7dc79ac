"""Pairwise preference losses. Each takes `PairLogps` and keyword hyper-parameters and
returns the per-pair loss (B,). Notation (ALGORITHMS.md §0): h = logp_theta - logp_ref,
delta_h = h_w - h_l (summed log-probs unless a docstring says otherwise)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignkit.objectives.registry import PairLogps, register_pairwise


def log_ratio_margin(logps: PairLogps) -> Tensor:
    """delta_h = (logp_w - ref_w) - (logp_l - ref_l), shape (B,)."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
    return (logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected)


@register_pairwise("dpo")
def dpo(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al. 2023): L = -log sigma(beta * delta_h).

    Shapes: every field of `logps` is (B,); returns the per-pair loss (B,).
    Equals log 2 when the policy equals the reference (delta_h = 0).
    """
    return -F.logsigmoid(beta * log_ratio_margin(logps))
