"""Length-bucketed batching: a deterministic permutation per epoch with little padding."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data import length_bucketed_batches, padding_efficiency


def mixed_lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 20), rng.randint(100, 400)]) for _ in range(n)]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), min_size=0, max_size=120),
    batch_size=st.integers(1, 9),
    bucket_factor=st.integers(1, 5),
    seed=st.integers(0, 10),
    epoch=st.integers(0, 3),
)
def test_every_index_exactly_once_per_epoch(lengths, batch_size, bucket_factor, seed, epoch):
    batches = length_bucketed_batches(
        lengths, batch_size, seed=seed, epoch=epoch, bucket_factor=bucket_factor
    )
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    assert sum(len(batch) < batch_size for batch in batches) <= 1


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    lengths = mixed_lengths(200)
    first = length_bucketed_batches(lengths, 8, seed=3, epoch=0, bucket_factor=5)
    assert first == length_bucketed_batches(lengths, 8, seed=3, epoch=0, bucket_factor=5)
    assert first != length_bucketed_batches(lengths, 8, seed=3, epoch=1, bucket_factor=5)
    assert first != length_bucketed_batches(lengths, 8, seed=4, epoch=0, bucket_factor=5)


def test_batches_are_sorted_by_length_within_a_batch():
    lengths = mixed_lengths(300)
    for batch in length_bucketed_batches(lengths, 10, seed=0, epoch=2, bucket_factor=4):
        batch_lengths = [lengths[i] for i in batch]
        assert batch_lengths == sorted(batch_lengths, reverse=True)


def test_drop_last_and_no_shuffle():
    lengths = list(range(1, 24))  # 23 examples
    batches = length_bucketed_batches(lengths, 5, seed=0, epoch=0, drop_last=True)
    assert len(batches) == 4 and all(len(b) == 5 for b in batches)
    assert len({i for b in batches for i in b}) == 20
    plain = length_bucketed_batches(lengths, 5, seed=0, epoch=0, shuffle=False)
    assert plain[0] == [0, 1, 2, 3, 4] and plain[-1] == [20, 21, 22]


def test_padding_efficiency_beats_random_batching_on_mixed_lengths():
    lengths = mixed_lengths(1000)
    bucketed = length_bucketed_batches(lengths, 16, seed=0, epoch=0)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    random_batches = [order[s : s + 16] for s in range(0, len(order), 16)]
    bucketed_eff = padding_efficiency(bucketed, lengths)
    random_eff = padding_efficiency(random_batches, lengths)
    assert random_eff < 0.7
    assert bucketed_eff > 0.9 > random_eff


def test_padding_efficiency_worked_example():
    """batches [0, 1] and [2]: real = 2 + 4 + 3 = 9, padded = 2*4 + 1*3 = 11."""
    assert padding_efficiency([[0, 1], [2]], [2, 4, 3]) == 9 / 11
    assert padding_efficiency([], []) == 1.0
