"""The noise of a round, drawn for the global batch, and this rank's rows of it.

Under torchrun each rank computes a block of a step's pairs (`distributed.shard_rows`). For the
ranks together to see exactly what one process sees, every draw of a round's noise (x_T, each
DDIM step's noise, each posterior step's noise) is made for the whole global batch on every
rank, from the same per-step generator, in the same order, and each rank keeps its own rows.
`BatchPart` is that pair (generator, rows of this rank); the samplers take it wherever they
take a `torch.Generator` (`standard_normal`). Scores of a rank's rows are put back together
with `gather`, so metrics over the global batch are computed as one process computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.training.run.distributed import gather_by_index


@dataclass(frozen=True)
class BatchPart:
    """Rows `positions` of a global batch of `size` rows (None: all of them, one process), and
    the generator whose draws are made for the whole batch."""

    generator: torch.Generator
    size: int
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and any(not 0 <= p < self.size for p in self.positions):
            raise ValueError(f"rows {list(self.positions)} are not all inside a batch of {self.size}")

    @property
    def rows(self) -> int:
        return self.size if self.positions is None else len(self.positions)

    def randn(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """This part's rows of a standard normal draw of shape (size, *shape[1:]) (float32, CPU)."""
        if shape[0] != self.rows:
            raise ValueError(f"a draw of {shape[0]} rows for a batch part of {self.rows}")
        full = torch.randn((self.size, *shape[1:]), generator=self.generator, device="cpu", dtype=torch.float32)
        return full if self.positions is None else full[list(self.positions)]

    def gather(self, values: Tensor) -> Tensor:
        """(size,) on every rank from each rank's (rows,) `values` at its positions (exact:
        zero-padded float64 sums, `distributed.gather_by_index`)."""
        if self.positions is None:
            return values
        column: list[Tensor | None] = [None] * self.size
        for value, position in zip(values.detach().cpu().reshape(-1), self.positions, strict=True):
            column[position] = value.reshape(1)
        return torch.cat(gather_by_index(column)).to(values.dtype)


def standard_normal(shape: tuple[int, ...] | torch.Size, source: torch.Generator | BatchPart | None) -> Tensor:
    """A float32 CPU standard normal draw of `shape`: from a generator (or the global stream),
    or this rank's rows of the global batch's draw (`BatchPart`)."""
    if isinstance(source, BatchPart):
        return source.randn(shape)
    return torch.randn(tuple(shape), generator=source, device="cpu", dtype=torch.float32)
