"""The evaluation lab: sample a policy, score it with rewards, and measure it with `eval/`.

Sits above `rollout/` (generation), `rewards/` (reward functions, reward models, preference
judges) and `eval/` (the pure metrics, fits, plots and reports), and below `training/` and the
command line. `eval/` itself imports none of these.

- `generation_eval.evaluate_model`: gold reward, sampled KL, win rate, length and diversity of
  one policy (used by `alignkit demo` and `alignkit eval`);
- `eval_command`: the `alignkit eval` verb;
- `overopt_lab`: the `alignkit overopt` verb (Gao et al.'s over-optimisation curves);
- `policy_loading`: load a policy from a model directory, LoRA adapter or training checkpoint;
- `label`: the `alignkit label` verb (preference pairs from a reward: best vs worst of n).
"""

from alignkit.lab.eval_command import EvalOptions, run_eval
from alignkit.lab.generation_eval import evaluate_model
from alignkit.lab.overopt_lab import OveroptOptions, PrefixReward, run_overopt
from alignkit.lab.policy_loading import base_model_of, checkpoint_step, load_policy

__all__ = [
    "EvalOptions",
    "OveroptOptions",
    "PrefixReward",
    "base_model_of",
    "checkpoint_step",
    "evaluate_model",
    "load_policy",
    "run_eval",
    "run_overopt",
]
