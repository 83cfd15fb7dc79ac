"""`load_rows`: read a dataset from a file, a directory, a `datasets` object, a list or the hub.

Every row keeps its origin `(file, 1-based row)` so later validation errors can point at the
exact place an editor shows: the line for JSONL and CSV (header = line 1), the record index
for JSON arrays, Parquet and in-memory data. Text files are UTF-8 (a leading byte-order mark
is dropped); a directory holding splits (train.jsonl + test.jsonl, train-00000-of-00001.parquet,
train/ and test/ folders, a `save_to_disk` dataset) is read one split at a time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from alignkit.data.csv_table import load_csv
from alignkit.data.encoding import binary_lines, data_suffix, decode_utf8, read_bytes
from alignkit.data.errors import DataError
from alignkit.data.hh import apply_data_format
from alignkit.data.splits import SplitChoice, choose_split, split_of
from alignkit.data.table import RowTable

log = logging.getLogger("alignkit")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_PATH_LIKE_SUFFIXES = DATA_SUFFIXES + (".txt", ".tsv", ".gz", ".zst", ".arrow", ".ndjson")


def load_rows(source: Any, *, split: SplitChoice = None, data_format: str = "auto") -> RowTable:
    """Load rows from any supported source and remember where each came from.

    `source` may be: a path to a `.jsonl`, `.json`, `.parquet` or `.csv` file; a directory
    of such files (sorted by path and concatenated, each row keeping its own file name; when
    the files name splits, only those of one split); a `datasets` dataset saved with
    `save_to_disk`; a `datasets.Dataset`; a `datasets.DatasetDict`; a list of dicts (origin
    `"<list>"`); or a hub dataset id, loaded with `datasets.load_dataset(source, split=...)`.
    A path that does not exist raises `DataError` instead of a hub lookup.

    `split` picks the split: a name (an error listing the splits found if there is none of
    that name, or if the source has no splits), a sequence of preferred names, or None for
    `train` (or the only split there is). `data_format` is `auto` or `hh` (Anthropic
    HH-RLHF transcripts, split into prompt and responses; `auto` detects them).
    """
    table = _load_any(source, split)
    if len(table) == 0:
        raise DataError(os.fspath(source) if isinstance(source, str | os.PathLike) else table.source,
                        None, "the dataset has no rows")
    return apply_data_format(table, data_format)


def _load_any(source: Any, split: SplitChoice) -> RowTable:
    """Rows of `source` before any schema conversion (see `load_rows`)."""
    if isinstance(source, RowTable):
        return source
    if isinstance(source, list | tuple):
        return _from_records("<list>", list(source))
    dataset_table = _from_datasets_object(source, split)
    if dataset_table is not None:
        return dataset_table
    if not isinstance(source, str | os.PathLike):
        raise DataError(repr(source)[:80], None, f"cannot load data from a {type(source).__name__}")

    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_dir():
        return _load_directory(path, split)
    if path.is_file():
        _refuse_split_of_one_file(str(path), split)
        return _load_file(path)
    if isinstance(source, os.PathLike) or _looks_like_path(os.fspath(source)):
        raise DataError(os.fspath(source), None, "no such file or directory")
    return _load_hub(str(source), split)


def _refuse_split_of_one_file(where: str, split: SplitChoice) -> None:
    """A split asked for by name from a source that has no splits is a mistake, not ignored."""
    if isinstance(split, str):
        raise DataError(
            where, None, f"no split {split!r}: this data has no splits (it is one set of rows); "
            "drop --split, or point --data at a directory with split files (train.jsonl, test.jsonl)"
        )


def builtin_prompts() -> dict[str, list[str]]:
    """The built-in movie-review prompts shipped as package data: {'train': [...],
    'heldout': [...]} (the demo trains on the first, `alignkit eval/overopt --prompts
    builtin` score the second)."""
    text = resources.files("alignkit").joinpath("assets/movie_review_prompts.json").read_text()
    return json.loads(text)


def _looks_like_path(text: str) -> bool:
    """A string the user meant as a local path (so a hub lookup would only confuse them)."""
    if text.startswith(("/", "./", "../", "~", "\\")) or text.endswith(("/", os.sep)):
        return True
    if text in (".", ".."):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    return text.lower().endswith(_PATH_LIKE_SUFFIXES)


def _from_records(file: str, records: list[Any], first_row: int = 1) -> RowTable:
    """Rows from in-memory records numbered from `first_row`; each must be a dict."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            got = type(record).__name__
            raise DataError(file, first_row + i, f"expected an object (dict), got {got}")
    origins = [(file, first_row + i) for i in range(len(records))]
    return RowTable([dict(r) for r in records], origins)


def _from_datasets_object(source: Any, split: SplitChoice) -> RowTable | None:
    """Rows of a `datasets.Dataset` / `DatasetDict`, or None if `source` is neither (it cannot
    be one while `datasets` is not imported, so file paths do not pay for importing it)."""
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return None
    if isinstance(source, datasets.DatasetDict):
        source = source[choose_split(source.keys(), split, "<DatasetDict>")]
    if isinstance(source, datasets.IterableDataset):
        return _from_records("<IterableDataset>", list(source))
    if isinstance(source, datasets.Dataset):
        name = source.info.dataset_name or "<Dataset>"
        return _from_records(name, source.to_list())
    return None


def _load_hub(dataset_id: str, split: SplitChoice) -> RowTable:
    """A hub dataset: the named split, or (for preferences) the first of them it has."""
    import datasets

    try:
        if split is None or isinstance(split, str):
            dataset = datasets.load_dataset(dataset_id, split=split or "train")
        else:
            splits = datasets.load_dataset(dataset_id)
            dataset = splits[choose_split(splits.keys(), split, dataset_id)]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the id the user typed
        raise DataError(
            dataset_id,
            None,
            f"not a local file or directory, and loading it as a hub dataset "
            f"failed: {type(exc).__name__}: {exc}",
        ) from exc
    return _from_records(dataset_id, dataset.to_list())


def _data_files(directory: Path) -> list[Path]:
    """The data files under `directory`, sorted by path, hidden files and folders left out."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and data_suffix(p) in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _split_files(directory: Path, files: list[Path], split: SplitChoice) -> list[Path]:
    """The files of the split to read when the files name splits, else all of them (logged)."""
    relative = [f.relative_to(directory) for f in files]
    splits = [split_of(r) for r in relative]
    if all(s is None for s in splits):
        _refuse_split_of_one_file(str(directory), split)
        log.info("%s: reading all %d data files (no split names): %s",
                 directory, len(files), ", ".join(map(str, relative)))
        return files
    if None in splits:
        unnamed = [str(r) for r, s in zip(relative, splits, strict=True) if s is None]
        named = [str(r) for r, s in zip(relative, splits, strict=True) if s is not None]
        raise DataError(
            str(directory), None,
            f"{', '.join(unnamed[:3])} name no split while {', '.join(named[:3])} do; "
            "move the other files out, or point --data at one file",
        )
    chosen = choose_split(splits, split, str(directory))
    picked = [f for f, s in zip(files, splits, strict=True) if s == chosen]
    log.info("%s: split %r (splits found: %s), reading %s", directory, chosen,
             ", ".join(sorted(set(splits))), ", ".join(str(f.relative_to(directory)) for f in picked))
    return picked


def _load_saved_dataset(directory: Path, split: SplitChoice) -> RowTable:
    """A dataset written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(directory))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for bad folders
        raise DataError(str(directory), None, f"cannot read the saved dataset: {exc}") from exc
    if isinstance(saved, datasets.DatasetDict):
        chosen = choose_split(saved.keys(), split, str(directory))
        log.info("%s: split %r of the saved dataset (splits found: %s)",
                 directory, chosen, ", ".join(sorted(saved.keys())))
        return _from_records(str(directory / chosen), saved[chosen].to_list())
    _refuse_split_of_one_file(str(directory), split)
    return _from_records(str(directory), saved.to_list())


def _load_directory(directory: Path, split: SplitChoice) -> RowTable:
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        return _load_saved_dataset(directory, split)
    files = _data_files(directory)
    if not files:
        raise DataError(str(directory), None, f"no data files ({', '.join(DATA_SUFFIXES)})")
    files = _split_files(directory, files, split)
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    for file in files:
        table = _load_file(file)
        rows.extend(table.rows)
        origins.extend(table.origins)
    return RowTable(rows, origins)


def _load_file(path: Path) -> RowTable:
    suffix = data_suffix(path)
    loaders = {
        ".jsonl": _load_jsonl,
        ".json": _load_json,
        ".parquet": _load_parquet,
        ".csv": load_csv,
    }
    if suffix not in loaders:
        raise DataError(
            str(path),
            None,
            f"unsupported file type {suffix or '(none)'!r}; "
            f"expected one of {', '.join(DATA_SUFFIXES)} (or .jsonl.gz, .json.gz, .csv.gz)",
        )
    return loaders[suffix](path)


def _load_jsonl(path: Path) -> RowTable:
    """One JSON object per line; blank lines are skipped but still counted."""
    file = str(path)
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    for line_number, raw in enumerate(binary_lines(path), start=1):
        line = decode_utf8(raw, file, first_line=line_number)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                file, line_number, f"invalid JSON: {exc.msg} (column {exc.colno})"
            ) from exc
        if not isinstance(record, dict):
            raise DataError(
                file, line_number, f"expected a JSON object, got {type(record).__name__}"
            )
        rows.append(record)
        origins.append((file, line_number))
    return RowTable(rows, origins)


def _load_json(path: Path) -> RowTable:
    """A JSON array of objects, an object holding one such array, or (mis-named) JSONL."""
    file = str(path)
    text = decode_utf8(read_bytes(path), file, rows_are_lines=False)
    if not text.strip():
        return RowTable([], [])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: it is really JSON Lines
            return _load_jsonl(path)
        raise DataError(
            file, None, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                file,
                None,
                "expected a JSON array of objects (or an object with exactly one array field)",
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(file, None, f"expected a JSON array of objects, got {type(data).__name__}")
    return _from_records(file, data)


def _load_parquet(path: Path) -> RowTable:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DataError(str(path), None, f"cannot read Parquet: {exc}") from exc
    return _from_records(str(path), records)
