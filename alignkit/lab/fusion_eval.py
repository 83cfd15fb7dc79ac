"""`alignkit eval-rm --fusion-index TRAIN.jsonl`: the same evaluation with RewardFusion
(Shen et al. 2023; `alignkit.rewards.fusion`), reported beside the plain reward model's.

The fused scorer wraps the already loaded reward model, so both evaluations score with the same
weights; `results["fusion"]` holds the fused metrics, the settings, the mean number of
neighbours a row was fused with, and `side_by_side` (plain vs fused accuracy and consistency).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignkit.eval.reward_eval import evaluate_reward_model
from alignkit.rewards.fusion import fused_reward

COMPARED = ("accuracy", "response_consistency", "instruction_consistency")


def _metric(results: dict[str, Any], name: str) -> float | None:
    if name == "accuracy":
        return results.get("accuracy")
    return results.get("consistency", {}).get(name)


def fusion_results(
    scorer: Any,
    plain_results: dict[str, Any],
    pairs: Sequence[dict[str, Any]],
    consistency: Sequence[dict[str, Any]] | None,
    *,
    index: str,
    k: int = 5,
    min_similarity: float = 0.9,
    n_bootstrap: int = 2000,
    seed: int = 0,
    embedder: Any = None,
) -> dict[str, Any]:
    """Evaluate `scorer` fused over the rows of `index` on the same `pairs` / `consistency`
    rows as `plain_results` came from; returns the `fusion` section of eval-rm's results."""
    fused = fused_reward(scorer, {"fusion_index": index, "fusion_k": k, "fusion_min_sim": min_similarity},
                         embedder=embedder)
    results = evaluate_reward_model(fused, pairs, consistency=consistency, n_bootstrap=n_bootstrap, seed=seed)
    counts = fused.neighbour_counts
    side_by_side = {
        name: {"plain": _metric(plain_results, name), "fused": _metric(results, name)}
        for name in COMPARED
        if _metric(plain_results, name) is not None
    }
    return {"index": str(index), "k": k, "min_similarity": min_similarity, "index_rows": len(fused.index_texts),
            "mean_neighbours": sum(counts) / len(counts), "side_by_side": side_by_side, **results}


__all__ = ["fusion_results"]
