"""What the offline trainer optimises: one small `Task` per family (SFT, reward model,
pairwise preference losses). A task tokenises rows, collates batches, precomputes what it
caches (reference log-probs) and turns a batch into a scalar loss plus detached metrics.
The loop in `offline.py` is the same for all of them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data import (
    PairExample,
    RowTable,
    SeqExample,
    TruncationStats,
    collate_pairs,
    collate_sequences,
    tokenize_pairwise,
    tokenize_sft,
)
from alignkit.models import reward_scores, sequence_logps
from alignkit.objectives import PAIRWISE, PairLogps
from alignkit.objectives.registry import REFERENCE_FREE
from alignkit.objectives.reward_model import bradley_terry
from alignkit.training.config import TrainConfig

Metrics = dict[str, Tensor]


def accepted_hparams(fn: Callable[..., Any]) -> dict[str, Any]:
    """Keyword hyper-parameters of a loss function with their defaults."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind is not p.VAR_POSITIONAL}


def check_hparams(algorithm: str, given: dict[str, Any], accepted: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(
            f"{algorithm}: unknown hyper-parameter(s) {unknown}; "
            f"accepted: {sorted(accepted) or 'none'}"
        )


@dataclass
class SFTTask:
    """Supervised fine-tuning: NLL on completion tokens only (prompt tokens masked).

    L = -sum_t m_t log p(y_t | x, y_<t) / sum_t m_t  (token mean over the micro-batch)
    """

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft",)
    needs_reference: bool = False

    def __post_init__(self) -> None:
        check_hparams("sft", self.config.hparams, {})

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[SeqExample], TruncationStats]:
        c = self.config
        return tokenize_sft(
            table,
            tokenizer,
            max_length=c.max_length,
            max_prompt_length=c.max_prompt_length,
            chat=bool(c.chat_template),
        )

    def length(self, example: SeqExample) -> int:
        return len(example.prompt_ids) + len(example.completion_ids)

    def collate(self, examples: list[SeqExample], pad_id: int) -> dict[str, Tensor]:
        return collate_sequences(examples, pad_id)

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logps, counts = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            chunk_size=self.config.logp_chunk_size,
        )
        tokens = counts.sum().clamp(min=1)
        loss = -logps.sum() / tokens
        return loss, {"loss": loss.detach(), "logps/completion": (logps / counts.clamp(min=1)).mean().detach()}


class PairData:
    """Tokenising and collating preference pairs: shared by reward models and pairwise losses."""

    config: TrainConfig

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[PairExample], TruncationStats]:
        c = self.config
        return tokenize_pairwise(
            table,
            tokenizer,
            max_length=c.max_length,
            max_prompt_length=c.max_prompt_length,
            chat=bool(c.chat_template),
        )

    def length(self, example: PairExample) -> int:
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))

    def collate(self, examples: list[PairExample], pad_id: int) -> dict[str, Tensor]:
        return collate_pairs(examples, pad_id)


@dataclass
class RewardModelTask(PairData):
    """Bradley-Terry reward model with optional margin column and centering coefficient.

    L = -log sigma(r(x, y_w) - r(x, y_l) - m) + c (r_w + r_l)^2, scores read at the last
    real token of prompt + response.
    """

    config: TrainConfig
    model_kind: str = "reward"
    data_kinds: tuple[str, ...] = ("pairwise",)
    needs_reference: bool = False
    center_coef: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        check_hparams("rm", self.config.hparams, {"center_rewards_coefficient": 0.0})
        self.center_coef = float(self.config.hparams.get("center_rewards_coefficient", 0.0))

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
        half = scores.shape[0] // 2
        chosen, rejected = scores[:half], scores[half:]
        per_pair = bradley_terry(chosen, rejected, batch.get("margin"), self.center_coef)
        loss = per_pair.mean()
        return loss, {
            "loss": loss.detach(),
            "rewards/chosen": chosen.mean().detach(),
            "rewards/rejected": rejected.mean().detach(),
            "rewards/margins": (chosen - rejected).mean().detach(),
            "rewards/accuracies": (chosen > rejected).float().mean().detach(),
        }


@dataclass
class PairwiseTask(PairData):
    """Any loss from `alignkit.objectives.PAIRWISE`, chosen and rejected in one forward.

    Reference log-probs are computed once before training (`precompute_reference`) and
    travel with each example, so no reference model stays in memory while training.
    """

    config: TrainConfig
    loss_name: str = "dpo"
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("pairwise",)
    hparams: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn = PAIRWISE[self.loss_name]
        accepted = accepted_hparams(self.loss_fn)
        check_hparams(self.loss_name, self.config.hparams, accepted)
        self.hparams = {**{k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}}
        self.hparams.update(self.config.hparams)
        self.beta = float(self.hparams.get("beta", 1.0))

    @property
    def needs_reference(self) -> bool:
        return self.loss_name not in REFERENCE_FREE

    def pair_logps(self, model, batch: dict[str, Tensor]) -> PairLogps:
        logps, counts = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            chunk_size=self.config.logp_chunk_size,
        )
        half = logps.shape[0] // 2
        return PairLogps(
            chosen=logps[:half],
            rejected=logps[half:],
            chosen_tokens=counts[:half],
            rejected_tokens=counts[half:],
            ref_chosen=batch.get("ref_chosen"),
            ref_rejected=batch.get("ref_rejected"),
        )

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logps = self.pair_logps(model, batch)
        loss = self.loss_fn(logps, **self.hparams).mean()
        return loss, self.pair_metrics(loss, logps)

    def pair_metrics(self, loss: Tensor, logps: PairLogps) -> Metrics:
        """DPO's implicit rewards beta * (logp - ref_logp); beta * mean token logp without a reference."""
        if logps.ref_chosen is not None and logps.ref_rejected is not None:
            chosen = self.beta * (logps.chosen - logps.ref_chosen)
            rejected = self.beta * (logps.rejected - logps.ref_rejected)
        else:
            chosen = self.beta * logps.chosen / logps.chosen_tokens.clamp(min=1)
            rejected = self.beta * logps.rejected / logps.rejected_tokens.clamp(min=1)
        return {
            "loss": loss.detach(),
            "rewards/chosen": chosen.mean().detach(),
            "rewards/rejected": rejected.mean().detach(),
            "rewards/margins": (chosen - rejected).mean().detach(),
            "rewards/accuracies": (chosen > rejected).float().mean().detach(),
            "logps/chosen": logps.chosen.mean().detach(),
            "logps/rejected": logps.rejected.mean().detach(),
        }

    @torch.no_grad()
    def reference_logps(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logps, _ = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            chunk_size=self.config.logp_chunk_size,
        )
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]


def make_task(config: TrainConfig):
    """The task behind an algorithm name."""
    from alignkit.training.registry import ALGORITHMS

    if config.algorithm not in ALGORITHMS:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown algorithm {config.algorithm!r}; known: {known}")
    return ALGORITHMS[config.algorithm].make_task(config)


def _register_offline_family() -> None:
    from functools import partial

    from alignkit.training.registry import AlgorithmSpec, first_docstring_line, register_algorithm

    register_algorithm(AlgorithmSpec(
        "sft", "sft", "prompt+completion | messages", "policy",
        "Supervised fine-tuning (Ouyang et al. 2022)", SFTTask))
    register_algorithm(AlgorithmSpec(
        "rm", "reward", "prompt+chosen+rejected [+margin]", "reward model",
        "Bradley-Terry reward model (Ouyang et al. 2022)", RewardModelTask))
    for name, fn in PAIRWISE.items():
        models = "policy" if name in REFERENCE_FREE else "policy (+ reference log-probs cached once)"
        register_algorithm(AlgorithmSpec(
            name, "pairwise", "prompt+chosen+rejected", models, first_docstring_line(fn),
            partial(PairwiseTask, loss_name=name)))


_register_offline_family()
