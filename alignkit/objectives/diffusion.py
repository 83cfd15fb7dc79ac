"""Losses over the denoising chain of a diffusion model, one value per (sample, denoising step).

Each denoising step x_t -> x_{t-1} of a sampler with eta > 0 is a Gaussian action, and its
log-likelihood log pi(x_{t-1} | x_t, c) is what these losses read (alignkit.diffusion.ddim,
averaged over latent elements as in DDPO/D3PO). Registered in `DIFFUSION` by name; every
function is pure (tensors and keyword hyper-parameters in, per-step losses out, no reduction).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DIFFUSION: dict[str, Callable[..., Tensor]] = {}


def register_diffusion(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register a per-step diffusion loss under `name`."""

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in DIFFUSION:
            raise ValueError(f"diffusion loss {name!r} is registered twice")
        DIFFUSION[name] = fn
        return fn

    return decorate


def clipped_log_ratio(logps: Tensor, base_logps: Tensor, eps: float) -> Tensor:
    """log clip(pi / pi_base, 1 - eps, 1 + eps) = clamp(logps - base_logps, log(1 - eps), log(1 + eps))."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return (logps - base_logps).clamp(math.log1p(-eps), math.log1p(eps))


@register_diffusion("d3po")
def d3po_step_loss(
    chosen_logps: Tensor,
    ref_chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    eps: float = 0.1,
) -> Tensor:
    """D3PO (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any
    Reward Model"): DPO applied to each denoising step of a preferred and a dispreferred chain.

        rho_w = pi_theta(x^w_{t-1} | x^w_t, c) / pi_ref(x^w_{t-1} | x^w_t, c)   (rho_l likewise)
        L_t   = -log sigmoid(beta [log clip(rho_w, 1-eps, 1+eps) - log clip(rho_l, 1-eps, 1+eps)])

    pi_ref is the frozen initial UNet. The clip bounds the per-step likelihood ratio (the paper's
    bound on the Q-values); outside [1-eps, 1+eps] that ratio gets no gradient.

    Checked against the official code, github.com/yk7333/d3po scripts/rm/train_d3po.py: the loss
    `-log(sigmoid(beta*log(ratio_0)*prefer_0 + beta*log(ratio_1)*prefer_1))` with
    `ratio = clamp(exp(logp - ref_logp), 1 - eps, 1 + eps)` and prefer = (+1, -1) for the chosen
    and rejected sample; defaults from its config/base.py (train.beta = 0.1, train.eps = 0.1).
    We clamp in log space (the same numbers, no exp overflow).

    Shapes: every input (B,) or (B, S) for S steps; returns the loss per element, same shape.

    Worked example (beta = 0.1, eps = 0.1): log-ratios 0.05 and -0.02 are inside the clip, so
    the logit is 0.1 x 0.07 = 0.007 and L = log(1 + e^-0.007) = 0.6896533. Log-ratios 0.5 and
    -0.5 are clipped to log 1.1 = 0.0953102 and log 0.9 = -0.1053605: logit 0.0200671,
    L = 0.6831640, and no gradient reaches either log-prob.
    """
    chosen_ratio = clipped_log_ratio(chosen_logps, ref_chosen_logps, eps)
    rejected_ratio = clipped_log_ratio(rejected_logps, ref_rejected_logps, eps)
    return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))


@register_diffusion("prdp")
def prdp_step_loss(
    logps_a: Tensor,
    old_logps_a: Tensor,
    logps_b: Tensor,
    old_logps_b: Tensor,
    reward_a: Tensor,
    reward_b: Tensor,
    *,
    num_steps: int,
    beta: float = 1.0,
    clip_eps: float = 1e-4,
) -> Tensor:
    """PRDP (Deng et al. 2024, "PRDP: Proximal Reward Difference Prediction for Large-Scale Reward
    Finetuning of Diffusion Models", arXiv 2402.08714): the model regresses the reward difference
    of two images of one prompt from their denoising chains, one timestep at a time, with a
    PPO-style clip as its proximal update.

        d_t      = beta [log pi_theta/pi_old (x^a_{t-1} | x^a_t, c) - log pi_theta/pi_old (x^b_{t-1} | x^b_t, c)]
        d_t^clip = beta [log clip(pi_theta/pi_old)(a) - log clip(pi_theta/pi_old)(b)],  clip to [1-eps, 1+eps]
        L_t      = max((dr / T - d_t)^2, (dr / T - d_t^clip)^2),     dr = r(x^a_0, c) - r(x^b_0, c)

    Summed over the T steps, the d_t form the predicted reward difference
    r_hat = beta sum_t log-ratio difference of the RDP objective E[(dr - r_hat)^2], whose optimum is
    that of KL-regularised reward maximisation with pi_old as the reference (the paper's
    theorem); the timestep-wise form lets each step train on its own, 1/T of the difference.
    The max of the unclipped and clipped errors (PPO's pessimistic bound, for a regression)
    removes the incentive to move a ratio beyond the clip within one round of samples.

    No official code was found (searched GitHub for PRDP / reward difference prediction); this
    follows our reading of the paper's Algorithm 1 and equations, and the defaults (beta = 1,
    clip_eps = 1e-4, DDPO's clip range for mean-reduced log-probs) are ours, not verified
    against the paper's hyper-parameter table.

    Shapes: log-prob tensors (B, S) for S of the chain's T = `num_steps` steps (or (B,)); the
    rewards (B,). Returns the per-(pair, step) loss, the log-probs' shape.

    Worked example (T = 4, beta = 1, clip_eps = 0.1, r_a = 1.0, r_b = 0.2, so dr / T = 0.2):
    log-ratios 0.08 and -0.05 give d = 0.13, inside the clip, L = (0.2 - 0.13)^2 = 0.0049.
    Log-ratios 0.3 and -0.3 give d = 0.6 and d^clip = log 1.1 - log 0.9 = 0.2006707:
    L = max(0.16, 4.5e-7) = 0.16 (the overshoot is penalised in full).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    target = (reward_a - reward_b) / num_steps
    if logps_a.ndim > target.ndim:
        target = target.reshape(target.shape + (1,) * (logps_a.ndim - target.ndim))
    predicted = beta * ((logps_a - old_logps_a) - (logps_b - old_logps_b))
    predicted_clipped = beta * (clipped_log_ratio(logps_a, old_logps_a, clip_eps)
                                - clipped_log_ratio(logps_b, old_logps_b, clip_eps))
    return torch.maximum((target - predicted) ** 2, (target - predicted_clipped) ** 2)
