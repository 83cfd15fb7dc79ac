"""Cross-family options for pairwise losses, as pure helpers the trainer calls:

- `ld_dpo`: LD-DPO length desensitisation of summed log-probs (from per-token log-probs);
- `wpo_weights` (+ `log_sum_squared_probs`): WPO per-pair importance weights;
- `combine_losses`: a weighted sum of registered pairwise losses;
- `mm_dpo_beta`: MM-DPO's per-pair beta from a reward model's margin.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from alignkit.objectives.registry import PAIRWISE, PairLogps


def ld_dpo(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    alpha_ld: float,
) -> tuple[Tensor, Tensor]:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"):
    split each response at the shorter response's length l_p = min(|y_w|, |y_l|); the first l_p
    response tokens count fully, the longer response's excess tokens are scaled by `alpha_ld`:

        logp_ld(y) = sum_{t <= l_p} log pi(y_t) + alpha_ld * sum_{t > l_p} log pi(y_t).

    alpha_ld = 1 is plain summation, 0 truncates to the common length. Returns the adjusted
    summed log-probs (chosen, rejected), each (B,), to put into `PairLogps` in place of the plain
    sums. Apply it to the policy AND to the reference per-token log-probs (as TRL's `ld_alpha`
    does), then use any reference-based loss (usually `dpo`).

    Shapes: *_token_logps (B, T_w) / (B, T_l); masks (B, T_*) with 1 on response tokens (need
    not be contiguous; position t counts the response tokens up to t). Padded positions are
    ignored whatever their log-prob value.
    """
    chosen_mask, rejected_mask = (
        chosen_mask.to(chosen_token_logps.dtype),
        rejected_mask.to(rejected_token_logps.dtype),
    )
    shared_len = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)  # (B, 1)

    def desensitised_sum(token_logps: Tensor, mask: Tensor) -> Tensor:
        position = mask.cumsum(-1)  # 1-based index among response tokens, (B, T)
        token_weight = (
            torch.where(position <= shared_len, 1.0, torch.full_like(mask, alpha_ld)) * mask
        )
        return (token_logps.masked_fill(mask == 0, 0.0) * token_weight).sum(-1)

    return (
        desensitised_sum(chosen_token_logps, chosen_mask),
        desensitised_sum(rejected_token_logps, rejected_mask),
    )


def log_sum_squared_probs(logits: Tensor) -> Tensor:
    """log sum_v pi(v | context)^2 per position, from logits (B, T, V) -> (B, T).

    The WPO "sampling-aligned" normaliser; compute it under no_grad in the trainer.
    """
    return torch.logsumexp(2 * torch.log_softmax(logits, dim=-1), dim=-1)


def wpo_weights(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    chosen_log_sum_sq_probs: Tensor | None = None,
    rejected_log_sum_sq_probs: Tensor | None = None,
) -> Tensor:
    """WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2):
    per-pair weight w = w(y_w) * w(y_l), with

        w(y) = exp( (1/|y|) * sum_t [ log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2 ] ),

    the length-normalised, sampling-aligned probability of y under the current policy. Detached
    (a weight, not a gradient path). Without the `*_log_sum_sq_probs` (B, T) normalisers
    (see `log_sum_squared_probs`) it falls back to the unaligned w(y) = exp(mean log pi(y_t)).
    Multiply a per-pair loss by it; not meaningful for the batch-coupled `aot`.

    Shapes: token log-probs, masks and normalisers (B, T_w) / (B, T_l) -> (B,).
    Matches TRL 1.16 `DPOTrainer._compute_loss` with `use_weighting=True`.
    """

    def sequence_weight(token_logps: Tensor, mask: Tensor, log_sum_sq: Tensor | None) -> Tensor:
        mask = mask.to(token_logps.dtype)
        aligned = token_logps if log_sum_sq is None else token_logps - log_sum_sq
        mean_aligned = (aligned.masked_fill(mask == 0, 0.0)).sum(-1) / mask.sum(-1).clamp(min=1)
        return torch.exp(mean_aligned)

    with torch.no_grad():
        return sequence_weight(
            chosen_token_logps, chosen_mask, chosen_log_sum_sq_probs
        ) * sequence_weight(rejected_token_logps, rejected_mask, rejected_log_sum_sq_probs)


def combine_losses(
    logps: PairLogps,
    loss_weights: Mapping[str, float],
    hparams: Mapping[str, Mapping[str, object]] | None = None,
) -> Tensor:
    """sum_name loss_weights[name] * PAIRWISE[name](logps, **hparams[name]), per pair (B,).

    E.g. MPO-style `{"dpo": 0.8, "bco": 0.2}`. `hparams` maps a loss name to its keyword
    hyper-parameters (missing name: the loss's defaults). Averaging the result over the batch
    equals TRL's multi-`loss_type` sum of weighted means.
    """
    hparams = hparams or {}
    unknown = sorted(set(loss_weights) - set(PAIRWISE)) + sorted(set(hparams) - set(loss_weights))
    if unknown:
        raise ValueError(f"combine_losses: unknown or unweighted loss names {unknown}")
    if not loss_weights:
        raise ValueError("combine_losses needs at least one loss")
    total: Tensor | None = None
    for name, weight in loss_weights.items():
        term = weight * PAIRWISE[name](logps, **hparams.get(name, {}))
        total = term if total is None else total + term
    return total


def mm_dpo_beta(
    reward_margin: Tensor, beta: float = 0.1, weight: float = 0.1, k: float = 1.0, min_beta: float = 1e-3
) -> Tensor:
    """MM-DPO's per-pair beta (Zhang et al. 2025, "MM-RLHF", arXiv 2502.10391, dynamic reward
    scaling): pairs a reward model separates by a wide margin get a larger beta,

        beta_i = max(beta * (1 + w * (1 - exp(-k * delta_i))), min_beta),
        delta_i = r(x_i, y_w) - r(x_i, y_l),

    then L_i = -log sigma(beta_i * delta_h_i) (DPO with beta_i). `weight` is the paper's w, `k`
    its sensitivity to the margin. The bracket saturates at 1 + w for confident pairs; a
    negative margin (the RM disagrees with the label) lowers beta, and `min_beta` keeps it
    positive. Checked against the official code (Kwai-YuanQi/MM-RLHF, read from its public
    mirror julyanghar/MM-RLHF, first commit e103c40, `trl/trainer/dpo_trainer.py`, `dpo_loss`):
    `beta_used = beta * (1 + ls_factor_weight * ls_factor)` clamped at min 1e-3, the factor
    1 - exp(-k delta) read per pair from the data (computed offline), `ls_factor_weight` = w =
    0.1 and beta = 0.1 in its `scripts/train/dpo_ov7b.sh`. The released k is not in that code:
    k = 1.0 is our default, set it with `dynamic_beta_k`. (The released `dpo_loss`, called with
    its default `implicit_beta=True`, then overrides this per-pair beta with a batch-level
    beta-DPO rule; we implement the per-pair rule the paper states.)

    Shapes: reward_margin (B,) -> beta (B,), detached from any graph (beta is a coefficient).
    """
    factor = 1.0 - torch.exp(-k * reward_margin.detach().float())
    return (beta * (1.0 + weight * factor)).clamp(min=min_beta)
