"""Pure sampling maths: counter-based noise and filtered inverse-CDF sampling.

Noise is a function of (seed, sample index, step) only, computed with a small integer hash
on the device, so a sample's draws do not depend on which other samples share its batch
(finished rows dropped, chunking by `max_batch_size`) nor on any global RNG state. Each
step needs one uniform per sample: the token is drawn by inverting the cumulative
distribution of the filtered probabilities (exact for any distribution; a Gumbel-max
draw would need V uniforms per sample and step). Unfiltered, the inversion runs in two levels
(blocks of 256 tokens, then the token in its block), so no step pays a sequential float64
cumulative sum over the whole vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.rollout.types import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    low = (x & 0xFFFF) * constant  # < 2**48
    high = (((x >> 16) * constant) & 0xFFFF) << 16  # only the part that survives mod 2**32
    return (low + high) & _MASK32


def mix32(x: Tensor) -> Tensor:
    """The `lowbias32` integer hash (C. Wellons) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: int, sample_ids: Tensor, step: int | Tensor) -> Tensor:
    """Uniform [0, 1) float64 noise, one value per sample and step, a pure function of its
    arguments.

    Shapes: `sample_ids` (A,) int64 and an int `step` -> (A,); or a `step` tensor that
    broadcasts against `sample_ids` (e.g. (A, 1) ids and (1, S) steps -> (A, S), every step
    of a rollout in one call, the same values as S calls).
    """
    seed_low = torch.full_like(sample_ids, seed & _MASK32)
    seed_high = torch.full_like(sample_ids, (seed >> 32) & _MASK32)
    key = mix32(seed_low ^ mix32(seed_high))
    key = mix32(key ^ (sample_ids & _MASK32))
    key = mix32(key ^ (step & _MASK32))
    high = mix32(key ^ 0x68E31DA4)
    low = mix32(key ^ 0x1B56C4E9)
    bits53 = (high << 21) | (low >> 11)
    return bits53.double() / float(2**53)


_BLOCK = 256  # vocabulary block of the two-level inverse CDF


def _draw_from_weights(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised weights (A, V) >= 0 in two levels: the vocabulary
    block whose cumulative mass passes u * total, then the token inside it. The same token as
    one float64 cumulative sum over V up to rounding of the sums, but the sequential cumsum runs
    over V / 256 block sums and one block of 256 instead of all V entries."""
    rows, vocab = weights.shape
    padded = -(-vocab // _BLOCK) * _BLOCK
    if padded != vocab:
        weights = torch.nn.functional.pad(weights, (0, padded - vocab))  # zero mass: never drawn
    blocks = weights.view(rows, padded // _BLOCK, _BLOCK)  # (A, nb, 256)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (A, nb)
    target = (uniforms * block_cdf[:, -1]).unsqueeze(-1)  # (A, 1), strictly below the total
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[-1] - 1)  # (A, 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # earlier blocks
    inner_cdf = blocks.gather(1, block.unsqueeze(-1).expand(-1, 1, _BLOCK)).squeeze(1).double().cumsum(-1)
    # keep the remainder strictly inside the chosen block despite rounding between the two sums
    rest = torch.minimum(target - before, inner_cdf[:, -1:] * (1 - 2.0**-40))
    position = torch.searchsorted(inner_cdf, rest, right=True).clamp_(max=_BLOCK - 1)
    return (block * _BLOCK + position).squeeze(-1).clamp_(max=vocab - 1)


def _filter_and_draw(logprobs: Tensor, sampling: SamplingParams, uniforms: Tensor) -> Tensor:
    """Apply top-k, top-p, min-p to `logprobs` (A, V) and draw one token per row by inverse CDF."""
    vocab = logprobs.shape[-1]
    if not (0 < sampling.top_k < vocab) and sampling.top_p >= 1.0 and sampling.min_p <= 0.0:
        return _draw_from_weights(logprobs.exp(), uniforms)  # nothing filtered: float32 probs
    index: Tensor | None = None  # maps filtered column -> token id when columns are reordered
    values = logprobs
    if 0 < sampling.top_k < vocab:
        values, index = logprobs.topk(sampling.top_k, dim=-1)  # sorted, descending
    elif sampling.top_p < 1.0:
        values, index = logprobs.sort(dim=-1, descending=True, stable=True)
    probs = values.double().exp()  # (A, V') unnormalised after top-k; normalised below
    if sampling.top_p < 1.0:
        normalised = probs / probs.sum(-1, keepdim=True)
        mass_before = normalised.cumsum(-1) - normalised
        # Keep the smallest prefix whose mass reaches top_p; the top token is always kept.
        probs = probs * (mass_before < sampling.top_p)
    if sampling.min_p > 0.0:
        top = probs.amax(-1, keepdim=True)
        probs = probs * (probs >= sampling.min_p * top)
    cdf = probs.cumsum(-1)  # (A, V') float64
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)  # strictly below the total mass
    position = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    if index is None:
        return position.squeeze(-1)
    return index.gather(-1, position).squeeze(-1)


def sample_next_tokens(
    logits: Tensor, sampling: SamplingParams, uniforms: Tensor | None, forced: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Choose one token per row from next-token `logits` and score it.

    Shapes: `logits` (A, V) any float dtype, `uniforms` (A,) float64 in [0, 1) (unused when
    greedy); returns `(tokens (A,) int64, logprobs (A,) float32)`, where
    logprobs = log softmax(logits / temperature)[token] of the unfiltered distribution
    (temperature 1 when temperature is 0).

    `forced` (A,) int64: rows with an id >= 0 take that token instead of a draw (teacher
    forcing, DR-PO's roll-in; TRIL's `RollinProcessor` sets every other logit to -inf), scored
    the same way; -1 samples as usual.
    """
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # (A, V)
    logprobs = torch.log_softmax(scaled, dim=-1)  # (A, V)
    drawn_from = logprobs
    if sampling.suppress_token_ids:  # never drawn; still scored under the unfiltered policy
        banned = torch.tensor(sampling.suppress_token_ids, dtype=torch.long, device=logits.device)
        drawn_from = logprobs.index_fill(-1, banned, -float("inf"))
    if sampling.is_greedy:
        tokens = drawn_from.argmax(-1) if sampling.suppress_token_ids else logits.argmax(-1)
    else:
        if uniforms is None:
            raise ValueError("sampling needs uniforms unless greedy")
        tokens = _filter_and_draw(drawn_from, sampling, uniforms)
    if forced is not None:
        tokens = torch.where(forced >= 0, forced, tokens)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
