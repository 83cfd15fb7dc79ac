"""Scaffolding shared by the end-to-end training tests: JSONL files in and metrics.jsonl out, and
the resume check (an uninterrupted run against one cut by an exception at a step, then resumed
from its last checkpoint, compared step by step)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

# Metrics of the pairwise (DPO-family) tasks that a resumed run must reproduce exactly.
PAIRWISE_DETERMINISTIC = ("loss", "lr", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen")


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of RUN_DIR/metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> str:
    """One JSON object a line; returns the path as a string, ready for `data=` or `--data`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Interrupt(Exception):
    """Raised by `interrupt_at`'s callback to cut a run short."""


def interrupt_at(step_to_fail: int) -> Callable[[int, dict], None]:
    """A training callback that raises Interrupt once step `step_to_fail` has been logged."""

    def callback(step, metrics):
        if step == step_to_fail:
            raise Interrupt

    return callback


class ResumedRuns(NamedTuple):
    full: list[dict]  # metrics of the uninterrupted run
    resumed: list[dict]  # metrics of the run cut short and then resumed
    full_result: Any  # what `train` returned for each
    resumed_result: Any


def run_interrupted_and_resumed(
    train: Callable[..., Any],
    tmp_path: Path,
    *,
    at: int,
    inspect_cut: Callable[[Path], None] | None = None,
) -> ResumedRuns:
    """Three calls of `train(output_dir=..., **kwargs)`: uninterrupted into tmp_path/full; into
    tmp_path/cut with a callback raising Interrupt at step `at` (the call must raise it); then
    with resume=tmp_path/cut, which continues in the cut run's directory (its own output_dir,
    tmp_path/ignored, is not used). `inspect_cut(cut_dir)` runs before the resume."""
    full_result = train(output_dir=tmp_path / "full")
    with pytest.raises(Interrupt):
        train(output_dir=tmp_path / "cut", callbacks=(interrupt_at(at),))
    if inspect_cut is not None:
        inspect_cut(tmp_path / "cut")
    resumed_result = train(output_dir=tmp_path / "ignored", resume=str(tmp_path / "cut"))
    return ResumedRuns(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"), full_result, resumed_result)


def assert_resumed_matches(
    full: list[dict],
    resumed: list[dict],
    keys: Iterable[str],
    *,
    steps: int,
    tolerance: dict[str, float] | None = None,
    skip_missing: bool = False,
) -> None:
    """The resumed run logged steps 1..`steps`, as many rows as the full run, and each row equals
    the full run's on every key: exactly, or within `tolerance` (pytest.approx's rel/abs).
    With `skip_missing`, keys absent from the full run's row are not compared."""
    keys = tuple(keys)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(full, resumed, strict=True):
        for key in keys:
            if skip_missing and key not in a:
                continue
            expected = b[key] if tolerance is None else pytest.approx(b[key], **tolerance)
            assert a[key] == expected, (a["step"], key)


def assert_same_parameters(first: torch.nn.Module, second: torch.nn.Module) -> None:
    """The two models' parameters match name for name (torch.testing.assert_close)."""
    for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def teacher_forced_logps(model: torch.nn.Module, rollout: Any, pad_id: int) -> torch.Tensor:
    """The log-probs (temperature 1, padded forward) of a rollout's sampled tokens, flattened
    in the order of `rollout.response_logprobs[rollout.response_mask]`."""
    from alignkit.eval.kl import response_logps

    ids, attention, mask = rollout.to_sequences(pad_id)
    return response_logps(model, ids, attention, mask, pack=False)[mask]
