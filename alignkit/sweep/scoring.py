"""Scores of `alignkit sweep`: one number per training run, read from its metrics.jsonl.

A run's score is the mean of the metric over the last `last_k` rows that log it (last_k=1:
its last logged value). Rows that lack the metric (an eval/ metric is logged only on eval
steps) are skipped, so `last_k` counts logged values, not steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of RUN_DIR/metrics.jsonl, in order; a missing file names the run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (the run did not log a step)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_score(rows: list[dict[str, Any]], metric: str, last_k: int = 1, source: str = "run") -> float:
    """Mean of `metric` over the last `last_k` rows that hold a number for it.

    >>> metric_score([{"loss": 3.0}, {"loss": 2.0, "eval/loss": 2.5}, {"loss": 1.0}], "loss", 2)
    1.5
    >>> metric_score([{"loss": 3.0}, {"loss": 2.0, "eval/loss": 2.5}, {"loss": 1.0}], "eval/loss")
    2.5
    """
    if last_k < 1:
        raise ValueError(f"--last-k must be >= 1, got {last_k}")
    values = [float(row[metric]) for row in rows
              if isinstance(row.get(metric), int | float) and not isinstance(row.get(metric), bool)]
    if not values:
        logged = sorted({key for row in rows for key in row if key != "step"})
        raise ValueError(f"{source}: metric {metric!r} is never logged; logged: {', '.join(logged) or 'nothing'}")
    tail = values[-last_k:]
    return sum(tail) / len(tail)


def mean_score(scores: list[float]) -> float:
    """Mean over seeds; NaN when any seed's score is not finite (a diverged run is not
    averaged away).

    >>> mean_score([1.0, 2.0]), math.isnan(mean_score([1.0, float("nan")]))
    (1.5, True)
    """
    if not scores:
        raise ValueError("no scores to average")
    if not all(math.isfinite(s) for s in scores):
        return float("nan")
    return sum(scores) / len(scores)


def is_better(score: float, best: float | None, direction: str) -> bool:
    """Whether `score` beats `best` (None: nothing yet) in `direction`; NaN never wins.

    >>> is_better(0.5, 0.7, "minimize"), is_better(0.5, 0.7, "maximize")
    (True, False)
    """
    if not math.isfinite(score):
        return False
    if best is None or not math.isfinite(best):
        return True
    return score < best if direction == "minimize" else score > best
