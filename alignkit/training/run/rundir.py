"""The run directory: what may start in `--output`, what `--resume` continues, who writes it.

    DIR/run.json        {"fingerprint": {"config": {...}, "data": {...}}, "status": ...}
    DIR/.alignkit.lock  an OS lock (fcntl.flock) held by the run writing DIR, with its pid

The fingerprint of a run is its resolved config minus the fields that do not change its
results (`NON_RESULT_FIELDS`: where it writes, logging, checkpoint cadence, threads, ...) plus
a content hash of its data (`--data`, `--eval-data`, and files named by hyper-parameters such
as rm_multi's `pairs=`). Every checkpoint records it too (state.json), so:

- a fresh run refuses an `--output` that holds a run (the same config or another) or files
  that are not a run, unless `--overwrite`;
- `--resume DIR` refuses a checkpoint whose config or data differ from the resumed run's,
  unless `--override key1,key2` names every change (then it logs them and continues);
- two runs never write one directory at once: the lock dies with its process (kill -9
  leaves no stale lock); under torchrun rank 0 holds it and tells the other ranks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.training.run import distributed
from alignkit.training.run.checkpoint import STATE_FILE, list_checkpoints, resumable_checkpoint
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.fingerprint import canonical, source_digest

log = logging.getLogger("alignkit")
RUN_FILE = "run.json"
LOCK_FILE = ".alignkit.lock"
# TrainConfig fields that do not change what a run computes: left out of its fingerprint.
NON_RESULT_FIELDS = frozenset({
    "output", "resume", "overwrite", "override", "progress", "logging_steps", "tensorboard",
    "save_steps", "save_total_limit", "eval_steps", "threads", "reward_workers", "reward_timeout",
    "allow_degenerate", "strategy", "gradient_checkpointing", "logp_chunk_size", "padding_free",
    "trust_remote_code", "vllm_url", "vllm_python", "vllm_args", "placement", "ray_address",
})
# What a run writes at the top of its directory (besides its reference caches).
RUN_ENTRIES = frozenset({RUN_FILE, LOCK_FILE, "config.yaml", "metrics.jsonl", "checkpoints", "final",
                         "tensorboard", "members", "hft"})
RUN_MARKERS = (RUN_FILE, "config.yaml", "metrics.jsonl", "checkpoints")
# Written by the launch itself (Ray workers' table and logs, vLLM servers' logs): kept by --overwrite.
LAUNCH_ENTRIES = frozenset({"workers.json", "workers"})
LAUNCH_PREFIXES = ("vllm-rank", "vllm-rollout")


# ---------------------------------------------------------------------------- fingerprints


def config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The config fields that change a run's results, as plain JSON values."""
    values = {k: v for k, v in config.to_dict().items() if k not in NON_RESULT_FIELDS}
    return canonical(values)


def _names_file(value: Any) -> bool:
    """Whether `value` is a string naming an existing file (any other text is not)."""
    try:
        return isinstance(value, str) and bool(value) and Path(value).is_file()
    except (OSError, ValueError):  # too long for a path, or a NUL byte: a template, not a file
        return False


def data_fingerprint(config: TrainConfig, data: Any = None, eval_data: Any = None) -> dict[str, str]:
    """Content hashes of the run's data: `data`, `eval_data` (in-memory objects, else the
    config's paths) and every hyper-parameter naming an existing file."""
    sources = {"data": data if data is not None else config.data,
               "eval_data": eval_data if eval_data is not None else config.eval_data}
    for key, value in sorted(config.hparams.items()):
        if _names_file(value):
            sources[key] = value
    return {key: digest for key, source in sources.items() if (digest := source_digest(source)) is not None}


def run_fingerprint(config: TrainConfig, data: Any = None, eval_data: Any = None) -> dict[str, Any]:
    return {"config": config_fingerprint(config), "data": data_fingerprint(config, data, eval_data)}


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """key -> what changed, between a saved fingerprint and this run's. Keys are config fields,
    hyper-parameter names, and data keys (`data`: the file's content changed)."""
    changes: dict[str, str] = {}
    old_config, new_config = saved.get("config") or {}, current.get("config") or {}
    for key in sorted(set(old_config) | set(new_config)):
        if key == "hparams":
            continue
        old, new = old_config.get(key), new_config.get(key)
        if old != new:
            changes[key] = f"{old!r} -> {new!r}"
    old_h, new_h = old_config.get("hparams") or {}, new_config.get("hparams") or {}
    for key in sorted(set(old_h) | set(new_h)):
        if old_h.get(key) != new_h.get(key):
            changes[key] = f"{old_h.get(key, '<default>')!r} -> {new_h.get(key, '<default>')!r}"
    old_data, new_data = saved.get("data"), current.get("data") or {}
    for key in sorted(set(old_data or {}) | set(new_data)) if old_data is not None else ():
        if old_data.get(key) == new_data.get(key):
            continue
        note = "its content changed" if key in old_data and key in new_data else "added or removed"
        changes[key] = f"{changes[key]}, {note}" if key in changes else note
    return changes


def override_keys(text: str) -> set[str]:
    """The keys of `--override a,b` (dashes read as underscores)."""
    return {k.strip().replace("-", "_") for k in (text or "").split(",") if k.strip()}


def check_changes(changes: dict[str, str], override: str, where: str) -> None:
    """Raise unless `--override` names every changed key; log the changes it allows, and warn
    about the keys it names that did not change (a typo?)."""
    allowed = override_keys(override)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = ", ".join(f"{k} ({v})" for k, v in refused.items())
        raise ValueError(f"--resume {where}: the run was trained with other settings or data: {listed}; "
                         f"pass --override {','.join(refused)} to continue with them anyway")
    if changes:
        log.warning("--resume %s with --override: %s", where, "; ".join(f"{k}: {v}" for k, v in changes.items()))
    unused = sorted(allowed - set(changes))
    if unused:
        log.warning("--override %s: unchanged from the resumed run (nothing to override)", ",".join(unused))


# ---------------------------------------------------------------------------- run.json


def read_run_file(run_dir: str | Path) -> dict[str, Any] | None:
    """DIR/run.json, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_run_file(run_dir: Path, record: dict[str, Any]) -> None:
    """Write DIR/run.json atomically."""
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def saved_fingerprint(run_dir: Path, checkpoint: Path | None) -> dict[str, Any] | None:
    """What the resumed weights were trained with: the checkpoint's fingerprint, else run.json's,
    else (a run written before fingerprints) config.yaml's config with no data hashes."""
    if checkpoint is not None:
        recorded = json.loads((checkpoint / STATE_FILE).read_text()).get("fingerprint")
        if recorded:
            return recorded
    record = read_run_file(run_dir)
    if record and record.get("fingerprint"):
        return record["fingerprint"]
    if (run_dir / "config.yaml").is_file():
        log.warning("%s was written by an older alignkit: its data cannot be checked", run_dir)
        return {"config": config_fingerprint(TrainConfig.from_yaml(run_dir / "config.yaml")), "data": None}
    return None


# ---------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive `fcntl.flock` on DIR/.alignkit.lock, which holds the owner's pid. The OS
    drops it when the process ends, however it ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ValueError(f"{run_dir}: cannot lock {path} ({error.strerror})") from None
                raise ValueError(f"{run_dir}: another alignkit run (pid {holder}) is writing to this directory; "
                                 "wait for it to finish or choose another --output") from None
            try:  # the file we locked must still be the one at `path` (a finishing run unlinks it)
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------- the directory


def _is_cache(path: Path) -> bool:
    """A reference cache a run wrote: a top-level safetensors file with a `fingerprint`."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return "fingerprint" in (handle.metadata() or {})
    except Exception:  # unreadable: not known to be ours
        return False


def _launch_entry(name: str) -> bool:
    return name in LAUNCH_ENTRIES or name.startswith(LAUNCH_PREFIXES)


def run_entries(run_dir: Path) -> tuple[list[str], list[str]]:
    """(entries a run writes, other entries) at the top of an existing directory."""
    ours, others = [], []
    for entry in sorted(run_dir.iterdir()):
        written = entry.name in RUN_ENTRIES or _launch_entry(entry.name) or _is_cache(entry)
        (ours if written else others).append(entry.name)
    return ours, others


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_MARKERS)


def remove_run_files(run_dir: Path) -> None:
    """--overwrite: remove what a run wrote (checkpoints, metrics, final/, run.json, ...).
    Reference caches stay: they are keyed by the content of the data, the reference model and
    the tokenizer, so the new run reuses one only if it was computed from exactly its inputs.
    Files a run does not write are left alone."""
    removed = [name for name in run_entries(run_dir)[0]
               if name != LOCK_FILE and not _launch_entry(name) and not _is_cache(run_dir / name)]
    for name in removed:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if removed:
        log.info("--overwrite: removed the previous run's %s from %s", ", ".join(removed), run_dir)


def _writable_directory(path: Path, flag: str) -> None:
    """Create `path` (and parents) or say in one line why it cannot be a run directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".alignkit-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None


def _refuse_existing(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """A fresh run without --overwrite: refuse a directory that holds a run or other files."""
    ours, others = run_entries(run_dir)
    if holds_run(run_dir):
        saved = saved_fingerprint(run_dir, None)
        record = read_run_file(run_dir) or {}
        changes = fingerprint_changes(saved, fingerprint) if saved else {"config": "unknown"}
        if changes:
            listed = ", ".join(list(changes)[:6])
            raise ValueError(f"--output {run_dir}: holds another run (it differs in {listed}); choose another "
                             "--output, or pass --overwrite to replace it")
        if record.get("status") == "finished":
            raise ValueError(f"--output {run_dir}: holds a finished run of this same configuration; pass "
                             "--overwrite to train it again from scratch, or choose another --output")
        latest = list_checkpoints(run_dir)
        where = f" (last checkpoint {latest[-1].name})" if latest else ""
        raise ValueError(f"--output {run_dir}: holds an unfinished run of this configuration{where}; continue it "
                         f"with `alignkit train --resume {run_dir}`, or pass --overwrite to start afresh")
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"--output {run_dir}: is not empty and holds no alignkit run ({shown}); choose an "
                         "empty directory, or pass --overwrite to write the run next to these files")


@dataclass
class RunDir:
    """The directory a run writes, locked; `resume_from` is the checkpoint to load (or None).
    As a context manager it records how the run ended in run.json and releases the lock."""

    path: Path
    resume_from: Path | None
    fingerprint: dict[str, Any]
    lock: RunLock | None = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """run.json's status: finished, interrupted (a signal, see interrupt.py) or failed."""
        from alignkit.training.run.interrupt import RunInterrupted

        self.close("finished" if kind is None else "interrupted" if isinstance(error, RunInterrupted) else "failed")

    def close(self, status: str | None = None) -> None:
        """Record `status` in run.json (rank 0) and release the lock."""
        if self.lock is not None and status is not None:
            record = read_run_file(self.path) or {"fingerprint": self.fingerprint}
            write_run_file(self.path, {**record, "status": status})
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _prepare(config: TrainConfig, fingerprint: dict[str, Any]) -> RunDir:
    """Rank 0's part of `open_run_dir`: check, lock, clean (--overwrite), write run.json."""
    if config.resume and config.overwrite:
        raise ValueError("--resume continues a run and --overwrite starts one afresh: pass one of them")
    if config.resume:
        run_dir = Path(config.resume)
        if not run_dir.exists():
            raise FileNotFoundError(f"--resume {run_dir}: no such directory (start a run with --output {run_dir})")
        if not holds_run(run_dir):
            raise ValueError(f"--resume {run_dir}: no alignkit run there (no run.json, config.yaml or "
                             f"checkpoints/); start one with --output {run_dir}")
    else:
        run_dir = Path(config.output)
        _writable_directory(run_dir, "--output")
    lock = RunLock.acquire(run_dir)
    try:
        resume_from = None
        if config.resume:
            resume_from = resumable_checkpoint(run_dir)
            saved = saved_fingerprint(run_dir, resume_from)
            if saved is not None:
                check_changes(fingerprint_changes(saved, fingerprint), config.override, str(run_dir))
            if resume_from is None and not (run_dir / "members").is_dir():  # (an ensemble resumes its members)
                log.warning("--resume %s: the run has no checkpoint yet; starting it from step 0", run_dir)
        elif config.overwrite:
            remove_run_files(run_dir)
        else:
            _refuse_existing(run_dir, fingerprint)
        write_run_file(run_dir, {"fingerprint": fingerprint, "status": "running", "algorithm": config.algorithm,
                                 "pid": os.getpid()})
        config.output = str(run_dir)
        config.save(run_dir / "config.yaml")  # now, so that a run killed while loading still resumes
    except BaseException:
        lock.release()
        raise
    return RunDir(run_dir, resume_from, fingerprint, lock)


def open_run_dir(config: TrainConfig, *, data: Any = None, eval_data: Any = None) -> RunDir:
    """Check and lock the run directory of `config` (see the module docstring) and set
    `config.output` to it. Under torchrun rank 0 does the work and every rank gets its
    outcome: the same RunDir, or the same one-line error."""
    ranks = distributed.current()
    outcome: dict[str, Any] = {}
    run, failure = None, None
    if ranks.is_main:
        try:
            run = _prepare(config, run_fingerprint(config, data, eval_data))
            outcome = {"path": str(run.path), "resume_from": run.resume_from and str(run.resume_from)}
        except Exception as error:  # under torchrun the other ranks must hear of it, not hang
            if not ranks.distributed:
                raise
            outcome = {"error": str(error), "user": isinstance(error, ValueError | FileNotFoundError)}
            failure = error
    if ranks.distributed:
        outcome = distributed.all_gather_json(outcome)[0]
        if "error" in outcome:
            if failure is not None:
                raise failure
            raise (ValueError if outcome["user"] else RuntimeError)(outcome["error"])
    if run is None:  # another rank: rank 0 holds the lock
        resume_from = Path(outcome["resume_from"]) if outcome["resume_from"] else None
        run = RunDir(Path(outcome["path"]), resume_from, {})
    config.output = str(run.path)
    return run
