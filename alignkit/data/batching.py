"""Length-bucketed batching: batches of similar lengths, still shuffled every epoch.

Indices are shuffled, cut into mega-batches of `bucket_factor * batch_size`, each mega-batch
is sorted by length (longest first) and split into batches, and the batch order is shuffled.
Padding then costs little while every example is still seen once per epoch in random company.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    bucket_factor: int = 50,
    drop_last: bool = False,
    shuffle: bool = True,
) -> list[list[int]]:
    """Batches of indices into `lengths`, deterministic for `(seed, epoch)`.

    Without `drop_last` every index appears exactly once; with it, the one batch smaller
    than `batch_size` (from the last mega-batch, if any) is dropped. `shuffle=False` keeps the
    original order and plain consecutive batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if bucket_factor < 1:
        raise ValueError(f"bucket_factor must be at least 1, got {bucket_factor}")
    indices = list(range(len(lengths)))
    if not shuffle:
        batches = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
        return [b for b in batches if not drop_last or len(b) == batch_size]
    # A fixed arithmetic combination (not hash()) so the order is the same in every process.
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(indices)
    mega = bucket_factor * batch_size
    batches = []
    for start in range(0, len(indices), mega):
        bucket = sorted(indices[start : start + mega], key=lambda i: lengths[i], reverse=True)
        for s in range(0, len(bucket), batch_size):
            batch = bucket[s : s + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    rng.shuffle(batches)
    return batches


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Real tokens / padded tokens over `batches` (1.0 means no padding at all)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return real / padded if padded else 1.0
