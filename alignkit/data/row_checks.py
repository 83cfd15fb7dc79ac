"""Checks that look at a whole table rather than one row: every row in one style (all plain
text or all conversations), and per-row number columns that are finite numbers everywhere."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from alignkit.data.columns import NUMBER_COLUMNS
from alignkit.data.table import RowTable


def check_one_style(table: RowTable, is_conversational: Callable[[Mapping[str, Any]], bool]) -> None:
    """Raise at the first row whose style (conversation or plain text) differs from row 1's.

    A conversational row is rendered through the chat template and a plain one is not, so a
    mixed table would train on two different formats without a word.
    """
    if not table.rows:
        return
    first = is_conversational(table.rows[0])
    for i, row in enumerate(table.rows):
        if is_conversational(row) != first:
            first_row = str(table.error(0, "")).removesuffix(": ")  # "file, row 1" (CSV: line)
            styles = ("plain text", "conversational (lists of {'role', 'content'} messages)")
            this, other = styles if first else styles[::-1]
            raise table.error(
                i,
                f"this row is {this} but the first row ({first_row}) is {other}; "
                "use one style for every row",
            )


def first_item_problem(column: str, items: Any, check: Callable[[str, Any], str | None]) -> str | None:
    """The first problem `check(f"{column}[k]", item)` finds among a list column's items, or None."""
    for k, item in enumerate(items):
        problem = check(f"{column}[{k}]", item)
        if problem:
            return problem
    return None


def number_problem(column: str, value: Any) -> str | None:
    """Why `value` is not a finite number for `column`, or None when it is one."""
    if value is None:
        return f"column '{column}' is missing"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"column '{column}' must be a number, got {type(value).__name__} {value!r}"
    if math.isnan(value):
        return f"column '{column}' is NaN"
    if math.isinf(value):
        return f"column '{column}' is infinite"
    return None


def check_number_columns(table: RowTable) -> None:
    """Every row must hold a finite number in each number column (`margin`, `score`, ...) that
    any row uses, and every `margins` value must be a list of finite numbers."""
    used = [c for c in NUMBER_COLUMNS if any(row.get(c) is not None for row in table.rows)]
    for i, row in enumerate(table.rows):
        for column in used:
            if row.get(column) is None:
                raise table.error(
                    i, f"column '{column}' is missing (other rows have one; give every row a "
                    "number, or drop the column)"
                )
            problem = number_problem(column, row[column])
            if problem:
                raise table.error(i, problem)
        if row.get("margins") is not None:
            problem = _margins_problem(row["margins"])
            if problem:
                raise table.error(i, problem)


def _margins_problem(value: Any) -> str | None:
    """Why a `margins` value is not a list of finite numbers, or None."""
    if not isinstance(value, list | tuple):
        return f"column 'margins' must be a list of numbers, got {type(value).__name__} {value!r}"
    return first_item_problem("margins", value, number_problem)
