"""Pure maths: preference losses, KL estimators, aggregations (registries by name)."""

from alignkit.objectives import kl as _kl  # noqa: F401  (fills KL)
from alignkit.objectives import pairwise as _pairwise  # noqa: F401  (fills PAIRWISE)
from alignkit.objectives import pairwise_trl as _pairwise_trl  # noqa: F401  (fills PAIRWISE)
from alignkit.objectives import reference_free as _reference_free  # noqa: F401  (fills PAIRWISE)
from alignkit.objectives.divergences import f_divergence_dpo, f_divergence_score
from alignkit.objectives.listwise import LISTWISE, register_listwise
from alignkit.objectives.pointwise import UNPAIRED, kto_kl_estimate, register_unpaired
from alignkit.objectives.registry import (
    KL,
    PAIRWISE,
    REFERENCE_FREE,
    PairLogps,
    register_kl,
    register_pairwise,
)
from alignkit.objectives.weighting import (
    combine_losses,
    ld_dpo,
    log_sum_squared_probs,
    mm_dpo_beta,
    wpo_weights,
)

__all__ = [
    "KL",
    "LISTWISE",
    "PAIRWISE",
    "UNPAIRED",
    "PairLogps",
    "REFERENCE_FREE",
    "combine_losses",
    "f_divergence_dpo",
    "f_divergence_score",
    "kto_kl_estimate",
    "ld_dpo",
    "log_sum_squared_probs",
    "mm_dpo_beta",
    "register_kl",
    "register_listwise",
    "register_pairwise",
    "register_unpaired",
    "wpo_weights",
]
