"""Listwise tasks: every loss in `alignkit.objectives.LISTWISE` (`pro`, `listwise_dpo`) on ranked
data (`prompt`, `completions`, `scores`).

The K_b responses of each prompt are flattened into one forward over sum_b K_b rows (no padding
rows for ragged K) and scattered back into (B, K_max) with a candidate mask. Reference log-probs
(`listwise_dpo`) are computed once before training and travel with each example.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data import RankedExample, SeqExample, collate_sequences
from alignkit.models import sequence_logps
from alignkit.objectives import LISTWISE
from alignkit.objectives.listwise import rank_by_score
from alignkit.training.offline.reference_values import attach_reference_values
from alignkit.training.offline.tasks import Metrics, RankedData, accepted_hparams, check_hparams
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.registry import AlgorithmSpec, first_docstring_line, register_algorithm

REFERENCE_FREE_LISTWISE = {"pro"}
PAPERS = {
    "pro": "PRO (Song et al. 2024, Preference Ranking Optimization for Human Alignment)",
    "listwise_dpo": "Plackett-Luce DPO (Rafailov et al. 2023, Appendix A.3)",
}


def collate_ranked(examples: list[RankedExample], pad_id: int) -> dict[str, Tensor]:
    """Flatten B ranked examples into N = sum_b K_b prompt+response rows.

    Returns the `collate_sequences` keys for the N rows (`input_ids` (N, T), ...), plus
    `candidate_mask` (B, K) bool (row-major order of its True entries = row order),
    `scores` (B, K) float32 (0 on padding), `rows` (B,) and, when every example carries them,
    `ref_logps` (B, K) float32.
    """
    flat = [SeqExample(ex.prompt_ids, ids, ex.row) for ex in examples for ids in ex.response_ids]
    batch = collate_sequences(flat, pad_id)
    counts = [len(ex.response_ids) for ex in examples]
    width = max(counts)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    scores = torch.zeros((len(examples), width), dtype=torch.float32)
    for b, ex in enumerate(examples):
        mask[b, : counts[b]] = True
        scores[b, : counts[b]] = torch.tensor(ex.scores, dtype=torch.float32)
    batch.update(candidate_mask=mask, scores=scores)
    batch["rows"] = torch.tensor([ex.row for ex in examples], dtype=torch.long)
    if all("ref_logps" in ex.extras for ex in examples):
        ref = torch.zeros((len(examples), width), dtype=torch.float32)
        for b, ex in enumerate(examples):
            ref[b, : counts[b]] = ex.extras["ref_logps"]
        batch["ref_logps"] = ref
    return batch


def to_grid(flat: Tensor, mask: Tensor) -> Tensor:
    """(N,) values of the flattened candidates -> (B, K), 0 on padding."""
    grid = flat.new_zeros(mask.shape)
    grid[mask] = flat
    return grid


@dataclass
class ListwiseTask(RankedData):
    """Any `LISTWISE` loss; rows need >= 2 completions (validation checks it)."""

    config: TrainConfig
    loss_name: str = "pro"
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("ranked",)
    hparams: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn = LISTWISE[self.loss_name]
        accepted = accepted_hparams(self.loss_fn)
        for positional in ("tokens", "scores", "ref_logps", "mask"):
            accepted.pop(positional, None)
        check_hparams(self.loss_name, self.config.hparams, accepted)
        self.hparams = {k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}
        self.hparams.update(self.config.hparams)

    @property
    def needs_reference(self) -> bool:
        return self.loss_name not in REFERENCE_FREE_LISTWISE

    def collate(self, examples: list[RankedExample], pad_id: int) -> dict[str, Tensor]:
        return collate_ranked(examples, pad_id)

    def prepare(self, model, tokenizer, splits, run_dir) -> None:
        if self.needs_reference:
            attach_reference_values(
                self, model, tokenizer, splits["train"][1], splits["eval"][1], self.config, run_dir
            )

    def candidate_logps(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed log-probs and token counts of every candidate, both (B, K)."""
        logps, counts = sequence_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
            chunk_size=self.config.logp_chunk_size,
        )
        mask = batch["candidate_mask"]
        return to_grid(logps, mask), to_grid(counts, mask)

    @torch.no_grad()
    def reference_values(self, model, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        logps, _ = self.candidate_logps(model, batch)
        mask = batch["candidate_mask"]
        return {"ref_logps": [row[m] for row, m in zip(logps, mask, strict=True)]}

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logps, tokens = self.candidate_logps(model, batch)
        mask = batch["candidate_mask"]
        ref = batch.get("ref_logps")
        per_prompt = self.loss_fn(logps, tokens, batch["scores"], ref, mask, **self.hparams)
        loss = per_prompt.mean()
        return loss, self.metrics(loss, logps, tokens, ref, batch["scores"], mask)

    def metrics(self, loss, logps, tokens, ref, scores, mask) -> Metrics:
        """Top-ranked candidate as `chosen`, bottom-ranked as `rejected`; rewards are the
        implicit ones: beta * (logp - ref_logp) with a reference, mean token logp without."""
        if ref is not None:
            rewards = self.hparams.get("beta", 1.0) * (logps - ref)
        else:
            rewards = logps / tokens.clamp(min=1)
        sorted_mask, sorted_logps, sorted_rewards = rank_by_score(scores, mask, logps, rewards)
        last = sorted_mask.sum(-1, keepdim=True) - 1  # (B, 1) index of the bottom candidate
        top_r, bottom_r = sorted_rewards[:, 0], sorted_rewards.gather(-1, last).squeeze(-1)
        return {
            "loss": loss.detach(),
            "rewards/chosen": top_r.mean().detach(),
            "rewards/rejected": bottom_r.mean().detach(),
            "rewards/margins": (top_r - bottom_r).mean().detach(),
            "rewards/accuracies": (top_r > bottom_r).float().mean().detach(),
            "logps/chosen": sorted_logps[:, 0].mean().detach(),
            "logps/rejected": sorted_logps.gather(-1, last).mean().detach(),
        }


def _register() -> None:
    from functools import partial

    for name, fn in LISTWISE.items():
        models = "policy" if name in REFERENCE_FREE_LISTWISE else "policy (+ reference log-probs cached once)"
        register_algorithm(AlgorithmSpec(
            name, "listwise", "prompt+completions+scores", models, PAPERS.get(name) or first_docstring_line(fn),
            partial(ListwiseTask, loss_name=name)))


_register()
