"""Listwise (ranking) preference losses over K candidate responses per prompt.

`LISTWISE`: dict name -> fn(logps, tokens, scores, ref_logps=None, mask=None, **hparams) -> (B,)
- logps (B, K): summed response log-probs under the policy;
- tokens (B, K): response token counts;
- scores (B, K): reward / rating of each candidate, higher = better (defines the ranking);
- ref_logps (B, K) or None: reference log-probs (reference-free losses ignore them);
- mask (B, K) bool or None: True on real candidates, for ragged lists (None = all real).

Ties in `scores` are ranked by candidate position (stable sort). Rows need >= 1 real candidate;
a row with a single one has zero ranking loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ListwiseLoss = Callable[..., Tensor]
LISTWISE: dict[str, ListwiseLoss] = {}


def register_listwise(name: str) -> Callable[[ListwiseLoss], ListwiseLoss]:
    """Decorator: register `fn(logps, tokens, scores, ref_logps, mask, **hparams) -> (B,)`."""

    def decorate(fn: ListwiseLoss) -> ListwiseLoss:
        if name in LISTWISE:
            raise ValueError(f"listwise loss {name!r} is registered twice")
        LISTWISE[name] = fn
        return fn

    return decorate


def rank_by_score(scores: Tensor, mask: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Sort each row best-first by score, real candidates before padding.

    Returns (sorted_mask, *sorted_tensors), all (B, K). Padding gets score -inf for sorting.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    order = torch.sort(
        scores.masked_fill(~mask, float("-inf")), dim=-1, descending=True, stable=True
    )
    index = order.indices
    return (mask.gather(-1, index), *(t.gather(-1, index) for t in tensors))


def plackett_luce_nll(utilities: Tensor, mask: Tensor) -> Tensor:
    """-log P(ranking) = sum_k [ log sum_{j >= k} exp(u_j) - u_k ] over real candidates.

    utilities (B, K) already sorted best-first, mask (B, K) sorted likewise (padding last).
    The last real candidate's term is 0. Returns (B,).
    """
    very_negative = torch.finfo(utilities.dtype).min
    masked = utilities.masked_fill(~mask, very_negative)
    # log-sum-exp over the remaining candidates j >= k: reverse, cumulative, reverse back
    remaining_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    return torch.where(mask, remaining_lse - masked, torch.zeros_like(masked)).sum(-1)


@register_listwise("listwise_dpo")
def listwise_dpo(
    logps: Tensor,
    tokens: Tensor,
    scores: Tensor,
    ref_logps: Tensor | None = None,
    mask: Tensor | None = None,
    beta: float = 0.1,
) -> Tensor:
    """Plackett-Luce DPO (Rafailov et al. 2023, Appendix A.3; ALGORITHMS.md §1.2): with
    r_k = beta * (logp_k - ref_logp_k) and candidates ranked by `scores` y_(1) > ... > y_(n),

        L = -sum_{k=1}^{n-1} log [ exp(r_(k)) / sum_{j >= k} exp(r_(j)) ].

    K = 2 is exactly `dpo`. Shapes: (B, K) inputs -> (B,). `tokens` is unused (summed logps).
    """
    if ref_logps is None:
        raise ValueError("listwise_dpo needs ref_logps (B, K)")
    sorted_mask, sorted_logratio = rank_by_score(scores, mask, logps - ref_logps)
    return plackett_luce_nll(beta * sorted_logratio, sorted_mask)


@register_listwise("pro")
def pro(
    logps: Tensor,
    tokens: Tensor,
    scores: Tensor,
    ref_logps: Tensor | None = None,
    mask: Tensor | None = None,
    sft_weight: float = 0.05,
) -> Tensor:
    """PRO (Song et al. 2024, "Preference Ranking Optimization for Human Alignment"; ALGORITHMS.md
    §3.5). With s_k = logp_k / |y_k| (length-averaged), candidates ranked by reward r (`scores`)
    y_1 > ... > y_n, and dynamic inverse temperatures tau_k^i = r_k - r_i (i > k),
    tau_k^k = max_{i > k} tau_k^i:

        L_rank = sum_{k=1}^{n-1} -log [ exp(s_k tau_k^k) / (exp(s_k tau_k^k) + sum_{i>k} exp(s_i tau_k^i)) ]
        L      = L_rank + sft_weight * (n - 1)^2 * (-logp_1)      (summed log-prob of the top one)

    Reference: AlibabaResearch/DAMO-ConvAI `PRO/train/utils/process_manager.py` (sft_weight 0.05;
    the code adds 1e-10 inside the log, omitted here). No reference model: `ref_logps` ignored.
    n is the number of real candidates in the row. Shapes: (B, K) inputs -> (B,).
    """
    sorted_mask, sorted_scores, sorted_logps, sorted_tokens = rank_by_score(
        scores, mask, scores, logps, tokens
    )
    avg_logps = sorted_logps / sorted_tokens.clamp(min=1)  # s_k, (B, K)
    very_negative = torch.finfo(avg_logps.dtype).min
    num_candidates = sorted_mask.shape[-1]
    rank_loss = torch.zeros_like(avg_logps[:, 0])
    for k in range(num_candidates - 1):
        # candidates i > k that are real; padding is sorted last, so it is a suffix
        later = sorted_mask[:, k + 1 :]  # (B, K-k-1)
        later_temperatures = sorted_scores[:, k : k + 1] - sorted_scores[:, k + 1 :]
        later_temperatures = later_temperatures.masked_fill(~later, 0.0)
        top_temperature = later_temperatures.masked_fill(~later, float("-inf")).amax(-1)  # (B,)
        has_later = later.any(-1) & sorted_mask[:, k]
        top_temperature = torch.where(has_later, top_temperature, torch.zeros_like(top_temperature))
        top_logit = avg_logps[:, k] * top_temperature  # (B,)
        later_logits = (avg_logps[:, k + 1 :] * later_temperatures).masked_fill(
            ~later, very_negative
        )
        all_logits = torch.cat([top_logit.unsqueeze(-1), later_logits], dim=-1)
        term = torch.logsumexp(all_logits, dim=-1) - top_logit
        rank_loss = rank_loss + torch.where(has_later, term, torch.zeros_like(term))
    num_real = sorted_mask.sum(-1).to(avg_logps.dtype)
    sft_loss = -sorted_logps[:, 0]
    return rank_loss + sft_weight * (num_real - 1) ** 2 * sft_loss
