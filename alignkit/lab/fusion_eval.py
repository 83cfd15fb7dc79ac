"""`alignkit eval-rm --fusion-index TRAIN.jsonl`: the same evaluation with RewardFusion
(Shen et al. 2023; `alignkit.rewards.fusion`), reported beside the plain reward model's.

The fused scorer wraps the already loaded reward model, so both evaluations score with the same
weights; `results["fusion"]` holds the fused metrics, the settings, the mean number of
neighbours a row was fused with, and `side_by_side` (plain vs fused accuracy and consistency).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignkit.eval.reward_eval import evaluate_reward_model
from alignkit.lab.argtypes import positive_int
from alignkit.rewards.fusion import fused_reward, load_fusion_index

DEFAULT_K, DEFAULT_MIN_SIMILARITY = 5, 0.9  # addendum §5: k = 5 neighbours, cosine >= 0.9

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
    k: int = DEFAULT_K,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
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


def add_fusion_arguments(parser: argparse.ArgumentParser) -> None:
    """eval-rm's --fusion-index, --fusion-k and --fusion-min-sim."""
    parser.add_argument("--fusion-index", default=None, help="training pairs: also report RewardFusion's metrics")
    parser.add_argument("--fusion-k", type=positive_int, default=None,
                        help=f"with --fusion-index: most neighbours ({DEFAULT_K})")
    parser.add_argument("--fusion-min-sim", type=float, default=None,
                        help=f"with --fusion-index: least cosine similarity ({DEFAULT_MIN_SIMILARITY})")


def check_fusion_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse's one-line errors for a flag that cannot apply, and the index's bad rows (a
    DataError naming file and row), before any model loads."""
    if args.fusion_index is not None and args.r2:
        parser.error("--fusion-index fuses pair and consistency scores; it does not apply to --r2")
    if args.fusion_index is None and (args.fusion_k, args.fusion_min_sim) != (None, None):
        parser.error("--fusion-k and --fusion-min-sim tune --fusion-index; add --fusion-index TRAIN.jsonl")
    if args.fusion_min_sim is not None and not -1 <= args.fusion_min_sim <= 1:
        parser.error(f"--fusion-min-sim is a cosine similarity in [-1, 1], got {args.fusion_min_sim}")
    if args.fusion_index is not None and Path(args.fusion_index).exists():
        load_fusion_index(args.fusion_index)  # a bad row fails now, not after the plain evaluation


def fusion_section(args: argparse.Namespace, scorer: Any, plain_results: dict[str, Any],
                   pairs: Sequence[dict[str, Any]], consistency: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """`fusion_results` with eval-rm's flags."""
    return fusion_results(scorer, plain_results, pairs, consistency, index=args.fusion_index,
                          k=args.fusion_k or DEFAULT_K, n_bootstrap=args.n_bootstrap, seed=args.seed,
                          min_similarity=DEFAULT_MIN_SIMILARITY if args.fusion_min_sim is None else args.fusion_min_sim)


__all__ = ["add_fusion_arguments", "check_fusion_arguments", "fusion_results", "fusion_section"]
