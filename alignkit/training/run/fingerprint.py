"""Content hashes: of files and directories, of rows, of tokenised examples, of a model's
weights and of a tokenizer. A run directory's `run.json` and its caches are keyed by them, so a
run never continues with, or reuses values computed from, other data or another model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

CHUNK = 1 << 20
# Files of a model directory that hold (or describe) its weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def directory_digest(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative names and bytes of every file under `path` (sorted), only those
    ending in one of `suffixes` when given; hidden files are skipped."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if suffixes is not None and not file.name.endswith(suffixes):
            continue
        digest.update(str(relative).encode() + b"\0" + file_digest(file).encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """A JSON stand-in for values json cannot write (tensors, arrays, paths, callables)."""
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if callable(value):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}>"
    return str(value)


def canonical(value: Any) -> Any:
    """`value` as plain JSON types (what json.dumps(sort_keys) then json.loads gives)."""
    return json.loads(json.dumps(value, sort_keys=True, default=_jsonable))


def rows_digest(rows: Iterable[Any]) -> str:
    """sha256 of rows (dicts or dataclasses), each written as canonical JSON."""
    digest = hashlib.sha256()
    for row in rows:
        if dataclasses.is_dataclass(row) and not isinstance(row, type):
            row = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
        digest.update(json.dumps(row, sort_keys=True, default=_jsonable).encode() + b"\n")
    return digest.hexdigest()


def source_digest(source: Any) -> str | None:
    """Content hash of a data source: a file's bytes, every file of a directory, the rows of an
    in-memory table / list / `datasets.Dataset`; `hub:<id>` for a name that is not a local
    path (a hub id: its content is what that id serves); None for no source."""
    if source is None:
        return None
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_file():
            return file_digest(path)
        if path.is_dir():
            return "dir:" + directory_digest(path)
        return f"hub:{source}"
    fingerprint = getattr(source, "_fingerprint", None)  # datasets.Dataset
    if isinstance(fingerprint, str):
        return f"dataset:{fingerprint}"
    rows = getattr(source, "rows", source)  # RowTable, or a list of dicts
    if not isinstance(rows, list | tuple):  # e.g. a generator: hashing it would consume it
        return f"object:{type(source).__name__}"
    return rows_digest(rows)


def examples_digest(*splits: Iterable[Any]) -> str:
    """sha256 of tokenised examples (their token ids, rows and extras), split after split."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(rows_digest(split or []).encode())
    return digest.hexdigest()


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state: every tensor's name, dtype, shape and bytes (GPU tensors are
    copied to the CPU one at a time)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach()
        if hasattr(value, "full_tensor"):  # a DTensor shard: hash the whole tensor
            value = value.full_tensor()
        value = value.contiguous().cpu()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy())  # the bytes, not copied
    return digest.hexdigest()


def model_source_digest(name_or_path: str) -> str:
    """Hash of the weight files of a local model directory (or a file); `name:<id>` otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return "dir:" + directory_digest(path, WEIGHT_SUFFIXES)
    return f"name:{name_or_path}"


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what turns text into ids: the vocabulary, special tokens and chat template."""
    values = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=_jsonable).encode()).hexdigest()
