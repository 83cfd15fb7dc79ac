"""Reward-model algorithms beyond pairwise Bradley-Terry, as offline-loop tasks:

- `rm_ranked`  K responses per prompt: Plackett-Luce or InstructGPT all-pairs (§1.2)
- `cost`       Safe RLHF cost model (§1.7)
- `rm_bayes`   BRME multi-head Gaussian reward model (§1.5; addendum §8: still open)
- `preference_model`  pairwise P(y > y' | x) on both orders (§1.3)
- `rm_segment` per-segment (process) rewards for fine-grained RLHF (§1.8)

Algorithms with their own loop (ensembles, frozen-feature heads) are in
`tasks_reward_runners.py`. A task may define `num_labels` (outputs of the score head) and
`write_final(final_dir)` (extra files next to the checkpoint, e.g. `brme.json`); the offline
loop honours both. Every reward task (runners included) takes its fields from `RewardTask` and
is registered by `register_reward_algorithms`.

Design choice for ranked data: a separate `rm_ranked` algorithm rather than `rm` reading
ranked data, so `rm` keeps its one data kind and `--set ranked_loss=...` is only accepted
where it means something. One batch element is one prompt with all its K responses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data import RankedExample, RowTable, TruncationStats
from alignkit.models import reward_scores
from alignkit.objectives.reward_losses import (
    RANKED_LOSSES,
    brme_bradley_terry,
    brme_reward,
    cost_model_loss,
    preference_bce,
    segment_reward_loss,
)
from alignkit.rewards.preference import DEFAULT_TEMPLATE, encode_preference
from alignkit.rewards.process import GRANULARITIES, encode_segments, token_scores
from alignkit.training.offline.reward_context import RewardContext
from alignkit.training.offline.tasks import (
    Metrics,
    PairData,
    RankedData,
    check_hparams,
    score_pair_metrics,
)
from alignkit.training.run import distributed
from alignkit.training.run.adapters import uses_adapter
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.schedule import default_lr

Batch = dict[str, Tensor]


def resolve_hparams(name: str, config: TrainConfig, accepted: dict[str, Any]) -> dict[str, Any]:
    """Defaults updated with `--set` values; unknown keys and missing required ones
    (default `...`) are errors. Also gives reward models the RM learning rate by default."""
    check_hparams(name, config.hparams, accepted)
    values = {**accepted, **config.hparams}
    missing = sorted(k for k, v in values.items() if v is ...)
    if missing:
        raise ValueError(
            f"{name}: hyper-parameter(s) {missing} are required (--set {missing[0]}=...)"
        )
    if config.lr is None:
        config.lr = default_lr("rm", lora=uses_adapter(config))
    return values


def _pad_rows(sequences: list[list[int]], pad_id: int) -> Batch:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for n, ids in enumerate(sequences):
        input_ids[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[n, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class RewardTask:
    """The fields every reward-model task shares: a reward (score-head) model on pairwise data
    by default, no reference model; `__post_init__` fills `hparams` with `resolve_hparams`."""

    config: TrainConfig
    model_kind: str = "reward"
    data_kinds: tuple[str, ...] = ("pairwise",)
    needs_reference: bool = False
    hparams: dict[str, Any] = field(init=False, default_factory=dict)


def register_reward_algorithms(specs: list[tuple[str, str, str, str, Any]]) -> None:
    """Register (name, data, models, paper, task class) rows as algorithms of kind "reward"."""
    from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

    for name, data, models, paper, task in specs:
        register_algorithm(AlgorithmSpec(name, "reward", data, models, paper, task))


@dataclass
class RankedRewardTask(RewardTask, RankedData):
    """Reward model on ranked data (prompt + completions + scores), one prompt per element.

    ranked_loss="plackett_luce": L = -log P(ranking) (Breslow ties); "all_pairs": the mean
    Bradley-Terry loss over the C(K, 2) ordered pairs of the prompt (InstructGPT).
    """

    data_kinds: tuple[str, ...] = ("ranked",)

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams("rm_ranked", self.config, {"ranked_loss": "plackett_luce"})
        if self.hparams["ranked_loss"] not in RANKED_LOSSES:
            raise ValueError(f"rm_ranked: ranked_loss must be one of {sorted(RANKED_LOSSES)}")
        self.loss_fn = RANKED_LOSSES[self.hparams["ranked_loss"]]

    def collate(self, examples: list[RankedExample], pad_id: int) -> Batch:
        sequences = [ex.prompt_ids + ids for ex in examples for ids in ex.response_ids]
        batch = _pad_rows(sequences, pad_id)
        k = max(len(ex.response_ids) for ex in examples)
        labels = torch.zeros((len(examples), k))
        mask = torch.zeros((len(examples), k), dtype=torch.bool)
        for b, ex in enumerate(examples):
            labels[b, : len(ex.scores)] = torch.tensor(ex.scores)
            mask[b, : len(ex.scores)] = True
        batch.update(labels=labels, response_slots=mask)
        return batch

    def loss(self, model, batch: Batch) -> tuple[Tensor, Metrics]:
        flat = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (N,)
        mask = batch["response_slots"]
        scores = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
        scores = scores.masked_scatter(mask, flat)  # (B, K), row-major like the flattening
        labels = batch["labels"].to(flat.device)
        loss = self.loss_fn(scores, labels, mask).mean()
        ordered = (
            (labels.unsqueeze(2) > labels.unsqueeze(1)) & mask.unsqueeze(2) & mask.unsqueeze(1)
        )
        right = (scores.unsqueeze(2) > scores.unsqueeze(1)) & ordered
        accuracy = right.sum() / ordered.sum().clamp(min=1)
        return loss, {"loss": loss.detach(),
                      "rewards/accuracies": distributed.Weighted(accuracy.detach().float(), ordered.sum())}


@dataclass
class CostModelTask(RewardTask, RewardContext, PairData):
    """Safe RLHF cost model: chosen = safer, rejected = less safe, `chosen_is_safe` and
    `rejected_is_safe` per-response labels; cost > 0 means harmful (see `cost_model_loss`)."""

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams("cost", self.config, {"reg": 0.0, "rm_context_columns": None})

    def images_problem(self) -> str | None:
        return None

    def tokenize(self, table: RowTable, tokenizer):
        for i, row in enumerate(table.rows):
            for column in ("chosen_is_safe", "rejected_is_safe"):
                if not isinstance(row.get(column), bool | int) or row[column] not in (0, 1):
                    raise table.error(
                        i, f"column {column!r} must be true/false, got {row.get(column)!r}"
                    )
        return super().tokenize(table, tokenizer)

    def loss(self, model, batch: Batch) -> tuple[Tensor, Metrics]:
        costs = reward_scores(model, batch["input_ids"], batch["attention_mask"],
                              pixel_inputs=batch.get("pixel_inputs"))
        half = costs.shape[0] // 2
        safer, unsafer = costs[:half], costs[half:]
        safer_safe, unsafer_safe = batch["chosen_is_safe"], batch["rejected_is_safe"]
        per_pair = cost_model_loss(
            safer, unsafer, safer_safe, unsafer_safe, reg=float(self.hparams["reg"])
        )
        loss = per_pair.mean()
        sign_right = torch.cat(
            [(safer > 0) != safer_safe.bool(), (unsafer > 0) != unsafer_safe.bool()]
        )
        return loss, {
            "loss": loss.detach(),
            "costs/safer": safer.mean().detach(),
            "costs/unsafer": unsafer.mean().detach(),
            "rewards/accuracies": (unsafer > safer).float().mean().detach(),
            "costs/sign_accuracy": sign_right.float().mean().detach(),
        }


@dataclass
class BayesRewardTask(RewardTask, PairData):
    """BRME: H Gaussian heads (mu_i, log sigma_i) on one backbone, reparameterised samples
    trained with Bradley-Terry. `heads` and `lambda_` are required (addendum §8: the paper's
    values are not pinned down); lambda_ is only used for the logged accuracy and saved in
    `brme.json` for `BayesRewardScorer`. log sigma is clamped to [-7, 3] for stability."""

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams("rm_bayes", self.config, {"heads": ..., "lambda_": ...})
        self.heads = int(self.hparams["heads"])
        if self.heads < 1 or not 0.0 <= float(self.hparams["lambda_"]) <= 1.0:
            raise ValueError("rm_bayes: heads must be >= 1 and lambda_ in [0, 1]")

    @property
    def num_labels(self) -> int:
        return 2 * self.heads

    def loss(self, model, batch: Batch) -> tuple[Tensor, Metrics]:
        outputs = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B, 2H)
        means, log_stds = outputs[:, : self.heads], outputs[:, self.heads :].clamp(-7.0, 3.0)
        # the noise one process draws for the global batch, this rank's rows of it
        noise = distributed.pair_rows_of_draw(
            lambda rows, generator: torch.randn((rows, means.shape[1]), generator=generator, dtype=means.dtype,
                                                device=means.device if generator is None else "cpu"
                                                ).to(means.device),
            means.shape[0] // 2)
        half = means.shape[0] // 2
        per_pair = brme_bradley_terry(
            means[:half], log_stds[:half], means[half:], log_stds[half:], noise[:half], noise[half:]
        )
        loss = per_pair.mean()
        with torch.no_grad():
            reward = brme_reward(means, log_stds, float(self.hparams["lambda_"]))
        metrics = score_pair_metrics(loss, reward[:half], reward[half:])
        metrics["sigma/mean"] = log_stds.exp().mean().detach()
        return loss, metrics

    def write_final(self, final_dir) -> None:
        manifest = {
            "heads": self.heads,
            "lambda_": float(self.hparams["lambda_"]),
            "outputs": "mu_1..mu_H, log_sigma_1..log_sigma_H",
        }
        (final_dir / "brme.json").write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class PreferenceModelTask(RewardTask):
    """Pairwise preference model: one sequence per (prompt, A, B) from `template`; each pair
    in both orders, labels 1 (chosen first) and 0, BCE (`preference_bce`)."""

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams(
            "preference_model", self.config, {"template": DEFAULT_TEMPLATE}
        )

    def tokenize(self, table: RowTable, tokenizer):
        from alignkit.data import split_implicit_prompt

        stats, examples = TruncationStats(), []
        for i, raw in enumerate(table.rows):
            row = split_implicit_prompt(raw)
            both = []
            for a, b in ((row["chosen"], row["rejected"]), (row["rejected"], row["chosen"])):
                try:
                    ids, cut = encode_preference(
                        tokenizer,
                        row["prompt"],
                        a,
                        b,
                        template=self.hparams["template"],
                        max_length=self.config.max_length,
                        max_prompt_length=self.config.max_prompt_length,
                    )
                except (KeyError, ValueError) as error:
                    raise table.error(
                        i, f"cannot build the preference sequence: {error}"
                    ) from error
                stats.truncated_responses += int(cut)
                both.append(ids)
            stats.examples += 1
            examples.append(both)
        return examples, stats

    def length(self, example: list[list[int]]) -> int:
        return max(len(ids) for ids in example)

    def collate(self, examples: list[list[list[int]]], pad_id: int) -> Batch:
        return _pad_rows([ex[0] for ex in examples] + [ex[1] for ex in examples], pad_id)

    def loss(self, model, batch: Batch) -> tuple[Tensor, Metrics]:
        logits = reward_scores(model, batch["input_ids"], batch["attention_mask"])
        half = logits.shape[0] // 2
        chosen_first, rejected_first = logits[:half], logits[half:]
        loss = preference_bce(chosen_first, rejected_first).mean()
        prob = 0.5 * (torch.sigmoid(chosen_first) + 1 - torch.sigmoid(rejected_first))
        return loss, {
            "loss": loss.detach(),
            "rewards/accuracies": (prob > 0.5).float().mean().detach(),
            "preference/prob_chosen": prob.mean().detach(),
        }

    def write_final(self, final_dir) -> None:
        manifest = {"template": self.hparams["template"], "max_length": self.config.max_length}
        (final_dir / "preference_model.json").write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class SegmentRewardTask(RewardTask):
    """Per-segment reward model (fine-grained RLHF): rows `prompt`, `completion`,
    `segment_labels` (one per segment of the completion at `granularity`), or `prompt`,
    `segments` (list of strings, concatenated into the completion), `segment_labels`."""

    data_kinds: tuple[str, ...] = ("sft", "prompt")

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams(
            "rm_segment", self.config, {"granularity": "sentence", "segment_loss": "bce"}
        )
        if self.hparams["granularity"] not in GRANULARITIES:
            raise ValueError(f"rm_segment: granularity must be one of {sorted(GRANULARITIES)}")

    def tokenize(self, table: RowTable, tokenizer):
        stats, examples = TruncationStats(), []
        for i, row in enumerate(table.rows):
            labels = row.get("segment_labels")
            segments = row.get("segments")
            completion = "".join(segments) if isinstance(segments, list) else row.get("completion")
            if not isinstance(labels, list) or not isinstance(completion, str):
                raise table.error(
                    i, "needs 'segment_labels' (a list) and 'completion' or 'segments'"
                )
            spans = None
            if isinstance(segments, list):
                ends = [sum(len(s) for s in segments[: k + 1]) for k in range(len(segments))]
                spans = list(zip([0, *ends[:-1]], ends, strict=True))
            ids, positions, count = encode_segments(
                tokenizer,
                str(row.get("prompt", "")),
                completion,
                self.hparams["granularity"],
                self.config.max_length,
                spans=spans,
            )
            if count != len(labels):
                raise table.error(i, f"{count} segments but {len(labels)} segment_labels")
            stats.examples += 1
            stats.truncated_responses += int(len(positions) < count)
            examples.append((ids, positions, [float(v) for v in labels[: len(positions)]]))
        return examples, stats

    def length(self, example) -> int:
        return len(example[0])

    def collate(self, examples, pad_id: int) -> Batch:
        batch = _pad_rows([ex[0] for ex in examples], pad_id)
        labels = torch.zeros(batch["input_ids"].shape)
        mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
        for n, (_, positions, values) in enumerate(examples):
            labels[n, positions] = torch.tensor(values)
            mask[n, positions] = True
        batch.update(segment_labels=labels, segment_mask=mask)
        return batch

    def loss(self, model, batch: Batch) -> tuple[Tensor, Metrics]:
        scores = token_scores(model, batch["input_ids"], batch["attention_mask"])  # (B, T)
        kind = self.hparams["segment_loss"]
        loss = segment_reward_loss(
            scores, batch["segment_labels"], batch["segment_mask"], kind
        ).mean()
        metrics = {"loss": loss.detach()}
        if kind == "bce":
            mask = batch["segment_mask"]
            right = ((scores > 0) == (batch["segment_labels"] > 0.5)) & mask
            metrics["rewards/accuracies"] = distributed.Weighted(
                (right.sum() / mask.sum().clamp(min=1)).detach().float(), mask.sum())
        return loss, metrics

    def write_final(self, final_dir) -> None:
        manifest = {
            "granularity": self.hparams["granularity"],
            "segment_loss": self.hparams["segment_loss"],
        }
        (final_dir / "segment_rm.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _register() -> None:
    specs = [
        (
            "rm_ranked",
            "prompt+completions+scores",
            "reward model",
            "Plackett-Luce / all-pairs ranking RM (Ouyang et al. 2022)",
            RankedRewardTask,
        ),
        (
            "cost",
            "prompt+chosen(safer)+rejected+chosen_is_safe+rejected_is_safe",
            "cost model",
            "Safe RLHF cost model (Dai et al. 2023)",
            CostModelTask,
        ),
        (
            "rm_bayes",
            "prompt+chosen+rejected",
            "multi-head Gaussian RM",
            "BRME reward-robust RM (Yan et al. 2024)",
            BayesRewardTask,
        ),
        (
            "preference_model",
            "prompt+chosen+rejected",
            "pairwise preference model",
            "General preference model (Munos et al. 2023)",
            PreferenceModelTask,
        ),
        (
            "rm_segment",
            "prompt+completion|segments+segment_labels",
            "segment reward model",
            "Fine-grained RLHF segment rewards (Wu et al. 2023)",
            SegmentRewardTask,
        ),
    ]
    register_reward_algorithms(specs)


_register()
