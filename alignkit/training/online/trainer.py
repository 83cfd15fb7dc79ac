"""The policy role: `PolicyTrainer` owns the trained parameters (policy, and the critic's when
there is one), the optimizer and the LR schedule, and performs step 6 of the online loop.

`update(experience)`: K epochs x M minibatches over the step's samples; each minibatch is one
forward/backward (in micro-batches), one gradient clip over every trained parameter and one
optimizer step, skipped when the gradient norm is not finite. The schedule steps once per
training step. The policy and value losses share that backward, clip and step, which is why
the critic's parameters are trained here (and `values` makes the trainer the critic role).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.models import adapter_disabled
from alignkit.models.saving import plain_state_dict
from alignkit.training.online.distributed_rollout import rank_rows
from alignkit.training.online.presets import OnlineSettings, no_grad_rows
from alignkit.training.online.roles import (
    SequenceBatch,
    ValueModel,
    in_chunks,
    response_distributions,
    response_logps,
)
from alignkit.training.online.sampling import step_seed
from alignkit.training.online.steps import (
    best_worst_pairs,
    branch_pairs,
    pairwise_update,
    policy_gradient_update,
    sft_update,
)
from alignkit.training.run import distributed, wrapping
from alignkit.training.run.checkpoint import load_checkpoint, save_checkpoint
from alignkit.training.run.degenerate import NonFiniteStop
from alignkit.training.run.schedule import adamw, build_scheduler
from alignkit.training.run.wrapping import TaskForward, full_tensor

log = logging.getLogger("alignkit")


@dataclass
class Experience:
    """One step's training samples and what steps 2-5 computed for them.

    Token tensors are (N, L) in response coordinates, per-sample ones (N,). advantages and
    returns are None for the pairwise objective; ref_logp without a reference, old_values
    without a critic.
    """

    batch: SequenceBatch
    rewards: Tensor
    """(N,) shaped rewards (online DPO pairs the best and worst sample of each group)."""
    group_index: Tensor
    old_logp: Tensor
    ref_logp: Tensor | None
    advantages: Tensor | None
    returns: Tensor | None
    old_values: Tensor | None
    beta: float
    """The KL coefficient of this step (kl_in="loss" adds beta x KL to the loss)."""
    step: int
    """The training step: seeds the minibatch order; the critic warm-up counts it."""
    tis_weights: Tensor | None = None
    """(N, L) truncated importance weights of each token's policy loss (--set tis_cap), or None."""
    ref_dist: Tensor | None = None
    """(N, L, V) log softmax over the vocabulary of the reference (objective sft with beta > 0) or
    the teacher (objective distill), or None."""
    rollin_mask: Tensor | None = None
    """(N, L) DR-PO's rolled-in tokens, left out of the policy-gradient term, or None."""


class Trainable(nn.Module):
    """Policy and critic in one module, so one checkpoint holds every trained parameter."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic


class PolicyTrainer:
    """The trained policy (a transformers causal LM, peft too) and critic, with their optimizer.

    critic: a separate `ValueModel`; value_head: a head on the policy's own hidden states (the
    "shared" critic: one forward gives log-probs and values). At most one of the two.
    """

    def __init__(self, model: nn.Module, s: OnlineSettings, config: Any, *, total_steps: int,
                 critic: ValueModel | None = None, value_head: nn.Module | None = None) -> None:
        self.model, self.s, self.critic, self.value_head = model, s, critic, value_head
        self.chunk_size, self.seed, self.max_grad_norm = config.logp_chunk_size, config.seed, config.max_grad_norm
        self.nonfinite = config.nonfinite
        self.module = Trainable(model, critic if critic is not None else value_head)
        self.module.eval()  # dropout off for sampling, old, reference and training log-probs alike
        # one pass, one minibatch, samples of the current weights: the old log-probs are the new ones
        self.on_policy = s.epochs_per_batch == 1 and s.minibatches == 1 and not s.async_rollout
        self.device = next(model.parameters()).device
        # every gradient-enabled forward goes through one module (DDP-wrapped under torchrun)
        self.ranks = distributed.current()
        self.forward_module = TaskForward(self.module, self._compute)
        self.engine: nn.Module = self.forward_module
        # FSDP2: every forward of the sharded module is a collective, so no-grad passes run the
        # same number of forwards on every rank (rank_rows(lockstep=True))
        self.lockstep = self.ranks.distributed and self.ranks.strategy == "fsdp2"
        if self.ranks.distributed:
            self.engine = wrapping.wrap(self.forward_module, self.ranks, self.device)
        # after wrapping: fully_shard replaces the parameters the optimizer must hold
        self.optimizer = build_online_optimizer(model, self.module.critic, config.lr, s.critic_lr,
                                                config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        self.hft = None
        """The run's HalfFineTuning (`--set hft=true`; the driver sets it), else None."""

    @property
    def has_critic(self) -> bool:
        """Whether a critic (separate or shared) is trained, so `values` can be called."""
        return self.module.critic is not None

    # ------------------------------------------------------------------ log-probs and values

    def _compute(self, module: Trainable, batch: SequenceBatch, with_entropy: bool = False,
                 with_values: bool = True, reference: bool = False, distributions: bool = False):
        """The trained computation of one micro-batch (the wrapped module's forward): (N, L)
        log-probs, entropies and values (shared head or separate critic; None without one).
        `reference`: the log-probs of the policy with its LoRA adapter off (the reference).
        `distributions`: (log-probs, entropies, (N, L, V) log softmax) instead; with
        `reference`, the reference's (N, L, V) log softmax alone."""
        if reference:
            with adapter_disabled(module.policy):
                if distributions:
                    return response_distributions(module.policy, batch)[2]
                return response_logps(module.policy, batch, chunk_size=self.chunk_size)[0]
        if distributions:
            return response_distributions(module.policy, batch)
        logps, entropy, values = response_logps(module.policy, batch, chunk_size=self.chunk_size,
                                                with_entropy=with_entropy, value_head=self.value_head)
        if self.critic is not None and with_values:
            values = self.critic.values(batch)
        return logps, entropy, values

    def forward(self, batch: SequenceBatch, *, with_entropy: bool = False, with_values: bool = True,
                distributions: bool = False):
        """One forward of a micro-batch: (N, L) log-probs, entropies and values (with
        `distributions`: log-probs, entropies and the (N, L, V) log softmax). With gradients
        it runs through the data-parallel wrapper; without, on this rank's module directly."""
        module = self.engine if torch.is_grad_enabled() else self.forward_module
        return module(batch, with_entropy, with_values, False, distributions)

    def gradient_sync(self, enabled: bool):
        """Context: all-reduce gradients in this backward (the last micro-batch) or not."""
        return wrapping.gradient_sync(self.engine, enabled)

    def _no_grad_rows(self, fn, batch: SequenceBatch) -> Tensor:
        """(N, L) `fn(micro-batch)` over the whole batch without gradients: micro-batches of this
        rank's block of rows (in lockstep under FSDP2), gathered from every rank."""
        with torch.no_grad():
            return rank_rows(lambda rows: in_chunks(fn, rows, no_grad_rows(self.s)), batch, self.ranks,
                             self.lockstep)

    def logps(self, batch: SequenceBatch) -> Tensor:
        """(N, L) log-probs of the current policy at temperature 1."""
        return self._no_grad_rows(lambda b: self.forward(b, with_values=False)[0], batch)

    def reference_logps(self, batch: SequenceBatch) -> Tensor:
        """(N, L) log-probs of the LoRA policy with its adapter off, through the (sharded)
        module: the reference role of an FSDP2 LoRA run."""
        return self._no_grad_rows(lambda b: self.forward_module(b, False, False, True), batch)

    def reference_distributions(self, batch: SequenceBatch) -> Tensor:
        """(N, L, V) log softmax of the LoRA policy with its adapter off (see reference_logps)."""
        return self._no_grad_rows(lambda b: self.forward_module(b, False, False, True, True), batch)

    def values(self, batch: SequenceBatch) -> Tensor:
        """(N, L) V(s_t) of the current critic (the critic role)."""
        return self._no_grad_rows(lambda b: self.forward(b)[2], batch)

    # ------------------------------------------------------------------ step 6

    def update(self, experience: Experience) -> dict[str, float]:
        """K epochs x M minibatches of optimizer steps, then one LR-schedule step; returns the
        minibatch metrics averaged over minibatches, with the lr of this step (and HFT's)."""
        hft_metrics = self.hft.enter_step(experience.step) if self.hft is not None else {}
        updates = [self._minibatch_step(experience, rows)
                   for epoch in range(self.s.epochs_per_batch)
                   for rows in self._minibatches(experience, epoch)]
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"lr": self.scheduler.get_last_lr()[0], **hft_metrics}
        self.scheduler.step()
        for key in {k for u in updates for k in u}:
            metrics[key] = sum(u[key] for u in updates if key in u) / sum(key in u for u in updates)
        metrics.setdefault("loss", 0.0)
        return metrics

    def skip_update(self) -> dict[str, float]:
        """A step without training rows: only the LR schedule moves (it stays a function of the
        step); returns the lr of this step."""
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return {"lr": lr}

    def _minibatches(self, experience: Experience, epoch: int) -> list[Tensor]:
        """Epoch `epoch`'s minibatches: (P, 2) best/worst pairs (pairwise) or sample rows in an
        order seeded by (seed, step, epoch), split into M parts."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, experience.step) + epoch + 1)
        if self.s.objective == "pairwise" and self.s.pairwise_loss == "refuel":
            units = branch_pairs(experience.group_index)  # every pair regresses, ties included
        elif self.s.objective == "pairwise":
            units = best_worst_pairs(experience.rewards, experience.group_index)
        else:
            units = torch.randperm(len(experience.rewards), generator=generator).to(self.device)
        return list(units.chunk(self.s.minibatches)) if len(units) else []

    def _minibatch_step(self, e: Experience, rows: Tensor) -> dict[str, float]:
        """Forward/backward of one minibatch, clip, optimizer step (unless the gradient norm is
        not finite); its metrics with grad_norm."""
        s = self.s
        self.optimizer.zero_grad(set_to_none=True)
        if s.objective == "pairwise":
            part = pairwise_update(self, e.batch, rows, e.ref_logp, s, e.old_logp, e.rewards)
        elif s.objective in ("sft", "distill"):
            part = sft_update(self, e.batch, rows, s, e.ref_dist,
                              sample_weights=e.rewards if s.cgpo else None)  # cgpo_crraft: r~-weighted NLL
        else:
            part = policy_gradient_update(self, e.batch, rows, s, e.old_logp, e.ref_logp,
                                          e.advantages, e.returns, e.old_values, self.on_policy, e.beta,
                                          e.step > s.critic_warmup_steps, tis_weights=e.tis_weights,
                                          rollin_mask=e.rollin_mask)
        if self.hft is not None:
            self.hft.drop_frozen_grads()  # this round's frozen half of the policy: no update
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
            params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf")))
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        elif self.nonfinite == "stop":
            raise NonFiniteStop(e.step, "gradient")
        else:
            log.warning("step %d: non-finite gradient; update skipped", e.step)
        part["grad_norm"] = float(grad_norm)
        part["updates_skipped"] = 0.0 if torch.isfinite(grad_norm) else 1.0  # averaged: the step's fraction
        return part

    # ------------------------------------------------------------------ weights and state

    def weights(self, merged: bool = True, adapters: bool = True) -> Iterator[tuple[str, Tensor]]:
        """(HF parameter name, full tensor) of the policy with LoRA merged (SSF folded): what a
        rollout engine loads. Tensors are detached views or merged copies: do not modify them.
        `merged=False`: the trained parameters only, by the policy's own names (LoRA unmerged),
        for an engine holding a copy of the policy module. `adapters=False`: the base weights,
        LoRA left out (for an engine that applies the adapter itself). FSDP2 shards are
        gathered (every rank must iterate)."""
        if not merged:
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    yield name, full_tensor(param.detach())
            return
        state = plain_state_dict(self.model, adapters=adapters)
        for name, tensor in state.items():
            yield name, full_tensor(tensor.detach())

    def save(self, run_dir: Path, step: int, *, keep: int | None, extras: dict) -> None:
        """Atomic checkpoint of step `step`: trained weights, optimizer, schedule, RNG, `extras`."""
        save_checkpoint(run_dir, step, self.module, self.optimizer, self.scheduler, keep=keep, extras=extras)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore a checkpoint written by `save`; returns its metadata (step, extras)."""
        return load_checkpoint(checkpoint, self.module, self.optimizer, self.scheduler)


def build_online_optimizer(model: nn.Module, critic: nn.Module | None, lr: float, critic_lr: float | None,
                           weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the policy's trainable parameters, the critic's in a group of its own (lr
    `critic_lr`, default `lr`)."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": critic_lr or lr})
    return adamw(groups, lr=lr, weight_decay=weight_decay)
