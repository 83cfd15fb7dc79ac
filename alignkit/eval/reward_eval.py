"""Reward-model evaluation: pairwise accuracy with a bootstrap interval, calibration (ECE),
score distributions, and reward consistency on contrast instructions.

Everything here takes scores or a plain scoring callable `(prompts, completions) -> (B,)`;
loading reward models is the caller's job (`alignkit.rewards.load_reward_model`; the
`alignkit eval-rm` verb wires the two together), so `eval/` stays below `rewards/`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alignkit.eval.stats import bootstrap_ci

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: accepted column names for (I1, I2, R1, R2): ours, and the official benchmark files' names
#: (addendum §5: `query`/`retrieval` instructions, `*_response_k` the preferred responses)
CONSISTENCY_COLUMNS = (
    ("I1", "I2", "R1", "R2"),
    ("query", "retrieval", "query_response_k", "retrieval_response_k"),
)


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def expected_calibration_error(chosen_scores: Any, rejected_scores: Any, n_bins: int = 10) -> float:
    """ECE of the Bradley-Terry probability p = sigma(r_w - r_l) (Guo et al. 2017 binning).

    Each pair is counted in both orders: prediction p with outcome 1 and 1 - p with outcome
    0, so the ordering of the data file does not matter. With n_bins equal-width bins on
    [0, 1]: ECE = sum_b (|b| / n) |mean outcome in b - mean prediction in b|.

    Worked example: margins (0, 0) -> every prediction 0.5 with outcomes (1, 0, 1, 0):
    ECE = 0 (useless but calibrated). Margins (10, 10) -> p ~ 1 with outcome 1 and ~0 with
    outcome 0: ECE ~ 0. Margin -10 -> p ~ 0 with outcome 1: ECE ~ 1.
    """
    margin = _numpy(chosen_scores) - _numpy(rejected_scores)
    prob = 1.0 / (1.0 + np.exp(-margin))
    predictions = np.concatenate([prob, 1.0 - prob])
    outcomes = np.concatenate([np.ones_like(prob), np.zeros_like(prob)])
    bins = np.minimum((predictions * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = abs(outcomes[in_bin].mean() - predictions[in_bin].mean())
            ece += in_bin.mean() * gap
    return float(ece)


def distribution(values: Any) -> dict[str, Any]:
    """mean, std, min, max and quantiles of a score array."""
    array = _numpy(values)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "quantiles": {str(q): float(np.quantile(array, q)) for q in QUANTILES},
    }


def _rate_with_ci(hits: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, list[float]]:
    point, low, high = bootstrap_ci(hits.astype(np.float64), n_resamples=n_bootstrap, seed=seed)
    return point, [low, high]


def pairwise_metrics(
    chosen_scores: Any, rejected_scores: Any, *, n_bootstrap: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """accuracy (strict r_w > r_l; ties are failures), its 95% bootstrap interval, the number
    of ties and the accuracy with ties counted half (what a coin flip on ties would score),
    ECE (10 bins) and the score distributions of chosen, rejected and their margin.

    Worked example: margins (1, 0, -1, 0) -> accuracy 1/4, ties 2, accuracy_ties_half
    (1 + 0.5 + 0 + 0.5) / 4 = 0.5."""
    chosen, rejected = _numpy(chosen_scores), _numpy(rejected_scores)
    accuracy, interval = _rate_with_ci(chosen > rejected, n_bootstrap, seed)
    ties = chosen == rejected
    return {
        "n_pairs": int(chosen.size),
        "accuracy": accuracy,
        "accuracy_ci": interval,
        "ties": int(ties.sum()),
        "accuracy_ties_half": float(((chosen > rejected) + 0.5 * ties).mean()),
        "ece": expected_calibration_error(chosen, rejected),
        "scores": {
            "chosen": distribution(chosen),
            "rejected": distribution(rejected),
            "margin": distribution(chosen - rejected),
        },
    }


def consistency_columns(columns: Sequence[str]) -> tuple[str, str, str, str] | None:
    """The (I1, I2, R1, R2) column names present in `columns`, or None."""
    for names in CONSISTENCY_COLUMNS:
        if set(names) <= set(columns):
            return names
    return None


def reward_consistency(
    score: Callable[[list[Any], list[Any]], Any],
    rows: Sequence[dict[str, Any]],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Contrast-instructions consistency (Shen et al. 2023; addendum §5, official code).

    For items (I1, I2, R1, R2) of lexically similar instructions and their preferred
    responses, with strict `>` (ties count as failures):
      response consistency    C_res = mean[ r(I1, R1) > r(I1, R2) ]
      instruction consistency C_ins = mean[ r(I1, R1) > r(I2, R1) ]
    """
    names = consistency_columns(list(rows[0]) if rows else [])
    if names is None:
        raise ValueError(
            f"consistency rows need columns {' or '.join(map(str, CONSISTENCY_COLUMNS))}"
        )
    i1, i2, r1, r2 = ([row[name] for row in rows] for name in names)
    n = len(rows)
    # one batched call: (I1, R1), (I1, R2), (I2, R1)
    scores = _numpy(score(i1 + i1 + i2, r1 + r2 + r1))
    own, other_response, other_instruction = scores[:n], scores[n : 2 * n], scores[2 * n :]
    response, response_ci = _rate_with_ci(own > other_response, n_bootstrap, seed)
    instruction, instruction_ci = _rate_with_ci(own > other_instruction, n_bootstrap, seed)
    return {
        "n_items": n,
        "response_consistency": response,
        "response_consistency_ci": response_ci,
        "instruction_consistency": instruction,
        "instruction_consistency_ci": instruction_ci,
    }


def evaluate_reward_model(
    score: Callable[[list[Any], list[Any]], Any],
    pairs: Sequence[dict[str, Any]] = (),
    *,
    consistency: Sequence[dict[str, Any]] | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric the data allows: pairwise metrics for rows with prompt/chosen/rejected,
    reward consistency for rows with (I1, I2, R1, R2) columns (from `pairs` itself or from
    `consistency`). Keys: n_pairs, accuracy, accuracy_ci, ece, scores, consistency."""
    result: dict[str, Any] = {}
    pair_rows = [r for r in pairs if r.get("chosen") is not None and r.get("rejected") is not None]
    if pair_rows:
        prompts = [r["prompt"] for r in pair_rows]
        chosen = [r["chosen"] for r in pair_rows]
        rejected = [r["rejected"] for r in pair_rows]
        all_scores = _numpy(score(prompts + prompts, chosen + rejected))
        n = len(pair_rows)
        result.update(
            pairwise_metrics(all_scores[:n], all_scores[n:], n_bootstrap=n_bootstrap, seed=seed)
        )
    contrast = (
        list(consistency) if consistency else [r for r in pairs if consistency_columns(list(r))]
    )
    if contrast:
        result["consistency"] = reward_consistency(
            score, contrast, n_bootstrap=n_bootstrap, seed=seed
        )
    if not result:
        raise ValueError(
            "no pairwise rows (prompt, chosen, rejected) and no consistency rows to evaluate"
        )
    return result
