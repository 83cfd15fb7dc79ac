"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

While a training loop runs inside `StopSignals`, either signal only sets a flag: the current
step finishes, the loop writes a checkpoint and raises `RunInterrupted`, whose message gives
the command that continues the run (`alignkit train --resume DIR`); the CLI prints it and exits
130 without a traceback. A second signal stops at once (KeyboardInterrupt; the last complete
checkpoint stays, checkpoints being atomic). Under torchrun every rank asks `requested()` after
each step (one all-reduce), so all ranks stop after the same step. A Ray worker's loop runs
outside its process's main thread: the driver forwards its own signal with `request_stop`,
which every `StopSignals` of the process honours as if the signal had arrived.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from alignkit.training.run import distributed

log = logging.getLogger("alignkit")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


_forwarded: list[str] = []  # the signal a driver forwarded to this process (`request_stop`)


def request_stop(signal_name: str) -> None:
    """Ask the loops of this process to stop as if `signal_name` had arrived (thread-safe)."""
    if not _forwarded:
        _forwarded.append(signal_name)


def clear_stop_request() -> None:
    _forwarded.clear()


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after step `step`, its checkpoint written."""

    def __init__(self, run_dir: str | Path, step: int, checkpoint: str | Path | None, signal_name: str) -> None:
        self.run_dir, self.step, self.checkpoint, self.signal_name = Path(run_dir), step, checkpoint, signal_name
        super().__init__(self.message)

    def for_run(self, run_dir: str | Path) -> RunInterrupted:
        """The same stop, reported for the enclosing run `run_dir` (what --resume continues)."""
        return RunInterrupted(run_dir, self.step, self.checkpoint, self.signal_name)

    def __reduce__(self):  # pickled across processes (a Ray worker's stop reaches its driver)
        return RunInterrupted, (self.run_dir, self.step, self.checkpoint, self.signal_name)

    @property
    def message(self) -> str:
        written = f", checkpoint {self.checkpoint} written" if self.checkpoint else ""
        return (f"{self.signal_name}: stopped after step {self.step}{written}; "
                f"continue with: alignkit train --resume {self.run_dir}")


class StopSignals:
    """Context manager turning SIGINT/SIGTERM into a request to stop after the current step.
    Outside the main thread (signals cannot be caught there) it installs nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Catch the signals (in the main thread only; a signal the process was started to
        ignore, as `cmd &` does for SIGINT, stays ignored); returns self."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers there were before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second signal: stop now
            self.restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step and writing a checkpoint (send it again to stop at once)",
                    self.received)

    def requested(self) -> bool:
        """Whether a signal arrived (on any rank under torchrun: one MIN all-reduce)."""
        return not distributed.all_ranks_true(self.received is None and not _forwarded)

    @property
    def name(self) -> str:
        return self.received or (_forwarded[0] if _forwarded else "stop requested on another rank")
