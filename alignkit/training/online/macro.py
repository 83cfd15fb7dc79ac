"""MA-RLHF's macro actions (Chai et al. 2024, "MA-RLHF: Reinforcement Learning from Human
Feedback with Macro Actions"; official code ernie-research/MA-RLHF
`applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py`): the credit assignment of `ma_ppo`.

A response's tokens are cut into macro actions w_1 .. w_M, contiguous spans (`macro_spans`,
`--set macro_termination`):

- fixed        n-grams of `macro_n` tokens (the paper's default n = 5; n = 1 is token-level PPO)
- random       spans of lengths drawn from {1, 2, 3, 5, 10}, each repeated `macro_repeat`
               times, in an order shuffled per sample by a generator seeded from (seed, step);
               the tokens left once the lengths run out form one span (the code's "length
               infinity")
- perplexity   a new span starts at token t when the reference model's perplexity rises,
               ppl_t > ppl_{t-1} (ppl_t = exp(-log pi_ref(y_t | ...)))

and, whatever the rule, the LAST token of a response is a macro action of its own (the code's
comment: otherwise the `equal` mean would average the terminal reward into its span).

The value and the reward of a macro action are sigma-weighted aggregates of its tokens' values
and per-token rewards (r_t = -beta KL_t + 1[t = last] R), `--set macro_value`:

    V(w) = sum_{t in w} sigma_t V(s_t),   r(w) = sum_{t in w} sigma_t r_t,   sum_{t in w} sigma_t = 1
    equal: sigma_t = 1/|w|;  unit: 1 on the span's last token;  position: sigma_t prop. to 1/j
    (j = 1, 2, ... the token's place in its span)

GAE then runs over macro steps (gamma and lambda per macro step, V after the last one 0):

    delta_m = r(w_m) + gamma V(w_{m+1}) - V(w_m),  A_m = sum_l (gamma lam)^l delta_{m+l},
    G_m = A_m + V(w_m)

and every token of w_m takes A_m in the clipped policy loss and regresses its own value onto
G_m in the clipped value loss (`broadcast`); both losses are normalised by the token count, as
the code's (token_mean). With one-token spans every step is the identity, so fixed n = 1 gives
exactly `alignkit.advantages.gae`.

Where this differs from the official code, on purpose:
- spans are cut per sample from its own mask (the code cuts row 0's and runs one sample per
  device); padding is no span.
- the code appends the last position twice whenever the n-grams end exactly one token before
  the end (always for n = 1), giving an empty macro action of value 0 that breaks the
  bootstrap; here spans are never empty, which is what makes n = 1 equal token-level GAE.
- perplexity: the code starts the new span at t - 1 (`ma_length.append(start + i)` when
  ppl[i + 1] > ppl[i]); here at t, the token whose perplexity rose, as the rule is stated.
- unit: the code's `sigma[:, -1] = 1.0` indexes a 1-D tensor (an IndexError); here the span's
  last token, as intended.
- parsing-based termination (constituency / code parses) is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.advantages import gae

MACRO_TERMINATIONS = ("none", "fixed", "random", "perplexity")
MACRO_VALUES = ("equal", "unit", "position")
RANDOM_LENGTHS = (1, 2, 3, 5, 10)
"""The span lengths of randomised n-gram termination (the code's list)."""


def token_ordinals(mask: Tensor) -> Tensor:
    """k_t = how many valid tokens come before t in its row: (N, T) -> (N, T), -1 off the mask."""
    mask = mask.bool()
    return torch.where(mask, mask.long().cumsum(-1) - 1, -1)


def spans_from_starts(starts: Tensor, mask: Tensor) -> Tensor:
    """Span index of every token from the tokens that start a span: (N, T) bool -> (N, T) long,
    0, 1, ... along each row, -1 off the mask. The first valid token always starts a span, and
    the last valid token always is a span of its own."""
    mask = mask.bool()
    ordinals = token_ordinals(mask)
    last = ordinals == mask.sum(-1, keepdim=True) - 1
    starts = mask & (starts.bool() | (ordinals == 0) | last)
    return torch.where(mask, starts.long().cumsum(-1) - 1, -1)


def fixed_starts(mask: Tensor, n: int) -> Tensor:
    """Fixed n-gram termination: a span starts at every n-th valid token, (N, T) -> (N, T) bool."""
    assert n >= 1, f"macro_n must be >= 1, got {n}"
    ordinals = token_ordinals(mask)
    return (ordinals >= 0) & (ordinals % n == 0)


def starts_from_lengths(mask: Tensor, lengths: Tensor) -> Tensor:
    """Spans of the given lengths in order (then one span of what is left): lengths (N, K) ->
    starts (N, T) bool, at the valid-token ordinals 0, l_1, l_1 + l_2, ..., l_1 + ... + l_K."""
    assert lengths.dim() == 2 and lengths.shape[0] == mask.shape[0], tuple(lengths.shape)
    ends = lengths.to(mask.device).long().cumsum(-1)  # (N, K)
    ordinals = token_ordinals(mask)
    at_end = (ordinals.unsqueeze(-1) == ends.unsqueeze(1)).any(-1)
    return (ordinals == 0) | at_end


def random_lengths(rows: int, repeat: int, generator: torch.Generator) -> Tensor:
    """Randomised n-gram termination's span lengths: RANDOM_LENGTHS each `repeat` times, in a
    fresh order per row drawn from `generator`: (rows, 5 x repeat) long."""
    assert repeat >= 1, f"macro_repeat must be >= 1, got {repeat}"
    pool = torch.tensor(RANDOM_LENGTHS).repeat_interleave(repeat)
    if rows == 0:
        return pool.new_zeros((0, len(pool)))
    return torch.stack([pool[torch.randperm(len(pool), generator=generator)] for _ in range(rows)])


def perplexity_starts(ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Perplexity-based termination: a span starts at valid token t when its reference
    perplexity exceeds the previous valid token's, exp(-ref_t) > exp(-ref_{t'}), i.e.
    ref_t < ref_{t'}: ref_logp (N, T) -> starts (N, T) bool."""
    assert ref_logp.shape == mask.shape, (tuple(ref_logp.shape), tuple(mask.shape))
    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    seen = torch.where(mask, positions, -1).cummax(-1).values  # last valid position <= t
    previous = torch.cat([seen.new_full((mask.shape[0], 1), -1), seen[:, :-1]], dim=-1)
    previous_logp = ref_logp.gather(1, previous.clamp(min=0))
    return mask & (previous >= 0) & (ref_logp < previous_logp)


def macro_spans(termination: str, mask: Tensor, *, n: int = 5, repeat: int = 3, ref_logp: Tensor | None = None,
                seed: int = 0) -> Tensor:
    """Span index (N, T) of every response token under `termination` (fixed, random,
    perplexity; see the module docstring), -1 off the mask. `ref_logp` (N, T): the reference
    model's log-probs (perplexity only); `seed`: random's generator seed."""
    if termination == "fixed":
        starts = fixed_starts(mask, n)
    elif termination == "random":
        lengths = random_lengths(mask.shape[0], repeat, torch.Generator().manual_seed(seed))
        starts = starts_from_lengths(mask, lengths)
    elif termination == "perplexity":
        if ref_logp is None:
            raise ValueError("macro_termination=perplexity needs the reference model's log-probs (beta > 0)")
        starts = perplexity_starts(ref_logp, mask)
    else:
        raise ValueError(f"unknown macro_termination {termination!r}; known: {MACRO_TERMINATIONS[1:]}")
    return spans_from_starts(starts, mask)


def _per_span(token_values: Tensor, spans: Tensor) -> Tensor:
    """sum over the tokens of each span: (N, T) -> (N, M + 1), the last column off the mask."""
    count = int(spans.max()) + 1 if spans.numel() else 0
    index = torch.where(spans >= 0, spans, count)
    out = token_values.new_zeros((spans.shape[0], count + 1))
    return out.scatter_add(1, index, torch.where(spans >= 0, token_values, 0.0))


def span_weights(spans: Tensor, how: str = "equal") -> Tensor:
    """sigma_t of every token inside its span, summing to 1 over each span: (N, T) -> (N, T)
    float, 0 off the mask. equal: 1/|w|; unit: 1 on the span's last token; position: 1/j
    normalised, j = 1, 2, ... the token's place in its span."""
    valid = spans >= 0
    ones = valid.float()
    sizes = _per_span(ones, spans)  # (N, M + 1)
    index = spans.clamp(min=0)
    size = sizes.gather(1, index)  # |w| at each token
    first = (sizes.cumsum(-1) - sizes).gather(1, index)  # ordinal of the span's first token
    place = token_ordinals(valid) - first + 1  # j = 1 .. |w|
    if how == "equal":
        weights = 1.0 / size.clamp(min=1)
    elif how == "unit":
        weights = (place == size).float()
    elif how == "position":
        inverse = 1.0 / place.clamp(min=1).float()
        weights = inverse / _per_span(torch.where(valid, inverse, 0.0), spans).gather(1, index)
    else:
        raise ValueError(f"unknown macro_value {how!r}; known: {MACRO_VALUES}")
    return torch.where(valid, weights, 0.0)


def aggregate(token_values: Tensor, spans: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Macro values sum_{t in w_m} sigma_t x_t and which exist: (N, T) -> ((N, M), (N, M) bool),
    M the most spans in a row; 0 where a row has fewer."""
    assert token_values.shape == spans.shape == weights.shape
    macro = _per_span(weights.to(token_values.dtype) * token_values, spans)[:, :-1]
    counts = spans.max(-1, keepdim=True).values + 1 if spans.numel() else spans.new_zeros((spans.shape[0], 1))
    exists = torch.arange(macro.shape[1], device=spans.device) < counts
    return macro, exists


def broadcast(macro_values: Tensor, spans: Tensor) -> Tensor:
    """Each token takes its span's value: (N, M), spans (N, T) -> (N, T), 0 off the mask."""
    if macro_values.shape[1] == 0:
        return macro_values.new_zeros(spans.shape)
    return torch.where(spans >= 0, macro_values.gather(1, spans.clamp(min=0)), 0.0)


def macro_gae(token_rewards: Tensor, values: Tensor, mask: Tensor, spans: Tensor, gamma: float = 1.0,
              lam: float = 0.95, value: str = "equal") -> tuple[Tensor, Tensor]:
    """GAE over macro actions, broadcast back to their tokens (module docstring): token
    rewards, values, mask, spans (N, T) -> (advantages (N, T), returns (N, T)), 0 off the mask.
    `value`: the aggregation of token values and rewards into macro ones (equal, unit, position)."""
    assert token_rewards.shape == values.shape == mask.shape == spans.shape
    spans = torch.where(mask.bool(), spans, -1)
    weights = span_weights(spans, value)
    macro_rewards, exists = aggregate(token_rewards, spans, weights)
    macro_values, _ = aggregate(values, spans, weights)
    advantages, returns = gae(macro_rewards, macro_values, exists, gamma=gamma, lam=lam)
    return broadcast(advantages, spans), broadcast(returns, spans)
