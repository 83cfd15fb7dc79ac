"""Helpers shared by the side-by-side benchmarks: child-process workers, alternating A/B
rounds, memory readings and a plain-text ratio table.

A benchmark script runs each framework in a fresh child (`python SCRIPT --worker NAME --spec
FILE`) so imports, allocator state and peak RSS never leak from one framework into the other.
The child prints one line `BENCH_RESULT {json}` as its last result line; `run_worker` parses it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MARKER = "BENCH_RESULT "


# --------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size of this process now (from /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


# --------------------------------------------------------------------------- workers


def emit_result(result: dict) -> None:
    """Child side: print the result line the parent looks for."""
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)


def run_worker(script: str | Path, name: str, spec: str | Path, *, timeout: float | None = None,
               env: dict[str, str] | None = None, verbose: bool = False) -> dict:
    """Parent side: run `SCRIPT --worker NAME --spec SPEC` in a fresh interpreter; its result."""
    cmd = [sys.executable, str(script), "--worker", name, "--spec", str(spec)]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - started
    if verbose and proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"worker {name!r} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(MARKER):])
    result.setdefault("process_wall_s", wall)
    return result


def ab_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Run order per round: forward, then reversed, alternating, so a drifting load (or a warm
    page cache) does not favour whichever framework always goes first."""
    names = list(names)
    return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]


def run_rounds(names: Sequence[str], rounds: int, run_one: Callable[[str, int], dict],
               log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Call `run_one(name, round)` in alternating A/B order; results grouped by name."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r, order in enumerate(ab_orders(names, rounds)):
        for name in order:
            log(f"round {r + 1}/{rounds}: {name} ...")
            result = run_one(name, r)
            results[name].append(result)
            log(f"  {summarise(result)}")
    return results


def summarise(result: dict) -> str:
    keys = ("steps_per_s", "tokens_per_s", "end_to_end_s", "peak_rss_mib", "final_loss")
    return ", ".join(f"{k}={result[k]:.4g}" for k in keys if isinstance(result.get(k), int | float))


# --------------------------------------------------------------------------- aggregation


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return format(value, spec)


def print_table(header: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> None:
    """Left-aligned first column, right-aligned others."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(values):
        first = str(values[0]).ljust(widths[0])
        rest = [str(v).rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    if title:
        print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
