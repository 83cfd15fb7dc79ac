"""The reward-function contract and the safe way to call one.

A reward function maps a batch of (prompt, completion) pairs, plus any extra dataset columns
passed by name, to one score per row:

    fn(prompts: list[str], completions: list[str], **columns) -> Tensor (B,)  or (B, K)

(B, K) is a multi-objective reward (K objectives per row). Where the caller knows each
completion's response tokens (the online loop), a reward may instead be dense, per token or
per segment (`alignkit.rewards.dense`); `score_safely(..., token_counts=...)` accepts those. Plain Python functions that
return a list of floats, a numpy array or a tensor are accepted everywhere: `as_reward_tensor`
turns their output into a float32 tensor and checks its length. A function that does not take
`**columns` receives only the columns it names as parameters. TRL's reward functions work
unchanged: one that names a `completions` parameter (`def reward_len(completions, **kwargs)`)
or takes only `**kwargs` is called by keyword, as TRL calls it (`invoke_reward`).

`score_safely` is what callers (the online loop, evaluation) use: it calls the function on the
whole batch, and when that raises it retries row by row to name the failing row, so a single
bad completion is either a clear `RewardError` or a counted penalty, never a silent zero.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from alignkit.rewards.dense import DenseRewards, Scores, as_scores, stack_rows
from alignkit.rewards.outputs import RewardOutputError, as_reward_tensor, none_rows


class RewardError(RuntimeError, ValueError):
    """A reward function raised, returned something that is not one score per completion, or
    returned NaN/inf/None, on a named row of a batch. A ValueError too: the CLI reports it as
    one line (the function is the user's input)."""


class RewardServiceError(RewardError):
    """A remote reward (`--reward http://...`) failed for a whole batch of rows (the server did
    not answer, or refused the request): `score_safely` does not retry it row by row."""


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch: `(prompts, completions, **columns) -> Tensor (B,)` or `(B, K)`.

    `columns` are extra dataset columns, each a list aligned with `prompts` (e.g. GSM8K's
    `answer`). Implementations should accept and ignore columns they do not use.
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor: ...


def reward_name(fn: Callable[..., Any]) -> str:
    """`module:function` of a reward callable (for logs and error messages): the spec it was
    loaded from (`my_rewards.py:brevity`), a function's or class's `module:qualname`, or the
    name an object gives itself (`RewardModelScorer(runs/rm/final)`)."""
    explicit = getattr(fn, "alignkit_reward_name", None)
    if isinstance(explicit, str):
        return explicit
    target: Any = fn
    if not (inspect.isroutine(fn) or isinstance(fn, type)):
        own = getattr(fn, "__dict__", {}).get("__name__")
        if isinstance(own, str):
            return own
        target = type(fn)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    return f"{module}:{name}" if module and module != "builtins" else name


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return None


def _accepted_columns(fn: Callable[..., Any], columns: dict[str, Any]) -> dict[str, Any]:
    """The subset of `columns` that `fn` accepts (all of them when it takes **kwargs)."""
    params = _parameters(fn)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return {key: value for key, value in columns.items() if key in names}


def takes_keywords(fn: Callable[..., Any], given: Sequence[str] = ("prompts", "completions")) -> bool:
    """Whether `fn` is called TRL's way, by keyword (`fn(prompts=..., completions=...,
    **columns)`): it takes only `**kwargs`, or names a `completions` parameter and every
    parameter it requires is among `given` (the names that will be passed). Otherwise it is
    called positionally, `fn(prompts, completions, **columns)`."""
    params = _parameters(fn)
    if not params:
        return False
    kinds = inspect.Parameter
    if all(p.kind is kinds.VAR_KEYWORD for p in params):
        return True
    by_name = [p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    required = [p.name for p in params if p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    return any(p.name == "completions" for p in by_name) and set(required) <= set(given) and not any(
        p.kind is kinds.POSITIONAL_ONLY for p in params)


def invoke_reward(
    fn: Callable[..., Any], prompts: list[Any], completions: list[Any], columns: dict[str, Any]
) -> Any:
    """Call `fn` on a batch and return what it returned, unconverted.

    TRL's reward functions (`def reward_len(completions, **kwargs)`) are called by keyword,
    exactly as TRL's GRPOTrainer calls them; alignkit's positional form
    `(prompts, completions, **columns)` (any parameter names) keeps working. Only the
    columns `fn` accepts are passed (all of them when it takes **kwargs).
    """
    if takes_keywords(fn, ("prompts", "completions", *columns)):
        given = {"prompts": prompts, "completions": completions, **columns}
        return fn(**_accepted_columns(fn, given))
    return fn(prompts, completions, **_accepted_columns(fn, columns))


def call_reward(
    fn: Callable[..., Any], prompts: list[str], completions: list[str], **columns: Any
) -> Tensor:
    """Call `fn` on a batch and convert its output with `as_reward_tensor` (no error handling)."""
    values = invoke_reward(fn, prompts, completions, columns)
    return as_reward_tensor(values, len(completions))


def _slice_columns(columns: dict[str, Any], index: int, n: int) -> dict[str, Any]:
    """Row `index` of every batch-aligned column (a sequence of length n); others unchanged."""
    sliced = {}
    for key, value in columns.items():
        if isinstance(value, (list, tuple, np.ndarray, Tensor)) and len(value) == n:
            sliced[key] = value[index : index + 1]
        else:
            sliced[key] = value
    return sliced


def prompt_preview(prompt: Any, width: int = 60) -> str:
    """The first `width` characters of a prompt (of its last turn for a conversation), on one line."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content", "")
    return str(prompt)[:width].replace("\n", " ")


def _row_label(index: int, prompts: Sequence[Any], offset: int = 0) -> str:
    prompt = prompts[index] if index < len(prompts) else ""
    return f"row {offset + index} (prompt {prompt_preview(prompt)!r})"


def unconverted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The user's function inside a `load_reward` wrapper (which converts its output to a
    tensor), so that `score_safely` sees what it really returned; any other callable as is."""
    return fn.__wrapped__ if getattr(fn, "alignkit_converts", False) else fn


def _convert(values: Any, n: int, name: str, where: str, counts: Sequence[int] | None = None,
             offset: int = 0) -> tuple[Scores, dict[int, str]]:
    """(scores, {row: "returned None"}) of a batch output; RewardError when it is not one
    score per completion (nor, given the `counts` of response tokens, dense rewards)."""
    try:
        scores = as_reward_tensor(values, n) if counts is None else as_scores(values, n, counts, offset)
    except RewardOutputError as err:
        raise RewardError(f"reward {name} {err.detail}{where}") from err
    return scores, {i: "returned None" for i in none_rows(values)}


def score_safely(
    fn: Callable[..., Any],
    prompts: list[Any],
    completions: list[Any],
    *,
    on_error: str = "raise",
    penalty: float = -1.0,
    row_offset: int = 0,
    batch: str | None = None,
    token_counts: Sequence[int] | None = None,
    **columns: Any,
) -> tuple[Scores, int]:
    """Score a batch with `fn`, isolating rows that raise or return NaN/inf/None.

    1. Call `fn` on the whole batch (`invoke_reward`: TRL's keyword style or alignkit's
       positional one). If it raises, call it again row by row: rows that work keep their
       score, rows that raise are "failed".
    2. Rows whose score is NaN or +-inf (in any objective), or None, are "failed" too.
    3. With `on_error="raise"` the first failed row raises `RewardError` naming the function
       (`module:function`), the row's index in the batch (+ `row_offset`), the first 60
       characters of its prompt and what went wrong; with `on_error="penalty"` every failed
       row gets `penalty` (in every objective) and the number of penalised rows is returned
       for the caller to log.

    An output that is not one score per completion (None, a string, 7 values for 8
    completions, ragged lists) is a bug in the function, not in a row: it raises
    `RewardError` saying what the function returned, in both modes. `batch` (e.g.
    "step 3, data rows 8-11") is added to every message.

    `token_counts` (each completion's number of response tokens, where the caller knows its
    tokens): the function may return dense per-token or per-segment rewards instead
    (`alignkit.rewards.dense`; a 2-D output is then per-token); a failed row's penalty sits
    on its last token.

    Returns (scores (B,) or (B, K) float32, or `DenseRewards`; number of penalised rows).
    """
    if on_error not in ("raise", "penalty"):
        raise ValueError(f"on_error must be 'raise' or 'penalty'; got {on_error!r}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(completions)
    if token_counts is not None and len(token_counts) != n:
        raise ValueError(f"{len(token_counts)} token counts for {n} completions")
    name, raw_fn = reward_name(fn), unconverted(fn)
    where = f" [{batch}]" if batch else ""
    failures: dict[int, str] = {}
    try:
        values = invoke_reward(raw_fn, prompts, completions, columns)
    except RewardOutputError as err:  # a nested reward's output (an ensemble member): no row retry
        raise RewardError(f"reward {name}: {err}{where}") from err
    except RewardServiceError as err:  # the service failed for the whole batch: rows would fail alike
        raise RewardServiceError(f"{err}{where}") from err
    except Exception as batch_err:  # isolate the failing row(s) below
        if n == 1:
            failures[0] = f"{type(batch_err).__name__}: {batch_err}"
            scores = torch.zeros(1)
        else:
            rows: list[Scores | None] = []
            for i in range(n):
                try:
                    row_values = invoke_reward(
                        raw_fn, prompts[i : i + 1], completions[i : i + 1], _slice_columns(columns, i, n)
                    )
                except Exception as row_err:
                    failures[i] = f"{type(row_err).__name__}: {row_err}"
                    rows.append(None)
                    continue
                row_counts = None if token_counts is None else token_counts[i : i + 1]
                row_scores, row_none = _convert(row_values, 1, name, where, row_counts, row_offset + i)
                if row_none:
                    failures[i] = row_none[0]
                rows.append(row_scores)
            scores = stack_rows(rows, token_counts if token_counts is not None else [1] * n)
    else:
        scores, failures = _convert(values, n, name, where, token_counts, row_offset)

    if isinstance(scores, DenseRewards):
        finite = scores.row_finite()
    else:
        finite = torch.isfinite(scores) if scores.ndim == 1 else torch.isfinite(scores).all(dim=1)
    for i in torch.nonzero(~finite).flatten().tolist():
        if i not in failures:
            bad = (scores.tokens[i, : int(scores.lengths[i])] if isinstance(scores, DenseRewards) else scores[i]).tolist()
            failures[i] = f"returned a non-finite {'per-token reward' if isinstance(scores, DenseRewards) else 'score'} ({bad})"

    if not failures:
        return scores, 0
    if on_error == "raise":
        first = min(failures)
        more = f" ({len(failures) - 1} more row(s) failed)" if len(failures) > 1 else ""
        raise RewardError(
            f"reward {name} failed on {_row_label(first, prompts, row_offset)}: "
            f"{failures[first]}{more}{where}"
        )
    for i in failures:
        if isinstance(scores, DenseRewards):
            scores.penalise(i, penalty)
        else:
            scores[i] = penalty
    return scores, len(failures)
