"""Dense rewards: a reward per response token instead of one per sample (Fine-Grained RLHF,
Wu et al. 2023, "Fine-Grained Human Feedback Gives Better Rewards for Language Model
Training"; ALGORITHMS.md §1.8).

Where a reward function's response tokens are known (the online loop passes `completion_ids`,
n_i = len(completion_ids[i]) tokens, the stop token included), it may return, instead of one
number per completion:

- per-token rewards: an (N, T) tensor or array, column t = response token t (T >= every n_i;
  columns past a sample's n_i tokens must be 0), or a list of N per-sample lists (or 1-D
  arrays/tensors) of exactly n_i numbers;
- per-segment rewards: a list of N per-sample lists of `(end_token_index, reward)` pairs, or
  of dicts `{end_token_index: reward}`; each reward sits on its segment's last token
  (0 <= end_token_index < n_i), rewards on the same token add up, every other token gets 0.
  An empty list or dict is a sample without segments (0 on every token).

A sample's item may be None (no reward: that row fails, as a None scalar does). Numbers mixed
with per-sample lists are refused (a sample's scalar reward would have to be put somewhere:
say where, e.g. `[(n_i - 1, r)]` at its last token). Anything else is a `RewardOutputError`
naming the sample, its token count and the problem.

`DenseRewards` holds the result: `tokens` (N, W) float32 (W >= every n_i, 0 past a sample's
tokens) and `lengths` (N,); `totals` is the per-sample sum, the scalar reward that logs,
group baselines, filters and pairs use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Number
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit.rewards.outputs import RewardOutputError, as_reward_tensor, describe_output


@dataclass(frozen=True)
class DenseRewards:
    """Per-token rewards of N samples: `tokens` (N, W) float32, column t = response token t,
    0 past each sample's `lengths` (N,) tokens (W >= max lengths)."""

    tokens: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def totals(self) -> Tensor:
        """(N,) sum_t r_{i,t}: each sample's reward as one number."""
        return self.tokens.sum(-1)

    def padded(self, width: int) -> DenseRewards:
        """The same rewards zero-padded (never cut) to `width` columns."""
        if width < self.tokens.shape[1] and bool(self.tokens[:, width:].ne(0).any()):
            raise ValueError(f"dense rewards of width {self.tokens.shape[1]} have rewards beyond column {width}")
        tokens = torch.zeros((len(self), width), dtype=self.tokens.dtype, device=self.tokens.device)
        keep = min(width, self.tokens.shape[1])
        tokens[:, :keep] = self.tokens[:, :keep]
        return DenseRewards(tokens, self.lengths)

    @classmethod
    def at_last_token(cls, scores: Tensor, lengths: Tensor) -> DenseRewards:
        """Scalar rewards (N,) placed on each sample's last token (none for a 0-token sample)."""
        lengths = lengths.long().cpu()
        width = max(1, int(lengths.max())) if len(lengths) else 1
        tokens = torch.zeros((len(lengths), width))
        rows = torch.nonzero(lengths > 0).flatten()
        tokens[rows, lengths[rows] - 1] = scores.float().cpu()[rows]
        return cls(tokens, lengths)

    @classmethod
    def cat(cls, parts: Sequence[DenseRewards]) -> DenseRewards:
        """Rows of `parts` in order, padded to the widest."""
        width = max((part.tokens.shape[1] for part in parts), default=1)
        return cls(torch.cat([part.padded(width).tokens for part in parts]),
                   torch.cat([part.lengths.long().cpu() for part in parts]))

    def row_finite(self) -> Tensor:
        """(N,) whether every reward of the sample is finite."""
        return torch.isfinite(self.tokens).all(-1)

    def penalise(self, row: int, penalty: float) -> None:
        """Replace sample `row`'s rewards by `penalty` on its last token (0 elsewhere)."""
        self.tokens[row] = 0.0
        if int(self.lengths[row]) > 0:
            self.tokens[row, int(self.lengths[row]) - 1] = penalty


Scores = Tensor | DenseRewards
"""A reward role's scores: (N,) float32, or dense per-token rewards."""


def sequence_scores(scores: Scores) -> Tensor:
    """(N,) one number per sample: the scalars, or the per-sample sums of dense rewards."""
    return scores.totals if isinstance(scores, DenseRewards) else scores


def _is_number(value: Any) -> bool:
    return isinstance(value, Number | np.number | np.bool_) or (
        isinstance(value, Tensor | np.ndarray) and value.ndim == 0)


def _is_index(value: Any) -> bool:
    """An integer (not a bool): a Python or numpy integer, or a 0-d integer tensor/array."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and bool(np.issubdtype(value.dtype, np.integer))
    return isinstance(value, Integral | np.integer)


def _reward_value(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _segment_row(item: Any, count: int, where: str) -> Tensor:
    """(count,) rewards of one sample's segment pairs or dict."""
    pairs = list(item.items()) if isinstance(item, dict) else list(item)
    row = torch.zeros(count)
    for k, pair in enumerate(pairs):
        if isinstance(pair, list | tuple) and len(pair) == 2:
            index, value = pair
        else:
            raise RewardOutputError(f"{where} has segment {k} = {describe_output(pair)}, not an "
                                    "(end_token_index, reward) pair")
        if not _is_index(index):
            raise RewardOutputError(f"{where} has segment {k} ending at {describe_output(index)}, not an "
                                    "integer token index")
        if not 0 <= int(index) < count:
            raise RewardOutputError(f"{where} has segment {k} ending at token {int(index)}, outside the "
                                    f"sample's {count} response tokens (0..{count - 1})")
        if not (value is None or _is_number(value)):
            raise RewardOutputError(f"{where} has segment {k} with reward {describe_output(value)}, not a number")
        row[int(index)] += _reward_value(value)
    return row


def _token_row(item: Any, count: int, where: str) -> Tensor:
    """(count,) rewards of one sample's per-token list."""
    values = item.tolist() if isinstance(item, Tensor | np.ndarray) else list(item)
    for k, value in enumerate(values):
        if not (value is None or _is_number(value)):
            raise RewardOutputError(f"{where} has reward {describe_output(value)} at token {k}, not a number")
    if len(values) != count:
        raise RewardOutputError(f"{where} has {len(values)} per-token rewards but the sample has {count} "
                                "response tokens (len(completion_ids[i]), the stop token included)")
    return torch.tensor([_reward_value(v) for v in values], dtype=torch.float32)


def _dense_row(item: Any, count: int, where: str) -> Tensor:
    """One sample's item (a per-token list, segment pairs or a dict) -> (count,) rewards."""
    if isinstance(item, dict):
        return _segment_row(item, count, where)
    if isinstance(item, Tensor | np.ndarray):
        if item.ndim != 1:
            raise RewardOutputError(f"{where} is {describe_output(item)}: per-token rewards are 1-D")
        return _token_row(item, count, where)
    if len(item) == 0:
        return torch.zeros(count)  # no segments
    if any(isinstance(v, list | tuple | dict | Tensor | np.ndarray) and not _is_number(v) for v in item):
        return _segment_row(item, count, where)
    return _token_row(item, count, where)


def _dense_tensor(values: Tensor, counts: list[int], offset: int) -> Tensor:
    """An (N, T) per-token tensor checked against the token counts."""
    shape = tuple(values.shape)
    width = values.shape[1]
    for i, count in enumerate(counts):
        if count > width:
            raise RewardOutputError(f"returned {describe_output(values)}: sample {offset + i} has {count} "
                                    f"response tokens, more than its {width} columns (a 2-D output is one reward per response "
                                    "token; several objectives are several --reward)")
        beyond = torch.nonzero(values[i, count:].ne(0)).flatten()
        if len(beyond):
            raise RewardOutputError(f"returned a tensor of shape {shape} with a reward at column "
                                    f"{count + int(beyond[0])} of sample {offset + i}, which has {count} response "
                                    "tokens (columns past a sample's tokens must be 0)")
    return values


def as_scores(values: Any, n: int, counts: Sequence[int], offset: int = 0) -> Scores:
    """A reward function's output for `n` samples with `counts` response tokens each: (n,)
    float32 scalars, or `DenseRewards` for the dense forms of the module docstring.
    `offset` is added to the sample numbers in messages (a batch's chunk)."""
    counts = [int(c) for c in counts]
    if len(counts) != n:
        raise ValueError(f"{len(counts)} token counts for {n} completions")
    lengths = torch.tensor(counts, dtype=torch.long)
    width = max(counts, default=0)
    if isinstance(values, Tensor | np.ndarray) and values.ndim == 2:
        tensor = as_reward_tensor(values, n)
        tokens = _dense_tensor(tensor, counts, offset)
        return DenseRewards(tokens[:, :width].clone(), lengths)  # columns past every sample's tokens are 0
    if not isinstance(values, list | tuple) or all(v is None or _is_number(v) for v in values):
        return as_reward_tensor(values, n)
    if len(values) != n:
        raise RewardOutputError(f"returned {describe_output(values)}: {len(values)} samples' rewards for a batch of "
                                f"{n} completions; return one per completion")
    numbers = [i for i, v in enumerate(values) if v is not None and _is_number(v)]
    if numbers:
        listed = next(i for i, v in enumerate(values) if v is not None and not _is_number(v))
        raise RewardOutputError(f"returned {describe_output(values)} whose item {offset + numbers[0]} is a number but "
                                f"item {offset + listed} is {describe_output(values[listed])}: give every sample "
                                "per-token or per-segment rewards (a scalar on the last token is [(n_i - 1, r)])")
    tokens = torch.zeros((n, width))
    for i, (item, count) in enumerate(zip(values, counts, strict=True)):
        if item is None:
            tokens[i, max(count - 1, 0) : max(count, 1)] = float("nan")  # no reward: the row fails
            continue
        where = f"returned {describe_output(values)} whose item {offset + i}"
        if not isinstance(item, list | tuple | dict | Tensor | np.ndarray):
            raise RewardOutputError(f"{where} is {describe_output(item)}: per-token rewards are a list of numbers, "
                                    "per-segment rewards a list of (end_token_index, reward) pairs or a dict")
        tokens[i, :count] = _dense_row(item, count, where)
    return DenseRewards(tokens, lengths)


def stack_rows(rows: Sequence[Scores | None], counts: Sequence[int]) -> Scores:
    """One batch's scores from per-row scores (a row-by-row retry; None: the row failed):
    (N,) when every row is scalar (failed rows 0, their shape kept), else `DenseRewards`
    (scalar rows on their last token, failed rows 0)."""
    lengths = torch.tensor([int(c) for c in counts], dtype=torch.long)
    if not any(isinstance(row, DenseRewards) for row in rows):
        shape = next((row.shape[1:] for row in rows if row is not None), torch.Size())
        return torch.stack([row[0] if row is not None else torch.zeros(shape) for row in rows])
    parts = []
    for row, length in zip(rows, lengths, strict=True):
        if isinstance(row, DenseRewards):
            parts.append(row)
        else:
            score = torch.zeros(1) if row is None else row.reshape(1)
            parts.append(DenseRewards.at_last_token(score, length.reshape(1)))
    return DenseRewards.cat(parts)


def concat_scores(parts: Sequence[Scores], counts: Sequence[Sequence[int]]) -> Scores:
    """Consecutive chunks' scores joined in row order (`counts`: each chunk's token counts);
    scalar chunks go on their last tokens when another chunk is dense."""
    if not any(isinstance(part, DenseRewards) for part in parts):
        return torch.cat(list(parts))
    dense = [part if isinstance(part, DenseRewards) else
             DenseRewards.at_last_token(part, torch.tensor(list(chunk), dtype=torch.long))
             for part, chunk in zip(parts, counts, strict=True)]
    return DenseRewards.cat(dense)


__all__ = ["DenseRewards", "Scores", "as_scores", "concat_scores", "sequence_scores", "stack_rows"]
