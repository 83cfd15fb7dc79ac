"""Pixel inputs on the prompt: how `HFEngine` prefills a vision-language model.

A prompt of a VLM is its token ids (each image already expanded to one token per patch by the
processor) plus *model inputs*: a dict of tensors the engine hands to the model's forward
without reading them (`pixel_values`, `image_grid_thw`, ...: dim 0 stacks the prompt's images
or patches; `alignkit.data.image_tokenize.encode_image_prompt` makes them). Two kinds of keys:

- token-aligned ones (`TOKEN_ALIGNED`, e.g. Qwen2-VL's `mm_token_type_ids`, 1 at image
  tokens): one value per prompt token, left-padded with 0 like the ids;
- everything else: concatenated along dim 0 over the chunk's prompts, in prompt order (how
  every transformers VLM pairs image features with image tokens).

Only the prefill sees them (`left_padded_inputs`): the vision tower runs once per prompt, and
the image features live on in the KV cache that the group's samples share. A teacher-forced
forward over the sampled rows (right-padded prompt + response) takes each row's prompt inputs
again (`right_padded_inputs`).

Positions: a model with multimodal rotary positions (Qwen2-VL's M-RoPE: `get_rope_index` on
its body) gets its 3-D prompt positions from that function, and each generated token the
position (real prompt tokens so far + delta) in all three axes, delta = max prompt position + 1
- real prompt length (what transformers' `compute_3d_position_ids` adds while decoding). Any
other model keeps the engine's 1-D positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")
"""Model inputs with one value per prompt token (padded like the ids, never concatenated)."""

ModelInputs = Mapping[str, Tensor]


def check_prompt_inputs(prompt_inputs: Sequence[ModelInputs | None], prompt_ids: Sequence[Sequence[int]]) -> None:
    """One entry per prompt; a token-aligned input must have one value per prompt token."""
    if len(prompt_inputs) != len(prompt_ids):
        raise ValueError(f"prompt_inputs: one per prompt ({len(prompt_ids)}), got {len(prompt_inputs)}")
    for index, (inputs, prompt) in enumerate(zip(prompt_inputs, prompt_ids, strict=True)):
        for key in TOKEN_ALIGNED:
            if inputs and key in inputs and inputs[key].shape[-1] != len(prompt):
                raise ValueError(f"prompt {index}: {key} has {inputs[key].shape[-1]} values for "
                                 f"{len(prompt)} prompt tokens")


def left_padded_inputs(prompt_inputs: Sequence[ModelInputs | None], prompt_len: int,
                       device: torch.device) -> dict[str, Tensor]:
    """The chunk's model inputs for one prefill forward over left-padded prompts of width
    `prompt_len` (see the module docstring); {} when no prompt has any."""
    keys = sorted({key for inputs in prompt_inputs if inputs for key in inputs})
    batched: dict[str, Tensor] = {}
    for key in keys:
        if key in TOKEN_ALIGNED:
            values = torch.zeros((len(prompt_inputs), prompt_len), dtype=torch.long, device=device)
            for row, inputs in enumerate(prompt_inputs):
                if inputs and key in inputs:
                    row_values = inputs[key].reshape(-1)
                    values[row, prompt_len - len(row_values):] = row_values.to(device)
            batched[key] = values
        else:
            batched[key] = torch.cat([inputs[key].to(device) for inputs in prompt_inputs
                                      if inputs and key in inputs])
    return batched


def right_padded_inputs(row_inputs: Sequence[ModelInputs | None], input_ids: Tensor) -> dict[str, Tensor]:
    """The model inputs of right-padded prompt + response rows `input_ids` (B, T), one entry
    per row (a teacher-forced forward): tensors concatenated over the rows in order,
    token-aligned ones laid over each row's first (prompt) positions, 0 elsewhere; {} when no
    row has any."""
    keys = sorted({key for inputs in row_inputs if inputs for key in inputs})
    batched: dict[str, Tensor] = {}
    for key in keys:
        if key in TOKEN_ALIGNED:
            values = torch.zeros_like(input_ids)
            for row, inputs in enumerate(row_inputs):
                if inputs and key in inputs:
                    flat = inputs[key].reshape(-1)
                    values[row, : len(flat)] = flat.to(values.device)
            batched[key] = values
        else:
            batched[key] = torch.cat([inputs[key] for inputs in row_inputs if inputs and key in inputs])
    return batched


def rope_index_fn(model: nn.Module) -> Any:
    """The body's `get_rope_index` of a model with multimodal rotary positions, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None)
    return getattr(body, "get_rope_index", None)


def multimodal_positions(model: nn.Module, input_ids: Tensor, prompt_mask: Tensor,
                         model_inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(3-D prompt positions (3, B, P), per-prompt delta (B,)) for a model with multimodal
    rotary positions and a prefill that carries image grids; None otherwise (1-D positions)."""
    rope_index = rope_index_fn(model)
    if rope_index is None or "image_grid_thw" not in model_inputs:
        return None
    token_types = model_inputs.get("mm_token_type_ids")
    if token_types is None:
        raise ValueError("a prompt with image grids needs its mm_token_type_ids (1 at image tokens) beside them")
    positions, deltas = rope_index(input_ids, mm_token_type_ids=token_types,
                                   image_grid_thw=model_inputs["image_grid_thw"], attention_mask=prompt_mask)
    return positions, deltas.reshape(-1)
