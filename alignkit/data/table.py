"""`RowTable`: the loaded rows of a dataset, each remembering the file and row it came from."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.errors import DataError


@dataclass
class RowTable:
    """Rows (dicts) plus, for each row, its origin `(file, 1-based row)` for error messages."""

    rows: list[dict[str, Any]]
    origins: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.origins:
            self.origins = [("<list>", i + 1) for i in range(len(self.rows))]
        if len(self.origins) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows but {len(self.origins)} origins")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        """Union of the rows' keys, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                seen.setdefault(key, None)
        return list(seen)

    @property
    def source(self) -> str:
        """The file name(s) the rows came from, for messages about the whole table."""
        files = list(dict.fromkeys(file for file, _ in self.origins))
        if not files:
            return "<empty>"
        return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"

    def origin(self, i: int) -> tuple[str, int]:
        """`(file, 1-based row)` of row `i`."""
        return self.origins[i]

    def error(self, i: int, problem: str) -> DataError:
        """A `DataError` for row `i` (the caller raises it)."""
        file, row = self.origins[i]
        return DataError(file, row, problem)

    def select(self, indices: Sequence[int]) -> RowTable:
        """The rows at `indices`, in that order, keeping their origins."""
        return RowTable([self.rows[i] for i in indices], [self.origins[i] for i in indices])

    def split(self, holdout: float | int, seed: int = 0) -> tuple[RowTable, RowTable]:
        """Random `(train, eval)` split; `holdout` is a fraction in (0, 1) or a row count >= 1.

        Deterministic for `seed`; both parts keep the original row order.
        """
        n = len(self.rows)
        if isinstance(holdout, float) and not isinstance(holdout, bool):
            if not 0.0 < holdout < 1.0:
                raise ValueError(f"holdout fraction must be in (0, 1), got {holdout}")
            n_eval = max(1, round(n * holdout))
        else:
            n_eval = int(holdout)
        if not 1 <= n_eval < n:
            raise ValueError(f"cannot hold out {n_eval} of {n} rows: both parts must be non-empty")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        eval_indices = sorted(order[:n_eval])
        train_indices = sorted(order[n_eval:])
        return self.select(train_indices), self.select(eval_indices)
