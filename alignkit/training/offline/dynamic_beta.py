"""MM-DPO's reward margins for `--set dynamic_beta=W` (MM-RLHF dynamic reward scaling): each
pair's delta = r(x, y_w) - r(x, y_l), from a `reward_margin` column or scored once before
training by the reward model `dynamic_beta_rm` (through `RewardModelScorer`, which reads image
rows and context columns exactly as the reward model was trained), stored in every example's
extras as `reward_margin`; the loss turns them into per-pair betas with `mm_dpo_beta`."""

from __future__ import annotations

import gc
import math
from typing import Any

from alignkit.data.formats import split_implicit_prompt
from alignkit.data.images import image_base_dir, open_image

MARGIN_COLUMN = "reward_margin"


def margins_from_column(table, examples) -> None:
    """Check every example's `reward_margin` extra (copied from the column) is a finite number."""
    for example in examples:
        value = example.extras.get(MARGIN_COLUMN)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise table.error(
                example.row,
                f"dynamic_beta needs a numeric {MARGIN_COLUMN!r} column (or --set dynamic_beta_rm=DIR), "
                f"got {table.rows[example.row].get(MARGIN_COLUMN)!r}",
            )


def _scoring_columns(table, indices: list[int]) -> tuple[list[Any], list[Any], list[Any], dict[str, list[Any]]]:
    """(prompts, chosen, rejected, other columns) of the rows `indices`, images opened from the
    data file's directory (the scorer has no file to resolve relative paths against)."""
    prompts, chosen, rejected = [], [], []
    columns: dict[str, list[Any]] = {}
    for i in indices:
        row = split_implicit_prompt(table.rows[i])  # as tokenising does
        prompts.append(row["prompt"])
        chosen.append(row["chosen"])
        rejected.append(row["rejected"])
        for key, value in row.items():
            if key not in ("prompt", "chosen", "rejected"):
                columns.setdefault(key, []).append(value)
    if "images" in columns:
        base = [image_base_dir(table.origin(i)[0]) for i in indices]
        columns["images"] = [[open_image(item, b) for item in (items or [])] for items, b in zip(columns["images"], base, strict=True)]
    return prompts, chosen, rejected, columns


def margins_from_reward_model(path: str, splits: dict[str, tuple[Any, list]], config, device) -> None:
    """Score chosen and rejected of every example with the reward model at `path`; store the
    margins as `extras['reward_margin']`; the model is freed afterwards."""
    from alignkit.rewards.scorer import RewardModelScorer

    scorer = RewardModelScorer(
        path, device=str(device), dtype=None if config.dtype == "auto" else config.dtype,
        batch_size=config.batch_size, max_length=config.max_length,
    )
    for table, examples in splits.values():
        if table is None or not examples:
            continue
        prompts, chosen, rejected, columns = _scoring_columns(table, [ex.row for ex in examples])
        margins = scorer.raw_scores(prompts, chosen, **columns) - scorer.raw_scores(prompts, rejected, **columns)
        if margins.dim() != 1:
            raise ValueError(f"dynamic_beta_rm {path}: a reward model with one output is needed, got {tuple(margins.shape)}")
        for example, margin in zip(examples, margins.tolist(), strict=True):
            example.extras[MARGIN_COLUMN] = float(margin)
    del scorer
    gc.collect()


def attach_reward_margins(task, model, splits: dict[str, tuple[Any, list]]) -> None:
    """The margins MM-DPO's beta reads, from `dynamic_beta_rm` or the `reward_margin` column."""
    if task.options.dynamic_beta_rm:
        device = next(model.parameters()).device
        margins_from_reward_model(task.options.dynamic_beta_rm, splits, task.config, device)
        return
    for table, examples in splits.values():
        if table is not None:
            margins_from_column(table, examples)
