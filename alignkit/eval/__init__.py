"""Evaluation: statistics (bootstrap intervals, win rate, diversity) and sentence embeddings."""

from alignkit.eval.embeddings import MiniLMEmbedder, embedding_diversity, minilm_model_dir
from alignkit.eval.stats import (
    bootstrap_ci,
    distinct_n,
    ead,
    format_table,
    intervals_overlap,
    ngrams,
    paired_bootstrap_diff,
    win_rate,
)

__all__ = [
    "MiniLMEmbedder",
    "bootstrap_ci",
    "distinct_n",
    "ead",
    "embedding_diversity",
    "format_table",
    "intervals_overlap",
    "minilm_model_dir",
    "ngrams",
    "paired_bootstrap_diff",
    "win_rate",
]
