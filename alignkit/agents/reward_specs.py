"""Reward specs with the agents layer's own forms: `alignkit.rewards.load_reward` plus
`rlhs:CONFIG.yaml` (RLHS's hindsight-simulation reward, alignkit/agents/hindsight.py).

The hindsight reward samples its simulator with the rollout engine (rank 5), which rewards/
(rank 4) may not import; so the `rlhs:` form is resolved here, and every place that turns a
`--reward` spec into a function (the online roles and validation, A-LoL, the lab's scorers
behind eval / overopt / tax / safety / merge / label) calls this `load_reward`.
"""

from __future__ import annotations

from typing import Any

from alignkit.rewards import RewardFunction
from alignkit.rewards import load_reward as load_base_reward

RLHS_PREFIX = "rlhs:"


def load_reward(spec: str, **kwargs: Any) -> RewardFunction:
    """`alignkit.rewards.load_reward(spec, **kwargs)`, or for `rlhs:CONFIG.yaml` a
    `HindsightReward` configured by that file (it takes no keyword arguments)."""
    text = spec.strip()
    if text.startswith(RLHS_PREFIX):
        if kwargs:
            raise ValueError(f"reward spec {spec!r}: arguments {sorted(kwargs)} do not apply to an rlhs reward; "
                             "set them in its config file")
        from alignkit.agents.hindsight import HindsightReward

        return HindsightReward.from_yaml(text[len(RLHS_PREFIX):], name=text)
    return load_base_reward(spec, **kwargs)


__all__ = ["RLHS_PREFIX", "load_reward"]
