"""Branched episodes, REFUEL's data (Gao et al. 2024, "Regressing the Relative Future"): roll in
with the current policy to a reset turn h, then play two (or more) continuations from the same
state to the end of the dialogue.

For each prompt, h ~ U{1, ..., max_turns} (drawn by the caller, seeded by the step):

1. roll in: the conversation plays turns 1 .. h - 1 (policy, tools, environment);
2. branch: the conversation's state is forked (its tokens, messages and rewards copied, its
   environment forked: `env.fork()` when the environment has one, else `copy.deepcopy`), once
   per branch; a conversation that ended during the roll-in branches at the start of its last
   turn instead (the reset turn is then its last);
3. continue: every branch plays from turn h to its end; the branches of a prompt are rows
   i*b .. i*b + b - 1 (one group).

The roll-in's tokens are shared by the branches: they are marked like the environment's
(`Rollout.env_mask`), so the loss and the KL see only the policy's tokens from turn h on, as
REFUEL's loss sums log-ratios over "the assistant tokens after the reset point". An
environment must be forkable: a stateful one holding something deepcopy cannot copy (a model,
a socket) defines `fork()` returning an independent copy of its episode state.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from typing import Any

from alignkit.agents.episodes import EpisodeRunner, Episodes, _Slot, base_seed
from alignkit.agents.protocol import EnvironmentError_
from alignkit.rollout import SamplingParams

BRANCH_SEED_OFFSET = 0x5DEECE66D
"""The continuations sample from seed + this (the roll-in from the seed itself)."""


def reset_turns(count: int, max_turns: int, seed: int) -> list[int]:
    """Each prompt's reset turn h ~ U{1, ..., max_turns}, a function of `seed` only."""
    rng = random.Random(seed)
    return [rng.randint(1, max_turns) for _ in range(count)]


def fork_env(env: Any) -> Any:
    """An independent copy of an environment's episode state: `env.fork()`, else a deepcopy."""
    fork = getattr(env, "fork", None)
    if callable(fork):
        return fork()
    try:
        return copy.deepcopy(env)
    except Exception as err:
        raise EnvironmentError_(f"branching an episode (REFUEL) copies its environment, and copying "
                                f"{type(env).__name__} failed ({type(err).__name__}: {err}); give it a fork() "
                                "method returning an independent copy of its episode state") from err


def fork_slot(slot: _Slot) -> _Slot:
    """A copy of a running conversation that can go on independently."""
    return dataclasses.replace(slot, env=fork_env(slot.env), conversation=copy.deepcopy(slot.conversation),
                               rewards=list(slot.rewards), info={k: list(v) for k, v in slot.info.items()})


def run_branched(runner: EpisodeRunner, engine: Any, rows: list[dict[str, Any]], sampling: SamplingParams,
                 resets: list[int], branches: int = 2) -> Episodes:
    """REFUEL's episodes (see the module docstring): `resets[i]` is prompt i's reset turn h."""
    if len(resets) != len(rows) or any(not 1 <= h <= runner.settings.max_turns for h in resets):
        raise ValueError(f"reset turns must be one per row, each in 1..{runner.settings.max_turns}")
    if branches < 2:
        raise ValueError(f"branching needs at least 2 continuations, got {branches}")
    started = time.perf_counter()
    slots = runner.slots(rows, 1)
    saved: list[_Slot | None] = [None] * len(slots)

    def snapshot(active: list[int]) -> None:  # the state before each roll-in turn
        for k in active:
            saved[k] = fork_slot(slots[k])

    seed = base_seed(sampling)
    runner.advance(engine, slots, sampling, seed, until=[h - 1 for h in resets], before_turn=snapshot)
    points = [slot if not slot.finish else saved[k] for k, slot in enumerate(slots)]
    branched = []
    for point in points:
        for _ in range(branches):
            branch = fork_slot(point)
            branch.prefix = len(branch.conversation.response_ids)
            branched.append(branch)
    runner.advance(engine, branched, sampling, (seed + BRANCH_SEED_OFFSET) % 2**62)
    episodes = runner.episodes(branched, branches, time.perf_counter() - started)
    episodes.metrics["refuel/reset_turn"] = sum(point.turns + 1 for point in points) / len(points)
    episodes.metrics["refuel/prefix_tokens"] = sum(b.prefix for b in branched) / len(branched)
    return episodes
