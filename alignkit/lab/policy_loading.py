"""Load the policy an evaluation talks about, whatever form it was saved in.

`load_policy(path)` accepts
- anything `load_model` loads: a directory with config.json + safetensors (e.g. a run's
  `final/`), a hub id, the embedded alias `smollm2-135m`;
- a peft LoRA adapter directory (`adapter_config.json`): the base model named there, wrapped
  with the adapter, so `adapter_disabled` gives back the base as the reference;
- an alignkit training checkpoint `RUN/checkpoints/step-000012/` holding only the trainable
  weights (`weights.safetensors`): the run's `config.yaml` says which base model and which
  LoRA (or SSF) settings to rebuild before the weights are copied in by name.

`base_model_of(path)` names the model a policy was trained from (the reference for KL):
the run's `config.yaml` `ref_model` or `model` for `final/` and checkpoint directories (a
salsa run's reference soup as `soup:A,B:w_A,w_B`, which `load_policy` rebuilds), the adapter's
base for LoRA directories, else None.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from alignkit.models import apply_lora, apply_ssf, load_model

SOUP = "soup:"
"""Prefix of a weight-soup reference: soup:DIR_A,DIR_B:WEIGHT_A,WEIGHT_B."""


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    return yaml.safe_load(config_file.read_text()) or {}


def _run_dir_of(path: Path) -> Path | None:
    """RUN for RUN/final and RUN/checkpoints/step-N, when RUN holds a config.yaml."""
    for candidate in (path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def run_config_of(path: str | Path) -> dict[str, Any] | None:
    """The config.yaml (as a dict) of the run that wrote `path` (RUN/final, a checkpoint), else None."""
    path = Path(path)
    run_dir = _run_dir_of(path) if path.is_dir() else None
    return _run_config(run_dir) if run_dir is not None else None


def checkpoint_step(path: str | Path) -> int | None:
    """12 for `.../step-000012`; the last logged step of the run for `.../final`; else None."""
    path = Path(path)
    match = re.fullmatch(r"step-(\d+)", path.name)
    if match:
        return int(match.group(1))
    run_dir = _run_dir_of(path)
    metrics = run_dir / "metrics.jsonl" if run_dir is not None else None
    if metrics is not None and metrics.is_file():
        steps = [
            json.loads(line).get("step")
            for line in metrics.read_text().splitlines()
            if line.strip()
        ]
        steps = [s for s in steps if isinstance(s, int)]
        return max(steps) if steps else None
    return None


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete `checkpoints/step-N` directories (state.json written last, as the
    trainer's `list_checkpoints` requires; temporary and set-aside ones are not `step-N`),
    oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def base_model_of(path: str | Path) -> str | None:
    """The model `path` was trained from, when its directory records it (see module doc)."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("base_model_name_or_path")
    run_dir = _run_dir_of(path) if path.is_dir() else None
    config = _run_config(run_dir) if run_dir is not None else None
    if config:
        hparams = config.get("hparams") or {}
        if hparams.get("soup") and config.get("ref_model"):  # salsa: the weight soup of --ref-model A,B
            parts = [p.strip() for p in str(config["ref_model"]).split(",")]
            from alignkit.models.soup import parse_soup_weights

            weights = parse_soup_weights(hparams.get("soup_weights"), len(parts))
            return f"{SOUP}{','.join(parts)}:{','.join(repr(w) for w in weights)}"
        return config.get("ref_model") or config.get("model")
    return None


def load_policy(
    path: str | Path, *, device: str | None = None, dtype: Any = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for any of the forms in the module docstring."""
    if str(path).startswith(SOUP):  # soup:A,B:w_A,w_B (base_model_of of a salsa run)
        from alignkit.models.soup import load_soup

        directories, weights = str(path)[len(SOUP):].rsplit(":", 1)
        parts = directories.split(",")
        tokenizer = load_model(parts[0], device=device, dtype=dtype)[1]
        return load_soup(parts, [float(w) for w in weights.split(",")], dtype=dtype, device=device), tokenizer
    if str(path).startswith("merge:"):  # a merge spec (alignkit.merge.spec), built in memory
        from alignkit.merge.spec import resolve_model_and_tokenizer

        return resolve_model_and_tokenizer(str(path), device=device, dtype=dtype, flag="model")
    local = Path(path)
    if (local / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = load_model(base_model_of(local), device=device, dtype=dtype)
        return PeftModel.from_pretrained(base, str(local)).eval(), tokenizer
    if (local / "weights.safetensors").is_file() and not (local / "config.json").is_file():
        return _load_training_checkpoint(local, device=device, dtype=dtype)
    return load_model(str(path), device=device, dtype=dtype)


def policy_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """The policy's own parameters of a checkpoint's trainable weights. An online run saves its
    `Trainable` module: the policy under `policy.`, a separate critic under `critic.` (not part of
    the policy, left out); an offline run saves the model's parameters by their own names."""
    if not any(name.startswith("policy.") for name in weights):
        return weights
    return {name[len("policy."):]: value for name, value in weights.items() if name.startswith("policy.")}


def _load_training_checkpoint(path: Path, *, device: str | None, dtype: Any) -> tuple[Any, Any]:
    import torch
    from safetensors.torch import load_file

    run_dir = _run_dir_of(path)
    config = _run_config(run_dir) if run_dir is not None else None
    if config is None:
        raise FileNotFoundError(
            f"{path} holds only trainable weights; its run directory (two levels up) must hold "
            f"the run's config.yaml to rebuild the model"
        )
    model, tokenizer = load_model(config.get("model", "smollm2-135m"), device=device, dtype=dtype)
    if int(config.get("lora_r") or 0) > 0:
        targets = config.get("lora_target_modules") or "all-linear"
        model = apply_lora(
            model,
            r=int(config["lora_r"]),
            alpha=config.get("lora_alpha"),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=targets if targets == "all-linear" else targets.split(","),
        )
    elif config.get("adapter") == "ssf":
        targets = config.get("ssf_target_modules") or "all-linear"
        model = apply_ssf(model, target_modules=targets if targets == "all-linear" else targets.split(","))
    weights = policy_weights(load_file(str(path / "weights.safetensors")))
    params = dict(model.named_parameters())
    unknown = [name for name in weights if name not in params]
    if unknown:
        raise ValueError(f"{path}: checkpoint parameters not in the rebuilt model: {unknown[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    return model.eval(), tokenizer
