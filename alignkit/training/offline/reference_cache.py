"""The keys and files of the reference caches in a run directory (`reference_logps.safetensors`,
`reference_values.safetensors`, `treg_token_rewards.safetensors`, ...).

A cache is a safetensors file whose metadata `fingerprint` says what its values were computed
from: the tokenised examples themselves (content hash), the reference model (hash of its
weight files, or of the initial policy's state), the tokenizer and chat template, the length
limits and the task's own key. A cache whose fingerprint differs, or that cannot be read, is
recomputed; caches are written atomically (temporary file, then rename)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignkit.training.run.config import TrainConfig
from alignkit.training.run.fingerprint import (
    examples_digest,
    model_source_digest,
    state_digest,
    tokenizer_digest,
)

log = logging.getLogger("alignkit")


def reference_digest(config: TrainConfig, model) -> str:
    """Hash of the reference model: the weight files of `--ref-model`, else the state of the
    initial policy `model` (the reference when no --ref-model is given)."""
    if config.ref_model and config.ref_model.startswith("merge:"):
        from alignkit.merge.spec import model_spec_digest

        return model_spec_digest(config.ref_model, model_source_digest)
    if config.ref_model:
        from alignkit.models.loading import resolve_model_path

        try:
            return model_source_digest(resolve_model_path(config.ref_model))
        except (OSError, ValueError):  # not resolvable here: loading it will say why
            return f"name:{config.ref_model}"
    return state_digest(model)


def cache_fingerprint(config: TrainConfig, model, tokenizer, splits: dict[str, list], task_key: Any = None) -> str:
    """What cached reference outputs depend on (see the module docstring), as a JSON string."""
    values = {
        "examples": {name: examples_digest(examples) for name, examples in splits.items()},
        "sizes": {name: len(examples or []) for name, examples in splits.items()},
        "reference": reference_digest(config, model),
        "tokenizer": tokenizer_digest(tokenizer),
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
    }
    if task_key:
        values["task"] = task_key
    return json.dumps(values, sort_keys=True, default=str)


def load_cached_tensors(path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors cache whose metadata fingerprint matches; {} otherwise
    (no file, another fingerprint, or a file that cannot be read: recomputed, with a warning)."""
    if not path.exists():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored != fingerprint:
            log.info("%s was computed from other data, model or settings: recomputing it", path)
            return {}
        tensors = load_file(str(path))
    except Exception as error:  # a torn or corrupted file: recompute rather than fail
        log.warning("%s cannot be read (%s): recomputing it", path, error)
        return {}
    log.info("reference outputs loaded from %s", path)
    return tensors


def save_cached_tensors(tensors: dict[str, torch.Tensor], path: Path, fingerprint: str) -> None:
    """Write a cache atomically with its fingerprint in the metadata."""
    tmp = str(path.with_name(f".{path.name}.tmp-{os.getpid()}"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
