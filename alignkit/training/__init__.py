"""Training loops and the algorithms they train. Importing this package registers every
algorithm in `alignkit.training.registry.ALGORITHMS`."""

from alignkit.training import online_presets as _online_presets  # noqa: F401  (ppo, grpo, ... online_dpo)
from alignkit.training import tasks as _tasks  # noqa: F401  (sft, rm, the pairwise family)
from alignkit.training import tasks_alol as _tasks_alol  # noqa: F401  (alol, alol_ref_free, alol_seq, alol_kl)
from alignkit.training import tasks_listwise as _tasks_listwise  # noqa: F401  (pro, listwise_dpo)
from alignkit.training import tasks_pointwise as _tasks_pointwise  # noqa: F401  (crlft, ift)
from alignkit.training import tasks_reward_frozen as _tasks_reward  # noqa: F401  (rm_ranked, cost, rm_bayes, preference_model, rm_segment, rm_ensemble, rm_multi, rm_embedding)
from alignkit.training import tasks_treg as _tasks_treg  # noqa: F401  (treg)
from alignkit.training import tasks_unpaired as _tasks_unpaired  # noqa: F401  (kto)
from alignkit.training.registry import ALGORITHMS, AlgorithmSpec, register_algorithm

__all__ = ["ALGORITHMS", "AlgorithmSpec", "register_algorithm"]
