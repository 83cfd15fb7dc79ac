"""Constraint judges for CGPO's mixture of judges: rule-based and LLM judges that say, per sample,
whether a constraint is satisfied (`--set judges=SPEC|SPEC|...`).

Judge specs, separated by `|` (write `\\|` for a literal bar inside a regex):

| spec                       | satisfied when                                                        |
|----------------------------|-----------------------------------------------------------------------|
| `regex:PATTERN`            | `re.search(PATTERN, completion)` matches (`RegexMatch`)               |
| `json_valid`               | the completion (or its first ```json block) parses (`JsonValid`)      |
| `max_words:N`              | the completion has at most N whitespace-separated words               |
| `max_chars:N`              | the completion has at most N characters                               |
| `judge:MODEL[,opts]`       | the LLM judge's P(Yes) >= threshold (inline `threshold=`, default 0.5) |
| `module:fn` / `file.py:fn` | the function's score >= 0.5 (return 1/0, or a probability)            |

The LLM judge is `alignkit.rewards.judge.LLMJudge` in pointwise mode, its options inline as for
`--reward judge:` (`judge:smollm2-135m,template=safety.txt,threshold=0.7`). Each judge's name
(for `judges/<name>/violation_rate`) is the spec's head (`regex`, `json_valid`, `max_words`,
`judge`, or the function's name), numbered _2, _3 when repeated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.rewards.base import call_reward
from alignkit.rewards.rules import JsonValid, RegexMatch, completion_text

RULE_JUDGES = ("regex", "json_valid", "max_words", "max_chars")
DEFAULT_THRESHOLD = 0.5


@dataclass
class ConstraintJudge:
    """One judge: `score(prompts, completions, **columns) -> (N,)`, satisfied when >= threshold."""

    name: str
    score: Callable[..., Any]
    threshold: float = DEFAULT_THRESHOLD
    spec: str = ""
    model_backed: bool = False
    """A model behind the verdicts (`judge:MODEL`): under torchrun each rank judges its own rows."""

    def satisfied(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> Tensor:
        """(N,) bool."""
        try:
            values = call_reward(self.score, prompts, completions, **columns)
        except ValueError as err:
            raise ValueError(f"judge {self.spec!r}: {err}") from None
        return values.float().reshape(-1) >= self.threshold


class _LengthAtMost:
    """1.0 when the completion's length (words or characters) is at most `limit`, else 0.0."""

    def __init__(self, limit: int, unit: str) -> None:
        self.limit, self.unit = limit, unit

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        texts = [str(completion_text(c)) for c in completions]
        lengths = [len(t.split()) if self.unit == "words" else len(t) for t in texts]
        return torch.tensor([1.0 if n <= self.limit else 0.0 for n in lengths])


def split_judge_specs(text: str) -> list[str]:
    """`a|b\\|c|d` -> ["a", "b|c", "d"]: split on unescaped bars, strip, drop nothing (an empty
    spec is an error)."""
    parts = [part.replace("\\|", "|").strip() for part in re.split(r"(?<!\\)\|", text)]
    if any(not part for part in parts):
        raise ValueError(f"judges {text!r}: an empty judge between bars; write SPEC|SPEC|...")
    return parts


def _threshold(options: list[str], spec: str) -> tuple[list[str], float]:
    """Pull `threshold=T` out of a judge's inline options."""
    kept, threshold = [], DEFAULT_THRESHOLD
    for option in options:
        key, sep, value = option.partition("=")
        if sep and key.strip() == "threshold":
            try:
                threshold = float(value)
            except ValueError:
                raise ValueError(f"judge {spec!r}: threshold must be a number, got {value!r}") from None
        else:
            kept.append(option)
    return kept, threshold


def load_constraint_judge(spec: str) -> ConstraintJudge:
    """One `ConstraintJudge` from its spec (table in the module docstring)."""
    head, sep, argument = spec.partition(":")
    if head == "regex":
        if not argument:
            raise ValueError(f"judge {spec!r}: write the pattern after the colon, regex:PATTERN")
        try:
            return ConstraintJudge("regex", RegexMatch(argument), spec=spec)
        except ValueError as err:
            raise ValueError(f"judge {spec!r}: {err}") from None
    if head == "json_valid":
        if sep:
            raise ValueError(f"judge {spec!r}: json_valid takes no argument")
        return ConstraintJudge("json_valid", JsonValid(), spec=spec)
    if head in ("max_words", "max_chars"):
        try:
            limit = int(argument)
        except ValueError:
            raise ValueError(f"judge {spec!r}: {head} takes a whole number, e.g. {head}:50") from None
        if limit < 0:
            raise ValueError(f"judge {spec!r}: {head} must be >= 0")
        return ConstraintJudge(head, _LengthAtMost(limit, head.removeprefix("max_")), spec=spec)
    if head == "judge":
        from alignkit.rewards.judge import load_judge_reward

        model, *options = spec.split(",")
        options, threshold = _threshold(options, spec)
        judge = load_judge_reward(",".join([model, *options]))
        if judge.mode != "pointwise":
            raise ValueError(f"judge {spec!r}: a constraint judge is pointwise (P(Yes) >= threshold); drop mode=")
        return ConstraintJudge("judge", judge, threshold, spec=spec, model_backed=True)
    from alignkit.rewards.loading import load_reward

    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute.isidentifier():
        raise ValueError(f"unknown judge {spec!r}: expected one of {', '.join(RULE_JUDGES)}, judge:MODEL, "
                         "'package.module:function' or 'path/to/file.py:function'")
    return ConstraintJudge(attribute, load_reward(spec), spec=spec)


class MixtureOfJudges:
    """Several constraint judges; `satisfied(...)` -> (N, K) bool, one column per judge."""

    def __init__(self, judges: list[ConstraintJudge]) -> None:
        self.judges = judges
        self.names: list[str] = []
        for judge in judges:
            name, count = judge.name, 2
            while name in self.names:
                name, count = f"{judge.name}_{count}", count + 1
            self.names.append(name)

    @classmethod
    def from_spec(cls, text: str) -> MixtureOfJudges:
        return cls([load_constraint_judge(spec) for spec in split_judge_specs(text)])

    def satisfied(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any],
                  model_verdicts: Callable[[ConstraintJudge], Tensor] | None = None) -> Tensor:
        """(N, K) bool; `model_verdicts(judge) -> (N,)` gives a model-backed judge's column instead
        (the online loop's split of those rows over torchrun ranks)."""
        if not self.judges:
            return torch.ones(len(completions), 0, dtype=torch.bool)
        return torch.stack([model_verdicts(judge) if model_verdicts is not None and judge.model_backed
                            else judge.satisfied(prompts, completions, columns) for judge in self.judges], dim=-1)


__all__ = ["ConstraintJudge", "MixtureOfJudges", "load_constraint_judge", "split_judge_specs"]
