"""Data parallelism on PyTorch's own engines: one process, or W torchrun ranks under DDP or FSDP2.

`torchrun --nproc-per-node=W -m alignkit train ALGO ...` starts W copies of the same program
(SPMD). Every rank tokenises the same data and walks the same global batch order; each global
micro-batch of `--batch-size` rows is split by rows (`shard_rows`), so `--batch-size` means the
same thing at any world size. Three rules keep W ranks equal to one process:

1. Global normalisers. A task's loss is a mean over its units (rows, or tokens for SFT-like
   tasks). Rank r turns its local mean into L_r = mean_r * n_r * W / N with N = sum_r n_r
   (all-reduced); DDP/FSDP2 average gradients over ranks, so the update follows
   (1/W) sum_r L_r = sum_r mean_r n_r / N, the global mean. A per-rank mean would weight ranks
   with few tokens as much as ranks with many (12.5% gradient error measured, SCALE.md).
2. Every training forward runs through the wrapper. The task's computation sits in one
   `nn.Module.forward` (`TaskForward`, in `wrapping.py`) and DDP or `fully_shard` wraps that module, never the
   bare model: otherwise DDP skips its gradient all-reduce and FSDP2 never unshards the root
   parameters. `guard_model` makes a forward that bypasses the wrapper raise.
3. Collectives in lockstep. A rank whose share of a micro-batch is empty runs one row with
   weight 0, so every rank makes the same forwards and backwards (FSDP2 hangs otherwise).

Rank 0 writes metrics.jsonl, config.yaml, caches, checkpoints and final/; other ranks log
warnings and errors only, prefixed with their rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger("alignkit")
STRATEGIES = ("ddp", "fsdp2")
# A rank that died makes the survivors' next collective fail within this many seconds.
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank r of W (W = 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = Ranks()


def current() -> Ranks:
    """The ranks of this process (set up by `init_ranks`)."""
    return _current


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_ranks(strategy: str = "ddp", device: str = "auto") -> Ranks:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA), once per process.

    Without torchrun this is one process and nothing is initialised.
    """
    global _current
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not launched_by_torchrun():
        _current = Ranks(strategy=strategy)
        return _current
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("ALIGNKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    _current = Ranks(rank=rank, world=world, local_rank=local_rank, strategy=strategy)
    _configure_logging(_current)
    return _current


def default_device(ranks: Ranks, requested: str) -> str | None:
    """The device a rank loads its model on: its own GPU under torchrun, else as asked."""
    if requested != "auto":
        return requested
    if ranks.distributed and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return None


class _RankFilter(logging.Filter):
    def __init__(self, ranks: Ranks) -> None:
        super().__init__()
        self.ranks = ranks

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.ranks.is_main and record.levelno < logging.WARNING:
            return False
        if not getattr(record, "_rank_prefixed", False):
            record.msg = f"[rank {self.ranks.rank}] {record.msg}"
            record._rank_prefixed = True
        return True


def _configure_logging(ranks: Ranks) -> None:
    """Rank-prefixed warnings everywhere, info and library progress bars on rank 0 only."""
    logger = logging.getLogger("alignkit")
    if not any(isinstance(f, _RankFilter) for f in logger.filters):
        logger.addFilter(_RankFilter(ranks))
    if not ranks.is_main:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


# --------------------------------------------------------------------------- collectives


def _device_for_collectives() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of `values` over ranks (a copy; float64 so counts and sums add exactly)."""
    if not current().distributed:
        return values.clone()
    buffer = values.detach().to(_device_for_collectives(), torch.float64)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device, values.dtype)


def all_ranks_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (one MIN all-reduce)."""
    if not current().distributed:
        return flag
    buffer = torch.tensor([1.0 if flag else 0.0], device=_device_for_collectives())
    dist.all_reduce(buffer, op=dist.ReduceOp.MIN)
    return bool(buffer.item() > 0)


def global_mean(values: Tensor) -> Tensor:
    """mean over every rank's elements of `values` (detached): sum all-reduced / count all-reduced."""
    total = all_reduce_sum(torch.stack([values.detach().sum().double(), torch.tensor(float(values.numel()))
                                        .to(values.device, torch.float64)]))
    return (total[0] / total[1].clamp(min=1)).to(values.dtype)


def gather_by_index(column: list[Tensor | None]) -> list[Tensor]:
    """Fill a list of 1-D tensors that each rank filled in part (None elsewhere): every rank
    gets every entry. Two all-reduces of zero-padded buffers (lengths, then values), exact."""
    if not current().distributed:
        return column  # type: ignore[return-value]
    lengths = torch.tensor([0 if v is None else v.numel() for v in column], dtype=torch.float64)
    lengths = all_reduce_sum(lengths).long()
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float64)
    for i, value in enumerate(column):
        if value is not None:
            flat[int(offsets[i]) : int(offsets[i + 1])] = value.double().reshape(-1)
    flat = all_reduce_sum(flat).float()
    return [flat[int(offsets[i]) : int(offsets[i + 1])].clone() for i in range(len(column))]


def all_gather_equal(value: Tensor) -> list[Tensor]:
    """Every rank's `value` (same shape and dtype on all ranks), in rank order."""
    if not current().distributed:
        return [value]
    local = value.to(_device_for_collectives())
    gathered = [torch.empty_like(local) for _ in range(current().world)]
    dist.all_gather(gathered, local)
    return [t.to(value.device) for t in gathered]


def all_gather_json(value) -> list:
    """Every rank's JSON-serialisable `value`, in rank order (no pickle: UTF-8 bytes)."""
    import json

    if not current().distributed:
        return [value]
    device = _device_for_collectives()
    encoded = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([encoded.numel()], dtype=torch.int64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    padded = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    padded[: encoded.numel()] = encoded
    gathered = [torch.empty_like(padded) for _ in range(current().world)]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(t.cpu().tolist()).rstrip(b"\0").decode()) for t in gathered]


def _reported_keys(values: dict) -> list[str]:
    """The sorted union of every rank's keys of `values` (ranks may report different ones)."""
    return sorted({k for ks in all_gather_json(sorted(values)) for k in ks})


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's sum over the ranks that report it (a rank may report none)."""
    if not current().distributed:
        return values
    keys = _reported_keys(values)
    total = all_reduce_sum(torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64))
    return {k: float(v) for k, v in zip(keys, total.tolist(), strict=True)}


def barrier() -> None:
    if current().distributed:
        dist.barrier()


@dataclass(frozen=True)
class Weighted:
    """A metric that is a mean over `weight` items of the rank's rows (accuracy over ordered
    pairs, NLL over tokens, a reward over the chosen rows only): ranks are weighted by `weight`
    instead of by their loss units, so the global value is sum(numerators) / sum(weights)."""

    value: Tensor | float
    weight: Tensor | float


def split_weighted(metrics: dict) -> tuple[dict[str, Any], dict[str, float]]:
    """(metrics with `Weighted` values unwrapped, {key: weight} of those)."""
    plain, weights = {}, {}
    for key, value in metrics.items():
        if isinstance(value, Weighted):
            plain[key], weights[key] = value.value, float(value.weight)
        else:
            plain[key] = value
    return plain, weights


def reduce_metrics(metrics: dict[str, float], weight: float, weights: dict[str, float] | None = None
                   ) -> dict[str, float]:
    """Weighted mean of each metric over the ranks that report it: sum_r w_r m_r / sum_r w_r
    (w = the rank's loss units, or the metric's own weight in `weights`). Ranks may report
    different keys (a KTO micro-batch can hold one class only): the key sets are gathered first."""
    if not current().distributed:
        return metrics
    weights = weights or {}
    keys = _reported_keys(metrics)
    packed = torch.zeros(2, len(keys), dtype=torch.float64)
    for i, key in enumerate(keys):
        if key in metrics:
            own = weights.get(key)  # a stand-in row (weight 0) counts for nothing either way
            w = weight if own is None else (own if weight > 0 else 0.0)
            packed[0, i], packed[1, i] = w * metrics[key], w
    total = all_reduce_sum(packed)
    return {k: float(total[0, i] / total[1, i]) if total[1, i] > 0 else float("nan") for i, k in enumerate(keys)}


# --------------------------------------------------------------------------- random streams

_shared_generator: torch.Generator | None = None


def split_random_streams(seed: int, ranks: Ranks) -> None:
    """Before training under torchrun: a shared generator, a copy of the (identical) global
    stream, for draws every rank must make alike (`pair_rows_of_draw`); then ranks > 0 reseed
    the global stream, so dropout masks differ across ranks (rank 0 keeps one process's)."""
    global _shared_generator
    if not ranks.distributed:
        _shared_generator = None
        return
    _shared_generator = torch.Generator()
    _shared_generator.set_state(torch.get_rng_state())
    if ranks.rank > 0:
        torch.manual_seed((seed * 1_000_003 + ranks.rank * 7_919) % 2**63)


def shared_generator() -> torch.Generator | None:
    """The generator every rank draws alike from (None in one process: use the global one)."""
    return _shared_generator


# --------------------------------------------------------------------------- rows

_shard_in_use: tuple[list[int], int] | None = None


@contextlib.contextmanager
def rows_in_use(positions: list[int], n_global: int) -> Iterator[None]:
    """Tell tasks which rows of a global micro-batch of `n_global` this rank computes (for
    random draws that must match one process: `pair_rows_of_draw`). One process: no effect."""
    global _shard_in_use
    previous, _shard_in_use = _shard_in_use, ((positions, n_global) if current().distributed else None)
    try:
        yield
    finally:
        _shard_in_use = previous


def pair_rows_of_draw(draw, local_pairs: int) -> Tensor:
    """`draw(rows, generator)` -> (rows, ...) random tensor; this rank's rows of the draw one
    process makes for a pair batch laid out [chosen; rejected] (2B rows), from the shared
    generator. One process: draw(2 * local_pairs, None), the global stream."""
    if _shard_in_use is None:
        return draw(2 * local_pairs, None)
    positions, n_global = _shard_in_use
    full = draw(2 * n_global, _shared_generator)
    index = torch.tensor(positions, device=full.device)
    return torch.cat([full[index], full[n_global + index]])


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a global micro-batch: `positions` within it; `weight` 0 marks a
    stand-in row that only keeps the collectives in step (fewer rows than ranks)."""

    positions: list[int]
    weight: float

    def take(self, items: Sequence) -> list:
        return [items[p] for p in self.positions]


def shard_rows(n_rows: int, ranks: Ranks) -> Shard:
    """Rows r, r + W, r + 2W, ... of a global micro-batch of `n_rows` (one process: all)."""
    if not ranks.distributed:
        return Shard(list(range(n_rows)), 1.0)
    mine = list(range(ranks.rank, n_rows, ranks.world))
    if not mine:
        return Shard([0], 0.0)
    return Shard(mine, 1.0)


def shard_items(items: Sequence, ranks: Ranks) -> list:
    """Items r, r + W, ... (work split across ranks, e.g. reference-cache batches)."""
    return list(items[ranks.rank :: ranks.world]) if ranks.distributed else list(items)


def loss_scale(local_units: float, total_units: float, ranks: Ranks) -> float:
    """The factor for a rank's local mean loss: n_r * W / N, N = sum_r n_r (all-reduced by the
    caller). One process: 1.0, so its loss is used exactly as computed."""
    if not ranks.distributed:
        return 1.0
    return local_units * ranks.world / total_units if total_units > 0 else 0.0
