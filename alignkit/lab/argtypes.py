"""argparse `type=` helpers shared by the argparse verbs (alignkit.cli_args, merge, sweep): a
value that fails becomes argparse's one-line error naming the flag. Here, at lab's rank, so the
verbs below the command line (merge/, sweep/) can use the same ones."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def check_data_source(flag: str, source: str) -> None:
    """A data file named like one (a path, or a data-file suffix) must exist; anything else
    may be a hub dataset id and is left to the loader."""
    from alignkit.models.sources import looks_like_path

    if Path(source).exists():
        return
    if looks_like_path(source) or source.endswith(DATA_SUFFIXES):
        raise FileNotFoundError(f"{flag} {source}: no such file or directory")


def prepare_output_file(flag: str, target: str) -> None:
    """Create the directory `target` will be written to, now rather than after the work; a
    directory or an unwritable place is a ValueError naming the flag."""
    path = Path(target)
    if path.is_dir():
        raise ValueError(f"{flag} {target}: is a directory; name the file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {target}: cannot create {path.parent}: {error.strerror or error}") from None
