"""Data of the diffusion trainers, validated up front with errors naming file, row and problem.

- image pairs (d3po): `prompt`, `image_chosen`, `image_rejected`; each image a path relative to
  the data file (or absolute), a PIL image, or a `{"bytes", "path"}` dict (a `datasets` Image
  feature); every image is opened once (PIL verify) before training starts;
- prompts (prdp, and d3po with --reward): `prompt`; other columns are passed to the reward.
  Without --data, the shipped prompt set (alignkit/assets/diffusion_prompts.json) is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from alignkit.data import DataError, RowTable, load_rows
from alignkit.data.images import image_base_dir, open_image

PAIR_COLUMNS = ("prompt", "image_chosen", "image_rejected")
BUILTIN_PROMPTS = "<built-in prompts: alignkit/assets/diffusion_prompts.json>"


@dataclass
class PromptRows:
    """Prompts and the other columns of their rows (passed to the reward), one list per column."""

    prompts: list[str]
    columns: dict[str, list[Any]]
    origin: str

    def take(self, indices: list[int]) -> tuple[list[str], dict[str, list[Any]]]:
        return [self.prompts[i] for i in indices], {k: [v[i] for i in indices] for k, v in self.columns.items()}


@dataclass
class ImagePairs:
    """Validated preference pairs of images; `images(i)` opens row i's (chosen, rejected)."""

    table: RowTable

    def __len__(self) -> int:
        return len(self.table.rows)

    @property
    def prompts(self) -> list[str]:
        return [row["prompt"] for row in self.table.rows]

    def images(self, i: int) -> tuple[Any, Any]:
        base = image_base_dir(self.table.origin(i)[0])
        row = self.table.rows[i]
        return open_image(row["image_chosen"], base), open_image(row["image_rejected"], base)


def _load(source: Any, role: str) -> RowTable:
    table = load_rows(source)
    if len(table) == 0:
        raise DataError(str(source), None, f"the {role} data has no rows")
    return table


def check_prompt(table: RowTable, i: int) -> None:
    prompt = table.rows[i].get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise table.error(i, f"column 'prompt' must be a non-empty string, got {prompt!r}")


def load_image_pairs(source: Any) -> ImagePairs:
    """Rows with prompt, image_chosen, image_rejected; every image checked readable."""
    table = _load(source, "training")
    for i, row in enumerate(table.rows):
        missing = [column for column in PAIR_COLUMNS if row.get(column) is None]
        if missing:
            raise table.error(i, f"missing column {missing[0]!r}: d3po image pairs need "
                                 f"{', '.join(PAIR_COLUMNS)} (got {sorted(row)})")
        check_prompt(table, i)
        base = image_base_dir(table.origin(i)[0])
        for column in PAIR_COLUMNS[1:]:
            try:
                open_image(row[column], base, verify_only=True)
            except ValueError as error:
                raise table.error(i, f"column {column!r}: {error}") from None
    return ImagePairs(table)


def has_image_pairs(source: Any) -> bool:
    """Whether the first row of `source` names image_chosen (pairs) rather than prompts only."""
    table = _load(source, "training")
    return "image_chosen" in table.rows[0] or "image_rejected" in table.rows[0]


def load_prompts(source: Any) -> PromptRows:
    """The `prompt` column (and the others, for the reward) of `source`; the shipped prompts when None."""
    if source is None:
        shipped = json.loads(resources.files("alignkit").joinpath("assets/diffusion_prompts.json").read_text())
        return PromptRows([f"a photo of a {name}" for name in shipped["prompts"]], {}, BUILTIN_PROMPTS)
    table = _load(source, "training")
    for i, row in enumerate(table.rows):
        if "prompt" not in row:
            raise table.error(i, f"missing column 'prompt' (got {sorted(row)})")
        check_prompt(table, i)
    names = [c for c in table.columns if c != "prompt"]
    columns = {c: [row.get(c) for row in table.rows] for c in names}
    return PromptRows([row["prompt"] for row in table.rows], columns, table.origin(0)[0])
