"""The environment protocol, and how `--env module:Factory` is loaded.

An environment is any object with two methods:

    reset(row: dict) -> list[message]
        Start an episode for dataset row `row` (its columns, e.g. `prompt`, `answer`); return
        the first messages of the conversation (a system and/or user message, OpenAI format:
        {"role": ..., "content": ...}). The policy speaks next.

    step(messages: list[message]) -> (reply, reward, done, info)
        `messages` is the conversation so far, ending with the policy's last assistant turn
        (its parsed `tool_calls` included when it made some). `reply` is a message dict (role
        "user" or "tool"), a list of them, or None (nothing to add: only sensible with
        done=True); `reward` a float for this turn; `done` ends the episode; `info` a dict
        (numbers in it are averaged into the step's metrics as `env/<key>`).

`--env module:Factory` (or `path/to/file.py:Factory`) names a class or a function called with
no arguments that returns an environment; `textarena:GAME`, `verifiers:TASKSET`, `gymnasium:ENV_ID` and
`trl:module:Class` load environments from those packages instead (`adapters.py`). The loop calls it once per conversation slot that
runs at the same time, and reuses an instance for later episodes (each begins with `reset`),
so one instance serves many episodes but never two at once.

Under torchrun every rank plays every conversation (each round's sampling is split across the
ranks and gathered), so each rank runs every `reset` and `step` itself: an environment must
answer a conversation the same way on every rank (seed its randomness from the row or its own
counter, not the clock or the process); the loop checks it after each batch and stops with an
error naming the environment when the ranks disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]
REPLY_ROLES = ("user", "tool")


class EnvironmentError_(ValueError):
    """An environment returned something outside the protocol; the message names the
    environment, the episode's dataset row and what was wrong (a ValueError: the CLI reports
    it in one line)."""


@runtime_checkable
class Environment(Protocol):
    """See the module docstring."""

    def reset(self, row: dict[str, Any]) -> list[Message]: ...

    def step(self, messages: list[Message]) -> tuple[Any, float, bool, dict[str, Any]]: ...


@dataclass
class StepResult:
    """One environment step, checked: the reply messages (possibly none), the turn's reward,
    whether the episode ended, and the numeric info values."""

    reply: list[Message]
    reward: float
    done: bool
    info: dict[str, float] = field(default_factory=dict)


def check_messages(messages: Any, where: str, roles: tuple[str, ...] | None = None) -> list[Message]:
    """`messages` as a list of message dicts with a string role and string content (a single
    dict becomes a list of one); `roles` restricts the roles. Raises EnvironmentError_."""
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise EnvironmentError_(f"{where}: expected a message dict or a list of them, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise EnvironmentError_(f"{where}: message {i} is not a dict with a 'role' string: {message!r:.80}")
        if roles is not None and message["role"] not in roles:
            raise EnvironmentError_(f"{where}: message {i} has role {message['role']!r}; "
                                    f"expected one of {', '.join(roles)}")
        if not isinstance(message.get("content", ""), str):
            raise EnvironmentError_(f"{where}: message {i}'s content is not a string")
        out.append(dict(message))
    return out


def prompt_messages(row: dict[str, Any], where: str) -> list[Message]:
    """The row's `prompt` as the first messages: a string is one user message, a list of
    message dicts is checked and copied."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return check_messages(prompt, f"{where}: the row's prompt")
    raise ValueError(f"{where}: the row needs a 'prompt' (a string or a list of messages), "
                     f"got {type(prompt).__name__}")


def as_step_result(out: Any, where: str) -> StepResult:
    """Check `env.step`'s return value (see the module docstring)."""
    if not isinstance(out, tuple) or len(out) != 4:
        raise EnvironmentError_(f"{where}: step must return (reply, reward, done, info), got {out!r:.80}")
    reply, reward, done, info = out
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise EnvironmentError_(f"{where}: the reward is not a number: {reward!r:.40}") from None
    if not math.isfinite(reward):
        raise EnvironmentError_(f"{where}: the reward is {reward}")
    if not isinstance(done, bool):
        raise EnvironmentError_(f"{where}: done must be a bool, got {type(done).__name__}")
    messages = [] if reply is None else check_messages(reply, where, REPLY_ROLES)
    if not messages and not done:
        raise EnvironmentError_(f"{where}: no reply but the episode is not done")
    info = info if isinstance(info, dict) else {}
    numeric = {str(k): float(v) for k, v in info.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return StepResult(messages, reward, done, numeric)


def load_env(spec: str) -> Callable[[], Environment]:
    """The factory named by `module:Factory` or `file.py:Factory`; called with no arguments it
    must give an object with `reset` and `step`. Adapter specs (`textarena:`, `verifiers:`, `gymnasium:`,
    `trl:`) are tried first (`adapters.adapter_factory`)."""
    from alignkit.agents.adapters import adapter_factory
    from alignkit.rewards.loading import load_object

    adapted = adapter_factory(spec)
    if adapted is not None:
        return adapted

    factory = load_object(spec, what="--env")
    if not callable(factory):
        raise ValueError(f"--env {spec}: {type(factory).__name__} is not callable")

    def make() -> Environment:
        env = factory()
        if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
            raise ValueError(f"--env {spec}: the factory returned {type(env).__name__}, which lacks "
                             "reset(row) and step(messages)")
        return env

    make.alignkit_env_name = spec  # type: ignore[attr-defined]
    return make
