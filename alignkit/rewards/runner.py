"""Calling a reward function on the online loop's batches: TRL's conventions, a deadline, threads.

`RewardRunner(fn, timeout=600, workers=0)(prompts, completions, columns)` scores one step's
completions with `score_safely` and:

- TRL's conventions: when the prompts are conversations (the online loop puts each row's
  prompt messages in the `prompt` column, see `reward_columns`), `fn` receives `prompts` as
  the list of message lists and each completion as `[{"role": "assistant", "content": text}]`,
  exactly as TRL's GRPOTrainer passes them; plain-text prompts stay strings. Like TRL it also
  passes `completion_ids` (each completion's token ids) and `trainer_state` (a transformers
  `TrainerState` whose `global_step` counts the optimizer steps done) to a function that
  accepts them (by name or `**kwargs`), besides the extra dataset columns.
- a deadline: a call that has not returned after `timeout` seconds raises `RewardTimeout`
  naming the function and the batch. The call runs in a daemon thread (a hung Python thread
  cannot be killed, but a daemon one does not keep the process alive), so the run ends.
  `timeout` None or <= 0: no limit, and the call runs in the caller's thread.
- workers: with `workers = N > 0` the batch is cut into at most N contiguous chunks of whole
  prompt groups (runs of equal consecutive prompts), each scored in its own thread at once, so
  slow or remote rewards overlap. The results are concatenated in row order: for a function that
  scores each row (or each group) on its own they equal the single call's exactly.

`reward_batch(step=..., max_steps=...)` tells the runner which training step is being scored
(for `trainer_state` and the messages); the online driver wraps each step's sampling in it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.rewards.base import (
    RewardError,
    _accepted_columns,
    prompt_preview,
    reward_name,
    score_safely,
    unconverted,
)
from alignkit.rewards.dense import Scores, concat_scores

#: The column of `reward_columns` that carries a conversational row's prompt messages.
PROMPT_MESSAGES = "prompt"


class RewardTimeout(RewardError):
    """A reward function did not return within the configured number of seconds."""


@dataclass(frozen=True)
class BatchContext:
    """Which training step the reward is scoring."""

    step: int
    max_steps: int = 0
    validation: bool = False
    """Scoring held-out samples after `step` updates (online validation), not step `step`'s."""


_CURRENT: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar(
    "alignkit_reward_batch", default=None
)


@contextlib.contextmanager
def reward_batch(step: int, max_steps: int = 0, validation: bool = False) -> Iterator[BatchContext]:
    """Within this block, rewards scored by a `RewardRunner` belong to training step `step`
    (`validation`: to the validation after `step` updates)."""
    context = BatchContext(step, max_steps, validation)
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def conversational_prompt(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A row's prompt as messages: its `prompt` when that is a message list, the turns before
    the last assistant turn of a `messages` row (all of them when there is none), else None."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return list(prompt)
    messages = row.get("messages")
    if prompt is None and isinstance(messages, list):
        assistant = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        return list(messages[: assistant[-1]] if assistant else messages)
    return None


def reward_columns(row: dict[str, Any]) -> dict[str, Any]:
    """What a prompt row gives the reward besides its prompt text: every other column (TRL
    passes them as keyword arguments) and, for a conversational row, its prompt messages
    under `PROMPT_MESSAGES` (the runner passes them as `prompts`)."""
    columns = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    messages = conversational_prompt(row)
    if messages is not None:
        columns[PROMPT_MESSAGES] = messages
    return columns


def group_chunks(prompts: Sequence[Any], parts: int) -> list[tuple[int, int]]:
    """At most `parts` contiguous (start, stop) row ranges covering `prompts`, each made of
    whole runs of equal consecutive prompts (a prompt's samples stay together), as even in
    runs as possible."""
    n = len(prompts)
    if n == 0:
        return []
    bounds = [0] + [i for i in range(1, n) if prompts[i] != prompts[i - 1]] + [n]
    runs = len(bounds) - 1
    parts = max(1, min(parts, runs))
    cuts = [bounds[(k * runs) // parts] for k in range(parts)] + [n]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def in_daemon_thread(call: Callable[[], Any], name: str = "alignkit-reward") -> Future:
    """Run `call` in a new daemon thread; its result or exception arrives in the returned
    Future. (concurrent.futures' pool threads are joined at exit, so one hung reward would
    keep the process alive forever; a daemon thread does not.)"""
    future: Future = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except BaseException as error:  # handed to the waiting caller
            future.set_exception(error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class RewardRunner:
    """Scores the online loop's batches with one reward function (see the module docstring).

    `on_error`/`penalty` as in `score_safely`; `timeout` seconds per batch (None or <= 0: no
    limit); `workers` threads (0: one call per batch).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        on_error: str = "raise",
        penalty: float = -1.0,
        timeout: float | None = 600.0,
        workers: int = 0,
    ) -> None:
        if workers < 0:
            raise ValueError(f"reward_workers must be >= 0, got {workers}")
        if timeout is not None and timeout != timeout:  # NaN
            raise ValueError("reward_timeout must be a number of seconds (0: no limit)")
        self.fn, self.on_error, self.penalty = fn, on_error, penalty
        self.timeout = timeout if timeout is not None and timeout > 0 else None
        self.workers = workers
        self.name = reward_name(fn)

    def wants(self, keyword: str) -> bool:
        """Whether the function accepts `keyword` (by name or **kwargs)."""
        return bool(_accepted_columns(unconverted(self.fn), {keyword: None}))

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        columns: dict[str, Any],
        *,
        completion_ids: Callable[[], list[list[int]]] | None = None,
        token_counts: Sequence[int] | None = None,
    ) -> tuple[Scores, int]:
        """(scores (N,) or (N, K), penalised rows) of one batch; `completion_ids` computes each
        completion's token ids when the function wants them. With `token_counts` (each
        completion's response tokens) the function may return dense rewards
        (`alignkit.rewards.dense`): then the scores are `DenseRewards`."""
        columns = dict(columns)
        messages = columns.pop(PROMPT_MESSAGES, None)
        if messages is not None and len(messages) == len(prompts) and all(isinstance(m, list) for m in messages):
            prompts = list(messages)
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        context = _CURRENT.get()
        if completion_ids is not None and self.wants("completion_ids"):
            columns["completion_ids"] = completion_ids()
        if context is not None and self.wants("trainer_state"):
            columns["trainer_state"] = _trainer_state(context)
        label = _batch_label(context, prompts)
        chunks = group_chunks(prompts, self.workers) if self.workers > 0 else [(0, len(completions))]
        calls = [self._chunk_call(prompts, completions, columns, start, stop, label, token_counts)
                 for start, stop in chunks]
        if self.timeout is None and self.workers == 0:
            results = [call() for call in calls]
        else:
            results = self._run(calls, len(completions), label)
        if not results:
            return torch.zeros(0), 0
        counts = [[1] * (stop - start) if token_counts is None else token_counts[start:stop] for start, stop in chunks]
        return concat_scores([scores for scores, _ in results], counts), sum(count for _, count in results)

    def _chunk_call(self, prompts, completions, columns, start: int, stop: int, label: str,
                    token_counts: Sequence[int] | None = None):
        """score_safely on rows start..stop (row-aligned columns sliced, others as they are)."""
        n = len(completions)
        part = {
            key: value[start:stop] if isinstance(value, list | tuple) and len(value) == n else value
            for key, value in columns.items()
        }

        def call() -> tuple[Scores, int]:
            counts = None if token_counts is None else token_counts[start:stop]
            return score_safely(self.fn, prompts[start:stop], completions[start:stop], on_error=self.on_error,
                                penalty=self.penalty, row_offset=start, batch=label, token_counts=counts, **part)

        return call

    def _run(self, calls: list[Callable[[], tuple[Scores, int]]], n: int, label: str):
        """Run each of `calls` in its own daemon thread; wait at most `timeout` seconds for all."""
        futures = [in_daemon_thread(call) for call in calls]
        _, pending = wait(futures, timeout=self.timeout)
        if pending:
            raise RewardTimeout(
                f"reward {self.name} did not return within {self.timeout:g} s on a batch of {n} "
                f"completions [{label}]; make it faster, score in threads with --reward-workers N, "
                f"or raise --reward-timeout (0: no limit)"
            )
        return [future.result() for future in futures]


def _trainer_state(context: BatchContext) -> Any:
    """TRL's `trainer_state`: a transformers TrainerState at the step being scored."""
    from transformers import TrainerState

    done = context.step if context.validation else context.step - 1  # optimizer steps taken
    return TrainerState(global_step=done, max_steps=context.max_steps)


def _batch_label(context: BatchContext | None, prompts: Sequence[Any]) -> str:
    """ "step 3, 8 completions, first prompt 'Say something'" (no step outside training)."""
    where = f"{len(prompts)} completions" + (f", first prompt {prompt_preview(prompts[0])!r}" if prompts else "")
    if context is None:
        return where
    return f"{'validation at ' if context.validation else ''}step {context.step}, {where}"
