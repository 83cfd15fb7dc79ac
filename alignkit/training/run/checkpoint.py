"""Atomic, pickle-free checkpoints: trainable weights, optimizer, scheduler and RNG states.

Layout of `DIR/checkpoints/step-000012/`:
  weights.safetensors    trainable parameters by name
  optimizer.safetensors  optimizer state tensors, keyed `state.<param index>.<name>`
  state.json             step, scheduler, optimizer param groups, python/numpy RNG, extras,
                         the run's fingerprint (from DIR/run.json) and `files`: the sha256
                         and size of every other file of the checkpoint
  rng.safetensors        torch CPU (and CUDA) RNG states
  extra.safetensors      tensors a task keeps across steps (e.g. a live reference), if any
Each checkpoint is written to a temporary directory and renamed into place, so a killed run
leaves either the previous checkpoint or the new one, never half of one. A checkpoint damaged
afterwards (a truncated or altered file) fails `verify_checkpoint`; `resumable_checkpoint`
then falls back to the newest intact one, with a warning naming both.

Data-parallel runs write the same layout: FSDP2 shards (weights and optimizer state) are
gathered into full tensors and rank 0 writes them, keyed exactly as one process keys them, so a
checkpoint resumes at any world size and under either strategy; rng.safetensors holds every
rank's torch RNG state (`torch_cpu`, `torch_cpu.rank1`, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.training.run import distributed
from alignkit.training.run.distributed import Ranks
from alignkit.training.run.wrapping import full_tensor, like_parameter

log = logging.getLogger("alignkit")
CHECKPOINT_PREFIX = "step-"
CORRUPT_PREFIX = "corrupt-"
EXTRA_TENSORS = "extra.safetensors"
STATE_FILE = "state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


REQUIRED_FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with checkpoint `path` (None when it is intact): state.json unreadable, a
    file missing, or a file whose size or sha256 differs from the one state.json records.
    Checkpoints written before checksums existed are checked for their files only."""
    path = Path(path)
    try:
        record = json.loads((path / STATE_FILE).read_text())
        int(record["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{STATE_FILE} cannot be read ({error})"
    files = record.get("files")
    if not isinstance(files, dict):  # an older checkpoint: no checksums to compare
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, {expected.get('bytes')} were written (truncated?)"
        if _file_checksum(file)["sha256"] != expected.get("sha256"):
            return f"{name} does not match its sha256 checksum (corrupted)"
    return None


def resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of `run_dir` (None when it has none).

    A damaged newer checkpoint is set aside (renamed `checkpoints/corrupt-step-N`) with a
    warning naming it and the checkpoint used instead; when every checkpoint is damaged, a
    ValueError lists them. Run by the process that owns the directory (rank 0)."""
    problems = []
    for candidate in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            for bad, reason in problems:
                aside = bad.with_name(CORRUPT_PREFIX + bad.name)
                log.warning("checkpoint %s is damaged (%s): resuming from %s instead; it is kept as %s",
                            bad, reason, candidate, aside)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
            return candidate
        problems.append((candidate, problem))
    if problems:
        listed = "; ".join(f"{bad.name}: {reason}" for bad, reason in problems)
        raise ValueError(f"{run_dir}: no intact checkpoint to resume from ({listed}); "
                         "start afresh with --overwrite")
    return None


def _full(value: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor (FSDP2 shards gathered: every rank must call this)."""
    return full_tensor(value.detach()).contiguous().cpu().clone()


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(state tensors keyed `state.<param index>.<name>`, JSON: param groups and scalar state)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in sorted(state["state"].items()):
        for name, value in sorted(values.items()):
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = _full(value)
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_tensors(ranks: Ranks) -> dict[str, torch.Tensor]:
    """This process's RNG states; under torchrun every rank's CPU state (rank 0's unsuffixed)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if ranks.distributed:
        states = distributed.all_gather_equal(torch.get_rng_state())
        tensors.update({f"torch_cpu.rank{r}": state for r, state in enumerate(states) if r > 0})
        tensors["torch_cpu"] = states[0]
    shared = distributed.shared_generator()
    if shared is not None:
        tensors["torch_shared"] = shared.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _file_checksum(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


def _run_fingerprint(run_dir: Path) -> dict | None:
    """The fingerprint in DIR/run.json (None without one), recorded in every checkpoint."""
    from alignkit.training.run.rundir import read_run_file

    record = read_run_file(run_dir)
    return record.get("fingerprint") if record else None


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    tensor_files: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically (one process: the caller is rank 0):
    each `tensor_files` entry as a safetensors file, `meta` with `step`, the run's fingerprint
    and the files' checksums as state.json; then point `latest` at it and prune to the newest
    `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        for name, tensors in tensor_files.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        files = {name: _file_checksum(tmp / name) for name in tensor_files}
        record = {"step": step, **meta, "fingerprint": _run_fingerprint(Path(run_dir)), "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(record))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(final.parent / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extras: dict[str, Any] | None = None,
    keep: int = 2,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep` checkpoints.

    `extras` (JSON) and `extra_tensors` (safetensors) hold a task's own state, written inside
    the same temporary directory so they appear together with the weights or not at all.
    Under torchrun every rank calls this (shards are gathered); rank 0 writes.
    """
    ranks = ranks or distributed.current()
    final = checkpoint_dir(run_dir, step)
    weights = _trainable_state(model)
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng = _rng_tensors(ranks)
    if not ranks.is_main:
        distributed.barrier()  # rank 0 has written the checkpoint when this returns
        return final
    tensor_files = {"weights.safetensors": weights, "optimizer.safetensors": opt_tensors, "rng.safetensors": rng}
    if extra_tensors:
        tensor_files[EXTRA_TENSORS] = {k: v.detach().contiguous().cpu().clone() for k, v in extra_tensors.items()}
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "scheduler": scheduler.state_dict(),
        "optimizer": opt_meta,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "extras": extras or {},
    }
    write_checkpoint(run_dir, step, tensor_files, meta, keep)
    distributed.barrier()
    return final


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what `optimizer_tensors` saved: state tensors laid out like each parameter."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state.items():
        param = ordered[index]
        for name, value in values.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.ndim > 0:
                values[name] = like_parameter(value, param)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; return the state metadata.

    Full tensors are laid out like each parameter (its shard under FSDP2), so a checkpoint of
    any world size and strategy loads."""
    ranks = distributed.current()
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable parameters {missing[:3]}...")
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise ValueError(f"{path}: checkpoint parameter {name!r} is not in the model")
            params[name].copy_(like_parameter(value, params[name]))

    restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])

    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng.get(f"torch_cpu.rank{ranks.rank}", rng["torch_cpu"]))
    shared = distributed.shared_generator()
    if shared is not None and "torch_shared" in rng:
        shared.set_state(rng["torch_shared"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return meta


def load_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The `extra_tensors` saved with checkpoint `path` ({} when there were none)."""
    file = Path(path) / EXTRA_TENSORS
    return load_file(str(file)) if file.is_file() else {}
