"""Allowed ranges of numeric options: `TrainConfig` fields and each algorithm's
hyper-parameters where its paper fixes them (beta > 0 for the DPO family, label smoothing in
[0, 0.5) for conservative / robust DPO, ...). `check_field_ranges` and `check_hparam_ranges`
raise a ValueError naming the key, the range and the value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Interval:
    """A real interval written as in mathematics: "[0, 0.5)", "(0, inf)"."""

    text: str

    def bounds(self) -> tuple[float, float, bool, bool]:
        """(low, high, low included, high included)."""
        low, high = (part.strip() for part in self.text[1:-1].split(","))
        return float(low), float(high), self.text[0] == "[", self.text[-1] == "]"

    def __contains__(self, value: float) -> bool:
        low, high, low_in, high_in = self.bounds()
        if isinstance(value, float) and math.isnan(value):
            return False
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        return above and below

    def describe(self) -> str:
        """">= 1", "> 0", "in [0, 0.5)"."""
        low, high, low_in, _ = self.bounds()
        if math.isinf(high):
            return f"{'>=' if low_in else '>'} {low:g}"
        return f"in {self.text}"


FIELD_RANGES: dict[str, Interval] = {
    name: Interval(text)
    for name, text in {
        "batch_size": "[1, inf)",
        "grad_accum": "[1, inf)",
        "lr": "(0, inf)",
        "epochs": "(0, inf)",
        "max_length": "[2, inf)",
        "max_prompt_length": "[1, inf)",
        "seed": "[0, inf)",
        "warmup_ratio": "[0, 1]",
        "weight_decay": "[0, inf)",
        "max_grad_norm": "[0, inf)",
        "lora_r": "[0, inf)",
        "lora_alpha": "(0, inf)",
        "lora_dropout": "[0, 1)",
        "hft_round_steps": "[0, inf)",
        "save_steps": "[0, inf)",
        "save_total_limit": "[1, inf)",
        "logging_steps": "[1, inf)",
        "eval_steps": "[0, inf)",
        "eval_samples": "[1, inf)",
        "logp_chunk_size": "[1, inf)",
        "reward_timeout": "[0, inf)",  # 0: no limit (alignkit.rewards.runner)
        "reward_workers": "[0, inf)",
        "threads": "[0, inf)",
    }.items()
}

POSITIVE, NON_NEGATIVE, UNIT = Interval("(0, inf)"), Interval("[0, inf)"), Interval("[0, 1]")
HALF_OPEN_HALF = Interval("[0, 0.5)")

PAIRWISE_RANGES: dict[str, Interval] = {"beta": POSITIVE}
"""Every loss of the pairwise family: beta scales the log-ratio margin (0 = no signal)."""

HPARAM_RANGES: dict[str, dict[str, Interval]] = {
    "cdpo": {"label_smoothing": HALF_OPEN_HALF},  # eps >= 0.5 flips the preference
    "rdpo": {"label_smoothing": HALF_OPEN_HALF},  # divides by 1 - 2 eps
    "exo": {"label_smoothing": Interval("(0, 1)")},
    "aot": {"label_smoothing": HALF_OPEN_HALF},
    "simpo": {"label_smoothing": HALF_OPEN_HALF, "gamma": NON_NEGATIVE},
    "cpo": {"label_smoothing": HALF_OPEN_HALF, "alpha": NON_NEGATIVE},
    "rpo": {"alpha": NON_NEGATIVE},
    "orpo": {"lambda_": NON_NEGATIVE},
    "cpl": {"lambda_": Interval("(0, 1]"), "bc_weight": NON_NEGATIVE},
    "discopop": {"tau": POSITIVE},
    "fdpo": {"alpha_div": Interval("(0, 1)")},
    "treg": {"beta": POSITIVE, "alpha": NON_NEGATIVE, "gamma": NON_NEGATIVE},
    "listwise_dpo": {"beta": POSITIVE},
    "pro": {"sft_weight": NON_NEGATIVE},
    "kto": {"beta": POSITIVE, "desirable_weight": POSITIVE, "undesirable_weight": POSITIVE},
    "ift": {"gamma": UNIT},
    "iq_learn": {"lambda_": NON_NEGATIVE, "gamma": UNIT, "temperature": POSITIVE},
    "rm": {"center_rewards_coefficient": NON_NEGATIVE},
    "cost": {"reg": NON_NEGATIVE},
    "rm_ensemble": {"members": Interval("[1, inf)"), "uwo_lambda": NON_NEGATIVE},
    "rm_multi": {"val_fraction": Interval("(0, 1)"), "gate_dropout": Interval("[0, 1)"),
                 "temperature": POSITIVE, "gate_width": Interval("[1, inf)")},
}
for _alol in ("alol", "alol_ref_free", "alol_seq", "alol_kl"):
    HPARAM_RANGES[_alol] = {"clip_epsilon": Interval("(0, 1)"), "kl_beta": NON_NEGATIVE,
                            "value_samples": Interval("[1, inf)"), "value_max_new_tokens": Interval("[1, inf)"),
                            "value_temperature": POSITIVE, "value_ridge": NON_NEGATIVE}

ONLINE_RANGES: dict[str, Interval] = {
    "max_new_tokens": Interval("[1, inf)"),
    "temperature": POSITIVE,
    "top_p": Interval("(0, 1]"),
    "top_k": NON_NEGATIVE,
    "reward_clip": POSITIVE,
    "beta": NON_NEGATIVE,
    "kl_target": POSITIVE,
    "kl_horizon": POSITIVE,
    "gamma": UNIT,
    "lam": UNIT,
    "advantage_clip": POSITIVE,
    "remax_clip": POSITIVE,
    "eps_low": Interval("[0, 1)"),
    "eps_high": NON_NEGATIVE,
    "clip_ratio_c": Interval("(1, inf)"),  # dual-clip PPO's c > 1
    "micro_batch_size": NON_NEGATIVE,
    "logprob_micro_batch_size": NON_NEGATIVE,
    "tis_cap": NON_NEGATIVE,
    "critic_lr": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "cliprange_value": POSITIVE,
    "critic_warmup_steps": NON_NEGATIVE,
    "label_smoothing": HALF_OPEN_HALF,
    "generation_batch_size": NON_NEGATIVE,
}
ONLINE_PAIRWISE_RANGES: dict[str, Interval] = {"beta": POSITIVE}
"""online_dpo (objective=pairwise): beta is DPO's, so it must be > 0."""


def out_of_range(key: str, value: Any, interval: Interval) -> str | None:
    """'KEY must be > 0, got -1' when a number lies outside `interval`, else None
    (None and non-numbers are the type checks' business)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if value in interval else f"{key} must be {interval.describe()}, got {value!r}"


def first_problem(values: dict[str, Any], ranges: dict[str, Interval]) -> str | None:
    """The first out-of-range message among `values` for the keys `ranges` knows."""
    for key, value in values.items():
        if key in ranges and (problem := out_of_range(key, value, ranges[key])):
            return problem
    return None


def check_field_ranges(values: dict[str, Any]) -> None:
    """Raise for the first TrainConfig value outside its range (named as its flag)."""
    problem = first_problem({"--" + k.replace("_", "-"): v for k, v in values.items()},
                            {"--" + k.replace("_", "-"): r for k, r in FIELD_RANGES.items()})
    if problem:
        raise ValueError(problem)
    max_steps = values.get("max_steps", -1)
    if isinstance(max_steps, int) and max_steps != -1 and max_steps < 1:
        raise ValueError(f"--max-steps must be -1 (derive the steps from --epochs) or >= 1, got {max_steps}")


def hparam_ranges(algorithm: str, kind: str, components: list[str], online_pairwise: bool) -> dict[str, Interval]:
    """The ranges that apply to `algorithm`'s hyper-parameters: the pairwise family's and
    each component loss's (a `loss_weights` mix), or the online loop's."""
    if kind == "online":
        return {**ONLINE_RANGES, **(ONLINE_PAIRWISE_RANGES if online_pairwise else {})}
    ranges: dict[str, Interval] = dict(PAIRWISE_RANGES) if kind == "pairwise" else {}
    for name in [algorithm, *components]:
        ranges.update(HPARAM_RANGES.get(name, {}))
    return ranges


def check_hparam_ranges(algorithm: str, hparams: dict[str, Any], ranges: dict[str, Interval]) -> None:
    """Raise for the first given hyper-parameter outside its range."""
    problem = first_problem(hparams, ranges)
    if problem:
        raise ValueError(f"{algorithm}: {problem} (--set {problem.split()[0]}=...)")
