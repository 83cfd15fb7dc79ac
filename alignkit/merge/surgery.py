"""Model surgery (Wang et al. 2024, "Model Surgery: Modulating LLM's Behavior Via Simple
Parameter Editing", arXiv 2407.08770; code github.com/lucywang720/model-surgery): the maths.

Three steps, each a small pure function here (the command is `surgery_command.py`):

1. behaviour probe: logistic regression on pooled hidden states h (N, D) of two prompt sets,
   label 1 = the behaviour to move towards (`--positive`), 0 = away from (`--negative`):
   p(1|h) = σ(w·h + b), fitted by minimising mean BCE + (l2 / 2)·||w||² (L-BFGS, full batch).
   The behaviour direction is θ = w / ||w||.
2. behaviour region: the rows of the chosen layers' gate projections (W_gate: (I, D), a row
   per MLP neuron, read against the hidden state) that are most *inversely* aligned with θ:
   score_i = −cos(W_gate[i], θ), ranked over all chosen layers together, the top
   round(fraction · total rows) kept (the reference code ranks every layer's rows in one list
   and keeps the first 4·4096 of 32·11008, a fraction of ≈ 0.047).
3. surgery: W_gate[i] ← W_gate[i] + strength · θ for the selected rows only.

Deliberate deviations from the reference code, labelled: it adds α times the raw weight row of
a 2-class softmax head (`mlp.weight[1]`), whose norm depends on how long the head trained; we
add `strength` times the unit direction, so the strength means the same across probes. Its
head is trained by Adam on cross-entropy; our logistic regression is the same model class
(a 2-class softmax head is logistic in w₁ − w₀) fitted to its optimum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pool_hidden(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """(B, T, D) hidden states and a (B, T) 0/1 mask -> (B, D) features.

    mean: Σ_t m_t h_t / Σ_t m_t (the reference's PPLM-style `avg_representation`);
    last: h at the last real token (right or left padding).
    """
    if mode == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if mode == "last":
        from alignkit.models import last_token_index

        index = last_token_index(attention_mask)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    raise ValueError(f"--pool must be 'mean' or 'last', got {mode!r}")


def probe_loss(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, l2: float) -> Tensor:
    """mean_n BCE(σ(w·h_n + b), y_n) + (l2 / 2)·||w||²  (scalar; the bias is not penalised)."""
    logits = features @ weight + bias  # (N,)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return bce + 0.5 * l2 * weight.pow(2).sum()


def fit_probe(features: Tensor, labels: Tensor, *, l2: float = 1e-2, steps: int = 200) -> tuple[Tensor, Tensor]:
    """Logistic-regression probe: (N, D) features, (N,) 0/1 labels -> (w (D,), b scalar) at the
    minimum of `probe_loss` (strictly convex for l2 > 0, so the optimum is unique).

    Features are fitted in float64 and centred/scaled per dimension internally (for
    conditioning); the returned (w, b) act on the raw features: w = w_std / s,
    b = b_std − Σ_d w_d μ_d. The penalty applies to w_std.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    if not ((labels == 0).any() and (labels == 1).any()):
        raise ValueError("the probe needs examples of both labels")
    x = features.detach().double()
    y = labels.detach().double()
    mean, scale = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    standard = (x - mean) / scale
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = probe_loss(standard, y, weight, bias, l2)
        loss.backward()
        return loss

    optimiser.step(closure)
    raw_weight = (weight.detach() / scale)
    raw_bias = bias.detach() - (raw_weight * mean).sum()
    return raw_weight.to(features.dtype), raw_bias.to(features.dtype)


def probe_logits(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(N, D) -> (N,) probe logits w·h + b (σ of it: the probability of the positive behaviour)."""
    return features @ weight.to(features.dtype) + bias.to(features.dtype)


def probe_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows where (logit > 0) equals the 0/1 label."""
    return float(((logits > 0).long() == labels.long()).double().mean())


def split_heldout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of `count` rows: round(fraction·count) held out, at least
    one when fraction > 0, at least one left to train; a seeded permutation, each part sorted."""
    if count < 1:
        raise ValueError("no rows to split")
    held = 0 if fraction <= 0 else min(count - 1, max(1, round(fraction * count)))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def unit_direction(weight: Tensor) -> Tensor:
    """θ = w / ||w||."""
    norm = weight.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the probe's weight vector is zero or not finite: the two prompt sets give "
                         "indistinguishable hidden states at this layer")
    return weight / norm


def select_rows(gate_weights: list[Tensor], direction: Tensor, fraction: float) -> list[Tensor]:
    """Behaviour region: for each (I_l, D) gate matrix, the (sorted) indices of its selected rows.

    score_{l,i} = −cos(W_l[i], θ); all layers' rows ranked together (highest score first, ties by
    layer then row), k = max(1, round(fraction · Σ_l I_l)) kept.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    scores = [-torch.nn.functional.cosine_similarity(w.float(), direction.float().unsqueeze(0), dim=1)
              for w in gate_weights]
    total = sum(s.numel() for s in scores)
    keep = max(1, round(fraction * total))
    flat = torch.cat(scores)  # (Σ I_l,)
    # stable sort keeps (layer, row) order among equal scores
    chosen = torch.sort(flat, descending=True, stable=True).indices[:keep]
    starts = [0]
    for s in scores:
        starts.append(starts[-1] + s.numel())
    return [torch.sort(chosen[(chosen >= lo) & (chosen < hi)] - lo).values
            for lo, hi in zip(starts[:-1], starts[1:], strict=True)]


def edit_rows(weight: Tensor, rows: Tensor, direction: Tensor, strength: float) -> Tensor:
    """W' = W with W'[i] = W[i] + strength · θ for i in `rows` (a new tensor; `weight` untouched)."""
    if not math.isfinite(strength):
        raise ValueError(f"--strength must be finite, got {strength}")
    edited = weight.clone()
    edited[rows] += strength * direction.to(weight.dtype)
    return edited
