"""Training loops and the algorithms they train. Importing this package registers every
algorithm in `alignkit.training.run.registry.ALGORITHMS`.

- `online/`   the online loop (PPO, GRPO, ... online DPO): driver, roles, trainer, presets
- `offline/`  the offline loop and its tasks (SFT, reward models, pairwise/listwise/... losses)
- `run/`      what every run shares: config, registry, checkpoints, metrics, schedule, seeding
- `distributed.py`  torchrun ranks, DDP/FSDP2 wrapping and collectives

The imports below register in this order, which is the order `alignkit algorithms` lists.
"""

# isort: off
from alignkit.training.online import presets as _online_presets  # noqa: F401  (ppo, grpo, ... online_dpo)
from alignkit.training.offline import tasks as _tasks  # noqa: F401  (sft, rm, the pairwise family)
from alignkit.training.offline import alol as _alol  # noqa: F401  (alol, alol_ref_free, alol_seq, alol_kl)
from alignkit.training.offline import listwise as _listwise  # noqa: F401  (pro, listwise_dpo)
from alignkit.training.offline import pointwise as _pointwise  # noqa: F401  (crlft, ift)
from alignkit.training.offline import reward_frozen as _reward  # noqa: F401  (rm_ranked, cost, rm_bayes, preference_model, rm_segment, rm_ensemble, rm_multi, rm_embedding)
from alignkit.training.offline import reward_principles as _reward_principles  # noqa: F401  (rm_principles)
from alignkit.training.offline import reward_vpl as _reward_vpl  # noqa: F401  (rm_vpl)
from alignkit.training.offline import treg as _treg  # noqa: F401  (treg)
from alignkit.training.offline import unpaired as _unpaired  # noqa: F401  (kto)
from alignkit.training.offline import turns as _turns  # noqa: F401  (filtered_bc)
from alignkit.training.offline import iq_learn as _iq_learn  # noqa: F401  (iq_learn)
from alignkit.training.offline import reward_seq2seq as _reward_seq2seq  # noqa: F401  (rm_seq2seq)
from alignkit.diffusion import tasks as _diffusion  # noqa: F401  (d3po, prdp)
from alignkit.training.run.registry import ALGORITHMS, AlgorithmSpec, register_algorithm
# isort: on

__all__ = ["ALGORITHMS", "AlgorithmSpec", "register_algorithm"]
