"""Unpaired (pointwise) preference losses: each example is one response with a binary label.

`UNPAIRED`: dict name -> fn(logps (B,), ref_logps (B,), labels bool (B,), kl_estimate, **hparams)
-> per-example loss (B,), in the input order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

UnpairedLoss = Callable[..., Tensor]
UNPAIRED: dict[str, UnpairedLoss] = {}


def register_unpaired(name: str) -> Callable[[UnpairedLoss], UnpairedLoss]:
    """Decorator: register `fn(logps, ref_logps, labels, kl_estimate, **hparams) -> (B,)`."""

    def decorate(fn: UnpairedLoss) -> UnpairedLoss:
        if name in UNPAIRED:
            raise ValueError(f"unpaired loss {name!r} is registered twice")
        UNPAIRED[name] = fn
        return fn

    return decorate


def kto_kl_estimate(mismatched_logps: Tensor, ref_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z_0 = max(0, sg(mean_j [logp(y'_j|x_j) - ref_logp(y'_j|x_j)])),
    from mismatched (prompt, completion) pairs (TRL shifts completions within the batch).

    Shapes: (B',) -> scalar. Under data parallelism average across ranks before the clamp, as
    TRL does (`gather_for_metrics(kl).mean().clamp(min=0)`).
    """
    return (mismatched_logps - ref_mismatched_logps).mean().detach().clamp(min=0)


@register_unpaired("kto")
def kto(
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_estimate: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 7), with h = logp - ref_logp and z_0 = `kl_estimate`:

        desirable (label True):    lambda_D * (1 - sigma(beta * (h - z_0)))
        undesirable (label False): lambda_U * (1 - sigma(beta * (z_0 - h)))

    `kl_estimate` is a scalar (see `kto_kl_estimate`); it is detached and clamped to >= 0 here
    as well, so no gradient flows through it. Matches TRL 1.16 `KTOTrainer._compute_loss`
    (`loss_type="kto"`) except that the result keeps the input order (TRL concatenates all
    desirable losses, then all undesirable ones; the mean is the same).
    Shapes: logps, ref_logps, labels (B,) -> (B,).
    """
    z0 = torch.as_tensor(kl_estimate, dtype=logps.dtype, device=logps.device).detach().clamp(min=0)
    log_ratio = logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    return torch.where(labels.bool(), desirable, undesirable)
