"""Scaffolding shared by the reward-model trainer tests: a quiet tiny training run (optionally
split into training and held-out rows) and the eval-rm verb (JSONL files: run_helpers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import alignkit
from alignkit.cli import main

QUIET = {"batch_size": 8, "progress": False}
COMMON = {**QUIET, "warmup_ratio": 0.0}


def train_tiny(
    algorithm: str,
    rows: list[dict[str, Any]],
    output_dir: Path,
    *,
    model_dir: Path | None = None,
    split: int | None = None,
    options: dict[str, Any] = COMMON,
    **settings: Any,
):
    """`alignkit.train(algorithm, ...)` on `rows[:split]`, evaluated on `rows[split:]` (on all
    rows, without eval data, when `split` is None); `model_dir` None leaves --model at the
    algorithm's default."""
    kwargs: dict[str, Any] = {} if model_dir is None else {"model": str(model_dir)}
    if split is None:
        kwargs.update(data=rows)
    else:
        kwargs.update(data=rows[:split], eval_data=rows[split:])
    return alignkit.train(algorithm, output_dir=output_dir, **kwargs, **options, **settings)


def eval_rm(model: Path, data: str, output: Path, n_bootstrap: int, *extra: str) -> dict:
    """Run `alignkit eval-rm` (extra flags go after --data), check it exits 0, return the
    results it wrote to `output`."""
    args = ["eval-rm", "--model", str(model), "--data", data, *extra, "--output", str(output)]
    assert main([*args, "--n-bootstrap", str(n_bootstrap)]) == 0
    return json.loads(output.read_text())
