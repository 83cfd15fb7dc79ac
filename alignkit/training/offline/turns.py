"""`filtered_bc`: behaviour cloning over every agent turn of multi-turn dialogues, on the
dialogues whose reward passes a filter (Hong et al. 2023's imagined conversations, written by
`alignkit imagine`).

Each `messages` row is one whole dialogue tokenised once (`alignkit.data.turns`): the loss is
the NLL of every assistant (agent) turn's tokens, eos included, and of nothing else (system
prompt and user turns are context only):

    L = -sum_b sum_t a_bt log pi(x_bt | x_b,<t) / sum_b sum_t a_bt    (a = agent mask)

Filter (on the `reward_column` of the TRAINING rows; evaluation rows pass the same thresholds;
kept / total counted in the log and in `filter_counts`):

- `min_reward=R`: keep dialogues with reward >= R;
- `top_fraction=q` (0 < q <= 1): keep dialogues with reward >= the reward of the ceil(q N)-th
  best training dialogue (ties at the cut are kept);
- both: both must hold; neither: every dialogue is kept (plain multi-turn BC, the paper's
  "IE+BC" baseline).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from alignkit.data import RowTable, TruncationStats
from alignkit.data.turns import TurnsExample, collate_turns, tokenize_turns
from alignkit.models import sequence_logps
from alignkit.training.offline.tasks import Metrics, check_hparams, completion_nll, scored_tokens
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

log = logging.getLogger("alignkit")

FILTER_DEFAULTS: dict[str, Any] = {"reward_column": "reward", "min_reward": None, "top_fraction": 1.0}


def reward_threshold(rewards: list[float], *, min_reward: float | None, top_fraction: float) -> float:
    """The smallest reward a kept dialogue may have: max(min_reward, reward of the
    ceil(top_fraction * N)-th best), -inf when neither filter is set."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    threshold = -math.inf if min_reward is None else float(min_reward)
    if top_fraction < 1.0 and rewards:
        keep = max(1, math.ceil(top_fraction * len(rewards)))
        threshold = max(threshold, sorted(rewards, reverse=True)[keep - 1])
    return threshold


@dataclass
class FilteredBCTask:
    """Multi-turn (filtered) behaviour cloning; see the module docstring."""

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft",)
    needs_reference: bool = False
    hparams: dict[str, Any] = field(init=False, default_factory=dict)
    filter_counts: dict[str, tuple[int, int]] = field(init=False, default_factory=dict)
    threshold: float = field(init=False, default=-math.inf)

    def __post_init__(self) -> None:
        check_hparams("filtered_bc", self.config.hparams, FILTER_DEFAULTS)
        self.hparams = {**FILTER_DEFAULTS, **self.config.hparams}
        min_reward = self.hparams["min_reward"]
        if min_reward is not None and (isinstance(min_reward, bool) or not isinstance(min_reward, int | float)):
            raise ValueError(f"filtered_bc: min_reward must be a number, got {min_reward!r}")
        reward_threshold([], min_reward=None, top_fraction=float(self.hparams["top_fraction"]))  # range check

    @property
    def filtering(self) -> bool:
        return self.hparams["min_reward"] is not None or float(self.hparams["top_fraction"]) < 1.0

    # ------------------------------------------------------------------ data

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[TurnsExample], TruncationStats]:
        for i, row in enumerate(table.rows):
            if row.get("messages") is None:
                raise table.error(i, "filtered_bc trains on whole dialogues: each row needs a 'messages' column")
        return tokenize_turns(table, tokenizer, max_length=self.config.max_length)

    def length(self, example: TurnsExample) -> int:
        return example.length

    def collate(self, examples: list[TurnsExample], pad_id: int) -> dict[str, Tensor]:
        return collate_turns(examples, pad_id)

    def rewards(self, table: RowTable, examples: list[TurnsExample]) -> list[float]:
        """The reward column of each example's row; a missing or non-numeric value is an error
        naming the file and row."""
        column = self.hparams["reward_column"]
        values = []
        for ex in examples:
            value = table.rows[ex.row].get(column)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise table.error(ex.row, f"filtered_bc filters on column '{column}', which must be a finite "
                                          f"number; got {value!r}")
            values.append(float(value))
        return values

    def prepare(self, model, tokenizer, splits, run_dir) -> None:
        """Apply the reward filter to every split (thresholds from the training split)."""
        train_table, train = splits["train"]
        if not self.filtering:
            self.filter_counts = {name: (len(ex), len(ex)) for name, (_, ex) in splits.items() if ex}
            return
        self.threshold = reward_threshold(self.rewards(train_table, train),
                                          min_reward=self.hparams["min_reward"],
                                          top_fraction=float(self.hparams["top_fraction"]))
        for name, (table, examples) in splits.items():
            if table is None or not examples:
                continue
            rewards = self.rewards(table, examples)
            total = len(examples)
            examples[:] = [ex for ex, r in zip(examples, rewards, strict=True) if r >= self.threshold]
            self.filter_counts[name] = (len(examples), total)
            log.info("filtered_bc: %d of %d %s dialogues have %s >= %.4g (the rest are skipped)",
                     len(examples), total, name, self.hparams["reward_column"], self.threshold)
        if not train:
            raise ValueError(f"filtered_bc: no training dialogue has {self.hparams['reward_column']} >= "
                             f"{self.threshold:.4g}")

    # ------------------------------------------------------------------ training

    loss_tokens = staticmethod(scored_tokens)  # a token mean over agent tokens

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                       batch["response_mask"], chunk_size=self.config.logp_chunk_size)
        return completion_nll(logps, counts)


register_algorithm(AlgorithmSpec(
    "filtered_bc", "sft", "messages [+reward]", "policy",
    "Filtered BC over agent turns (the BC baseline of Hong et al. 2023, Zero-Shot Goal-Directed "
    "Dialogue via RL on Imagined Conversations, on reward-filtered dialogues)",
    FilteredBCTask))
