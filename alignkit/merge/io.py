"""Loading the models a merge reads, checking they can be merged, and writing the result.

`load_input(source, label)` reads a model directory (or hub id / alias) in float32 on the CPU,
or a peft LoRA adapter directory (adapter_config.json) with its adapters folded into the base
weights (`models.merged_state_dict`). `check_compatible(base, other)` raises one ValueError
naming the first mismatch: architecture (config architectures / model_type and the structural
config fields), parameter names, parameter shapes, then the tokenizer's vocabulary.
`save_merged` loads a merged state dict into the template model and writes a directory
`transformers.AutoModelForCausalLM.from_pretrained` loads (safetensors + tokenizer + config),
plus `merge.json` saying how it was made.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.merge.methods import StateDict
from alignkit.models import load_model, merged_state_dict, save_pretrained_merged

log = logging.getLogger("alignkit")

STRUCTURAL_CONFIG = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "hidden_act", "rope_theta", "rope_scaling",
                     "tie_word_embeddings", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner")
"""Config fields that change what the weights compute without (always) changing their shapes."""


@dataclass
class MergeInput:
    """One model read for a merge: `label` names it in errors (`--models runs/b`)."""

    label: str
    source: str
    state: StateDict
    """The floating-point tensors as float32 on the CPU, tied aliases removed (see `aliases`):
    what the methods merge."""
    config: Any
    tokenizer: Any
    model: nn.Module | None = None
    """A plain (non-peft) model holding these weights; kept for the first input only (the
    template every merged state dict is loaded into)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied names left out of `state` -> the name they share storage with (lm_head -> embed)."""
    lora: bool = False
    fixed: StateDict = field(default_factory=dict)
    """Non-floating tensors (integer buffers): never averaged, they must be equal in every
    input and are copied from the first."""


def is_adapter_dir(source: str) -> bool:
    return (Path(source).expanduser() / "adapter_config.json").is_file()


def check_source(source: str, flag: str) -> None:
    """Before anything loads: a model directory, alias or cached hub id, or a LoRA adapter
    directory whose base model is loadable (`flag` names the input in the error)."""
    from alignkit.models.loading import check_model_source

    if is_adapter_dir(source):
        adapter = Path(source).expanduser()
        try:
            base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as error:
            raise ValueError(f"{flag}: {adapter / 'adapter_config.json'} is not valid JSON: {error}") from None
        if not base:
            raise ValueError(f"{flag}: {adapter / 'adapter_config.json'} names no base_model_name_or_path, "
                             "so the adapter cannot be merged onto its base")
        if not any(adapter.glob("adapter_model*.safetensors")):
            raise FileNotFoundError(f"{flag}: no adapter_model.safetensors in {adapter} (alignkit never unpickles .bin)")
        check_model_source(base, f"{flag} (the adapter's base {base})")
        return
    check_model_source(source, flag)


def without_tied_aliases(state: dict[str, Tensor]) -> tuple[StateDict, dict[str, str]]:
    """(state without the names that share storage with an earlier name, alias -> kept name).
    Tied embeddings appear twice in a state dict; merged once, they stay tied."""
    kept: StateDict = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
               tuple(tensor.shape))
        if tensor.numel() and key in owners:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        kept[name] = tensor
    return kept, aliases


def split_float32(state: StateDict) -> tuple[StateDict, StateDict]:
    """(floating tensors as float32 CPU copies, the other tensors as CPU copies)."""
    floating = {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in state.items() if t.is_floating_point()}
    fixed = {n: t.detach().to("cpu", copy=True) for n, t in state.items() if not t.is_floating_point()}
    return floating, fixed


def _plain_model(config: Any, state: StateDict, generation_config: Any) -> nn.Module:
    """A plain causal LM of `config` holding `state` (built on the meta device: no random init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # copies: merged state dicts are later loaded into this model, which must not write into `state`
    model.load_state_dict({name: tensor.clone() for name, tensor in state.items()}, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise RuntimeError(f"the merged adapter's state dict misses {left[:3]}")
    if generation_config is not None:
        model.generation_config = generation_config
    return model


def load_input(source: str, label: str, *, keep_model: bool, trust_remote_code: bool = False) -> MergeInput:
    """Read one model (see the module docstring) into float32 CPU tensors."""
    if is_adapter_dir(source):
        from alignkit.lab.policy_loading import load_policy

        peft_model, tokenizer = load_policy(source, device="cpu", dtype=torch.float32)
        inner = peft_model.get_base_model()
        state, aliases = without_tied_aliases(merged_state_dict(peft_model))
        state, fixed = split_float32(state)
        model = None
        if keep_model:
            model = _plain_model(inner.config, {**state, **fixed}, getattr(inner, "generation_config", None))
        log.info("%s: LoRA adapter merged onto its base %s", label, inner.config._name_or_path)
        return MergeInput(label, source, state, inner.config, tokenizer, model, aliases, lora=True, fixed=fixed)
    model, tokenizer = load_model(source, dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code)
    state, aliases = without_tied_aliases(model.state_dict())
    state, fixed = split_float32(state)
    return MergeInput(label, source, state, model.config, tokenizer, model.eval() if keep_model else None, aliases,
                      fixed=fixed)


# --------------------------------------------------------------------------- checks


def _architecture(config: Any) -> str:
    names = ",".join(getattr(config, "architectures", None) or []) or "?"
    return f"{names} ({config.model_type})"


def check_compatible(base: MergeInput, other: MergeInput) -> None:
    """Raise a one-line ValueError naming the first mismatch between `other` and `base`, checked
    in this order: architecture, parameter names, shapes, structural config fields (head counts,
    activation, RoPE: what shapes cannot show), tokenizer."""
    if _architecture(base.config) != _architecture(other.config):
        raise ValueError(f"{other.label}: architecture {_architecture(other.config)} differs from "
                         f"{base.label}'s {_architecture(base.config)}; only models of one architecture merge")
    for name in [*base.state, *base.fixed]:
        if name not in other.state and name not in other.fixed:
            raise ValueError(f"{other.label}: has no parameter {name} (which {base.label} has)")
    for name in [*other.state, *other.fixed]:
        if name not in base.state and name not in base.fixed:
            raise ValueError(f"{other.label}: has a parameter {name} that {base.label} lacks")
    for name, tensor in base.state.items():
        theirs = other.state[name]
        if tuple(theirs.shape) != tuple(tensor.shape):
            raise ValueError(f"{other.label}: parameter {name} has shape {tuple(theirs.shape)}, "
                             f"{base.label}'s has {tuple(tensor.shape)}")
    for name, tensor in base.fixed.items():
        theirs = other.fixed.get(name)
        if theirs is None or theirs.shape != tensor.shape or not torch.equal(tensor, theirs):
            raise ValueError(f"{other.label}: non-floating tensor {name} differs from {base.label}'s; it cannot "
                             "be averaged")
    base_config, other_config = base.config.get_text_config().to_dict(), other.config.get_text_config().to_dict()
    for key in STRUCTURAL_CONFIG:
        if base_config.get(key) != other_config.get(key):
            raise ValueError(f"{other.label}: config {key} = {other_config.get(key)!r} differs from "
                             f"{base.label}'s {base_config.get(key)!r}")
    check_tokenizers(base, other)


def check_tokenizers(base: MergeInput, other: MergeInput) -> None:
    """Same vocabulary (token -> id) and the same eos token; a different chat template is
    logged (the output keeps the base's)."""
    ours, theirs = base.tokenizer.get_vocab(), other.tokenizer.get_vocab()
    for token, index in sorted(ours.items(), key=lambda item: item[1]):
        if theirs.get(token) != index:
            here = "missing here" if token not in theirs else f"id {theirs[token]} here"
            raise ValueError(f"{other.label}: tokenizer differs from {base.label}'s: token {token!r} is id "
                             f"{index} there, {here}")
    extra = sorted(set(theirs) - set(ours), key=lambda token: theirs[token])
    if extra:
        raise ValueError(f"{other.label}: tokenizer differs from {base.label}'s: it has {len(extra)} extra "
                         f"token(s), first {extra[0]!r} (id {theirs[extra[0]]})")
    if base.tokenizer.eos_token != other.tokenizer.eos_token:
        raise ValueError(f"{other.label}: tokenizer's eos token {other.tokenizer.eos_token!r} differs from "
                         f"{base.label}'s {base.tokenizer.eos_token!r}")
    if getattr(base.tokenizer, "chat_template", None) != getattr(other.tokenizer, "chat_template", None):
        log.warning("%s: chat template differs from %s's; the merged model keeps %s's", other.label,
                    base.label, base.label)


def load_inputs(sources: list[tuple[str, str]], *, trust_remote_code: bool = False, progress: bool = False) -> list[MergeInput]:
    """Load (source, label) pairs in order, checking each against the first as it arrives, so
    a mismatch fails before the rest load. The first keeps its model (the template)."""
    from tqdm.auto import tqdm

    inputs: list[MergeInput] = []
    for source, label in tqdm(sources, desc="loading models", unit="model", disable=not progress, leave=False):
        one = load_input(source, label, keep_model=not inputs, trust_remote_code=trust_remote_code)
        if inputs:
            check_compatible(inputs[0], one)
        inputs.append(one)
    return inputs


# --------------------------------------------------------------------------- layers


def layer_index_map(model: nn.Module, names: list[str]) -> tuple[dict[str, int | None], int]:
    """(name -> transformer-block index or None, number of blocks L).

    The blocks are the `nn.ModuleList` holding `config.num_hidden_layers` modules
    (`model.layers` in Llama/Qwen, `transformer.h` in GPT-2); a parameter belongs to block b
    iff its name starts with `<that list's name>.<b>.`, so no other numbered module can match.
    """
    num_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and num_layers and len(module) == num_layers]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: no module list of "
                         f"config.num_hidden_layers = {num_layers} modules")
    prefix = lists[0] + "."
    layer_of: dict[str, int | None] = {}
    for name in names:
        if name.startswith(prefix):
            layer_of[name] = int(name[len(prefix):].split(".", 1)[0])
        else:
            layer_of[name] = None
    return layer_of, num_layers


# --------------------------------------------------------------------------- saving


def load_into(model: nn.Module, state: StateDict, aliases: dict[str, str]) -> nn.Module:
    """Copy `state` into `model`'s tensors (cast to their dtype and device); every name of the
    model must be in `state` or be a tied alias of one."""
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if name not in aliases]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"merged state dict does not fit the model: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    return model


def jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def save_merged(template: MergeInput, state: StateDict, output: str | Path, record: dict[str, Any],
                dtype: torch.dtype | None = None) -> Path:
    """Write `state` as a from_pretrained directory at `output` (atomically replaced) with the
    template's config, tokenizer and generation config, in `dtype` (default float32), plus
    `merge.json` (`record`)."""
    model = load_into(template.model, {**state, **template.fixed}, template.aliases)
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model.to(dtype)
    path = save_pretrained_merged(model, template.tokenizer, output)
    (path / "merge.json").write_text(json.dumps(jsonable(record), indent=2) + "\n")
    return path
