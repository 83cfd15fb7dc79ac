"""Scalar heads on top of a decoder: reward models (and, later, value heads).

A sequence-classification model maps the final hidden state of the last real token to
`num_labels` scores:  r(x) = w^T h_{last(x)}  (+ b). HF's own forward finds "last" by
searching for the pad id, which breaks when pad == eos and the sequence ends with eos; here the
attention mask decides, for left and right padding alike, and the head runs on B rows only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkit.models.logprobs import _unwrap_peft, position_ids_from_mask
from alignkit.models.vlm import is_vlm_config

# Attribute names of the classification head in transformers' *ForSequenceClassification.
_HEAD_NAMES = ("score", "classifier")


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token per row: (B, T) 0/1 mask -> (B,) long.

    last(b) = max{t : mask[b, t] = 1} = T - 1 - argmax(flip(mask[b])), which is right for
    right padding (1 1 1 0 0 -> 2), left padding (0 0 1 1 1 -> 4) and no padding. An all-zero
    row gives T - 1.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    length = attention_mask.shape[1]
    flipped_first = attention_mask.flip(-1).ne(0).int().argmax(-1)
    return length - 1 - flipped_first


def _score_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, score head) of a sequence-classification model."""
    inner = _unwrap_peft(model)
    head = next((getattr(inner, n) for n in _HEAD_NAMES if hasattr(inner, n)), None)
    backbone = getattr(inner, "base_model", None)
    if head is None or backbone is None or backbone is inner:
        raise ValueError(
            f"{type(inner).__name__} has no score head: reward_scores needs a sequence-"
            "classification model (load_model(..., kind='reward'))"
        )
    return backbone, head


def reward_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    position_ids: Tensor | None = None,
    pixel_inputs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Scores of a sequence-classification model at each row's last real token.

    Shapes: input_ids, attention_mask (B, T) -> (B,) float32 when `num_labels == 1`, else
    (B, num_labels). The backbone runs once; the head sees only the B gathered rows (B, H).
    Works through a peft wrapper (LoRA layers and `modules_to_save` heads stay active).
    `position_ids` default to `position_ids_from_mask`, so left- and right-padded copies of
    the same text get the same score.

    A vision-language reward model (`alignkit.models.vlm_reward`) runs its multimodal body with
    `pixel_inputs` (a VLM batch's `pixel_values`, `image_grid_thw`, ...) and positions left to
    the model (Qwen2-VL derives M-RoPE positions from the ids): its rows must be right-padded.
    """
    backbone, head = _score_head(model)
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if is_vlm_config(getattr(_unwrap_peft(model), "config", None)):
        if not bool(attention_mask[:, 0].all()):
            raise ValueError("vision-language batches must be right-padded (every row starts with a real token)")
        inputs.update(pixel_inputs or {})
    elif pixel_inputs:
        raise ValueError(f"{type(_unwrap_peft(model)).__name__} is a text model: it takes no pixel inputs")
    else:
        inputs["position_ids"] = position_ids_from_mask(attention_mask) if position_ids is None else position_ids
    hidden = backbone(**inputs).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_hidden = hidden[rows, last_token_index(attention_mask).to(hidden.device)]  # (B, H)
    scores = head(last_hidden).float()  # (B, num_labels)
    return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


def head_parameter_names(model: nn.Module) -> list[str]:
    """Checkpoint names of a sequence classifier's head parameters, e.g. ["score.weight"]."""
    inner = _unwrap_peft(model)
    attribute = next((n for n in _HEAD_NAMES if hasattr(inner, n)), None)
    if attribute is None:
        return []
    return [f"{attribute}.{name}" for name, _ in getattr(inner, attribute).named_parameters()]


def checkpoint_tensor_names(path: str) -> set[str] | None:
    """Names of the tensors a checkpoint stores: the safetensors index's weight map, else the
    headers of its `*.safetensors` files (no tensor is read). `path` is a local directory or a
    hub id already in the local cache; None when no safetensors file is found there."""
    import json
    import os
    from pathlib import Path

    from safetensors import safe_open

    if os.path.isdir(path):
        directory = Path(path)
        index_files = sorted(directory.glob("*.safetensors.index.json"))
        weight_files = sorted(directory.glob("*.safetensors"))
    else:
        from huggingface_hub import try_to_load_from_cache

        def cached(name: str) -> list[Path]:
            found = try_to_load_from_cache(path, name)
            return [Path(found)] if isinstance(found, str) else []

        index_files = cached("model.safetensors.index.json")
        weight_files = [] if index_files else cached("model.safetensors")
    names: set[str] = set()
    for index in index_files:
        names.update(json.loads(index.read_text()).get("weight_map", {}))
    if not index_files:
        for weights in weight_files:
            with safe_open(str(weights), framework="pt") as handle:
                names.update(handle.keys())
    return names if (index_files or weight_files) else None


def _stored_name(key: str) -> str:
    """A checkpoint key without the peft wrapping ("base_model.model.", ".modules_to_save.default")."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".modules_to_save.default", "").replace(".original_module", "")


def untrained_head_parameters(path: str, model: nn.Module) -> list[str] | None:
    """The head parameters of `model` (loaded from `path` as a sequence classifier) that the
    checkpoint does not hold, so transformers initialised them at random: [] when the head was
    loaded, e.g. ["score.weight"] for a causal-LM checkpoint, None when the checkpoint's
    tensor names cannot be read (no safetensors file found)."""
    stored = checkpoint_tensor_names(path)
    if stored is None:
        return None
    stored = {_stored_name(key) for key in stored}
    return [
        name
        for name in head_parameter_names(model)
        if not any(key == name or key.endswith("." + name) for key in stored)
    ]


def require_trained_head(path: str, model: nn.Module, what: str, fix: str | None = None) -> None:
    """Raise ValueError when `model`, loaded from `path` as a sequence classifier, got a freshly
    initialised score head (its checkpoint stores no such weights): it would score at random.
    `what` names the flag or role in the message, e.g. "--reward-model"; `fix` replaces the
    default advice (pass a trained reward model)."""
    from alignkit.models.loading import resolve_model_path

    resolved = resolve_model_path(path)
    missing = untrained_head_parameters(resolved, model)
    if not missing:
        return
    raise ValueError(
        f"{what} {path} is not a reward model: it is {_saved_architecture(resolved)} without a score head "
        f"({', '.join(missing)} not in its weights), so the head would be random and every "
        f"score meaningless. "
        + (fix or "Pass a directory written by `alignkit train rm` (its final/) or another "
           "sequence-classification reward model")
    )


def _saved_architecture(path: str) -> str:
    """ "a LlamaForCausalLM checkpoint" from the directory's config.json, else "a checkpoint"."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") if config.is_file() else None
    return f"a {architectures[0]} checkpoint" if architectures else "a checkpoint"
