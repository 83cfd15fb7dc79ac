"""Checking what `--model` (or --ref-model, --reward-model, ...) names before anything loads.

A model source is a local directory, an embedded alias, a `.gguf` file or a hub id. These
checks read only file names and safetensors headers, so a typo, a half-copied directory or a
truncated download fails in milliseconds, with the path and what is missing:

- `looks_like_path(name)`: whether the user meant a local path (then a missing one is an
  error, never a hub lookup);
- `check_model_dir(path)`: config, safetensors weights (complete), tokenizer files;
- `check_hub_id(name)`: with HF_HUB_OFFLINE set, the id must be in the local hub cache.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set in the environment, read at call time."""
    return any(os.environ.get(name, "").strip().lower() in _OFFLINE_VALUES
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local path rather than a hub id (`org/model`) or an alias.

    A path: starts with `.`, `~` or `/`, contains a backslash or more than one `/`, ends with
    `.gguf`, exists (as a file or a directory), or its first component exists locally
    (`runs/dpo` when `runs/` is a directory here).
    """
    if name.startswith((".", "~", "/", os.sep)) or "\\" in name or name.count("/") > 1:
        return True
    if name.endswith(".gguf") or os.path.exists(name):
        return True
    if "/" in name:
        head, tail = name.split("/")
        return os.path.isdir(head) or not (_HUB_PART.match(head) and _HUB_PART.match(tail))
    return False


def missing_path_error(name: str, flag: str) -> FileNotFoundError:
    """The error for a path that is not there, naming the deepest part that is."""
    path = Path(os.path.expanduser(name))
    existing = next((p for p in path.parents if p.is_dir()), None)
    where = f" ({existing} exists, {path.relative_to(existing)} does not)" if existing not in (
        None, Path("."), Path("/")) else ""
    return FileNotFoundError(f"{flag} {name}: no such model directory{where}")


def check_safetensors(path: Path) -> None:
    """A ValueError when a safetensors file is truncated or its header is not readable: the
    8-byte header length, the JSON header and the tensors' byte ranges must fit the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_length,) = struct.unpack("<Q", head)
        if 8 + header_length > size:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes; its header alone "
                             f"needs {8 + header_length}); copy or download it again")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    ends = [int(t["data_offsets"][1]) for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        raise ValueError(f"{path}: truncated safetensors file ({size} of {expected} bytes); "
                         "copy or download it again")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files a model directory's weights live in (shards of an index too);
    a FileNotFoundError when a shard the index lists is missing."""
    files = sorted(directory.glob("*.safetensors"))
    for index in directory.glob("*.safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{index}: not a readable safetensors index") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
    return files


def check_model_dir(directory: str | Path, flag: str = "model") -> None:
    """Raise (naming `flag` and the directory) unless it holds what `load_model` reads: a
    config.json (or a PEFT adapter_config.json), complete safetensors weights and tokenizer
    files. Pickle checkpoints (.bin) are named as such: alignkit never unpickles them."""
    directory = Path(directory)
    problems = []
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        problems.append("no config.json")
    weights = weight_files(directory)
    if not weights:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        problems.append(f"no *.safetensors weights (only {', '.join(pickles)}: alignkit never unpickles "
                        "weights; re-save them with safe_serialization=True)" if pickles
                        else "no *.safetensors weights")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the "
                        "tokenizer next to the model with tokenizer.save_pretrained(DIR)")
    if problems:
        raise FileNotFoundError(f"{flag} {directory}: not a loadable model directory: {'; '.join(problems)}")
    for path in weights:
        try:
            check_safetensors(path)
        except ValueError as error:
            raise ValueError(f"{flag} {directory}: {error}") from None


def check_hub_id(name: str, flag: str = "model") -> None:
    """With HF_HUB_OFFLINE set nothing may be downloaded: a hub id must already be in the local
    hub cache (checked without any network access). Without it, nothing is checked here."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"{flag} {name}: not a local directory, and not in the hub cache; HF_HUB_OFFLINE is set, "
            "so nothing can be downloaded: pass a local directory holding config.json, *.safetensors "
            "and the tokenizer files"
        )
