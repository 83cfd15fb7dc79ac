"""Evaluation: statistics, sampled KL, win rates, diversity, over-optimisation curves, reports.

Pure metrics: `stats`, `kl`, `winrate`, `diversity`, `overopt`, `reward_eval`. Reports:
`report.write_report`. This layer imports only `data/`, `models/` and `objectives/`; the
drivers that sample a policy and score it with rewards (`evaluate_model`, `alignkit eval`,
`alignkit overopt`) live one layer up, in `alignkit.lab`.
"""

from alignkit.eval.diversity import diversity_metrics, lexical_diversity
from alignkit.eval.embeddings import MiniLMEmbedder, embedding_diversity, minilm_model_dir
from alignkit.eval.kl import sequence_kl
from alignkit.eval.overopt import (
    CurveFit,
    best_of_n_values,
    bon_curve,
    bon_kl,
    bon_weights,
    fit_overoptimization,
)
from alignkit.eval.report import (
    MethodResult,
    ReportInput,
    curve_from_metrics,
    validation_from_metrics,
    write_report,
)
from alignkit.eval.stats import (
    bootstrap_ci,
    distinct_n,
    ead,
    format_table,
    intervals_overlap,
    mean_pass_at_k,
    ngrams,
    paired_bootstrap_diff,
    pass_at_k,
    wilson_interval,
    win_rate,
)
from alignkit.eval.winrate import (
    PairwiseJudge,
    RewardJudge,
    judged_win_rate,
    length_controlled_win_rate,
)

__all__ = [
    "CurveFit",
    "MethodResult",
    "PairwiseJudge",
    "ReportInput",
    "RewardJudge",
    "best_of_n_values",
    "bon_curve",
    "bon_kl",
    "bon_weights",
    "curve_from_metrics",
    "diversity_metrics",
    "fit_overoptimization",
    "judged_win_rate",
    "length_controlled_win_rate",
    "lexical_diversity",
    "sequence_kl",
    "validation_from_metrics",
    "write_report",
    "MiniLMEmbedder",
    "bootstrap_ci",
    "distinct_n",
    "ead",
    "embedding_diversity",
    "format_table",
    "intervals_overlap",
    "mean_pass_at_k",
    "minilm_model_dir",
    "ngrams",
    "paired_bootstrap_diff",
    "pass_at_k",
    "wilson_interval",
    "win_rate",
]
