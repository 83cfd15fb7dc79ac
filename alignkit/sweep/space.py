"""The search space of `alignkit sweep`, its seeds and its metric's direction: parsing and checks.

A space file is a YAML mapping of keys (TrainConfig fields such as `lr`, or algorithm
hyper-parameters such as `beta`, as `--set` takes them) to distributions:

    lr:        {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    beta:      {type: float, low: 0.05, high: 0.5}
    lora_r:    {type: int, low: 4, high: 16, step: 4}
    scheduler: {type: categorical, choices: [cosine, constant]}

Every error names the file, the key and the problem; nothing here loads a model or data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Keys the sweep sets itself (each trial's seed and run directory) or that would break it.
RESERVED_KEYS = ("seed", "output", "resume", "overwrite", "override", "progress")

_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class Distribution:
    """One key's distribution: `kind` float | int | categorical; `low`/`high` inclusive bounds,
    `log` (sample log-uniformly) and `step` for numbers, `choices` for categorical."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def to_optuna(self):
        """The matching `optuna.distributions` object."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return CategoricalDistribution(self.choices)

    def extremes(self) -> list[Any]:
        """The values that bound what can be sampled: low and high, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def _is_number(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, int | float)


def parse_distribution(key: str, spec: Any, source: str = "space") -> Distribution:
    """One `key: {type: ..., ...}` entry -> Distribution; a bad entry is a ValueError naming
    `source` and `key`.

    >>> parse_distribution("lr", {"type": "float", "low": 1e-5, "high": 1e-3, "log": True})
    Distribution(kind='float', low=1e-05, high=0.001, log=True, step=None, choices=())
    """
    where = f"{source}: key {key!r}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping such as {{type: float, low: 0.1, high: 1}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in _FIELDS:
        raise ValueError(f"{where}: type must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(spec) - _FIELDS[kind])
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for type {kind}; allowed: {sorted(_FIELDS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if not (c is None or isinstance(c, bool | int | float | str))]
        if bad:
            raise ValueError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"{where}: choices repeat a value: {choices}")
        return Distribution("categorical", choices=tuple(choices))
    for bound in ("low", "high"):
        if bound not in spec:
            raise ValueError(f"{where}: {bound} is required for type {kind}")
        if not _is_number(spec[bound], kind) or not math.isfinite(spec[bound]):
            raise ValueError(f"{where}: {bound} must be a finite {'integer' if kind == 'int' else 'number'}, "
                             f"got {spec[bound]!r}")
    low, high = spec["low"], spec["high"]
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, got {log!r}")
    if low > high:
        raise ValueError(f"{where}: low ({low}) is above high ({high})")
    if log and low <= 0:
        raise ValueError(f"{where}: log: true needs low > 0, got low={low}")
    if step is not None:
        if not _is_number(step, kind) or step <= 0:
            raise ValueError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, "
                             f"got {step!r}")
        if log and (kind == "float" or step != 1):
            raise ValueError(f"{where}: step and log: true cannot be combined")
    if kind == "float":
        return Distribution("float", float(low), float(high), log, None if step is None else float(step))
    return Distribution("int", low, high, log, step)


def parse_space(values: Any, source: str = "space") -> dict[str, Distribution]:
    """A whole space mapping -> {key: Distribution}, in file order. Keys with dashes are
    normalised to underscores (as `--set` does); reserved keys are refused.

    >>> sorted(parse_space({"beta": {"type": "categorical", "choices": [0.1, 0.5]}}))
    ['beta']
    """
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{source}: a space must be a non-empty YAML mapping of keys to distributions")
    space: dict[str, Distribution] = {}
    for raw_key, spec in values.items():
        if not isinstance(raw_key, str) or not raw_key.strip():
            raise ValueError(f"{source}: key {raw_key!r} must be a config field or hyper-parameter name")
        key = raw_key.strip().replace("-", "_")
        if key in RESERVED_KEYS:
            raise ValueError(f"{source}: key {raw_key!r} is set by the sweep itself (reserved: "
                             f"{', '.join(RESERVED_KEYS)}); use --tune-seeds / --test-seeds / --output")
        if key in space:
            raise ValueError(f"{source}: key {raw_key!r} given twice")
        space[key] = parse_distribution(raw_key, spec, source)
    return space


def load_space(path: str | Path) -> dict[str, Distribution]:
    """`parse_space` of a YAML file (YAML 1.2 numbers, so 1e-4 is a float); errors name the file."""
    from alignkit.training.run.values import load_yaml_file

    return parse_space(load_yaml_file(path), str(path))


def space_to_dict(space: dict[str, Distribution]) -> dict[str, dict[str, Any]]:
    """The space as plain data (written to sweep.json and compared on --resume)."""
    out = {}
    for key, dist in space.items():
        if dist.kind == "categorical":
            out[key] = {"type": "categorical", "choices": list(dist.choices)}
        else:
            out[key] = {"type": dist.kind, "low": dist.low, "high": dist.high, "log": dist.log}
            if dist.step is not None:
                out[key]["step"] = dist.step
    return out


def parse_seeds(text: str, flag: str) -> list[int]:
    """`"0,1"` -> [0, 1]; each a non-negative integer, none repeated; errors name `flag`.

    >>> parse_seeds("100, 101,102", "--test-seeds")
    [100, 101, 102]
    """
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"{flag} {text!r}: expected comma-separated non-negative integers, got {part!r}")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{flag} {text!r}: a seed is repeated")
    return seeds


def check_disjoint_seeds(tune_seeds: list[int], test_seeds: list[int]) -> None:
    """Tuning and test seeds must not share a seed: a configuration chosen on a seed and scored
    on it again reports its tuning luck as performance (Eimer et al. 2023)."""
    shared = sorted(set(tune_seeds) & set(test_seeds))
    if shared:
        raise ValueError(f"--test-seeds must be disjoint from --tune-seeds; both contain {shared}")


def default_direction(metric: str) -> str:
    """minimize for losses and KL, maximize for rewards, accuracies and pass@k; anything else
    must be given with --direction.

    >>> default_direction("eval/loss"), default_direction("reward/mean")
    ('minimize', 'maximize')
    """
    leaf = metric.rsplit("/", 1)[-1]
    if leaf.endswith("loss") or leaf == "kl":
        return "minimize"
    if metric.startswith(("reward", "rewards/", "eval/reward", "eval/gold", "eval/pass@")) or leaf == "accuracies":
        return "maximize"
    raise ValueError(f"--metric {metric}: cannot tell whether to maximize or minimize it; pass --direction")
