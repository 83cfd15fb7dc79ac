"""Plain Python functions as tools: loading them, their JSON schemas, and running the calls.

A tool is a function with type hints and a Google-style docstring (an `Args:` line per
parameter), which is what transformers' `get_json_schema` reads:

    def calculator(expression: str) -> str:
        \"\"\"Evaluate an arithmetic expression.

        Args:
            expression: The expression, e.g. "(2 + 3) * 4".
        \"\"\"

`--tools mymod.py:fn1,fn2` or `--tools package.module:fn1,fn2` names them (`load_tools`).
How a model writes a call, per template family, is in `tool_calls.py` (re-exported here);
`ToolRunner` runs parsed calls in a thread pool and answers each with a tool message, errors
included, so one bad call never stops an episode.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from alignkit.agents.tool_calls import (
    TOOL_CALL_FORMATS,
    ToolCall,
    ToolCallFormat,
    assistant_message,
    detect_tool_format,
    format_tool_call,
    format_tool_calls,
    parse_assistant_turn,
    template_supports_tools,
    tools_system_prompt,
)

__all__ = [
    "TOOL_CALL_FORMATS", "ToolCall", "ToolCallFormat", "ToolRunner", "ToolStats", "assistant_message",
    "detect_tool_format", "format_tool_call", "format_tool_calls", "load_tools", "parse_assistant_turn",
    "template_supports_tools", "tool_message", "tool_schemas", "tools_system_prompt",
]

Message = dict[str, Any]
MAX_ERROR_CHARS = 300  # an error message is one line the model reads; a traceback would swamp it
POLL_S = 0.05  # how often a waiting batch looks for calls that started or ran past their time


def one_line(text: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` with its whitespace runs collapsed to single spaces, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def tool_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def tool_schema(fn: Callable[..., Any], where: str = "tool") -> dict[str, Any]:
    """transformers' `get_json_schema(fn)`; its parsing exceptions become a one-line ValueError
    naming `where` and the function."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import (
        DocstringParsingException,
        TypeHintParsingException,
    )

    name = tool_name(fn)
    try:
        return get_json_schema(fn)
    except DocstringParsingException as err:
        raise ValueError(f"{where}: {name}: {one_line(err)} (write a Google-style docstring with an "
                         "'Args:' line per parameter)") from None
    except TypeHintParsingException as err:
        raise ValueError(f"{where}: {name}: {one_line(err)} (give every parameter a JSON-able type hint)") from None
    except (NameError, TypeError) as err:  # get_type_hints on an unresolvable annotation
        raise ValueError(f"{where}: {name}: cannot read its type hints: {one_line(err)}") from None


def check_tools(tools: Iterable[Any], where: str = "tools") -> list[Callable[..., Any]]:
    """`tools` as a list of plain functions (or methods) with unique names and readable schemas;
    a class, a non-callable or a duplicate name is a one-line ValueError naming `where`."""
    checked: list[Callable[..., Any]] = []
    seen: set[str] = set()
    for tool in tools:
        name = getattr(tool, "__name__", repr(tool)[:40])
        if isinstance(tool, type):
            raise ValueError(f"{where}: {name} is a class; name a function (its docstring and hints are the schema)")
        if not callable(tool):
            raise ValueError(f"{where}: {name} is a {type(tool).__name__}, not a function")
        if not hasattr(tool, "__name__"):
            raise ValueError(f"{where}: {name} has no __name__; a tool must be a named function")
        if name in seen:
            raise ValueError(f"{where}: two tools are named {name!r}; tool names must be unique")
        tool_schema(tool, where)
        seen.add(name)
        checked.append(tool)
    if not checked:
        raise ValueError(f"{where}: no tools given")
    return checked


def load_tools(spec: str) -> list[Callable[..., Any]]:
    """The functions named by `--tools mymod.py:fn1,fn2` or `package.module:fn1,fn2`, checked
    (see `check_tools`: callable, docstring, type hints, unique names)."""
    from alignkit.rewards.loading import load_objects

    return check_tools(load_objects(spec, what="--tools"), where=f"--tools {spec}")


def tool_schemas(tools: Iterable[Callable[..., Any]]) -> list[dict[str, Any]]:
    """One `{"type": "function", "function": {"name", "description", "parameters"}}` per tool,
    from transformers' `get_json_schema` (what `apply_chat_template(tools=...)` renders)."""
    return [tool_schema(fn) for fn in tools]


def result_text(result: Any) -> str:
    """A tool's return value as message content: a string as is, else JSON when it can be, else str()."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)


def argument_problem(signature: inspect.Signature, arguments: dict[str, Any], err: TypeError) -> str:
    """Why `arguments` do not bind to `signature`, in one line, with the parameters it takes."""
    parameters = signature.parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unexpected = [name for name in arguments if name not in signature.parameters]
    problem = (f"unexpected argument {', '.join(map(repr, unexpected))}" if unexpected and not takes_any
               else one_line(err))
    takes = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                      for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                            inspect.Parameter.VAR_KEYWORD))
    return f"{problem}; it takes ({takes})"


def tool_message(name: str, content: str) -> Message:
    return {"role": "tool", "name": name, "content": content}


@dataclass
class ToolStats:
    """Counts over some calls: `calls` made, `errors` (every reply starting "Error:", timeouts
    included) and `timeouts`. Add them up with `+`."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0

    def __add__(self, other: ToolStats) -> ToolStats:
        return ToolStats(self.calls + other.calls, self.errors + other.errors, self.timeouts + other.timeouts)


class _Job:
    """One submitted call: its future and when a worker started it (None while queued)."""

    def __init__(self, fn: Callable[..., Any], bound: inspect.BoundArguments):
        self.fn, self.bound = fn, bound
        self.started_at: float | None = None
        self.future: Future | None = None

    def __call__(self) -> Any:
        self.started_at = time.monotonic()
        return self.fn(*self.bound.args, **self.bound.kwargs)


class ToolRunner:
    """Runs parsed tool calls in a shared thread pool, answering each with a tool message.

    `run(calls)` -> (messages, stats): one `{"role": "tool", "name", "content"}` per call, in
    order. Errors never raise: an unknown tool, arguments that do not bind to the signature,
    a malformed call (`ToolCall.error`), an exception in the tool and a timeout each give a
    reply "Error: ..." in one line. `run_many(batches)` submits the calls of several
    conversations at once, so a slow tool in one does not hold up the others.

    `timeout_s` counts from when a worker starts the call (waiting for a free worker does not
    count). A Python thread cannot be killed: a timed-out call keeps running in its thread until
    it returns (and the interpreter waits for it at exit). The runner stays usable: when every
    worker of the pool is held by such calls, queued calls move to a fresh pool.
    """

    def __init__(self, tools: Iterable[Callable[..., Any]], timeout_s: float = 10.0, max_workers: int = 8):
        if not timeout_s > 0:
            raise ValueError(f"ToolRunner: timeout_s must be > 0, got {timeout_s}")
        if max_workers < 1:
            raise ValueError(f"ToolRunner: max_workers must be >= 1, got {max_workers}")
        self.tools = {tool_name(fn): fn for fn in check_tools(tools, "ToolRunner")}
        self.signatures = {name: inspect.signature(fn) for name, fn in self.tools.items()}
        self.timeout_s = float(timeout_s)
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self._stuck: list[Future] = []  # timed-out calls of the current pool, still running

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="alignkit-tool")

    def close(self) -> None:
        """Shut the pool down (calls still running finish in their threads)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def prepare(self, call: ToolCall) -> _Job | str:
        """The job for `call`, or the error text when it cannot run."""
        if call.error is not None:
            return f"Error: malformed tool call: {one_line(call.error)}"
        if call.name not in self.tools:
            return f"Error: unknown tool {call.name!r}; available: {', '.join(self.tools)}"
        signature = self.signatures[call.name]
        try:
            bound = signature.bind(**call.arguments)
        except TypeError as err:
            return f"Error: bad arguments for {call.name}: {argument_problem(signature, call.arguments, err)}"
        return _Job(self.tools[call.name], bound)

    def run(self, calls: list[ToolCall]) -> tuple[list[Message], ToolStats]:
        """One conversation's calls: (tool messages in call order, stats)."""
        return self.run_many([calls])[0]

    def run_many(self, batches: list[list[ToolCall]]) -> list[tuple[list[Message], ToolStats]]:
        """The calls of several conversations, all submitted at once; per conversation, in order,
        (tool messages, stats)."""
        with self._lock:  # one batch at a time owns the pool's bookkeeping
            prepared = [[self.prepare(call) for call in calls] for calls in batches]
            jobs = [job for row in prepared for job in row if isinstance(job, _Job)]
            self._stuck = [future for future in self._stuck if not future.done()]
            for job in jobs:
                job.future = self._pool.submit(job)
            timed_out = self._await(jobs)
        results = []
        for calls, row in zip(batches, prepared, strict=True):
            messages, stats = [], ToolStats(calls=len(calls))
            for call, job in zip(calls, row, strict=True):
                content = job if isinstance(job, str) else self._reply(call, job, job in timed_out)
                stats.errors += content.startswith("Error:")
                stats.timeouts += isinstance(job, _Job) and job in timed_out
                messages.append(tool_message(call.name, content))
            results.append((messages, stats))
        return results

    def _await(self, jobs: list[_Job]) -> set[_Job]:
        """Wait until every job has finished or run past `timeout_s`; the timed-out ones."""
        pending, timed_out = set(jobs), set()
        while pending:
            now = time.monotonic()
            for job in list(pending):
                if job.future.done():
                    pending.discard(job)
                elif job.started_at is not None and now - job.started_at >= self.timeout_s:
                    pending.discard(job)
                    timed_out.add(job)
                    self._stuck.append(job.future)
            if not pending:
                break
            self._unblock(pending)
            deadlines = [job.started_at + self.timeout_s - now for job in pending if job.started_at is not None]
            wait([job.future for job in pending], timeout=min([POLL_S, *deadlines]), return_when=FIRST_COMPLETED)
        return timed_out

    def _unblock(self, pending: set[_Job]) -> None:
        """When every worker is held by a timed-out call, resubmit the queued jobs to a fresh pool."""
        self._stuck = [future for future in self._stuck if not future.done()]
        if len(self._stuck) < self.max_workers:
            return
        queued = [job for job in pending if job.started_at is None and job.future.cancel()]
        self._pool.shutdown(wait=False)
        self._pool, self._stuck = self._new_pool(), []
        for job in queued:
            job.future = self._pool.submit(job)

    def _reply(self, call: ToolCall, job: _Job, timed_out: bool) -> str:
        if timed_out:
            return f"Error: {call.name} did not finish within {self.timeout_s:g} s"
        error = job.future.exception()
        if error is not None:
            return f"Error: {call.name} raised {type(error).__name__}: {one_line(error)}"
        try:
            return result_text(job.future.result())
        except Exception as err:  # a result whose str() raises
            return f"Error: the result of {call.name} cannot be shown as text: {type(err).__name__}: {one_line(err)}"
