"""What `alignkit tax` and `alignkit safety` share: checking model flags before anything
loads, the shipped text and prompt sets (package data under alignkit/assets), greedy
generation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alignkit.lab.generation_eval import encode_prompts, progress_bar, sample


def check_policy_source(source: str, flag: str) -> None:
    """Raise (naming `flag`) unless `source` is something `load_policy` reads: a LoRA adapter
    directory, a training checkpoint (weights.safetensors beside a run's config.yaml two levels
    up), or any model `load_model` takes (checked without reading weights)."""
    from alignkit.models.loading import check_model_source

    path = Path(source).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return
    if path.is_dir() and (path / "weights.safetensors").is_file() and not (path / "config.json").is_file():
        if not (path.parent.parent / "config.yaml").is_file():
            raise FileNotFoundError(f"{flag} {source}: holds only trainable weights and no run config.yaml "
                                    "two levels up to rebuild the model from")
        return
    check_model_source(source, flag)


def check_counts(options: Any, fields: tuple[str, ...]) -> None:
    """Each named option (None allowed: "all") must be an integer >= 1."""
    for field in fields:
        value = getattr(options, field)
        if value is not None and value < 1:
            raise ValueError(f"--{field.replace('_', '-')} must be >= 1; got {value}")
    if getattr(options, "seed", 0) < 0:
        raise ValueError(f"--seed must be >= 0; got {options.seed}")


def check_output_dir(output: str) -> None:
    """--output names a directory (created later): an existing file there is an error now."""
    if Path(output).is_file():
        raise ValueError(f"--output {output}: is a file; name a directory for the report")


@contextmanager
def flag_named(flag: str) -> Iterator[None]:
    """Prefix the one-line error of a loader with the flag whose value it was loading:
    "--text bad.jsonl, row 2: ..."; an error that already names the flag passes unchanged."""
    try:
        yield
    except FileNotFoundError as error:
        if str(error).startswith(flag):
            raise
        raise FileNotFoundError(f"{flag} {error}") from None
    except ValueError as error:
        if str(error).startswith(flag):
            raise
        raise ValueError(f"{flag} {error}") from None


def _asset(name: str) -> dict[str, Any]:
    return json.loads(resources.files("alignkit").joinpath(f"assets/{name}").read_text(encoding="utf-8"))


def builtin_general_text() -> list[dict[str, str]]:
    """The shipped held-out general-English passages (assets/general_text.json): 200 rows
    {"id", "category", "text"}; categories fact, instruction, narrative, dialogue, everyday, code."""
    return list(_asset("general_text.json")["passages"])


def builtin_safety_prompts() -> dict[str, list[dict[str, str]]]:
    """The shipped safety prompt sets (assets/safety_prompts.json): {"harmful": [...],
    "benign": [...]}, rows {"id", "category", "prompt"}; requests only, no instructions."""
    data = _asset("safety_prompts.json")
    return {"harmful": list(data["harmful"]), "benign": list(data["benign"])}


def load_id_rows(source: str, column: str, flag: str, prefix: str) -> list[dict[str, Any]]:
    """Rows {"id", "category", column} from a data file: `column` is required (a row without it
    is an error naming the file and row), `id` defaults to PREFIX-<row number>, `category` to
    PREFIX; ids must be unique."""
    from alignkit.data import load_rows

    table = load_rows(source)
    rows = []
    for i, row in enumerate(table.rows):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise table.error(i, f"needs a non-empty text '{column}' column")
        rows.append({"id": str(row.get("id") or f"{prefix}-{i + 1:03d}"),
                     "category": str(row.get("category") or prefix), column: value})
    if not rows:
        raise ValueError(f"{flag} {source}: no rows")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["id"] in seen:
            raise table.error(i, f"duplicate id {row['id']!r}")
        seen.add(row["id"])
    return rows


def greedy_completions(model: Any, tokenizer: Any, prompts: list[Any], *, max_new_tokens: int,
                       batch_size: int, progress: bool, who: str) -> tuple[list[str], list[bool]]:
    """One greedy (arg-max) completion per prompt, and whether each hit `max_new_tokens`
    before a stop token. Prompts go through the chat template when the tokenizer has one."""
    ids = encode_prompts(tokenizer, prompts)
    with progress_bar(progress, f"generating ({who})", len(ids), "prompt") as bar:
        drawn = sample(model, tokenizer, ids, 1, max_new_tokens=max_new_tokens, temperature=0.0,
                       max_batch_size=batch_size, progress=bar)
    return [group[0] for group in drawn.texts], list(drawn.truncated)

