"""Pairwise preference losses with a reference model: DPO and the variants from the papers.

Each takes `PairLogps` and keyword hyper-parameters and returns the per-pair loss (B,); callers
aggregate. Notation (ALGORITHMS.md §0): h = logp_theta - logp_ref (summed over response tokens),
delta_h = h_w - h_l, sigma = logistic. "Length-normalised" means divided by the response's token
count (clamped to >= 1, as TRL does).

The TRL-only `loss_type` variants live in `pairwise_trl.py`, the reference-free losses in
`reference_free.py`, f-DPO in `divergences.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.objectives.registry import PairLogps, register_pairwise


def log_ratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """(h_w, h_l) = (logp_w - ref_w, logp_l - ref_l), each (B,)."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


def log_ratio_margin(logps: PairLogps) -> Tensor:
    """delta_h = (logp_w - ref_w) - (logp_l - ref_l), shape (B,)."""
    chosen_logratio, rejected_logratio = log_ratios(logps)
    return chosen_logratio - rejected_logratio


def per_token(summed: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalise a summed quantity: summed / max(tokens, 1), shape (B,)."""
    return summed / tokens.clamp(min=1)


def chosen_mean_nll(logps: PairLogps) -> Tensor:
    """NLL of the chosen response averaged over its tokens: -logp_w / |y_w|, shape (B,)."""
    return -per_token(logps.chosen, logps.chosen_tokens)


def smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): BCE of z against the soft label 1 - eps."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_pairwise("dpo")
def dpo(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al. 2023): L = -log sigma(beta * delta_h).

    Shapes: every field of `logps` is (B,); returns the per-pair loss (B,).
    Equals log 2 when the policy equals the reference (delta_h = 0). TRL `loss_type="sigmoid"`.
    """
    return -F.logsigmoid(beta * log_ratio_margin(logps))


@register_pairwise("cdpo")
def cdpo(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.1) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):

        L = -(1 - eps) log sigma(beta * delta_h) - eps log sigma(-beta * delta_h),

    eps = `label_smoothing`, the assumed rate of flipped labels. Minimised at a finite margin
    (sigma(beta * delta_h) = 1 - eps), so it is not monotone in delta_h for eps > 0.
    Shapes: fields (B,) -> (B,).
    """
    return smoothed_sigmoid_loss(beta * log_ratio_margin(logps), label_smoothing)


@register_pairwise("rdpo")
def rdpo(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.1) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): "Provably Robust DPO", unbiased under label noise eps:

        L = [(1 - eps)(-log sigma(beta * delta_h)) - eps(-log sigma(-beta * delta_h))] / (1 - 2 eps),

    eps = `label_smoothing` in [0, 0.5). Can be negative. TRL `loss_type="robust"`.
    Shapes: fields (B,) -> (B,).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"rdpo needs label_smoothing in [0, 0.5), got {label_smoothing}")
    logits = beta * log_ratio_margin(logps)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@register_pairwise("ipo")
def ipo(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): L = (h_w/|y_w| - h_l/|y_l| - 1/(2 beta))^2.

    `beta` is the paper's tau. Each response's log-ratio is length-normalised before the
    difference, as TRL does (confirmed with the IPO authors per TRL's comment). Not monotone:
    it pulls the normalised margin to 1/(2 beta), it does not push it up without bound.
    Shapes: fields (B,) -> (B,).
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    margin = per_token(chosen_logratio, logps.chosen_tokens) - per_token(
        rejected_logratio, logps.rejected_tokens
    )
    return (margin - 1 / (2 * beta)) ** 2


@register_pairwise("hinge")
def hinge(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """SLiC-HF hinge (Zhao et al. 2023): L = max(0, 1 - beta * delta_h). TRL `loss_type="hinge"`.

    Zero (and flat) once beta * delta_h >= 1. Shapes: fields (B,) -> (B,).
    """
    return torch.relu(1 - beta * log_ratio_margin(logps))


@register_pairwise("sigmoid_norm")
def sigmoid_norm(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """Length-normalised DPO: L = -log sigma(beta * (h_w/|y_w| - h_l/|y_l|)).

    TRL `loss_type="sigmoid_norm"`. Shapes: fields (B,) -> (B,).
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    margin = per_token(chosen_logratio, logps.chosen_tokens) - per_token(
        rejected_logratio, logps.rejected_tokens
    )
    return -F.logsigmoid(beta * margin)


@register_pairwise("rpo")
def rpo(logps: PairLogps, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """RPO / iterative RPO (Pang et al. 2024): L = -log sigma(beta * delta_h) + alpha * NLL_w,

    NLL_w = -logp_theta(y_w|x) / |y_w| (length-normalised, as in the paper's Eq. 1).
    Shapes: fields (B,) -> (B,).
    """
    return dpo(logps, beta=beta) + alpha * chosen_mean_nll(logps)


@register_pairwise("modpo")
def modpo(logps: PairLogps, weights: Sequence[float] | Tensor, beta: float = 0.1) -> Tensor:
    """MODPO (Zhou et al. 2023): multi-objective DPO ("Beyond One-Preference-Fits-All"),

        L = -log sigma( (1/w_0) * [beta * delta_h - w_rest . margins] ),

    `weights` = [w_0, w_1, ..., w_K] (w_0 > 0 weights the objective the pairs were labelled for),
    `logps.margins` (B, K) = r_k(x, y_w) - r_k(x, y_l) for the other K objectives.
    Reference: ZHZisZZ/modpo `src/trainer/modpo_trainer.py` (sigmoid variant).
    Shapes: fields (B,), margins (B, K) -> (B,).
    """
    if logps.margins is None:
        raise ValueError("modpo needs PairLogps.margins (B, K) from the other objectives' rewards")
    margins = logps.margins
    weights = torch.as_tensor(weights, dtype=margins.dtype, device=margins.device)
    if weights.ndim != 1 or weights.shape[0] != margins.shape[-1] + 1:
        raise ValueError(
            f"modpo weights must be [w_0, w_1..w_K] with K = margins.shape[-1] = "
            f"{margins.shape[-1]}; got {tuple(weights.shape)}"
        )
    logits = (beta * log_ratio_margin(logps) - margins @ weights[1:]) / weights[0]
    return -F.logsigmoid(logits)
