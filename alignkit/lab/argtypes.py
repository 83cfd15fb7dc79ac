"""argparse `type=` helpers shared by the argparse verbs (alignkit.cli_args, merge, sweep): a
value that fails becomes argparse's one-line error naming the flag. Here, at lab's rank, so the
verbs below the command line (merge/, sweep/) can use the same ones."""

from __future__ import annotations

import argparse

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def int_at_least(minimum: int):
    """argparse `type=` for integers that must be >= `minimum` (counts: 1, seeds: 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # batch sizes, resamples
non_negative_int = int_at_least(0)  # seeds
