"""How many CPU threads torch uses: `--threads N` as given, or chosen from the machine's load.

torch starts one intra-op thread per core. Its OpenMP threads wait for each other at the end
of every parallel region, so when another process holds one of the cores each region waits
for a thread that is not running: on 2 shared cores a 50-step sampling loop took 39 s with 2
threads and 0.8 s with 1. `--threads 0` (auto) therefore starts from the cores this process
may run on (CPU affinity and a cgroup CPU quota), splits them between the ranks torchrun
started on this machine, and leaves out the cores other processes keep busy:

    threads = clamp(floor((cores - load) / local_ranks + 1/4), 1, cores // local_ranks)

where `load` is the number of other processes' tasks wanting a core right now (the run queue,
sampled for 0.2 s; a load of 0.25 or less still counts as an idle core). Outside torchrun a
positive `OMP_NUM_THREADS` counts as the request. The automatic choice is made once per
process: later runs in the same process (the demo trains twice) reuse it, since by then the
cores are busy with this process's own threads.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger("alignkit")

IDLE_LOAD_TOLERANCE = 0.25
"""Load that does not yet count against a core (daemons, the shell, the tail of a command)."""

_auto_choice: int | None = None
_logged: int | None = None


def choose_threads(cores: int, load: float, local_world_size: int = 1, requested: int = 0) -> int:
    """torch intra-op threads for one process: `requested` when > 0, else the auto rule of the
    module docstring (at least 1, at most this rank's share of the cores).

    >>> choose_threads(2, 0.1), choose_threads(2, 3.1), choose_threads(16, 2.0, local_world_size=4)
    (2, 1, 3)
    """
    if requested < 0:
        raise ValueError(f"--threads must be >= 0 (0 picks a count from the load), got {requested}")
    if requested > 0:
        return requested
    ranks = max(1, local_world_size)
    share = max(1, max(1, cores) // ranks)
    free = max(0.0, cores - max(0.0, load))
    return max(1, min(share, math.floor(free / ranks + IDLE_LOAD_TOLERANCE)))


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup quota (cpu.max, or cfs_quota_us / cfs_period_us), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as quota_file, \
                open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as period_file:
            quota, period = int(quota_file.read()), int(period_file.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def current_load(samples: int = 20, interval_s: float = 0.01) -> float:
    """Tasks of other processes wanting a core right now: the run-queue length of
    /proc/loadavg minus this process, averaged over `samples` reads `interval_s` apart (0.2 s).

    Not the 1-minute load average: that still counts a job that has just ended (`make demo`
    right after `pip install`) and misses one that has just started. Falls back to the load
    average where /proc is missing."""
    import time

    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as handle:
                counts.append(max(0, int(handle.read().split()[3].split("/")[0]) - 1))
        except (OSError, ValueError, IndexError):
            break
        time.sleep(interval_s)
    if counts:
        return sum(counts) / len(counts)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _env_request() -> int:
    """A positive OMP_NUM_THREADS outside torchrun (torchrun sets 1 for every rank itself)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return 0
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def requested_threads(source: Any) -> int:
    """The request held by a config-like object (`.threads`) or an int; 0 when it has none."""
    value = getattr(source, "threads", source)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"--threads must be a whole number >= 0, got {value!r}")
    return value


def configure_threads(source: Any = 0) -> int:
    """Set torch's intra-op thread count for `source` (a TrainConfig/DemoOptions with `.threads`,
    or an int: N as given, 0 auto); log the choice when it changes; return it."""
    global _auto_choice, _logged
    import torch

    requested = requested_threads(source)
    if requested < 0:
        choose_threads(1, 0.0, requested=requested)  # raises the user-facing error
    reason = "--threads"
    if requested == 0 and _env_request():
        requested, reason = _env_request(), "OMP_NUM_THREADS"
    if requested > 0:
        threads = requested
    elif _auto_choice is not None:
        threads, reason = _auto_choice, ""
    else:
        cores, ranks = available_cores(), local_world_size()
        load = max(0.0, current_load() - (ranks - 1))  # torchrun's other local ranks are not "others"
        threads = _auto_choice = choose_threads(cores, load, ranks)
        reason = f"{cores} cores, load {load:.1f}" + (f", {ranks} local ranks" if ranks > 1 else "")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if threads != _logged:
        log.info("torch threads: %d%s", threads, f" ({reason})" if reason else "")
        _logged = threads
    return threads


def configure_cli_threads(argv: list[str]) -> list[str]:
    """For a verb whose own parser does not know `--threads` (eval, eval-rm, overopt): take
    `--threads N` / `--threads=N` out of `argv` and apply it (absent: auto); return the rest."""
    rest, values, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--threads":
            if i + 1 >= len(argv):
                raise ValueError("--threads needs a value: a whole number >= 0 (0 picks a count from the load)")
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--threads="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    requested = 0
    if values:
        try:
            requested = int(values[-1])
        except ValueError:
            raise ValueError(f"--threads must be a whole number >= 0, got {values[-1]!r}") from None
    configure_threads(requested)
    return rest
