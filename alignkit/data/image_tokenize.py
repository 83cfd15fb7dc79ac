"""Tokenise image rows with a VLM processor: prompt ids with the image tokens expanded, and the
pixel inputs the model reads beside them; batch them (`collate_image_sequences`).

The prompt (images included) is rendered by the processor's chat template exactly as text
rows are (`alignkit.data.tokenize`), then the processor expands each image token to one
token per image patch and computes the pixel inputs (`pixel_values`, plus `image_grid_thw`
for Qwen2-VL). The completion is tokenised on its own, so image tokens are prompt tokens and
every loss masks them out with the prompt. Images must sit in the prompt, and a prompt is
never truncated (cutting image tokens would desynchronise them from their pixels): a prompt
that leaves no room for one completion token is an error naming the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data.collate import collate_pairs, collate_sequences
from alignkit.data.images import count_placeholders, image_base_dir, open_image
from alignkit.data.table import RowTable
from alignkit.data.tokenize import (
    PairExample,
    SeqExample,
    TruncationStats,
    _bos_prefix,
    _encode,
    _extras,
    _prompt_and_responses,
    _render,
)

# Processor outputs that are token-aligned (padded with the ids), not pixel inputs.
_TOKEN_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class ImageSeqExample(SeqExample):
    """A `SeqExample` with its images: `pixel_inputs` (tensors whose dim 0 stacks over images
    or patches, concatenated across a batch) and the prompt's `mm_token_type_ids` (1 at image
    tokens), when the processor returns them."""

    pixel_inputs: dict[str, Tensor] = field(default_factory=dict)
    prompt_token_types: list[int] | None = None


@dataclass
class ImagePairExample(PairExample):
    """A `PairExample` whose shared prompt holds images: `pixel_inputs` and `prompt_token_types`
    as in `ImageSeqExample` (chosen and rejected read the same pixels)."""

    pixel_inputs: dict[str, Tensor] = field(default_factory=dict)
    prompt_token_types: list[int] | None = None


def encode_image_prompt(processor: Any, prompt_text: str, images: list[Any]) -> tuple[list[int], dict[str, Tensor], list[int] | None]:
    """(prompt ids with image tokens expanded, pixel inputs, token types or None) of one prompt."""
    encoded = processor(text=[prompt_text], images=images or None, return_tensors="pt")
    ids = encoded["input_ids"][0].tolist()
    types = encoded["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in encoded else None
    bos = _bos_prefix(processor.tokenizer)
    if bos and ids[: len(bos)] != bos:
        ids, types = bos + ids, (None if types is None else [0] * len(bos) + types)
    pixels = {key: value for key, value in encoded.items() if key not in _TOKEN_ALIGNED}
    return ids, pixels, types


def _row_images(table: RowTable, i: int, prompt: Any) -> list[Any]:
    """The opened images of row `i`, checked to sit in its prompt (one placeholder each)."""
    items = list(table.rows[i].get("images") or [])
    if count_placeholders(prompt) != len(items):
        raise table.error(i, f"{len(items)} image(s) but {count_placeholders(prompt)} placeholder(s) in the prompt; images must sit in the prompt")
    base_dir = image_base_dir(table.origin(i)[0])
    try:
        return [open_image(item, base_dir) for item in items]
    except ValueError as err:
        raise table.error(i, str(err)) from None


def _fit_responses(
    table: RowTable, i: int, prompt_len: int, responses: list[list[int]], max_length: int, stats: TruncationStats
) -> list[list[int]]:
    """Responses cut to the room the (never truncated) image prompt leaves; cuts counted."""
    room = max_length - prompt_len
    if room < 1:
        raise table.error(i, f"the prompt takes {prompt_len} tokens (images included), leaving no room for a response within max_length {max_length}; prompts with images are never truncated")
    stats.examples += 1
    fitted = []
    for ids in responses:
        if len(ids) > room:
            ids = ids[:room]
            stats.truncated_responses += 1
        fitted.append(ids)
    return fitted


def _tokenize_image_rows(table: RowTable, processor: Any, response_keys: tuple[str, ...], max_length: int):
    """(row index, prompt ids, pixel inputs, token types, fitted response ids) per row."""
    tokenizer = processor.tokenizer
    stats = TruncationStats()
    rows = []
    for i, row in enumerate(table.rows):
        prompt, responses = _prompt_and_responses(row, response_keys)
        images = _row_images(table, i, prompt)
        prompt_text, response_texts = _render(prompt, responses, tokenizer, apply_chat_template=True)
        prompt_ids, pixels, types = encode_image_prompt(processor, prompt_text, images)
        response_ids = _fit_responses(table, i, len(prompt_ids), _encode(tokenizer, response_texts), max_length, stats)
        rows.append((i, prompt_ids, pixels, types, response_ids))
    return rows, stats


def prompt_model_inputs(processor: Any, prompt_text: str, images: list[Any]) -> tuple[list[int], dict[str, Tensor]]:
    """(prompt ids, model inputs) of one prompt for a rollout engine: the pixel inputs, plus
    `mm_token_type_ids` (one per prompt token) when the processor gives token types
    (`alignkit.rollout.multimodal` says how the engine batches them)."""
    ids, inputs, types = encode_image_prompt(processor, prompt_text, images)
    if types is not None:
        inputs["mm_token_type_ids"] = torch.tensor(types, dtype=torch.long)
    return ids, inputs


def tokenize_image_prompts(
    table: RowTable, processor: Any, *, max_prompt_length: int | None
) -> tuple[list[list[int]], list[dict[str, Tensor] | None], TruncationStats]:
    """Prompts of image rows (any format; the prompt is everything before the last assistant
    turn) for generation: ids with the image tokens expanded, each row's model inputs (None for a
    row without images) and the counts. Never truncated: a prompt longer than
    `max_prompt_length` is an error naming the row (cutting image tokens would desynchronise
    them from their pixels)."""
    tokenizer = processor.tokenizer
    prompts, inputs = [], []
    for i, row in enumerate(table.rows):
        prompt, _ = _prompt_and_responses(row, ())
        images = _row_images(table, i, prompt)
        prompt_text, _ = _render(prompt, [], tokenizer, apply_chat_template=True)
        ids, row_inputs = prompt_model_inputs(processor, prompt_text, images)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise table.error(i, f"the prompt takes {len(ids)} tokens (images included), over --max-prompt-length {max_prompt_length}; prompts with images are never truncated")
        prompts.append(ids)
        inputs.append(row_inputs if images else None)
    return prompts, inputs, TruncationStats(examples=len(prompts))


def tokenize_sft_images(
    table: RowTable, processor: Any, *, max_length: int
) -> tuple[list[ImageSeqExample], TruncationStats]:
    """Tokenise SFT rows with images (`messages`, or `prompt` + `completion`) into
    `ImageSeqExample`s; completions longer than the room left are cut (kept start, counted)."""
    rows, stats = _tokenize_image_rows(table, processor, ("completion",), max_length)
    examples = [
        ImageSeqExample(prompt_ids, completion, i, _extras(table.rows[i]), pixels, types)
        for i, prompt_ids, pixels, types, (completion,) in rows
    ]
    return examples, stats


def tokenize_pairwise_images(
    table: RowTable, processor: Any, *, max_length: int
) -> tuple[list[ImagePairExample], TruncationStats]:
    """Tokenise pairwise rows with images (`prompt` + `chosen` + `rejected`, the images in the
    prompt) into `ImagePairExample`s; chosen and rejected share the prompt's ids and pixels and
    are cut to the room the prompt leaves (kept start, counted)."""
    rows, stats = _tokenize_image_rows(table, processor, ("chosen", "rejected"), max_length)
    examples = [
        ImagePairExample(prompt_ids, chosen, rejected, i, _extras(table.rows[i]), pixels, types)
        for i, prompt_ids, pixels, types, (chosen, rejected) in rows
    ]
    return examples, stats


def _attach_pixels(batch: dict[str, Any], examples: list[Any]) -> dict[str, Any]:
    """`batch["pixel_inputs"]` for rows that are `examples` in order (an example may repeat):
    each pixel tensor concatenated in row order (how VLMs pair image features with image
    tokens), and `mm_token_type_ids` (N, T) padded with 0 when the examples carry token types."""
    keys = sorted({key for ex in examples for key in ex.pixel_inputs})
    pixel_inputs = {key: torch.cat([ex.pixel_inputs[key] for ex in examples if key in ex.pixel_inputs]) for key in keys}
    if any(ex.prompt_token_types is not None for ex in examples):
        types = torch.zeros_like(batch["input_ids"])
        for n, ex in enumerate(examples):
            if ex.prompt_token_types is not None:
                types[n, : len(ex.prompt_token_types)] = torch.tensor(ex.prompt_token_types)
        pixel_inputs["mm_token_type_ids"] = types
    batch["pixel_inputs"] = pixel_inputs
    return batch


def collate_image_pairs(examples: list[ImagePairExample], pad_id: int) -> dict[str, Any]:
    """`collate_pairs` (rows 0..B-1 prompt + chosen, B..2B-1 prompt + rejected) plus
    `pixel_inputs` for those 2B rows: each pair's pixels twice, chosen half then rejected half."""
    return _attach_pixels(collate_pairs(examples, pad_id), list(examples) * 2)


def collate_image_sequences(examples: list[ImageSeqExample], pad_id: int) -> dict[str, Any]:
    """`collate_sequences` plus `pixel_inputs` (see `_attach_pixels`)."""
    return _attach_pixels(collate_sequences(examples, pad_id), examples)
