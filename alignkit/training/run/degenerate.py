"""Runs that cannot learn say so, instead of exiting 0 with an unchanged model.

A step is *degenerate* when it cannot move the model towards the objective:

- `skipped`: its loss or gradient was not finite, so the update was skipped (`--nonfinite skip`);
- `identical_pairs`: every pair of its batch is identical after truncation (chosen == rejected
  token for token, e.g. a long prompt left one response token each): the pairs state no
  preference and a pairwise loss has no gradient;
- `no_reward_variance` (online RL): its rewards did not vary (within any prompt group, for the
  advantages that subtract a group baseline), so every advantage is 0.

Policy (`DegenerateWatch`, one per run, every rank calls it once per step):

1. the first step on which a condition holds: one warning naming it;
2. a condition that has held on EVERY step of the run so far, for N = min(steps this run
   makes, 10) steps: `DegenerateRunError` right after that step is logged, so a useless run
   stops at step 10 instead of at its last step; a 1-step run stops after its one step.
   No `final/` model is written (checkpoints already written stay); metrics.jsonl holds the
   steps that ran. A condition that did not hold on some step never becomes an error
   (the warning of point 1 stays the only word).
3. `--allow-degenerate` (config.allow_degenerate) turns the error into a warning; the run goes on
   and writes `final/`.

"The run so far" is this process's part of it: a resumed run counts from its first step.
Under torchrun each step's flags are all-reduced first (a condition holds when it holds on
every rank), so every rank raises at the same step and no rank stops alone.

What is known before training is checked up front with the same refusal (`refuse`): a
pairwise dataset whose every pair is identical after truncation (`check_identical_pairs`;
some identical: a warning with the count), and, in the online loop, a group baseline with one
sample per group (`alignkit.training.online.steps.check_group_baseline`).

`data_metrics` turns the tokeniser's truncation counts into the `data/*` metrics that the
first metrics.jsonl row of a run carries (run totals).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.training.run import distributed

log = logging.getLogger("alignkit")

PATIENCE = 10
"""Steps a condition must hold (from the first step of the run on) before the run stops."""

ALLOW_HINT = "pass --allow-degenerate to train anyway"


class DegenerateRunError(ValueError):
    """A run that cannot learn (the CLI reports it as one `error:` line, exit 2)."""


@dataclass(frozen=True)
class Condition:
    """A reason a step teaches nothing: `name` (the flag's key), what a degenerate step is
    (`each_step`, a clause) and how to fix it (`fix`, a clause)."""

    name: str
    each_step: str
    fix: str


SKIPPED = Condition(
    "skipped",
    "the loss or gradient was not finite (NaN/inf), so the update was skipped",
    "check the model weights, the data and --lr (--nonfinite stop stops at the first such step)",
)
IDENTICAL_PAIRS = Condition(
    "identical_pairs",
    "every pair of the batch was identical after truncation (chosen == rejected, token for token), "
    "so the pairs state no preference",
    "raise --max-length or lower --max-prompt-length so that the responses survive truncation",
)


def refuse(message: str, allow: bool) -> None:
    """Raise `DegenerateRunError(message + hint)`, or with `allow` log it as a warning."""
    if allow:
        log.warning("%s (--allow-degenerate: continuing)", message)
        return
    raise DegenerateRunError(f"{message}; {ALLOW_HINT}")


def agree(flags: Sequence[bool]) -> list[bool]:
    """Each flag, True only if it is True on every rank (one all-reduce; one process: as given)."""
    if not distributed.current().distributed:
        return [bool(f) for f in flags]
    total = distributed.all_reduce_sum(torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64))
    world = distributed.current().world
    return [bool(v >= world) for v in total.tolist()]


class DegenerateWatch:
    """Tracks `conditions` over the steps of one run (see the module docstring for the policy).

    `steps`: the steps this run makes (its patience is min(steps, PATIENCE)); `allow`:
    --allow-degenerate. Call `observe` once per step on every rank.
    """

    def __init__(self, conditions: Sequence[Condition], *, steps: int, allow: bool,
                 patience: int = PATIENCE) -> None:
        self.conditions = list(conditions)
        self.limit = max(1, min(steps, patience))
        self.allow = allow
        self.observed = 0
        self.first_step: int | None = None
        self.always = {c.name: True for c in self.conditions}  # held on every step so far
        self.warned: set[str] = set()
        self.reported: set[str] = set()

    def observe(self, step: int, flags: dict[str, bool]) -> None:
        """Record step `step`'s flags (condition name -> whether it held; a missing one did
        not): warn the first time a condition holds, raise `DegenerateRunError` when one has
        held on every step of the run for the patience."""
        held = agree([flags.get(c.name, False) for c in self.conditions])
        self.observed += 1
        if self.first_step is None:
            self.first_step = step
        for condition, now in zip(self.conditions, held, strict=True):
            self.always[condition.name] = self.always[condition.name] and now
            if now and condition.name not in self.warned:
                self.warned.add(condition.name)
                if distributed.current().is_main:
                    log.warning("step %d: %s; a run where this holds on its first %d step(s) stops with an "
                                "error (--allow-degenerate to go on)", step, condition.each_step, self.limit)
            if self.always[condition.name] and self.observed >= self.limit and condition.name not in self.reported:
                self.reported.add(condition.name)
                steps = f"step {step}" if step == self.first_step else f"steps {self.first_step}-{step}"
                refuse(f"the run cannot learn: on every step so far ({steps}) {condition.each_step}; "
                       f"{condition.fix}", self.allow)


def count_identical_pairs(task: Any, examples: Sequence[Any]) -> int | None:
    """How many `examples` the task calls identical pairs (its `identical_pair` hook); None for
    a task without pairs."""
    identical: Callable[[Any], bool] | None = getattr(task, "identical_pair", None)
    if identical is None:
        return None
    return sum(bool(identical(example)) for example in examples)


def batch_identical(task: Any, examples: Sequence[Any], indices: Sequence[int]) -> bool:
    """Whether every pair of the (global) batch `indices` is identical (False for a task
    without pairs). Every rank sees the same global batch, so every rank gets the same answer."""
    identical = getattr(task, "identical_pair", None)
    return identical is not None and len(indices) > 0 and all(identical(examples[i]) for i in indices)


def check_identical_pairs(task: Any, examples: Sequence[Any], allow: bool) -> int | None:
    """Before training: the count of training pairs identical after truncation (None for a task
    without pairs). All of them: refused (`refuse`); some: a warning with the count."""
    count = count_identical_pairs(task, examples)
    if not count:
        return count
    total = len(examples)
    what = (f"{count} of {total} training pairs are identical after truncation (chosen == rejected, "
            "token for token: a prompt near --max-length leaves too few response tokens)")
    if count < total:
        log.warning("%s; they teach nothing (%s)", what, IDENTICAL_PAIRS.fix)
        return count
    refuse(f"the run cannot learn: all {what}; {IDENTICAL_PAIRS.fix}", allow)
    return count


def data_metrics(stats: Any, identical_pairs: int | None = None, *, responses: bool = True) -> dict[str, float]:
    """The `data/*` run totals of the training data: examples tokenised, prompts and (unless
    `responses` is False: prompt-only data) responses truncated (`TruncationStats`), and pairs
    identical after truncation when counted."""
    metrics = {"data/examples": float(stats.examples), "data/truncated_prompts": float(stats.truncated_prompts)}
    if responses:
        metrics["data/truncated_responses"] = float(stats.truncated_responses)
    if identical_pairs is not None:
        metrics["data/identical_pairs"] = float(identical_pairs)
    return metrics


class NonFiniteStop(RuntimeError):
    """`--nonfinite stop`: a step's loss or gradient was not finite. One line at the CLI (no
    traceback); the weights are those of the last finite step (this one's update never ran)."""

    one_line = True

    def __init__(self, step: int, what: str = "loss or gradient") -> None:
        super().__init__(f"step {step}: non-finite {what}; stopped (--nonfinite stop) before the update, so the "
                         "weights and the last checkpoint are from finite steps. Check the model weights, the data "
                         "and --lr, or --nonfinite skip to skip such steps")
