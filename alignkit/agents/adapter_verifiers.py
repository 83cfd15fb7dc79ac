"""`verifiers` environments (verifiers 0.4.0, the `verifiers.v1` stack) as alignkit environments:
`--env verifiers:TASKSET_ID[,env=ENV_ID][,key=value...]`.

verifiers 0.4 drives the model from inside the environment: `Env.run(task, agents)` calls
`agents.<seat>.run(task)` (one reply to the task's prompt; `SingleAgentEnv`, what every plain
taskset gets) or opens `agents.<seat>.interaction(task)` and alternates
`segment = await interaction.turn(user_message)` with its own logic (games, simulated users),
then `Task.score(trace)` runs the task's `@vf.reward` / `@vf.metric` functions and
`Env.finalize(task, episode)` may add episode-level rewards. The adapter inverts that control:
it runs the env's own `setup` / `run` / `finalize` unchanged on an event loop owned by the
adapter instance, with the one agent seat played by the alignkit policy. Each time the env
asks the seat for a reply the loop pauses and `reset` / `step` return the env's new messages;
the policy's next `step` resumes it. The turns are recorded in a real `vf.Trace` (through
`verifiers.v1.graph.prepare_turn(...).commit(vf.Response(...))`, as verifiers' own session
records model calls), so reward functions read `trace.last_reply`, `trace.messages`, ... as
usual. The episode's reward is `trace.reward` (the weighted sum of the trace's rewards), given
on the last step; every other step gives 0. Trace metrics and reward components come back in
`info`.

Which task: `reset(row)` takes the taskset's task number `row["example_id"]` (or `row["idx"]`)
when the row has one; otherwise the row's columns are the task's data (`prompt`, and the
fields the task's `TaskData` declares, e.g. `answer`), so an alignkit dataset of prompts and
answers drives a verifiers task type directly.

Not supported (each is a one-line error when loading or on first use): agent harnesses,
runtimes and sandboxes (the policy is the agent; nothing is launched), MCP tool servers, LLM
judges, `@vf.intercept` hooks and request/response `@vf.stop` hooks, rewards or task
setup/finalize hooks that need a runtime, envs with more than one agent seat, and envs that
run the seat twice in one episode (best-of-n: one alignkit episode is one conversation).
`@vf.stop` hooks on the trace are honoured.

Threads: each adapter instance owns one event loop, run only inside its `reset`/`step`, so
the episode runner may call an instance from any thread of its pool (never two at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from alignkit.agents.adapters import missing_package_error, parse_options
from alignkit.agents.protocol import Message


def _first_line(err: BaseException) -> str:
    """The error's first informative line (pydantic: the first field error; nltk's LookupError
    opens with a row of asterisks)."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        except (TypeError, IndexError, KeyError):
            pass
    lines = [line.strip() for line in str(err).splitlines() if any(c.isalnum() for c in line)]
    return lines[0] if lines else type(err).__name__


def verifiers_factory(text: str, spec: str) -> Callable[[], VerifiersEnvironment]:
    """Load the env once (its taskset, config validation, seat); the factory then makes one
    `VerifiersEnvironment` per conversation slot, all sharing the env and its loaded tasks
    (verifiers runs many episodes of one Env concurrently, so its hooks are reentrant)."""
    try:
        import verifiers.v1 as vf
        from verifiers.v1.configs.agent import agent_config_fields
    except ImportError as err:
        raise missing_package_error(spec, "verifiers", err) from None
    taskset_id, options = parse_options(text, spec)
    env_id = str(options.pop("env", ""))
    try:
        config = vf.resolve_env_config({"id": env_id, "taskset": {"id": taskset_id, **options}})
        env = vf.load_environment(config)
    except ModuleNotFoundError as err:
        raise ValueError(f"--env {spec}: verifiers cannot find taskset {taskset_id!r}: "
                         f"{_first_line(err)}") from None
    except Exception as err:  # pydantic validation, a taskset's own constructor checks
        raise ValueError(f"--env {spec}: {type(err).__name__}: {_first_line(err)}") from None
    seats = agent_config_fields(env.config)
    if len(seats) != 1:
        raise ValueError(f"--env {spec}: {type(env).__name__} has agent seats {sorted(seats)}; "
                         "the adapter plays exactly one seat (the policy)")
    if env.taskset.toolsets(env.taskset.config):
        raise ValueError(f"--env {spec}: the taskset serves MCP tool servers, which the adapter "
                         "does not run")
    tasks = TaskSource(env.taskset, spec)
    seat_config = next(iter(seats.values()))

    def make() -> VerifiersEnvironment:
        return VerifiersEnvironment(env, seat_config, tasks, spec)

    return make


def _needs_runtime(fn: Callable[..., Any]) -> bool:
    """verifiers' own test (Task.score): a `runtime` parameter without a default."""
    param = inspect.signature(fn).parameters.get("runtime")
    return param is not None and param.default is inspect.Parameter.empty


def unsupported_features(task: Any) -> list[str]:
    """What in `task` needs machinery the adapter does not run (empty when it can play it)."""
    import verifiers.v1 as vf
    from verifiers.v1.session import hook_boundary
    from verifiers.v1.utils.decorators import discover_decorated

    problems = []
    cls = type(task)
    for hook in ("setup", "finalize", "stage_verifier"):
        if getattr(cls, hook) is not getattr(vf.Task, hook):
            problems.append(f"Task.{hook} (runs in a sandbox runtime)")
    if cls.toolsets(task.config):
        problems.append("MCP tool servers")
    if task.config.judges:
        problems.append("LLM judges")
    if discover_decorated(task, "intercept"):
        problems.append("@vf.intercept hooks")
    problems += [f"@vf.stop {fn.__name__} on a request/response" for fn in task.hooks("stop")
                 if hook_boundary(fn, allow_trace=True) is not vf.Trace]
    problems += [f"{fn.__name__} (needs a runtime)" for fn in (*task.hooks("metric"), *task.hooks("reward"))
                 if _needs_runtime(fn)]
    return problems


class TaskSource:
    """The taskset's tasks, loaded lazily and shared by every instance of one factory; a
    row's `example_id` picks one, or the row's columns become the task's data."""

    def __init__(self, taskset: Any, spec: str):
        self.taskset = taskset
        self.spec = spec
        self.loaded: list[Any] = []
        self.stream = None
        self.checked: set[type] = set()
        self.lock = threading.Lock()

    def task_for(self, row: dict[str, Any]) -> Any:
        number = row.get("example_id", row.get("idx"))
        task = self.by_number(number) if number is not None else self.from_row(row)
        self.check(task)
        return task

    def by_number(self, number: Any) -> Any:
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"--env {self.spec}: example_id must be a task number >= 0, got {number!r}")
        with self.lock:
            if self.stream is None:
                self.stream = iter(self.taskset)
            while len(self.loaded) <= number:
                try:
                    task = next(self.stream, None)
                except Exception as err:  # the taskset's own load(): a dataset, a download
                    raise ValueError(f"--env {self.spec}: loading task {len(self.loaded)} of the "
                                     f"taskset failed: {type(err).__name__}: {_first_line(err)}") from None
                if task is None:
                    raise ValueError(f"--env {self.spec}: the taskset has {len(self.loaded)} tasks; "
                                     f"the row asks for example_id {number}")
                self.loaded.append(task)
            return self.loaded[number]

    def from_row(self, row: dict[str, Any]) -> Any:
        import pydantic

        task_cls = type(self.taskset).task_type()
        data_cls = task_cls.data_type()
        fields = {key: value for key, value in row.items() if key in data_cls.model_fields}
        if "prompt" not in fields:
            raise ValueError(f"--env {self.spec}: the row has neither example_id nor a prompt "
                             f"for a {data_cls.__name__}")
        try:
            data = data_cls.model_validate(fields)
        except pydantic.ValidationError as err:
            names = sorted({".".join(map(str, e["loc"])) for e in err.errors()})
            raise ValueError(f"--env {self.spec}: the row is not a {data_cls.__name__}: "
                             f"bad or missing {', '.join(names)}") from None
        return task_cls(data, self.taskset.config.task)

    def check(self, task: Any) -> None:
        if type(task) in self.checked:
            return
        problems = unsupported_features(task)
        if problems:
            raise ValueError(f"--env {self.spec}: {type(task).__name__} uses what the adapter "
                             f"does not run: {', '.join(problems)}")
        self.checked.add(type(task))


def _as_dict(message: Any) -> Message:
    from verifiers.v1.types import content_text

    return {"role": message.role, "content": content_text(message.content)}


def _as_messages(message: Any) -> list[Any]:
    """A turn's user input (a string or messages, typed or wire dicts) as typed messages."""
    import verifiers.v1 as vf
    from verifiers.v1.dialects import parse_message

    if isinstance(message, str):
        return [vf.UserMessage(content=message)]
    return [parse_message(m) if isinstance(m, dict) else m for m in message]


def opening_messages(data: Any) -> list[Any]:
    """The task's system prompt and prompt as typed messages (what a harness would send)."""
    import verifiers.v1 as vf

    opening = [vf.SystemMessage(content=data.system_prompt)] if data.system_prompt else []
    if data.prompt is not None:
        opening += _as_messages(data.prompt)
    return opening


class VerifiersEnvironment:
    """One conversation slot on a verifiers env (see the module docstring)."""

    def __init__(self, env: Any, seat_config: Any, tasks: TaskSource, spec: str):
        self.env = env
        self.seat_config = seat_config
        self.tasks = tasks
        self.spec = spec
        self.loop = asyncio.new_event_loop()
        self.episode: asyncio.Task | None = None
        self.outbox: asyncio.Future | None = None  # the env's next request: ("ask", msgs) / ("done", ...)
        self.inbox: asyncio.Future | None = None  # the policy's reply the env awaits

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self._abandon()
        task = self.tasks.task_for(row)
        self.outbox = self.loop.create_future()
        self.episode = self.loop.create_task(self._play(task))
        self.episode.add_done_callback(self._ended)
        event = self._next_event()
        if event[0] == "done":
            raise ValueError(f"--env {self.spec}: the episode ended before the policy spoke")
        return event[1]

    def step(self, messages: list[Message]) -> tuple[Any, float, bool, dict[str, Any]]:
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant":
            raise ValueError(f"--env {self.spec}: step needs the conversation to end with the "
                             "policy's assistant turn")
        if self.inbox is None or self.inbox.done():
            raise ValueError(f"--env {self.spec}: step with no turn pending; call reset first")
        self.outbox = self.loop.create_future()
        self.inbox.set_result(str(last.get("content") or ""))
        event = self._next_event()
        if event[0] == "ask":
            return event[1], 0.0, False, {}
        _, reward, info = event
        return None, reward, True, info

    def _next_event(self) -> tuple:
        """Run the loop until the env asks the policy for a turn or the episode ends."""
        try:
            return self.loop.run_until_complete(self.outbox)
        except Exception as err:
            raise ValueError(f"--env {self.spec}: the environment failed: "
                             f"{type(err).__name__}: {_first_line(err)}") from err

    def close(self) -> None:
        """Cancel a pending episode and close this instance's event loop."""
        self._abandon()
        self.loop.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self.loop.is_closed():
                self.close()

    def _abandon(self) -> None:
        """Cancel an episode the runner stopped early (max_turns, token budget)."""
        if self.episode is not None and not self.episode.done():
            self.episode.cancel()
            self.loop.run_until_complete(asyncio.wait([self.episode]))
        self.episode = self.inbox = None

    def _ended(self, episode: asyncio.Task) -> None:
        if episode.cancelled() or self.outbox is None or self.outbox.done():
            return
        if episode.exception() is not None:
            self.outbox.set_exception(episode.exception())
        else:
            self.outbox.set_result(("done", *episode.result()))

    async def ask(self, new_messages: list[Any]) -> str:
        """Hand the env's new messages to the policy and wait for its reply."""
        self.inbox = self.loop.create_future()
        self.outbox.set_result(("ask", [_as_dict(m) for m in new_messages]))
        return await self.inbox

    async def _play(self, task: Any) -> tuple[float, dict[str, float]]:
        """One episode through the env's own hooks, the seat played by the policy."""
        import verifiers.v1 as vf
        from verifiers.v1.trace import TraceTask

        seat = PolicySeat(self, self.seat_config)
        agents = vf.Agents(self.env.config, make=lambda name, config: seat)
        await self.env.setup(agents)
        await self.env.run(task, agents)
        if seat.trace is None:
            raise ValueError(f"{type(self.env).__name__}.run() never gave the policy a turn")
        episode = vf.Episode(env=vf.EnvInfo(id=self.env.config.env_id), traces=[seat.trace],
                             task=TraceTask(type=type(task).__name__, data=task.data,
                                            key=task.key, hash=task.hash))
        await self.env.finalize(task, episode)
        trace = seat.trace
        info = {name: float(value) for name, value in trace.metrics.items() if value is not None}
        info |= {f"reward_{name}": r.value for name, r in trace.rewards.items() if r is not None}
        return float(trace.reward), info


class PolicySeat:
    """Stands in for a `vf.Agent` in `env.run`: `run(task)` is one policy reply to the task's
    prompt; `interaction(task)` a turn-by-turn exchange (`turn(message) -> vf.Segment`)."""

    trainable = True

    def __init__(self, adapter: VerifiersEnvironment, config: Any):
        self.adapter = adapter
        self.config = config
        self.trace: Any = None
        self.conversation: list[Any] = []

    def _open(self, task: Any) -> Any:
        from verifiers.v1.state import state_cls
        from verifiers.v1.trace import AgentInfo, Trace, TraceTask

        if self.trace is not None:
            raise ValueError("the env ran the policy's seat twice in one episode (best-of-n?); "
                         "the adapter plays one conversation per episode")
        self.trace = Trace(task=TraceTask(type=type(task).__name__, data=task.data, key=task.key,
                                          hash=task.hash),
                           state=state_cls(type(task))(), agent=AgentInfo(config=self.config))
        return self.trace

    async def run(self, task: Any, **_: Any) -> Any:
        trace = self._open(task)
        await self.policy_turn(task, opening_messages(task.data))
        if trace.stop_condition is None:
            trace.stop("agent_completed")
        await self._close(task)
        return trace

    @contextlib.asynccontextmanager
    async def interaction(self, task: Any, **_: Any) -> AsyncIterator[PolicyInteraction]:
        self._open(task)
        yield PolicyInteraction(self, task)
        if self.trace.stop_condition is None:
            self.trace.stop("user_closed")
        await self._close(task)

    async def policy_turn(self, task: Any, new_messages: list[Any]) -> Any:
        """Send `new_messages` to the policy, record its reply as a sampled turn, run the
        task's trace-level @stop hooks; returns the assistant message."""
        import verifiers.v1 as vf
        from verifiers.v1.graph import prepare_turn
        from verifiers.v1.session import call_hook

        self.conversation += new_messages
        reply = vf.AssistantMessage(content=await self.adapter.ask(new_messages))
        response = vf.Response(id=uuid.uuid4().hex, created=int(time.time()), model="alignkit-policy",
                               message=reply, finish_reason="stop")
        prepare_turn(self.trace, list(self.conversation)).commit(response)
        self.conversation.append(reply)
        for stop in task.hooks("stop"):
            fired = await call_hook(stop, {vf.Trace: self.trace})
            if not isinstance(fired, bool):
                raise ValueError(f"@vf.stop {stop.__name__} returned {type(fired).__name__}, not bool")
            if fired:
                self.trace.stop(stop.__name__)
                break
        return reply

    async def _close(self, task: Any) -> None:
        await task.score(self.trace)
        self.trace.is_completed = True
        self.trace.ok = not self.trace.errors


class PolicyInteraction:
    """`vf.Interaction`'s `turn` and `trace`, with the policy answering each turn."""

    def __init__(self, seat: PolicySeat, task: Any):
        self.seat = seat
        self.task = task
        self.started = False
        self.over = False

    @property
    def trace(self) -> Any:
        return self.seat.trace

    async def turn(self, message: Any = None) -> Any:
        import verifiers.v1 as vf

        if self.over:
            raise RuntimeError("the exchange is over (the run ended); read interaction.trace")
        prompted = not self.started and self.task.data.prompt is not None
        if (message is None) != prompted:
            raise ValueError("a prompted task opens with a bare turn(); later turns take a message")
        new_messages = opening_messages(self.task.data) if prompted else _as_messages(message)
        if not self.started and not prompted and self.task.data.system_prompt:
            new_messages = [vf.SystemMessage(content=self.task.data.system_prompt), *new_messages]
        self.started = True
        if self.trace.stop_condition is not None:  # a @stop fired after the last reply
            self.over = True
            return vf.Segment(messages=[], terminated=True)
        reply = await self.seat.policy_turn(self.task, new_messages)
        return vf.Segment(messages=[reply])
