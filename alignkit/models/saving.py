"""Writing checkpoints that plain `transformers` loads, and counting parameters.

LoRA weights are merged into a copy: W_merged = W + (alpha / r) B A for each adapted layer,
computed per layer with peft's own `get_delta_weight`, so the live model is never touched
(training may continue) and no second copy of the whole model is made, only of the state dict.
SSF layers are folded likewise (`alignkit.models.ssf`: W' = diag(γ) W, b' = γ ⊙ b + β) into a
model of the same class whose config gives the folded layers a bias.
Directories are written next to the target and moved into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from alignkit.models.adapters import is_peft
from alignkit.models.ssf import folded_state_dict, has_ssf


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def merged_state_dict(model: nn.Module, *, adapters: bool = True) -> dict[str, Tensor]:
    """Plain-transformers state dict of a peft LoRA model with the adapters folded in
    (`adapters=False`: left out, the base weights alone, for an engine that applies them).

    Keys are those of the unwrapped model (`model.layers.0.self_attn.q_proj.weight`, ...);
    `modules_to_save` copies (e.g. a reward head) replace the originals. Tensors are new
    (detached) where merged and the live ones elsewhere: callers must not modify them.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    inner = model.get_base_model()
    if any(getattr(m, "merged", False) for m in inner.modules() if isinstance(m, LoraLayer)):
        raise ValueError("adapters are already merged into the live weights; unmerge first")
    replacements: dict[str, Tensor] = {}
    skipped_prefixes: list[str] = []
    for name, module in inner.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            with torch.no_grad():
                for adapter in module.active_adapters if adapters else ():
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            replacements[f"{prefix}weight"] = weight
            if getattr(base, "bias", None) is not None:
                replacements[f"{prefix}bias"] = base.bias.detach()
            skipped_prefixes.append(prefix)
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.modules_to_save[module.active_adapter] if adapters else module.original_module
            for key, tensor in active.state_dict().items():
                replacements[f"{prefix}{key}"] = tensor.detach()
            skipped_prefixes.append(prefix)

    merged: dict[str, Tensor] = {}
    for key, tensor in inner.state_dict().items():
        if not any(key.startswith(prefix) for prefix in skipped_prefixes):
            merged[key] = tensor.detach()
    merged.update(replacements)
    return merged


def plain_state_dict(model: nn.Module, *, adapters: bool = True) -> dict[str, Tensor]:
    """The state dict a plain transformers model of `model`'s class loads: LoRA merged
    (`merged_state_dict`; `adapters=False`: the base alone), SSF folded (`folded_state_dict`),
    else the model's own. Tensors are detached, shared with the live model where nothing was
    merged: do not modify them."""
    if is_peft(model):
        return merged_state_dict(model, adapters=adapters)
    if has_ssf(model):
        return folded_state_dict(model)[0]
    return model.state_dict()


def _fresh_copy(inner: PreTrainedModel, state_dict: dict[str, Tensor], config=None) -> PreTrainedModel:
    """A new model of `inner`'s class and `config` (default: its own) holding `state_dict`
    (no random init)."""
    config = inner.config if config is None else config
    with torch.device("meta"):
        fresh = type(inner)(config)
    unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise RuntimeError(f"merged state dict has unexpected keys {unexpected[:5]} ...")
    missing = [k for k, v in fresh.state_dict().items() if v.is_meta]
    # A VLM's text config may not carry the flag (Qwen2-VL keeps it on the top config).
    tied = getattr(config.get_text_config(), "tie_word_embeddings", None)
    if tied if tied is not None else getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        missing = [k for k, v in fresh.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"merged state dict misses {missing[:5]} ...")
    if getattr(inner, "generation_config", None) is not None:
        fresh.generation_config = inner.generation_config
    return fresh


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` then move `tmp_dir` to `path`, replacing what was there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model directory is world-readable
        if path.exists():  # os.replace cannot overwrite a non-empty directory: swap in two steps
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_pretrained_merged(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | ProcessorMixin | None,
    path: str | os.PathLike,
    *,
    merge_lora: bool = True,
    adapters: bool = True,
) -> Path:
    """Save `model` (+ tokenizer, or a VLM's processor) to `path` as safetensors; returns the path.

    A plain model is saved as is, an SSF model folded (always: its layers are not a
    transformers format). A LoRA model with `merge_lora=True` is saved with the
    adapters merged into a copy of the weights, so `AutoModelForCausalLM.from_pretrained(path)`
    (or `...ForSequenceClassification` for reward models) loads it without peft; with
    `merge_lora=False` only the adapter is written (peft format, loads with `PeftModel`).
    `adapters=False` (with `merge_lora=True`): the base model alone, the adapters left out.
    The live model is never modified; an existing `path` is replaced atomically.
    """
    peft_model = is_peft(model)
    if peft_model and merge_lora:
        inner = model.get_base_model()
        to_save: nn.Module = _fresh_copy(inner, merged_state_dict(model, adapters=adapters))
    elif has_ssf(model):
        state, config = folded_state_dict(model)
        to_save = _fresh_copy(model, state, config)
    else:
        to_save = model

    def write(directory: Path) -> None:
        to_save.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    return _write_atomically(Path(path), write)
