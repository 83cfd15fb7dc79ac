"""Adapter-only weight sync: send a LoRA policy's adapter, not its merged weights.

A LoRA run trains r (d_in + d_out) numbers per adapted layer; the rollout server can hold the
frozen base once and apply the adapter itself, so each update writes the adapter alone
(SmolLM2-135M at r=16: 4.9M of 135M numbers). The engine side is vLLM's runtime LoRA
(`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`):

    POST /v1/load_lora_adapter {"lora_name": "policy-lora-v{t}", "lora_path": DIR_t}
    POST /v1/completions {"model": "policy-lora-v{t}", ...}
    POST /v1/unload_lora_adapter {"lora_name": "policy-lora-v{t-1}"}

Each version gets a new name and directory: vLLM keys its prefix cache and its loaded
adapters on the adapter's id, so reloading a name in place from the same path would let
requests reuse KV blocks of the old weights. The adapter directory is peft's format
(`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`, and
`adapter_config.json`); what vLLM applies is

    W' x = W x + s B A x,   s = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

which `adapter_deltas` computes for the reference server.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

ADAPTER_PREFIX = "policy-lora-v"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
_PEFT_KEY = "base_model.model."
_LORA_PARTS = ("lora_A", "lora_B")


def adapter_name(version: int) -> str:
    """The served name of the adapter after optimizer step `version` (the same on every rank)."""
    return f"{ADAPTER_PREFIX}{int(version)}"


def adapter_key(name: str, adapter: str = "default") -> str:
    """peft's saved key of a live LoRA parameter name:
    `base_model.model.m.q_proj.lora_A.default.weight` -> `base_model.model.m.q_proj.lora_A.weight`.
    Anything but a LoRA A/B matrix of `adapter` is a ValueError: the server applies those only."""
    parts = name.split(".")
    if (len(parts) < 4 or not name.startswith(_PEFT_KEY) or parts[-1] != "weight" or parts[-2] != adapter
            or parts[-3] not in _LORA_PARTS):
        raise ValueError(f"{name}: adapter-only sync sends LoRA A/B matrices only, and this parameter trains "
                         "too (modules_to_save, a trained embedding or norm): use --vllm-lora-sync merged")
    return ".".join(parts[:-2] + ["weight"])


def adapter_tensors(source: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """peft-format adapter tensors (CPU, contiguous) from the policy's trained (name, tensor)
    pairs (`trainer.weights(merged=False)`)."""
    tensors = {adapter_key(name): tensor.detach().to("cpu").contiguous() for name, tensor in source}
    if not tensors:
        raise ValueError("adapter-only sync: the policy trains no LoRA matrices (--lora-r is 0?)")
    return tensors


UNSERVED_FIELDS = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices",
                   "fan_in_fan_out")  # adapter_config.json fields a server's LoRA does not apply


def check_servable(config: dict[str, Any]) -> None:
    """Refuse an adapter_config.json that sets a field in UNSERVED_FIELDS (DoRA,
    modules_to_save, per-layer rank/alpha patterns, trainable tokens, transposed weights)."""
    bad = [name for name in UNSERVED_FIELDS if config.get(name)]
    if bad:
        raise ValueError(f"adapter-only sync: the adapter sets {', '.join(bad)}, which the rollout server's "
                         "LoRA does not apply; use --vllm-lora-sync merged")


def servable_config(peft_config: Any) -> dict[str, Any]:
    """`adapter_config.json` of a peft LoraConfig (`check_servable`: refused if a server's LoRA
    cannot apply it)."""
    config = peft_config.to_dict()
    for key, value in config.items():  # sets (target_modules) -> sorted lists, enums -> values
        if isinstance(value, set):
            config[key] = sorted(value)
        elif hasattr(value, "value"):
            config[key] = value.value
    check_servable(config)
    config["inference_mode"] = True
    return config


def max_lora_rank(r: int) -> int:
    """The smallest vLLM `--max-lora-rank` choice that holds rank `r`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"LoRA rank {r}: vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")


def server_lora_flags(r: int) -> tuple[str, ...]:
    """The vLLM server flags for runtime adapters of rank `r` (one adapter in use at a time)."""
    return ("--enable-lora", "--max-lora-rank", str(max_lora_rank(r)), "--max-loras", "1")


def write_adapter(tensors: dict[str, Tensor], config: dict[str, Any], directory: Path) -> Path:
    """Write `directory/adapter_model.safetensors` and `adapter_config.json` (each through a
    partial file and a rename); returns the directory."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "adapter_model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, directory / "adapter_model.safetensors")
    partial = directory / "adapter_config.json.partial"
    partial.write_text(json.dumps(config, indent=1, default=str))
    os.replace(partial, directory / "adapter_config.json")
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, tensors) of a peft adapter directory (safetensors only)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: no adapter_config.json + adapter_model.safetensors")
    return json.loads(config_path.read_text()), load_file(str(weights_path))


def lora_scale(config: dict[str, Any]) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_deltas(config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """{module name (unwrapped model's): s B A} of an adapter: what it adds to each weight."""
    check_servable(config)
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if not key.startswith(_PEFT_KEY) or parts[-1] != "weight" or parts[-2] not in _LORA_PARTS:
            raise ValueError(f"adapter tensor {key}: not a LoRA A/B matrix")
        module = ".".join(parts[2:-2])
        modules.setdefault(module, {})[parts[-2]] = tensor
    scale = lora_scale(config)
    deltas = {}
    for module, pair in modules.items():
        if set(pair) != set(_LORA_PARTS):
            raise ValueError(f"adapter module {module}: needs both lora_A and lora_B")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if a.shape[0] != int(config["r"]) or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter module {module}: A {tuple(a.shape)}, B {tuple(b.shape)} for r={config['r']}")
        deltas[module] = scale * (b @ a)
    return deltas
