"""Sampled KL(policy || reference) of whole responses, from the policy's own samples.

With u_t = log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) on a response y ~ pi(. | x):

    k1(y) = sum_t u_t                          unbiased for KL(pi(.|x) || pi_ref(.|x)), noisy,
                                               can be negative on a single sample;
    k3(y) = sum_t (exp(-u_t) - 1 + u_t)        unbiased too (each term has conditional mean
                                               u_t's mean because E_{y_t~pi}[exp(-u_t)] = 1),
                                               and every term is >= 0.

(Schulman 2020, "Approximating KL divergence"; `alignkit.objectives.KL` holds the per-token
estimators.) The report quotes the mean over all samples of each, with a bootstrap interval
over prompts. Both models are scored at the sampling temperature, so with temperature tau
the quantity is KL(pi_tau || pi_ref,tau) of the distributions actually sampled; top-p / top-k
filtering is not accounted for (use top_p = 1 when KL matters). Responses cut at
`max_new_tokens` give the KL of the first `max_new_tokens` tokens.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from alignkit.objectives import KL


def sequence_kl(logps: Tensor, ref_logps: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """Per-sequence k1 and k3: per-token estimators summed over response tokens.

    Shapes: logps, ref_logps, response_mask (B, T) -> {"k1": (B,), "k3": (B,)} float64.
    Masked positions contribute nothing whatever they hold.
    """
    if not (logps.shape == ref_logps.shape == response_mask.shape):
        raise ValueError(
            f"logps {tuple(logps.shape)}, ref_logps {tuple(ref_logps.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be (B, T)"
        )
    mask = response_mask.bool()
    policy, reference = logps.double(), ref_logps.double()
    out = {}
    for name in ("k1", "k3"):
        per_token = KL[name](policy, reference)  # (B, T)
        out[name] = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    return out


@torch.no_grad()
def response_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    temperature: float = 1.0,
    batch_size: int = 32,
    group_size: int = 1,
    disable_adapter: bool = False,
    pack: bool = True,
) -> Tensor:
    """log pi(y_t | x, y_<t) at response positions, 0 elsewhere, in batches: (B, T) float32.

    `disable_adapter=True` scores the base model of a peft `model` (its LoRA switched off).
    Rows are right-padded `Rollout.to_sequences` layouts (or any layout with position ids
    counted over real tokens). Rows come in groups of `group_size` consecutive rows (the
    samples of one prompt), kept whole in a batch of about `batch_size` rows, so that with
    `pack` (padding-free forwards, `models.packing`, where the architecture supports them)
    each prompt is computed once for all its samples.
    """
    from alignkit.models import adapter_disabled, token_logps
    from alignkit.models.packing import padding_free

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scale = temperature if temperature > 0 else 1.0
    parts = []
    if group_size < 1 or batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and group_size ({group_size}) must be >= 1")
    step = group_size * max(1, batch_size // group_size)
    try:
        with adapter_disabled(model) if disable_adapter else nullcontext(model), padding_free(pack):
            for start in range(0, input_ids.shape[0], step):
                rows = slice(start, start + step)
                width = int(attention_mask[rows].sum(-1).max().item())  # trim shared padding
                parts.append(
                    token_logps(
                        model,
                        input_ids[rows, :width].to(device),
                        attention_mask[rows, :width].to(device),
                        response_mask[rows, :width].to(device),
                        temperature=scale,
                    )
                    .float()
                    .cpu()
                )
    finally:
        model.train(was_training)
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    for start, part in zip(range(0, input_ids.shape[0], step), parts, strict=True):
        out[start : start + part.shape[0], : part.shape[1]] = part
    return out
