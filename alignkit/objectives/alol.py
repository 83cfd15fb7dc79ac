"""A-LoL: advantage-based offline policy gradient (Baheti et al. 2024, "Leftover Lunch:
Advantage-based Offline Reinforcement Learning for Language Models"; ALGORITHMS.md §3.7).

The whole response is one action; with advantage A(x, y) = R(x, y) - V_ref(x) (only A > 0 is
trained on), the per-example losses are

    alol           A * clip(sg(pi_theta(y|x) / pi_ref(y|x)), 1 - eps, 1 + eps) * NLL(y)
    alol_ref_free  A * NLL(y)
    alol_seq       A * sum_t clip(sg(pi_theta(y_t|.) / pi_ref(y_t|.)), 1 - eps, 1 + eps) * nll_t
    alol_kl        A * NLL(y) + kl_beta * (logp_theta(y|x) - logp_ref(y|x))

with NLL(y) = -sum_t log pi_theta(y_t | x, y_<t) (summed, not averaged) and eps = 0.9, i.e. the
ratio is clipped to [0.1, 1.9]. Reference: abaheti95/LoL-RL `lolrl_qlora_llama_hh.py`
(`--algorithm a_lol | a_lol_ref_free | a_lol_seq`, `--ppo_clip 0.9`; the KL variant runs
`a_lol` with `--kl_beta > 0`, which the code only allows with the clip off, so `alol_kl` has no
importance weight). Every function takes

    token_logps (B, T) policy log-probs, 0 off the response;  response_mask (B, T) bool;
    advantages (B,);  ref_token_logps (B, T) or None;  ref_logps (B,) or None

and returns the per-example loss (B,); callers take the batch mean (the reference code's
`torch.mean` over the batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AlolLoss = Callable[..., Tensor]
ALOL: dict[str, AlolLoss] = {}
REFERENCE_FREE_ALOL = {"alol_ref_free"}


def register_alol(name: str) -> Callable[[AlolLoss], AlolLoss]:
    def decorate(fn: AlolLoss) -> AlolLoss:
        if name in ALOL:
            raise ValueError(f"A-LoL loss {name!r} is registered twice")
        ALOL[name] = fn
        return fn

    return decorate


def clipped_ratio(log_ratio: Tensor, clip_epsilon: float) -> Tensor:
    """clip(exp(sg(log_ratio)), 1 - eps, 1 + eps); any shape. No gradient flows through it."""
    return torch.exp(log_ratio.detach()).clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)


def _need(value: Tensor | None, name: str, loss: str) -> Tensor:
    if value is None:
        raise ValueError(f"{loss} needs {name}")
    return value


@register_alol("alol")
def alol(token_logps, response_mask, advantages, ref_token_logps=None, ref_logps=None,
         clip_epsilon: float = 0.9) -> Tensor:
    """A-LoL (Baheti et al. 2024): A * clip(sg(pi/pi_ref), 1-eps, 1+eps) * NLL_sum, sequence ratio."""
    logps = (token_logps * response_mask).sum(-1)  # (B,)
    ratio = clipped_ratio(logps - _need(ref_logps, "ref_logps", "alol"), clip_epsilon)
    return advantages * ratio * (-logps)


@register_alol("alol_ref_free")
def alol_ref_free(token_logps, response_mask, advantages, ref_token_logps=None, ref_logps=None) -> Tensor:
    """A-LoL ref-free (Baheti et al. 2024): A * NLL_sum, no importance weight."""
    return advantages * (-(token_logps * response_mask).sum(-1))


@register_alol("alol_seq")
def alol_seq(token_logps, response_mask, advantages, ref_token_logps=None, ref_logps=None,
             clip_epsilon: float = 0.9) -> Tensor:
    """A-LoL seq (Baheti et al. 2024): A * sum_t clip(sg(pi_t/pi_ref_t), 1-eps, 1+eps) * nll_t."""
    ref = _need(ref_token_logps, "ref_token_logps", "alol_seq")
    mask = response_mask.to(token_logps.dtype)
    ratio = clipped_ratio(token_logps - ref, clip_epsilon) * mask  # (B, T)
    return advantages * (ratio * (-token_logps) * mask).sum(-1)


@register_alol("alol_kl")
def alol_kl(token_logps, response_mask, advantages, ref_token_logps=None, ref_logps=None,
            kl_beta: float = 0.1) -> Tensor:
    """A-LoL KL (Baheti et al. 2024): A * NLL_sum + kl_beta * (logp - ref_logp), no ratio."""
    logps = (token_logps * response_mask).sum(-1)
    return advantages * (-logps) + kl_beta * (logps - _need(ref_logps, "ref_logps", "alol_kl"))


def fit_value_head(features: Tensor, targets: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Closed-form ridge regression V(x) = w . f(x) + b on standardised features.

    features (N, H), targets (N,) -> (weight (H,), bias ()) in the ORIGINAL feature scale, from
    min_w ||F_std w + b - y||^2 + ridge * N * ||w||^2 (the bias is not penalised). float64 inside.
    """
    x = features.double()
    y = targets.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    y_mean = y.mean()
    gram = z.T @ z + ridge * len(y) * torch.eye(z.shape[1], dtype=z.dtype)
    w_std = torch.linalg.solve(gram, z.T @ (y - y_mean))
    weight = w_std / std
    bias = y_mean - (weight * mean).sum()
    return weight.float(), bias.float()


def r_squared(predictions: Tensor, targets: Tensor) -> Tensor:
    """1 - SS_res / SS_tot over (N,) tensors (0-d result; 0 when targets are constant)."""
    residual = ((targets - predictions) ** 2).sum()
    total = ((targets - targets.mean()) ** 2).sum()
    return torch.where(total > 0, 1 - residual / total.clamp(min=1e-12), torch.zeros_like(total))
