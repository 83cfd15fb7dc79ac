"""Loading any saved alignkit reward model as a reward function, by what its directory holds.

`reward_model_kind(DIR)` reads the marker file a trainer wrote (ensemble.json,
embedding_rm.json, ...); `load_reward_model(DIR)` builds the matching scorer. This module sits
above every scorer module (scorer, ensemble, multi_objective, embedding_rm) and none of them
imports it, so the package has no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.rewards.embedding_rm import EmbeddingRewardModel
from alignkit.rewards.ensemble import BayesRewardScorer, EnsembleScorer
from alignkit.rewards.multi_objective import MultiObjectiveScorer
from alignkit.rewards.principles import PrincipleRewardScorer
from alignkit.rewards.scorer import RewardModelScorer
from alignkit.rewards.seq2seq import Seq2SeqRewardScorer
from alignkit.rewards.vpl import VariationalRewardScorer


def reward_model_kind(directory: str | Path) -> str:
    """Which scorer a saved reward-model directory needs, from the marker file it holds:
    ensemble.json, embedding_rm.json, multi_objective.json, brme.json, preference_model.json,
    segment_rm.json, principles_rm.json, vpl_rm.json, seq2seq_rm.json, else "sequence_classifier"."""
    directory = Path(directory)
    for marker in (
        "ensemble",
        "embedding_rm",
        "multi_objective",
        "brme",
        "preference_model",
        "segment_rm",
        "principles_rm",
        "vpl_rm",
        "seq2seq_rm",
    ):
        if (directory / f"{marker}.json").is_file():
            return marker
    return "sequence_classifier"


def load_reward_model(directory: str | Path, **kwargs: Any) -> Any:
    """Load any saved alignkit reward model as a `RewardFunction` (scalar score per row).

    Dispatches on `reward_model_kind`: an ensemble directory -> `EnsembleScorer`, an
    embedding RM -> `EmbeddingRewardModel`, ArmoRM-style -> `MultiObjectiveScorer`, BRME ->
    `BayesRewardScorer`, rm_principles -> `PrincipleRewardScorer` (`principles=`), rm_vpl ->
    `VariationalRewardScorer` (`user_context=`), a plain sequence classifier (or a hub id) -> `RewardModelScorer`.
    `kwargs` go to that class.
    """
    kind = reward_model_kind(directory) if Path(directory).is_dir() else "sequence_classifier"
    if kind == "ensemble":
        return EnsembleScorer(directory, **kwargs)
    if kind == "embedding_rm":
        return EmbeddingRewardModel.load(directory, **kwargs)
    if kind == "multi_objective":
        return MultiObjectiveScorer(directory, **kwargs)
    if kind == "brme":
        return BayesRewardScorer(directory, **kwargs)
    if kind == "principles_rm":
        return PrincipleRewardScorer(directory, **kwargs)
    if kind == "vpl_rm":
        return VariationalRewardScorer(directory, **kwargs)
    if kind == "seq2seq_rm":  # per-token rewards with completion_ids, else summed per row
        return Seq2SeqRewardScorer(directory, **kwargs)
    if kind in ("preference_model", "segment_rm"):
        raise ValueError(
            f"{directory} is a {kind.replace('_', ' ')}, not a scalar reward model: load it "
            f"with {'PreferenceJudge' if kind == 'preference_model' else 'SegmentRewardScorer'}"
            + ("" if kind == "preference_model" else
               " (online training takes it as --reward-model DIR or --reward rm:DIR: dense per-segment rewards)")
        )
    return RewardModelScorer(directory, **kwargs)
