"""Environments users already have, behind the alignkit protocol (`reset(row)`, `step(messages)`).

`--env` accepts, besides `module:Factory`, four adapter specs:

- `textarena:GAME_ID[,key=value...]`  a TextArena game (`alignkit/agents/adapter_textarena.py`);
  the policy plays player 0, other players are `opponent=random`.
- `verifiers:TASKSET_ID[,env=ENV_ID][,key=value...]`  a `verifiers` (0.4, the `verifiers.v1`
  stack) taskset and its Env, driven turn by turn (`alignkit/agents/adapter_verifiers.py`).
- `gymnasium:ENV_ID[,key=value...]`  a gymnasium environment with Discrete or Text actions
  (toy-text FrozenLake, Taxi, CliffWalking, Blackjack, or the user's own registered id), one
  env step per policy turn (`alignkit/agents/adapter_gymnasium.py`).
- `trl:module:Class` or `trl:path/to/file.py:Class`  a TRL `environment_factory` class, unchanged
  (below): its public methods are tools, `reset(**row)` may return a string appended to the last
  prompt message, `get_reward()` (optional) scores the episode.

`adapter_factory(spec)` returns the zero-argument factory for such a spec, or None for any other
spec (then `protocol.load_env` loads `module:Factory`). textarena, verifiers and gymnasium are optional
(`pip install alignkit[envs]`) and imported only when their spec is loaded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

from alignkit.agents.protocol import Environment, Message, prompt_messages
from alignkit.agents.tools import ToolCall, ToolRunner

ENVS_EXTRA_HINT = "pip install alignkit[envs]"
ADAPTER_PREFIXES = ("textarena:", "verifiers:", "gymnasium:", "trl:")


def parse_options(text: str, spec: str) -> tuple[str, dict[str, Any]]:
    """`"GAME,k=v,flag=true"` -> ("GAME", {"k": "v", "flag": True}). Values become int, float
    or bool when they read as one (`true`/`false`), else stay strings."""
    head, *items = [part.strip() for part in text.split(",")]
    if not head:
        raise ValueError(f"--env {spec}: name the game/taskset after the colon")
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--env {spec}: option {item!r} is not key=value")
        options[key.strip()] = _option_value(value.strip())
    return head, options


def _option_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def missing_package_error(spec: str, package: str, err: ImportError) -> ValueError:
    """The one-line error for an adapter whose optional package is not installed."""
    return ValueError(f"--env {spec}: needs the {package} package ({err}); {ENVS_EXTRA_HINT}")


def adapter_factory(spec: str) -> Callable[[], Environment] | None:
    """The factory for an adapter spec (see the module docstring), None for anything else.
    Loading checks what it can up front (package installed, game/taskset exists, options)."""
    spec = spec.strip()
    if spec.startswith("textarena:"):
        from alignkit.agents.adapter_textarena import textarena_factory

        factory = textarena_factory(spec[len("textarena:"):], spec)
    elif spec.startswith("verifiers:"):
        from alignkit.agents.adapter_verifiers import verifiers_factory

        factory = verifiers_factory(spec[len("verifiers:"):], spec)
    elif spec.startswith("gymnasium:"):
        from alignkit.agents.adapter_gymnasium import gymnasium_factory

        factory = gymnasium_factory(spec[len("gymnasium:"):], spec)
    elif spec.startswith("trl:"):
        factory = trl_factory(spec[len("trl:"):], spec)
    else:
        return None
    factory.alignkit_env_name = spec  # type: ignore[attr-defined]
    return factory


# ---------------------------------------------------------------------------------------------
# TRL environment_factory classes


def trl_factory(target: str, spec: str) -> Callable[[], TRLEnvironment]:
    """`module:Class` / `file.py:Class` -> a factory of `TRLEnvironment`s around new instances."""
    from alignkit.rewards.loading import load_object

    if ":" not in target:
        raise ValueError(f"--env {spec}: write trl:package.module:Class or trl:path/to/file.py:Class")
    make_env = load_object(target, what="--env")
    if not callable(make_env):
        raise ValueError(f"--env {spec}: {type(make_env).__name__} is not callable")

    def make() -> TRLEnvironment:
        return TRLEnvironment(make_env(), spec)

    return make


def public_methods(env: Any) -> list[Callable[..., Any]]:
    """TRL's rule for an environment's tools: the functions defined on its class whose names
    do not start with `_`, except `reset` and `get_reward`, bound to `env`, in name order."""
    return [getattr(env, name) for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")]


def awaiting(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` as a plain function for a ToolRunner thread: a coroutine it returns (TRL allows
    async tools) is run to completion on a loop of that thread's own."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        value = method(*args, **kwargs)
        return asyncio.run(value) if inspect.iscoroutine(value) else value

    return call


def message_call(call: dict[str, Any]) -> ToolCall:
    """A chat-format tool call (`{"function": {"name", "arguments"}}`, arguments a dict or JSON
    text) as a `ToolCall`; unreadable arguments give one with `error` set."""
    function = call.get("function", call)
    name, arguments = str(function.get("name")), function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return ToolCall(name, {}, raw=arguments, error=f"arguments are not JSON: {err}")
    if not isinstance(arguments, dict | None):
        return ToolCall(name, {}, raw=str(arguments), error=f"arguments must be an object, got {type(arguments).__name__}")
    return ToolCall(name, dict(arguments or {}), raw=json.dumps(function, default=str))


class TRLEnvironment:
    """A TRL `environment_factory`-style object as an alignkit environment.

    reset(row): `env.reset(**row)`; a returned string is appended to the last prompt message
    (TRL appends it verbatim, so do we); the row's prompt messages open the conversation.
    `tools()`: the environment's public methods (TRL's rule), for the episode runner's
    ToolRunner and the chat template's tool schemas.
    step(messages): a last assistant turn with `tool_calls` is answered with the tool results
    (one "tool" message per call, run here; a runner whose ToolRunner already answers tool
    turns never sends them to step); a turn without tool calls ends the episode with reward
    `get_reward()` (awaited when async) or 0.0 when the class has none.
    """

    def __init__(self, env: Any, spec: str):
        if not callable(getattr(env, "reset", None)):
            raise ValueError(f"--env {spec}: {type(env).__name__} has no reset method "
                             "(a TRL environment class needs reset(**kwargs))")
        self.env = env
        self.spec = spec
        self._tools = {method.__name__: method for method in public_methods(env)}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.runner = ToolRunner([awaiting(m) for m in self._tools.values()]) if self._tools else None

    def tools(self) -> list[Callable[..., Any]]:
        """The bound public methods of the wrapped environment (see the class docstring)."""
        return list(self._tools.values())

    def reset(self, row: dict[str, Any]) -> list[Message]:
        messages = prompt_messages(row, f"--env {self.spec}")
        observation = self._resolve(self.env.reset(**row))
        if observation is None:
            return messages
        if not isinstance(observation, str):
            raise ValueError(f"--env {self.spec}: reset returned {type(observation).__name__}; "
                             "expected None or a string")
        last = messages[-1]
        messages[-1] = {**last, "content": str(last.get("content", "")) + observation}
        return messages

    def step(self, messages: list[Message]) -> tuple[Any, float, bool, dict[str, Any]]:
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant":
            raise ValueError(f"--env {self.spec}: step needs the conversation to end with the "
                             "policy's assistant turn")
        calls = last.get("tool_calls") or []
        if calls and self.runner is None:
            return [{"role": "tool", "name": str(c.get("function", c).get("name")),
                     "content": "Error: this environment has no tools"} for c in calls], 0.0, False, {}
        if calls:  # the tools' results, run (with their timeout) by a ToolRunner of the bound methods
            replies, _ = self.runner.run([message_call(call) for call in calls])
            for reply, call in zip(replies, calls, strict=True):
                if call.get("id"):
                    reply["tool_call_id"] = call["id"]
            return replies, 0.0, False, {"tool_calls": len(calls)}
        get_reward = getattr(self.env, "get_reward", None)
        reward = float(self._resolve(get_reward())) if callable(get_reward) else 0.0
        return None, reward, True, {}

    def _resolve(self, value: Any) -> Any:
        """`value`, awaited on this adapter's own event loop when it is a coroutine (TRL
        allows async tools and an async get_reward)."""
        if not inspect.isawaitable(value):
            return value
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(value)
