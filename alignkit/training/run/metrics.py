"""Where metrics go: `DIR/metrics.jsonl` (one object per logged step, always `step` and
`loss`), TensorBoard when asked, and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("alignkit")


def to_float(value: Any) -> float:
    if torch.is_tensor(value):
        return float(value.detach().float().mean().item())
    return float(value)


def lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl logged at steps <= `step`. A line that is not JSON (the
    half-written last line a killed run leaves) is dropped with a warning, not an error."""
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s, line %d: not a complete JSON record (a torn write); dropped", path, number)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    return kept


class MetricsWriter:
    """Append-only JSON-lines metrics file; on resume, entries after `resume_step` are dropped
    so the file matches an uninterrupted run step for step."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = lines_up_to(self.path, resume_step)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None:
            self.path.write_text("")
        self.handle = self.path.open("a")
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # tensorboard is an optional dependency
                raise RuntimeError(
                    "--tensorboard needs the `tensorboard` package: pip install tensorboard"
                ) from error
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        record = {"step": step, **{k: to_float(v) for k, v in metrics.items()}}
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in record.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)
        return record

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class RecordOnly:
    """The writer of ranks other than 0: builds the same records, writes nothing."""

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        return {"step": step, **{k: to_float(v) for k, v in metrics.items()}}

    def close(self) -> None:
        pass


def open_metrics(run_dir: Path, is_main: bool, **options: Any) -> MetricsWriter | RecordOnly:
    """`MetricsWriter` on rank 0 (or one process), `RecordOnly` elsewhere."""
    return MetricsWriter(run_dir, **options) if is_main else RecordOnly()


def mean_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average each metric over the micro-batches of one optimizer step."""
    keys = {k for part in parts for k in part}
    return {k: sum(to_float(p[k]) for p in parts if k in p) / sum(k in p for p in parts) for k in keys}


def progress_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The few numbers worth reading on a progress bar."""
    shown = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin"}
    postfix = {short: f"{metrics[key]:.4f}" for key, short in shown.items() if key in metrics}
    if "throughput/tokens_per_s" in metrics:
        postfix["tok/s"] = f"{metrics['throughput/tokens_per_s']:.0f}"
    return postfix
