"""Training loops and the algorithms they train. Importing this package registers every
algorithm in `alignkit.training.registry.ALGORITHMS`."""

from alignkit.training import tasks as _tasks  # noqa: F401  (sft, rm, the pairwise family)
from alignkit.training.registry import ALGORITHMS, AlgorithmSpec, register_algorithm

__all__ = ["ALGORITHMS", "AlgorithmSpec", "register_algorithm"]
