"""`alignkit eval-rm --r2`: score held-out samples that carry a ground-truth score with a reward
model and report, per PF-PPO filter, how well the reward predicts the true score (R² of a
linear fit, Pearson r, samples kept, slope and intercept; `alignkit.eval.policy_filter`).

Samples are SFT-format rows: `prompt` + `completion` (text or conversations) or `messages`
(the last assistant turn is the completion), plus a numeric true-score column (`score` unless
`--score-column` names another). Samples of the same prompt form its group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from alignkit.data import RowTable, validate_rows
from alignkit.data.row_checks import number_problem
from alignkit.eval.policy_filter import filter_r2, r2_table_rows
from alignkit.eval.stats import format_table


def _prompt_and_completion(row: Mapping[str, Any]) -> tuple[Any, Any]:
    """(prompt, completion) of a validated SFT row; a `messages` row splits before its last
    assistant turn."""
    if row.get("completion") is None and row.get("messages") is not None:
        messages = list(row["messages"])
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last:]
    return row["prompt"], row["completion"]


def _true_score(table: RowTable, i: int, column: str) -> float:
    """Row i's true score: a finite number (a CSV cell is text, so it is parsed first)."""
    row = table.rows[i]
    if row.get(column) is None:
        present = ", ".join(table.columns)
        raise table.error(i, f"column '{column}' (the true score) is missing; the rows have {present} "
                             "(--score-column names another column)")
    value = row[column]
    if isinstance(value, str) and table.origin(i)[0].lower().endswith(".csv"):
        try:
            value = float(value)
        except ValueError:
            raise table.error(i, f"column '{column}' (the true score) must be a number, got {value!r}") from None
    problem = number_problem(column, value)
    if problem:
        raise table.error(i, problem + " (the true score)")
    return float(value)


def scored_samples(table: RowTable, score_column: str = "score") -> tuple[list[Any], list[Any], list[float]]:
    """(prompts, completions, true scores) of every row; a row without a prompt and completion
    (or messages), or without a finite number in `score_column`, is a DataError naming its file
    and row."""
    validate_rows(table, "sft")
    prompts, completions = zip(*(_prompt_and_completion(row) for row in table.rows), strict=True)
    scores = [_true_score(table, i, score_column) for i in range(len(table))]
    return list(prompts), list(completions), scores


def evaluate_filters(
    score: Callable[[list[Any], list[Any]], Any],
    table: RowTable,
    *,
    score_column: str = "score",
    seed: int = 0,
) -> dict[str, Any]:
    """Reward every sample with `score(prompts, completions) -> (n,)` and fit the true score on
    it over each filter's kept samples (`filter_r2`); adds `score_column` and the rewards'
    mean and std to the result."""
    prompts, completions, true_scores = scored_samples(table, score_column)
    rewards = score(prompts, completions)
    if hasattr(rewards, "detach"):
        rewards = rewards.detach().float().cpu().numpy()
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != (len(prompts),):
        raise ValueError(f"{table.source}: the reward model gave shape {tuple(rewards.shape)} for "
                         f"{len(prompts)} samples; --r2 needs one scalar reward per sample")
    result = filter_r2(rewards, true_scores, prompts, seed=seed)
    return {"score_column": score_column, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(ddof=1)) if rewards.size > 1 else 0.0, **result}


def format_filter_r2(result: dict[str, Any]) -> str:
    """The terminal report of `evaluate_filters`: a title line, one table row per filter, and
    a line per note (undefined R², groups of one)."""
    title = (f"R² of the true score '{result['score_column']}' on the reward, per PF-PPO filter: "
             f"{result['n_samples']} samples in {result['n_groups']} prompt groups")
    notes = [f"note: {name}: {values['note']}" for name, values in result["filters"].items() if values["note"]]
    return "\n".join([title, format_table(r2_table_rows(result)), *notes])
