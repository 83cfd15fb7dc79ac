"""`load_rows`: read a dataset from a file, a directory, a `datasets` object, a list or the hub.

Every row keeps its origin `(file, 1-based row)` so later validation errors can point at the
exact place an editor shows: the line for JSONL and CSV (header = line 1), the record index
for JSON arrays, Parquet and in-memory data.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from alignkit.data.errors import DataError
from alignkit.data.table import RowTable

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_PATH_LIKE_SUFFIXES = DATA_SUFFIXES + (".txt", ".tsv", ".gz", ".zst", ".arrow", ".ndjson")


def load_rows(source: Any, *, split: str = "train") -> RowTable:
    """Load rows from any supported source and remember where each came from.

    `source` may be: a path to a `.jsonl`, `.json`, `.parquet` or `.csv` file; a directory
    of such files (sorted by path and concatenated, each row keeping its own file name); a
    `datasets.Dataset`; a `datasets.DatasetDict` (the `split` is taken); a list of dicts
    (origin `"<list>"`); or a hub dataset id, loaded with `datasets.load_dataset(source,
    split=split)`. A path that does not exist raises `DataError` instead of a hub lookup.
    """
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
        table = _load_directory(path)
    elif path.is_file():
        table = _load_file(path)
    elif isinstance(source, os.PathLike) or _looks_like_path(os.fspath(source)):
        raise DataError(os.fspath(source), None, "no such file or directory")
    else:
        table = _load_hub(str(source), split)
    if len(table) == 0:
        raise DataError(os.fspath(source), None, "the dataset has no rows")
    return table


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


def _from_datasets_object(source: Any, split: str) -> RowTable | None:
    """Rows of a `datasets.Dataset` / `DatasetDict`, or None if `source` is neither."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError("<DatasetDict>", None, f"no split {split!r}; it has {sorted(source)}")
        source = source[split]
    if isinstance(source, datasets.IterableDataset):
        return _from_records("<IterableDataset>", list(source))
    if isinstance(source, datasets.Dataset):
        name = source.info.dataset_name or "<Dataset>"
        return _from_records(name, source.to_list())
    return None


def _load_hub(dataset_id: str, split: str) -> RowTable:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - re-raised with the id the user typed
        raise DataError(
            dataset_id,
            None,
            f"not a local file or directory, and loading it as a hub dataset "
            f"failed: {type(exc).__name__}: {exc}",
        ) from exc
    return _from_records(dataset_id, dataset.to_list())


def _load_directory(directory: Path) -> RowTable:
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise DataError(str(directory), None, f"no data files ({', '.join(DATA_SUFFIXES)})")
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    for file in files:
        table = _load_file(file)
        rows.extend(table.rows)
        origins.extend(table.origins)
    return RowTable(rows, origins)


def _load_file(path: Path) -> RowTable:
    suffix = path.suffix.lower()
    loaders = {
        ".jsonl": _load_jsonl,
        ".json": _load_json,
        ".parquet": _load_parquet,
        ".csv": _load_csv,
    }
    if suffix not in loaders:
        raise DataError(
            str(path),
            None,
            f"unsupported file type {suffix or '(none)'!r}; "
            f"expected one of {', '.join(DATA_SUFFIXES)}",
        )
    return loaders[suffix](path)


def _load_jsonl(path: Path) -> RowTable:
    """One JSON object per line; blank lines are skipped but still counted."""
    file = str(path)
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
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
    text = path.read_text(encoding="utf-8")
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


def _load_csv(path: Path) -> RowTable:
    """CSV with a header line; numeric and true/false columns are converted column-wise."""
    file = str(path)
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return RowTable([], [])
        if len(set(header)) != len(header):
            raise DataError(file, 1, f"duplicate column names in header {header}")
        start_line = reader.line_num + 1
        for record in reader:
            line, start_line = start_line, reader.line_num + 1  # records may span lines
            if not record:
                continue  # blank line
            if len(record) != len(header):
                raise DataError(file, line, f"expected {len(header)} fields, found {len(record)}")
            rows.append(dict(zip(header, record, strict=True)))
            origins.append((file, line))
    for column in header:
        _convert_csv_column(rows, column)
    return RowTable(rows, origins)


def _convert_csv_column(rows: list[dict[str, Any]], column: str) -> None:
    """Turn a column into int, float or bool when every one of its values parses as such."""
    values = [row[column] for row in rows]
    if not values:
        return
    for convert in (_to_bool, int, float):
        try:
            converted = [convert(value) for value in values]
        except ValueError:
            continue
        for row, value in zip(rows, converted, strict=True):
            row[column] = value
        return


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError(text)
