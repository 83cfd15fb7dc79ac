"""What a reward function returned: converted to a float32 tensor, or described in an error.

`as_reward_tensor(values, n)` accepts one number per completion: a tensor, a numpy array, a
list/tuple of numbers (or of equal-length lists of numbers, for K objectives) or a single
number when n == 1. Anything else raises `RewardOutputError` saying what the function
returned, not what numpy made of it: `None`, the string 'good', a list of 7 values for 8
completions, a list whose item 2 is the string '0.5', lists of uneven lengths, ...

`None` items of a list become NaN (TRL's convention for "no reward for this row");
`none_rows` finds them so that callers can say "returned None" for those rows.
"""

from __future__ import annotations

from numbers import Number
from typing import Any

import numpy as np
import torch
from torch import Tensor

_EXPECTED = "one number per completion (a list of floats, a numpy array or a tensor)"


class RewardOutputError(ValueError):
    """A reward function returned something that is not one score per completion.

    `detail` starts with "returned ..."; `name` is the function's name when known. The
    message is "reward NAME returned ...".
    """

    def __init__(self, detail: str, name: str | None = None) -> None:
        self.detail, self.name = detail, name
        super().__init__(f"reward {name or 'function'} {detail}")

    def named(self, name: str) -> RewardOutputError:
        """The same error naming the function."""
        return RewardOutputError(self.detail, name)


def _is_number(value: Any) -> bool:
    return isinstance(value, Number | np.number | np.bool_) or (
        isinstance(value, Tensor | np.ndarray) and value.ndim == 0
    )


def _describe_item(value: Any) -> str:
    """A list item in words: "None", "the string '0.5'", "a dict", "a list of 2 values"."""
    if value is None:
        return "None"
    if isinstance(value, str | bytes):
        return f"the {type(value).__name__} {value[:40]!r}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)} values"
    if isinstance(value, Tensor | np.ndarray):
        return f"a {'tensor' if isinstance(value, Tensor) else 'numpy array'} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _row_problem(values: list | tuple) -> str | None:
    """Why a list is not (B,) numbers (None items allowed) nor (B, K) rows of numbers."""
    rows = [isinstance(v, list | tuple | np.ndarray | Tensor) and not _is_number(v) for v in values]
    for i, value in enumerate(values):
        if value is None or _is_number(value):
            continue
        if not rows[i]:
            return f"item {i} is {_describe_item(value)}"
        for j, inner in enumerate(value):
            if not _is_number(inner) and inner is not None:
                return f"item {i} is a list whose item {j} is {_describe_item(inner)}"
    if any(rows) and not all(rows):
        first = next(i for i, is_row in enumerate(rows) if is_row != rows[0])
        return f"items mix numbers and lists (item 0 is {_describe_item(values[0])}, item {first} is {_describe_item(values[first])})"
    if all(rows) and values:
        lengths = [len(v) for v in values]
        if len(set(lengths)) > 1:
            return f"its lists have uneven lengths {lengths[:8]}{'...' if len(lengths) > 8 else ''}"
    return None


def describe_output(values: Any) -> str:
    """A reward function's output in a few words: "None", "the str 'good'", "a list of 7
    values", "a tensor of shape (8, 1, 2)", "the single number 0.5", "a dict"."""
    if values is None or isinstance(values, str | bytes):
        return _describe_item(values)
    if isinstance(values, Tensor | np.ndarray):
        return _describe_item(values)
    if _is_number(values):
        return f"the single number {values!r}"
    if isinstance(values, list | tuple):
        return f"a {type(values).__name__} of {len(values)} values"
    return f"a {type(values).__name__}"


def none_rows(values: Any) -> list[int]:
    """Indices of the `None` items of a list/tuple output (rows the function gave no score)."""
    if not isinstance(values, list | tuple):
        return []
    return [i for i, value in enumerate(values) if value is None]


def _to_tensor(values: Any) -> Tensor:
    """The output as a float32 CPU tensor, or RewardOutputError describing it."""
    if isinstance(values, Tensor):
        return values.detach().to(device="cpu", dtype=torch.float32)
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.number) and values.dtype != np.bool_:
            raise RewardOutputError(
                f"returned {describe_output(values)} of dtype {values.dtype}, but rewards must be numbers: {_EXPECTED}"
            )
        return torch.as_tensor(values.astype(np.float64), dtype=torch.float32)
    if _is_number(values):
        return torch.tensor([float(values)], dtype=torch.float32)
    if isinstance(values, list | tuple):
        problem = _row_problem(values)
        if problem is not None:
            raise RewardOutputError(
                f"returned {describe_output(values)} whose {problem}, but rewards must be numbers: {_EXPECTED}"
            )
        rows = [
            float("nan") if v is None
            else [float("nan") if x is None else float(x) for x in v] if not _is_number(v)
            else float(v)
            for v in values
        ]
        return torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(0)
    raise RewardOutputError(
        f"returned {describe_output(values)}, but rewards must be numbers: {_EXPECTED}"
    )


def as_reward_tensor(values: Any, n: int) -> Tensor:
    """Convert a reward function's output to a float32 tensor of shape (n,) or (n, K).

    Accepts a tensor, a numpy array, a list/tuple of numbers (or of equal-length lists for
    multi-objective rewards; `None` items become NaN) or a single number when n == 1.
    Raises `RewardOutputError` (a ValueError) describing the output otherwise, e.g. when
    the first dimension is not `n`.

    >>> as_reward_tensor([1, 0.5], 2)
    tensor([1.0000, 0.5000])
    """
    tensor = _to_tensor(values)
    if tensor.ndim == 0:
        tensor = tensor.reshape(1)
    if tensor.ndim > 2:
        raise RewardOutputError(
            f"returned {describe_output(values)}, but rewards must be (B,) or (B, K): {_EXPECTED}"
        )
    if tensor.shape[0] != n:
        raise RewardOutputError(
            f"returned {describe_output(values)}: {tensor.shape[0]} values for a batch of {n} "
            f"completions (shape {tuple(tensor.shape)}); return exactly one score per completion"
        )
    return tensor
