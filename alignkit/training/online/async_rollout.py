"""One-step-off asynchronous rollout (`--set async_rollout=true`).

With an engine that holds its own copy of the weights (`--rollout vllm`), step t+1's prompts
are generated and scored in a background thread while step t updates the policy:

    step t:   [samples t (prefetched)] -> log-probs, advantages -> submit collect(t + 1) -> update t
              -> wait for collect(t + 1) -> sync the engine to the weights after step t

so step t+1 trains on samples of the weights after step t-1: staleness 1, and the importance
ratios are taken against the sampling policy's own log-probs (the engine's), as in the
anchors' one-step-off mode. The engine is synced only after the prefetch has finished, so no
sample mixes two weight versions. Before a checkpoint step nothing is prefetched (the next
step samples the saved weights, staleness 0), so a run resumed from that checkpoint repeats
the uninterrupted one; a checkpoint written because of Ctrl-C while a prefetch runs saves the
data cursor and reward statistics from before it (the resumed step then samples afresh).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Prefetcher:
    """At most one background `collect(step)` in flight, with its timing."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-rollout")
        self.future: Future | None = None
        self.step: int | None = None
        self.snapshot: Any = None
        self.started = self.finished = 0.0

    def submit(self, step: int, collect: Callable[[int], Any], snapshot: Any) -> None:
        """Start `collect(step)`; `snapshot` is the sampler state from before it (for checkpoints)."""
        if self.future is not None:
            raise RuntimeError(f"a prefetch for step {self.step} is still pending")
        self.step, self.snapshot, self.started = step, snapshot, time.perf_counter()

        def run() -> Any:
            try:
                return collect(step)
            finally:
                self.finished = time.perf_counter()

        self.future = self.pool.submit(run)

    @property
    def pending(self) -> bool:
        return self.future is not None

    def wait(self) -> dict[str, float]:
        """Block until the prefetch is done (its error is raised by `take`); returns how long the
        update waited for it and how much of its run overlapped the update."""
        if self.future is None:
            return {}
        waited_from = time.perf_counter()
        self.future.exception()  # waits; raises nothing
        waited = time.perf_counter() - waited_from
        return {"async/wait_s": waited, "async/overlap_s": max(0.0, self.finished - self.started - waited)}

    def take(self, step: int) -> Any:
        """The prefetched samples of `step` (or None when nothing was prefetched for it)."""
        if self.future is None:
            return None
        if self.step != step:
            raise RuntimeError(f"prefetched step {self.step}, asked for step {step}")
        future, self.future, self.snapshot = self.future, None, None
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
