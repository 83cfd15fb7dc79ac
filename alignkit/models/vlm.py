"""Vision-language models: detection, loading (model + processor) and which parts train.

A checkpoint is a VLM when its config carries a `vision_config` (Qwen2-VL, Qwen2.5-VL,
LLaVA, ...): it loads with `AutoModelForImageTextToText` and `AutoProcessor`, the processor
doing for image + text what the tokenizer does for text (it also carries the tokenizer:
`processor.tokenizer`).

Qwen2-VL's processor also holds a video processor, which in transformers 5 needs torchvision.
Where torchvision is missing, `load_processor` falls back to `Qwen2VLImageProcessor`: the
same processor class without its video part (images and text behave identically; passing
videos is an error). The checkpoint it saves still names the stock class, so it loads with
`AutoProcessor` wherever torchvision is installed.

Module roles, by name (`vlm_parameter_groups`): the vision tower (`visual`, `vision_tower`),
the projector from vision to text features (`visual.merger`, `multi_modal_projector`), and the
language model (everything else).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

VLM_TRAINABLE = ("language", "projector", "vision")

# Module-name prefixes (after any `model.` wrapper) of the vision tower and the projector.
_VISION_PREFIXES = ("visual.", "vision_tower.", "vision_model.")
_PROJECTOR_PREFIXES = ("visual.merger.", "multi_modal_projector.", "mm_projector.")


def is_vlm_config(config: Any) -> bool:
    """True when a transformers config (or its dict) describes a vision-language model."""
    if isinstance(config, dict):
        return config.get("vision_config") is not None
    return getattr(config, "vision_config", None) is not None


def is_vlm_dir(path: str | os.PathLike) -> bool:
    """True when the checkpoint directory's config.json has a `vision_config`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return is_vlm_config(json.loads(config_file.read_text()))
    except ValueError:
        return False


def module_role(name: str) -> str:
    """"vision", "projector" or "language" for a parameter or module name of a VLM.

    >>> module_role("model.visual.merger.mlp.0.weight"), module_role("model.visual.blocks.0.attn.qkv")
    ('projector', 'vision')
    >>> module_role("model.language_model.layers.0.self_attn.q_proj"), module_role("lm_head.weight")
    ('language', 'language')
    """
    parts = name.split(".")
    for start in range(len(parts)):
        tail = ".".join(parts[start:]) + "."
        if tail.startswith(_PROJECTOR_PREFIXES):
            return "projector"
        if tail.startswith(_VISION_PREFIXES):
            return "vision"
    return "language"


def language_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the language model's linear layers, the output layer excepted: LoRA's
    default targets on a VLM (peft's "all-linear" would adapt the vision tower too)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module_role(name) == "language"
        and name.rsplit(".", 1)[-1] not in ("lm_head", "score")
    ]


def set_vlm_trainable(model: nn.Module, trainable: tuple[str, ...] | list[str]) -> None:
    """Make only the parameters of the named roles (`VLM_TRAINABLE`) require grad; for a model
    with LoRA adapters, additionally those adapter parameters stay trainable."""
    unknown = sorted(set(trainable) - set(VLM_TRAINABLE))
    if unknown:
        raise ValueError(f"vlm trainable parts must be among {VLM_TRAINABLE}, got {unknown}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = module_role(name) in trainable or "lora_" in name
    for parameter in unused_output_head(model):
        parameter.requires_grad = False


def unused_output_head(model: nn.Module) -> list[nn.Parameter]:
    """The language-model head of a VLM reward model (`score` replaces it: its weights never
    get a gradient), unless it is tied to the input embeddings, which the forward does use.
    Frozen, it is left out of the optimizer and of DDP's gradient all-reduce, which otherwise
    waits for it forever (a trainable weight no forward reaches)."""
    if not type(model).__name__.endswith("ForSequenceClassification") or not hasattr(model, "vlm"):
        return []
    head, embeddings = model.vlm.get_output_embeddings(), model.vlm.get_input_embeddings()
    if head is None or (embeddings is not None and head.weight is embeddings.weight):
        return []
    return list(head.parameters())


def vlm_train_parts(spec: str, *, lora: bool) -> tuple[str, ...]:
    """The parts (`"projector"`, `"vision"`) a `--vlm-train` value trains in full.

    >>> vlm_train_parts("auto", lora=True), vlm_train_parts("auto", lora=False)
    ((), ('projector',))
    >>> vlm_train_parts("vision,projector", lora=True)
    ('projector', 'vision')
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return () if lora else ("projector",)
    if spec == "none":
        return ()
    parts = {part.strip() for part in spec.split(",") if part.strip()}
    unknown = sorted(parts - {"projector", "vision"})
    if unknown or not parts:
        raise ValueError(f"--vlm-train {spec!r}: write auto, none, or parts among projector, vision")
    return tuple(sorted(parts))


def _image_only_qwen2_vl() -> type:
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageProcessor(Qwen2VLProcessor):
        """`Qwen2VLProcessor` without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            output = super().to_dict()
            output["processor_class"] = "Qwen2VLProcessor"  # the stock class, for AutoProcessor
            return output

    return Qwen2VLImageProcessor


def _torchvision_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is None


def image_only_processor(model_type: str, image_processor: Any, tokenizer: Any, chat_template: str | None) -> Any:
    """The processor of `model_type` built from parts, without a video processor (Qwen2-VL
    family); other types get their stock processor class."""
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return _image_only_qwen2_vl()(image_processor, tokenizer, chat_template=chat_template)
    raise ValueError(f"no image-only processor for model type {model_type!r}")


def load_processor(path: str) -> Any:
    """`AutoProcessor.from_pretrained(path)`; for the Qwen2-VL family without torchvision,
    the image-only processor (see the module docstring). trust_remote_code stays off."""
    from transformers import AutoConfig, AutoProcessor

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in ("qwen2_vl", "qwen2_5_vl") and _torchvision_missing():
        return _image_only_qwen2_vl().from_pretrained(path)
    return AutoProcessor.from_pretrained(path, trust_remote_code=False)


def encode_images_once(body: nn.Module, row_inputs: list[dict[str, Any] | None], batched: dict[str, Any]) -> dict[str, Any]:
    """The forward inputs of a VLM body over rows that share prompts (a rollout's group: G rows
    per prompt, each row's `row_inputs` entry the same dict object): the image features computed
    once per distinct prompt (`body.get_image_features`, vision tower and projector, gradients
    kept) and handed to every row as `mm_encoder_outputs` instead of `pixel_values`, which the
    body would run through the tower once per row. `batched`: the rows' inputs concatenated
    (`right_padded_inputs`); returned as is when no prompt is shared or the body takes no
    precomputed features."""
    if "pixel_values" not in batched or not hasattr(body, "get_image_features"):
        return batched
    if "mm_encoder_outputs" not in inspect.signature(body.forward).parameters:
        return batched
    distinct: dict[int, int] = {}
    prompts, rows = [], []
    for inputs in row_inputs:
        if inputs and "pixel_values" in inputs:
            if id(inputs) not in distinct:
                distinct[id(inputs)] = len(prompts)
                prompts.append(inputs)
            rows.append(distinct[id(inputs)])
    if len(prompts) == len(rows):  # nothing shared
        return batched
    import torch

    kwargs = {"pixel_values": torch.cat([p["pixel_values"] for p in prompts])}
    if "image_grid_thw" in batched:
        kwargs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts])
    for name in ("vision_feature_layer", "vision_feature_select_strategy"):  # LLaVA reads them from its config
        if hasattr(body.config, name):
            kwargs[name] = getattr(body.config, name)
    encoded = body.get_image_features(**kwargs, return_dict=True)
    per_image = list(encoded.pooler_output)  # one (tokens, H) tensor per image, in prompt order
    counts = [len(p["image_grid_thw"]) if "image_grid_thw" in p else p["pixel_values"].shape[0] for p in prompts]
    starts = [sum(counts[:k]) for k in range(len(counts))]
    encoded.pooler_output = [per_image[starts[r] + j] for r in rows for j in range(counts[r])]
    out = {key: value for key, value in batched.items() if key != "pixel_values"}
    out["mm_encoder_outputs"] = {"image": encoded}
    return out
