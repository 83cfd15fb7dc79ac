"""Per-token KL estimators on samples from the policy, u_t = logp_t - ref_logp_t
(Schulman, "Approximating KL divergence"). Each returns (B, T)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.objectives.registry import register_kl


@register_kl("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = u_t = logp - ref_logp: unbiased for KL(pi || ref), can be negative."""
    return logp - ref_logp


@register_kl("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = u_t^2 / 2: low variance, biased; its gradient is that of the forward-KL surrogate."""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(-u_t) - 1 + u_t >= 0: unbiased for KL(pi || ref) in expectation."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def capped(per_token: Tensor, cap: float | None) -> Tensor:
    """A per-token KL estimate clamped to [-cap, cap] (gradient 0 outside; None: unchanged).
    k3 = exp(-u) - 1 + u grows exponentially in -u (142 at u = -5): one rare token can rule a
    batch's KL term; verl's low_var_kl clamps at 10."""
    return per_token if cap is None else per_token.clamp(-cap, cap)
