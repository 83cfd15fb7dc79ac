"""Splits of a dataset directory: which split each file belongs to, and which split to read.

A file names its split the way the hub lays datasets out: `train.jsonl`, `test.parquet`,
`train-00000-of-00002.parquet` (any split name before the shard number, e.g.
`train_prefs-00000-of-00001.parquet`), `test_prefs.jsonl`, or a folder `train/`, `test/`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import PurePath

from alignkit.data.errors import DataError

SPLIT_KEYWORDS = ("train", "test", "validation", "valid", "dev", "eval")
# Splits an evaluation set is read from, in order of preference.
EVAL_SPLITS = ("test", "validation", "valid", "eval", "dev")

_KEYWORDS = "|".join(SPLIT_KEYWORDS)
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-.+)?$")
_KEYWORD = re.compile(rf"^(?P<split>{_KEYWORDS})(?:[-_.]?\d+)?$", re.IGNORECASE)
_NAMED = re.compile(rf"^(?:{_KEYWORDS})[-_]\w[\w-]*$", re.IGNORECASE)

SplitChoice = str | Sequence[str] | None


def split_of(relative: PurePath) -> str | None:
    """The split a data file at `relative` (inside the dataset directory) belongs to, or None.

    >>> [split_of(PurePath(p)) for p in ("train.jsonl", "data/test-00000-of-00001.parquet",
    ...  "data/train_prefs-00000-of-00001.parquet", "train/part.jsonl", "notes.jsonl",
    ...  "helpful-base/test.jsonl.gz")]
    ['train', 'test', 'train_prefs', 'train', None, 'test']
    """
    stem = PurePath(relative.name.removesuffix(".gz")).stem  # train.jsonl.gz -> train
    shard = _SHARD.match(stem)
    name = shard["split"] if shard else stem
    keyword = _KEYWORD.match(name)
    if keyword:
        return keyword["split"].lower()
    for folder in reversed(relative.parts[:-1]):
        keyword = _KEYWORD.match(folder)
        if keyword or _NAMED.match(folder):
            return keyword["split"].lower() if keyword else folder
    return name if shard or _NAMED.match(name) else None


def choose_split(found: Iterable[str], wanted: SplitChoice, where: str) -> str:
    """The split to read among `found`.

    `wanted` is a split name (it must exist), a sequence of preferred names (the first that
    exists), or None (`train`). Without a preferred one, a single split is taken; otherwise
    `DataError` lists the splits found.
    """
    names = sorted(set(found))
    if isinstance(wanted, str):
        if wanted in names:
            return wanted
        raise DataError(
            where, None, f"no split {wanted!r}; the splits found are {', '.join(names)}"
        )
    preferred = ("train",) if wanted is None else tuple(wanted)
    for name in preferred:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise DataError(
        where,
        None,
        f"found splits {', '.join(names)} and none named {' or '.join(preferred)}; "
        "choose one with --split NAME",
    )
