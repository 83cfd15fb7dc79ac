"""Bytes of a data file to text: UTF-8, a leading byte-order mark dropped, and a byte that is
not UTF-8 reported at its line. A `.gz` file (`train.jsonl.gz`, as HH-RLHF is published) is
decompressed on the way."""

from __future__ import annotations

import codecs
import gzip
from collections.abc import Iterator
from pathlib import Path, PurePath

from alignkit.data.errors import DataError


def data_suffix(path: PurePath) -> str:
    """The suffix naming a file's format, looking through `.gz`: `train.jsonl.gz` -> `.jsonl`."""
    name = path.name.lower()
    return PurePath(name.removesuffix(".gz")).suffix if name.endswith(".gz") else PurePath(name).suffix


def read_bytes(path: Path) -> bytes:
    """The bytes of `path`, decompressed when it ends in `.gz`."""
    if not path.name.lower().endswith(".gz"):
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(str(path), None, f"cannot decompress: {exc}") from exc


def binary_lines(path: Path) -> Iterator[bytes]:
    """The lines of `path` as bytes (decompressed when it ends in `.gz`)."""
    if not path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            yield from handle
        return
    try:
        with gzip.open(path, "rb") as handle:
            yield from handle
    except (OSError, EOFError) as exc:
        raise DataError(str(path), None, f"cannot decompress: {exc}") from exc


def strip_bom(data: bytes) -> bytes:
    """`data` without a leading UTF-8 byte-order mark (Excel and Notepad write one)."""
    return data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data


def decode_utf8(data: bytes, file: str, *, first_line: int = 1, rows_are_lines: bool = True) -> str:
    """Decode `data` (which starts at line `first_line` of `file`) as UTF-8 without a BOM.

    A byte that is not UTF-8 raises `DataError` naming its line: as the error's row when the
    file's rows are its lines (JSONL, CSV), inside the message otherwise (a JSON array).
    """
    data = strip_bom(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        position = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = (
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at position {position} of the line)"
            f"{_encoding_hint(data)}; re-save the file as UTF-8"
        )
        if rows_are_lines:
            raise DataError(file, line, problem) from None
        raise DataError(file, None, f"line {line}: {problem}") from None


def _encoding_hint(data: bytes) -> str:
    """A short guess at the encoding the file is really in, when its first bytes tell."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return ", the file looks UTF-16 encoded"
    return ""
