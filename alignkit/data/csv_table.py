"""CSV files: a header line, then one record per row (quoted records may span lines).

Cells are text. Text columns (prompt, chosen, ids, ...) stay strings whatever they look like;
number columns (margin, score, ...) are converted cell by cell, a cell that is not a number
being an error at its line; any other column becomes int, float or bool when every one of its
cells parses as such (rating attributes, labels), and stays text otherwise.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignkit.data.columns import NUMBER_COLUMNS, is_text_column
from alignkit.data.encoding import decode_utf8, read_bytes
from alignkit.data.errors import DataError
from alignkit.data.table import RowTable


def load_csv(path: Path) -> RowTable:
    """Rows of a CSV file; each row's origin is the line its record starts on (header = 1)."""
    file = str(path)
    text = decode_utf8(read_bytes(path), file)
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
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
    table = RowTable(rows, origins)
    for column in header:
        if column in NUMBER_COLUMNS:
            _convert_number_column(table, column)
        elif not is_text_column(column):
            _convert_if_all_parse(rows, column)
    return table


def _convert_number_column(table: RowTable, column: str) -> None:
    """Every cell of `column` to a float; a cell that is not a number is an error at its line."""
    for i, row in enumerate(table.rows):
        try:
            row[column] = float(row[column])
        except ValueError:
            raise table.error(i, f"column '{column}' must be a number, got {row[column]!r}") from None


def _convert_if_all_parse(rows: list[dict[str, Any]], column: str) -> None:
    """Turn a column into bool, int or float when every one of its cells parses as such."""
    values = [row[column] for row in rows]
    if not values:
        return
    converters: tuple[Callable[[str], Any], ...] = (_to_bool, int, float)
    for convert in converters:
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
