"""The reward-function contract and the safe way to call one.

A reward function maps a batch of (prompt, completion) pairs, plus any extra dataset columns
passed by name, to one score per row:

    fn(prompts: list[str], completions: list[str], **columns) -> Tensor (B,)  or (B, K)

(B, K) is a multi-objective reward (K objectives per row). Plain Python functions that
return a list of floats, a numpy array or a tensor are accepted everywhere: `as_reward_tensor`
turns their output into a float32 tensor and checks its length. A function that does not take
`**columns` receives only the columns it names as parameters.

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


class RewardError(RuntimeError):
    """A reward function raised, or returned NaN/inf, on a named row of a batch."""


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch: `(prompts, completions, **columns) -> Tensor (B,)` or `(B, K)`.

    `columns` are extra dataset columns, each a list aligned with `prompts` (e.g. GSM8K's
    `answer`). Implementations should accept and ignore columns they do not use.
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor: ...


def reward_name(fn: Callable[..., Any]) -> str:
    """A short human-readable name for a reward callable (for logs and error messages)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def as_reward_tensor(values: Any, n: int) -> Tensor:
    """Convert a reward function's output to a float32 tensor of shape (n,) or (n, K).

    Accepts a tensor, a numpy array, a list/tuple of numbers (or of equal-length lists for
    multi-objective rewards) or a single number when n == 1. Raises ValueError naming the
    expected and the actual length when the first dimension is not `n`.

    >>> as_reward_tensor([1, 0.5], 2)
    tensor([1.0000, 0.5000])
    """
    if isinstance(values, Tensor):
        tensor = values.detach().to(device="cpu", dtype=torch.float32)
    else:
        try:
            tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"reward output must be numbers (a list, numpy array or tensor); got "
                f"{type(values).__name__}: {err}"
            ) from err
    if tensor.ndim == 0:
        tensor = tensor.reshape(1)
    if tensor.ndim > 2:
        raise ValueError(f"reward output must be (B,) or (B, K); got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != n:
        raise ValueError(
            f"reward output has {tensor.shape[0]} values for a batch of {n} completions "
            f"(shape {tuple(tensor.shape)}); return exactly one score per completion"
        )
    return tensor


def _accepted_columns(fn: Callable[..., Any], columns: dict[str, Any]) -> dict[str, Any]:
    """The subset of `columns` that `fn` accepts (all of them when it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return {key: value for key, value in columns.items() if key in names}


def call_reward(
    fn: Callable[..., Any], prompts: list[str], completions: list[str], **columns: Any
) -> Tensor:
    """Call `fn` on a batch and convert its output with `as_reward_tensor` (no error handling)."""
    values = fn(prompts, completions, **_accepted_columns(fn, columns))
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


def _row_label(index: int, prompts: Sequence[str]) -> str:
    prompt = prompts[index] if index < len(prompts) else ""
    preview = str(prompt)[:60].replace("\n", " ")
    return f"row {index} (prompt {preview!r})"


def score_safely(
    fn: Callable[..., Any],
    prompts: list[str],
    completions: list[str],
    *,
    on_error: str = "raise",
    penalty: float = -1.0,
    **columns: Any,
) -> tuple[Tensor, int]:
    """Score a batch with `fn`, isolating rows that raise or return NaN/inf.

    1. Call `fn` on the whole batch. If it raises, call it again row by row: rows that work
       keep their score, rows that raise are "failed".
    2. Rows whose score is NaN or +-inf (in any objective) are "failed" too.
    3. With `on_error="raise"` the first failed row raises `RewardError` naming its 0-based
       index in the batch, the first 60 characters of its prompt and the exception; with
       `on_error="penalty"` every failed row gets `penalty` (in every objective) and the
       number of penalised rows is returned for the caller to log.

    An output of the wrong length is a bug in the function, not in a row: it raises
    ValueError in both modes.

    Returns (scores (B,) or (B, K) float32, number of penalised rows).
    """
    if on_error not in ("raise", "penalty"):
        raise ValueError(f"on_error must be 'raise' or 'penalty'; got {on_error!r}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(completions)
    name = reward_name(fn)
    failures: dict[int, str] = {}
    try:
        values = fn(prompts, completions, **_accepted_columns(fn, columns))
    except Exception as batch_err:  # isolate the failing row(s) below
        if n == 1:
            failures[0] = f"{type(batch_err).__name__}: {batch_err}"
            scores = torch.zeros(1)
        else:
            rows: list[Tensor | None] = []
            for i in range(n):
                try:
                    row_values = fn(
                        prompts[i : i + 1],
                        completions[i : i + 1],
                        **_accepted_columns(fn, _slice_columns(columns, i, n)),
                    )
                except Exception as row_err:
                    failures[i] = f"{type(row_err).__name__}: {row_err}"
                    rows.append(None)
                    continue
                rows.append(as_reward_tensor(row_values, 1))
            shape = next((r.shape[1:] for r in rows if r is not None), torch.Size())
            scores = torch.stack([r[0] if r is not None else torch.zeros(shape) for r in rows])
    else:
        scores = as_reward_tensor(values, n)

    finite = torch.isfinite(scores) if scores.ndim == 1 else torch.isfinite(scores).all(dim=1)
    for i in torch.nonzero(~finite).flatten().tolist():
        if i not in failures:
            bad = scores[i].tolist()
            failures[i] = f"non-finite score {bad}"

    if not failures:
        return scores, 0
    if on_error == "raise":
        first = min(failures)
        more = f" ({len(failures) - 1} more row(s) failed)" if len(failures) > 1 else ""
        raise RewardError(
            f"reward {name} failed on {_row_label(first, prompts)}: {failures[first]}{more}"
        )
    for i in failures:
        scores[i] = penalty
    return scores, len(failures)
