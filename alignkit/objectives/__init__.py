"""Pure maths: preference losses, KL estimators, aggregations (registries by name)."""

from alignkit.objectives.registry import KL, PAIRWISE, PairLogps, register_kl, register_pairwise
from alignkit.objectives import pairwise as _pairwise  # noqa: F401  (fills PAIRWISE)
from alignkit.objectives import kl as _kl  # noqa: F401  (fills KL)

__all__ = ["KL", "PAIRWISE", "PairLogps", "register_kl", "register_pairwise"]
