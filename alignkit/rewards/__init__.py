"""Reward functions: the contract, safe scoring, loading by spec, and built-in rule rewards.

A reward function is any callable `(prompts, completions, **columns) -> Tensor (B,)` (or
(B, K) for several objectives); plain functions returning lists or arrays are accepted and
converted with `as_reward_tensor`. Rewards know nothing of training.
"""

from alignkit.rewards.base import (
    RewardError,
    RewardFunction,
    as_reward_tensor,
    call_reward,
    reward_name,
    score_safely,
)
from alignkit.rewards.embeddings import MiniLMEmbedder
from alignkit.rewards.loading import BUILTIN_REWARDS, load_reward
from alignkit.rewards.rules import (
    JsonValid,
    LengthTarget,
    NumericAnswerMatch,
    RegexMatch,
    VaderSentiment,
    extract_final_number,
)

__all__ = [
    "BUILTIN_REWARDS",
    "JsonValid",
    "LengthTarget",
    "MiniLMEmbedder",
    "NumericAnswerMatch",
    "RegexMatch",
    "RewardError",
    "RewardFunction",
    "VaderSentiment",
    "as_reward_tensor",
    "call_reward",
    "extract_final_number",
    "load_reward",
    "reward_name",
    "score_safely",
]
