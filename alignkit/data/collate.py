"""Pad tokenised examples into tensors (right padding for training, left for generation).

`response_mask` is True exactly at the positions of response tokens (the label positions);
the log-prob code shifts it by one when it pairs logits at t with tokens at t + 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.data.tokenize import PairExample, SeqExample

# Keys the collators produce themselves; an extra column with one of these names is skipped.
_RESERVED = frozenset({"input_ids", "attention_mask", "response_mask", "prompt_lengths", "rows"})


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths, default=0)
    if pad_to_multiple_of:
        longest = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _right_pad(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, Tensor]:
    """`input_ids`, `attention_mask`, `response_mask`, `prompt_lengths` for prompt+response rows."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = _padded_length(lengths, pad_to_multiple_of)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)  # (N, T)
    response_mask = torch.zeros((len(lengths), width), dtype=torch.bool)  # (N, T)
    for n, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        length = len(prompt) + len(response)
        input_ids[n, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[n, :length] = 1
        response_mask[n, len(prompt) : length] = True
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (N,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "prompt_lengths": prompt_lengths,
    }


def _numeric_extras(extras: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack the numeric extras every example has as float32 tensors (B,)."""
    if not extras:
        return {}
    keys = [
        k
        for k in extras[0]
        if k not in _RESERVED and all(isinstance(e.get(k), int | float | bool) for e in extras)
    ]
    return {k: torch.tensor([float(e[k]) for e in extras], dtype=torch.float32) for k in keys}


def collate_pairs(
    examples: list[PairExample], pad_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Batch B pairs as 2B rows so one forward pass scores chosen and rejected.

    Returns `input_ids` (2B, T) long: rows 0..B-1 are prompt+chosen, rows B..2B-1 are
    prompt+rejected of the same pairs; `attention_mask` (2B, T) long; `response_mask`
    (2B, T) bool; `prompt_lengths` (2B,) long; `rows` (B,) long (indices into the source
    table, e.g. for cached reference log-probs); numeric extras such as `margin` (B,) float32.
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompts = [ex.prompt_ids for ex in examples] * 2
    responses = [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]
    batch = _right_pad(prompts, responses, pad_id, pad_to_multiple_of)
    batch["rows"] = torch.tensor([ex.row for ex in examples], dtype=torch.long)
    batch.update(_numeric_extras([ex.extras for ex in examples]))
    return batch


def collate_sequences(
    examples: list[SeqExample], pad_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Batch prompt+completion examples: `input_ids`, `attention_mask` (B, T) long,
    `response_mask` (B, T) bool, `prompt_lengths` (B,), `rows` (B,), numeric extras (B,)."""
    if not examples:
        raise ValueError("collate_sequences needs at least one example")
    batch = _right_pad(
        [ex.prompt_ids for ex in examples],
        [ex.completion_ids for ex in examples],
        pad_id,
        pad_to_multiple_of,
    )
    batch["rows"] = torch.tensor([ex.row for ex in examples], dtype=torch.long)
    batch.update(_numeric_extras([ex.extras for ex in examples]))
    return batch


def pad_left(
    sequences: list[list[int]], pad_id: int, *, pad_to_multiple_of: int | None = None
) -> tuple[Tensor, Tensor]:
    """Left-pad prompts for generation: `(input_ids, attention_mask)`, both (B, T) long."""
    width = _padded_length([len(s) for s in sequences], pad_to_multiple_of)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for n, sequence in enumerate(sequences):
        if sequence:
            input_ids[n, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[n, width - len(sequence) :] = 1
    return input_ids, attention_mask
