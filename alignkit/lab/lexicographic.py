"""Lexicographic reward factors (HERON: Bukharin et al. 2023, "Deep Reinforcement Learning from
Hierarchical Preference Design", arXiv 2309.02632; language-model form) for `alignkit label
--lexicographic`: responses are compared on an ordered list of reward functions, each with a
tolerance, and the decided comparisons become preference pairs for any offline method.

Comparison rule (checked against the official code, abukharin3/HERON
`ClassicControl/cleanrl/rm_mountain.py`, `RewardModel.get_loss`: a decision tree over the
factors in importance order, each level with a margin; the paper text itself was not read,
its abstract and summaries describe the same importance-ordered decision tree), for responses
a, b and factors r_1..r_F with tolerances d_1..d_F:

    for k = 1..F:  if r_k(a) - r_k(b) > d_k: a wins (decided by factor k)
                   if r_k(b) - r_k(a) > d_k: b wins (decided by factor k)
                   otherwise (|difference| <= d_k) fall through to factor k + 1
    no factor decides: a tie, and no pair.

Tolerances are absolute (`SPEC:0.1`) or, as in HERON's code (margin = sigma_mult x the
factor's standard deviation over the batch), a multiple of the factor's standard deviation over
every response scored in the run (`SPEC:0.5std`). Every factor is "higher is better"; negate a
cost in its reward function. HERON compares every pair of samples (its `get_loss` loops over
all i > j); `pairing="all"` does the same per prompt, and `pairing="best_worst"` keeps one pair
per prompt: the response with the best Copeland score (wins - losses) against the worst,
when the rule decides between those two.

Factor lists: inline `SPEC1:TOL1,SPEC2:TOL2` (a spec holding a comma belongs in a file), or a
YAML file: a list (or `factors:` list) of `{reward: SPEC, tolerance: T}` or
`{reward: SPEC, tolerance_std: M}`.

Worked example (tolerances 0.5 then 0): a = (1.0, 3), b = (1.4, 2): |1.0 - 1.4| <= 0.5 falls
through, 3 > 2 on factor 2: a wins, decided by factor 2. c = (2.0, 0) beats both on factor 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
INLINE_TOLERANCE = re.compile(rf"^(?P<spec>.+):(?P<value>{NUMBER})(?P<std>std)?$")
PAIRINGS = ("all", "best_worst")


@dataclass(frozen=True)
class Factor:
    """One reward factor: its spec and tolerance (absolute, or x its std when `in_std`)."""

    spec: str
    tolerance: float
    in_std: bool = False


def _yaml_factors(path: Path) -> list[Factor]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"--lexicographic {path}: not valid YAML ({' '.join(str(err).split())})") from None
    items = loaded.get("factors") if isinstance(loaded, dict) else loaded
    if not isinstance(items, list) or not items:
        raise ValueError(f"--lexicographic {path}: expected a list of factors (or 'factors:' holding one)")
    factors = []
    for number, item in enumerate(items, start=1):
        where = f"--lexicographic {path}, factor {number}"
        if not isinstance(item, dict) or not isinstance(item.get("reward"), str):
            raise ValueError(f"{where}: write {{reward: SPEC, tolerance: T}} or {{reward: SPEC, tolerance_std: M}}")
        unknown = set(item) - {"reward", "tolerance", "tolerance_std"}
        if unknown or ("tolerance" in item) == ("tolerance_std" in item):
            raise ValueError(f"{where}: give exactly one of tolerance, tolerance_std"
                             + (f" (unknown keys {sorted(unknown)})" if unknown else ""))
        key = "tolerance" if "tolerance" in item else "tolerance_std"
        value = item[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
        factors.append(Factor(item["reward"].strip(), float(value), key == "tolerance_std"))
    return factors


def parse_factors(text: str) -> list[Factor]:
    """The factors of `--lexicographic` (inline or a YAML file; see the module docstring)."""
    text = text.strip()
    path = Path(text)
    if text.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise FileNotFoundError(f"--lexicographic {text}: no such file")
        return _yaml_factors(path)
    factors = []
    for item in text.split(","):
        match = INLINE_TOLERANCE.match(item.strip())
        if match is None:
            raise ValueError(
                f"--lexicographic factor {item.strip()!r} has no tolerance: write SPEC:TOLERANCE "
                f"(e.g. vader:0.1 or vader:0.5std); a spec holding a comma goes in a YAML file"
            )
        factors.append(Factor(match["spec"], float(match["value"]), match["std"] is not None))
    return factors


def resolve_tolerances(factors: list[Factor], scores: torch.Tensor) -> list[float]:
    """Absolute tolerances: `in_std` ones times the factor's std (ddof 0, as numpy's default
    in HERON's code) over every score. Shapes: scores (P, n, F)."""
    stds = scores.reshape(-1, scores.shape[-1]).double().std(dim=0, unbiased=False)
    return [f.tolerance * float(stds[k]) if f.in_std else f.tolerance for k, f in enumerate(factors)]


def lexicographic_compare(a: list[float], b: list[float], tolerances: list[float]) -> tuple[int, int | None]:
    """(+1 when a wins, -1 when b wins, 0 for a tie, the 0-based deciding factor or None)."""
    for k, tolerance in enumerate(tolerances):
        if a[k] - b[k] > tolerance:
            return 1, k
        if b[k] - a[k] > tolerance:
            return -1, k
    return 0, None


def lexicographic_pairs(
    scores: list[list[float]], texts: list[str], tolerances: list[float], pairing: str = "all"
) -> list[tuple[int, int, int]] | str:
    """(winner, loser, deciding factor) index triples for one prompt's responses, or the reason
    it gives none: "too_few_samples" (fewer than two distinct non-blank texts) or "ties" (no
    decided comparison). Repeated texts are compared once (the first one). Shapes: scores (n, F)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"--pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    first_of: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text.strip():
            first_of.setdefault(text, i)
    candidates = sorted(first_of.values())
    if len(candidates) < 2:
        return "too_few_samples"
    decided, net = [], dict.fromkeys(candidates, 0)
    for x, i in enumerate(candidates):
        for j in candidates[x + 1:]:
            outcome, level = lexicographic_compare(scores[i], scores[j], tolerances)
            if outcome:
                winner, loser = (i, j) if outcome > 0 else (j, i)
                decided.append((winner, loser, level))
                net[winner] += 1
                net[loser] -= 1
    if not decided:
        return "ties"
    if pairing == "all":
        return decided
    best = max(candidates, key=lambda i: (net[i], -i))
    worst = min((i for i in candidates if i != best), key=lambda i: (net[i], i))
    outcome, level = lexicographic_compare(scores[best], scores[worst], tolerances)
    return [(best, worst, level)] if outcome > 0 else "ties"


def lexicographic_label(
    prompts: list[Any], texts: list[list[str]], scores: torch.Tensor, factors: list[Factor], pairing: str = "all"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs for every prompt and the counts (`ties`, `too_few_samples`, `decided_by` per factor
    spec) plus the resolved tolerances. Shapes: scores (P, n, F)."""
    from alignkit.lab.label import pair_row

    tolerances = resolve_tolerances(factors, scores)
    rows, skipped = [], {"ties": 0, "too_few_samples": 0, "identical_texts": 0}
    decided_by = dict.fromkeys((f.spec for f in factors), 0)
    for prompt, group, group_scores in zip(prompts, texts, scores.tolist(), strict=True):
        result = lexicographic_pairs(group_scores, group, tolerances, pairing)
        if isinstance(result, str):
            skipped[result] += 1
            continue
        for winner, loser, level in result:
            row = pair_row(prompt, group[winner], group[loser], group_scores[winner][0], group_scores[loser][0])
            row.update(factor_scores_chosen=group_scores[winner], factor_scores_rejected=group_scores[loser],
                       decided_by=factors[level].spec)
            decided_by[factors[level].spec] += 1
            rows.append(row)
    return rows, {**skipped, "decided_by": decided_by, "tolerances": tolerances}


__all__ = ["Factor", "lexicographic_compare", "lexicographic_label", "lexicographic_pairs", "parse_factors",
           "resolve_tolerances"]
