"""Unpaired tasks: every loss in `alignkit.objectives.UNPAIRED` (`kto`) on data with `prompt`,
`completion` and a boolean `label` (desirable / undesirable).

KTO's reference point z_0 is estimated per micro-batch from mismatched pairs, as TRL's
`KTOTrainer` does: completions are rotated by one within the batch, (x_1, y_B), (x_2, y_1), ...,
(x_B, y_{B-1}), so the mismatched completions are the same set as the batch's own; their
policy log-probs (no gradient) and reference log-probs give

    z_0 = max(0, sg(mean_j [logp(y'_j | x_j) - ref_logp(y'_j | x_j)])).

TRL fixes these pairs when it builds the dataset and therefore needs sequential batches; here
they are formed at collation from the actual (length-bucketed, shuffled) micro-batch, which keeps
the property TRL wants without forbidding shuffling. The price: the mismatched pairs change every
epoch, so their reference log-probs are computed each step, from the base model with adapters
off under LoRA, otherwise from a frozen copy of the initial policy (or `--ref-model`). The
matched pairs' reference log-probs are cached once before training.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data import SeqExample, collate_sequences
from alignkit.models import adapter_disabled, is_peft, sequence_logps
from alignkit.objectives import UNPAIRED, kto_kl_estimate
from alignkit.training.offline.reference import load_reference
from alignkit.training.offline.reference_values import attach_reference_values
from alignkit.training.offline.tasks import Metrics, SequenceData, accepted_hparams, check_hparams
from alignkit.training.run import distributed
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm


def collate_unpaired(examples: list[SeqExample], pad_id: int, max_length: int,
                     keep: list[int] | None = None) -> dict[str, Tensor]:
    """`collate_sequences` of the examples (with `label` (B,) and, once cached, `ref_logps` (B,)),
    plus the mismatched KL rows under `kl_input_ids`, `kl_attention_mask`, `kl_response_mask`:
    row i is prompt i with the completion of example i - 1 (cyclically), cut to `max_length`.
    `keep`: only these positions (a rank's rows), mismatched within the whole `examples`."""
    shifted = examples[-1:] + examples[:-1]
    mismatched = [
        SeqExample(ex.prompt_ids, other.completion_ids[: max(1, max_length - len(ex.prompt_ids))], ex.row)
        for ex, other in zip(examples, shifted, strict=True)
    ]
    if keep is not None:
        examples, mismatched = [examples[p] for p in keep], [mismatched[p] for p in keep]
    batch = collate_sequences(examples, pad_id)
    if all("ref_logps" in ex.extras for ex in examples):
        batch["ref_logps"] = torch.cat([ex.extras["ref_logps"] for ex in examples])
    kl = collate_sequences(mismatched, pad_id)
    for key in ("input_ids", "attention_mask", "response_mask"):
        batch[f"kl_{key}"] = kl[key]
    return batch


@dataclass
class UnpairedTask(SequenceData):
    """Any `UNPAIRED` loss; batch mean of the per-example losses (TRL's `losses.nanmean()`)."""

    config: TrainConfig
    loss_name: str = "kto"
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("unpaired",)
    needs_reference: bool = True
    hparams: dict[str, Any] = field(init=False, default_factory=dict)
    reference: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.loss_fn = UNPAIRED[self.loss_name]
        accepted = accepted_hparams(self.loss_fn)
        for positional in ("ref_logps", "labels", "kl_estimate"):
            accepted.pop(positional, None)
        check_hparams(self.loss_name, self.config.hparams, accepted)
        self.hparams = {k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}
        self.hparams.update(self.config.hparams)
        if self.config.batch_size < 2:
            raise ValueError(
                f"{self.loss_name}: batch_size must be > 1; with one example the KL estimate "
                "is the example's own log-ratio"
            )

    def collate(self, examples: list[SeqExample], pad_id: int) -> dict[str, Tensor]:
        return collate_unpaired(examples, pad_id, self.config.max_length)

    def collate_shard(self, examples: list[SeqExample], positions: list[int], pad_id: int) -> dict[str, Tensor]:
        """A rank's rows, with the mismatched KL rows of the global micro-batch (as one process)."""
        return collate_unpaired(examples, pad_id, self.config.max_length, keep=positions)

    def prepare(self, model, tokenizer, splits, run_dir) -> None:
        attach_reference_values(self, model, tokenizer, splits["train"][1], splits["eval"][1], self.config, run_dir)
        reference, owned = load_reference(self.config, model, tokenizer)
        if owned:
            self.reference = reference
        elif self.config.lora_r == 0 and not is_peft(model):
            # the policy is about to change in place: keep a frozen copy for the KL term
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def _logps(self, model, batch: dict[str, Tensor], prefix: str = "") -> tuple[Tensor, Tensor]:
        return sequence_logps(
            model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
            batch[f"{prefix}response_mask"], chunk_size=self.config.logp_chunk_size,
        )

    @torch.no_grad()
    def reference_values(self, model, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        logps, _ = self._logps(model, batch)
        return {"ref_logps": list(logps.unsqueeze(-1))}

    @torch.no_grad()
    def kl_estimate(self, model, batch: dict[str, Tensor]) -> Tensor:
        """z_0 from the mismatched rows: policy and reference log-probs, no gradient."""
        policy_kl, _ = self._logps(model, batch, "kl_")
        if self.reference is not None:
            reference, context = self.reference, nullcontext()
        elif is_peft(model):
            reference, context = model, adapter_disabled(model)
        else:
            raise RuntimeError("kto: no reference model for the KL term (prepare() was not called)")
        with context:
            ref_kl, _ = self._logps(reference, batch, "kl_")
        if distributed.current().distributed:  # z_0 over the global micro-batch (TRL gathers it too)
            return distributed.global_mean(policy_kl - ref_kl).clamp(min=0)
        return kto_kl_estimate(policy_kl, ref_kl)

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        z0 = self.kl_estimate(model, batch)
        logps, _ = self._logps(model, batch)
        labels = batch["label"].bool()
        per_example = self.loss_fn(logps, batch["ref_logps"], labels, z0, **self.hparams)
        loss = per_example.mean()
        rewards = self.hparams.get("beta", 1.0) * (logps - batch["ref_logps"]).detach()
        metrics: Metrics = {"loss": loss.detach(), "kl": z0.detach()}
        for name, chosen in (("chosen", labels), ("rejected", ~labels)):
            if chosen.any():  # a micro-batch may hold one class only; the mean skips it then
                metrics[f"rewards/{name}"] = distributed.Weighted(rewards[chosen].mean(), chosen.sum())
                metrics[f"logps/{name}"] = distributed.Weighted(logps[chosen].mean().detach(), chosen.sum())
        return loss, metrics


def _register() -> None:
    from functools import partial

    papers = {"kto": "KTO (Ethayarajh et al. 2024, Model Alignment as Prospect Theoretic Optimization)"}
    for name in UNPAIRED:
        register_algorithm(AlgorithmSpec(
            name, "unpaired", "prompt+completion+label",
            "policy + reference (KL term; base model with adapters off under LoRA; "
            "matched reference log-probs cached once)",
            papers.get(name, name), partial(UnpairedTask, loss_name=name)))


_register()
