"""Reward functions: the contract, safe scoring, loading by spec, and built-in rule rewards.

A reward function is any callable `(prompts, completions, **columns) -> Tensor (B,)` (or
(B, K) for several objectives); plain functions returning lists or arrays are accepted and
converted with `as_reward_tensor`. Rewards know nothing of training.

Reward models as reward functions: `RewardModelScorer` (any sequence classifier),
`EnsembleScorer` (mean / WCO / UWO), `BayesRewardScorer` (BRME), `MultiObjectiveScorer`
(ArmoRM), `EmbeddingRewardModel` (MiniLM + head), `load_reward_model(DIR)` picks the right
one; `PreferenceJudge` (pairwise P(a > b)) and `SegmentRewardScorer` (per-segment rewards)
are not scalar rewards and are loaded by name.

Dense rewards (`alignkit.rewards.dense`, Fine-Grained RLHF): where the response tokens are
known (the online loop), a reward may return one reward per token or per segment instead of
one per completion; `DenseRewards` holds them.

`RewardRunner` calls a reward on the online loop's batches: TRL's conventions (conversational
prompts as message lists, `completion_ids`, `trainer_state`), a deadline, worker threads.
"""

from alignkit.rewards.base import (
    RewardError,
    RewardFunction,
    call_reward,
    invoke_reward,
    reward_name,
    score_safely,
)
from alignkit.rewards.dense import DenseRewards
from alignkit.rewards.embedding_rm import EmbeddingRewardModel
from alignkit.rewards.embeddings import MiniLMEmbedder
from alignkit.rewards.ensemble import BayesRewardScorer, EnsembleScorer
from alignkit.rewards.loading import BUILTIN_REWARDS, load_reward
from alignkit.rewards.multi_objective import MultiObjectiveScorer
from alignkit.rewards.outputs import RewardOutputError, as_reward_tensor, describe_output
from alignkit.rewards.preference import PreferenceJudge
from alignkit.rewards.principles import PrincipleRewardScorer, principled_prompt
from alignkit.rewards.process import SegmentRewardScorer, split_segments
from alignkit.rewards.rules import (
    JsonValid,
    LengthTarget,
    NumericAnswerMatch,
    RegexMatch,
    VaderSentiment,
    extract_final_number,
)
from alignkit.rewards.runner import RewardRunner, RewardTimeout
from alignkit.rewards.saved import load_reward_model, reward_model_kind
from alignkit.rewards.scorer import RewardModelScorer, ScoreNormalizer
from alignkit.rewards.seq2seq import Seq2SeqRewardScorer
from alignkit.rewards.visual import BoxIoU, ChoiceAccuracy, ThinkAnswerFormat
from alignkit.rewards.vpl import VariationalRewardScorer

__all__ = [
    "BUILTIN_REWARDS",
    "BayesRewardScorer",
    "BoxIoU",
    "ChoiceAccuracy",
    "DenseRewards",
    "EmbeddingRewardModel",
    "EnsembleScorer",
    "MultiObjectiveScorer",
    "PreferenceJudge",
    "PrincipleRewardScorer",
    "VariationalRewardScorer",
    "principled_prompt",
    "RewardModelScorer",
    "ScoreNormalizer",
    "SegmentRewardScorer",
    "Seq2SeqRewardScorer",
    "ThinkAnswerFormat",
    "load_reward_model",
    "split_segments",
    "JsonValid",
    "LengthTarget",
    "MiniLMEmbedder",
    "NumericAnswerMatch",
    "RegexMatch",
    "RewardError",
    "RewardOutputError",
    "RewardRunner",
    "RewardTimeout",
    "RewardFunction",
    "VaderSentiment",
    "as_reward_tensor",
    "call_reward",
    "describe_output",
    "invoke_reward",
    "extract_final_number",
    "load_reward",
    "reward_model_kind",
    "reward_name",
    "score_safely",
]
