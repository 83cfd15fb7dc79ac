"""The loop of d3po and prdp: rounds of chains, per-step losses, checkpoints, final/.

1. the run directory is checked and locked by the offline loop (`task.run` is called inside it);
   config.yaml is written, and with --resume the newest intact checkpoint is restored
2. the pipeline loads (`pipeline.py`: DDIM scheduler, frozen VAE and text encoder); LoRA on the
   UNet by default (--lora-r, default rank 4), every UNet weight with --adapter none
3. each step is one round (`rounds.py`): B pairs of chains from the data or sampled by the
   current UNet, then `inner_epochs` optimizer updates on them (gradients accumulated over
   the chain's steps, clipped); the noise of step s comes from a generator seeded by
   (--seed, s) and the data order of an epoch from (--seed, epoch), so a resumed run draws
   exactly what the uninterrupted one drew
4. metrics.jsonl every --logging-steps; a checkpoint every --save-steps (and on SIGINT/SIGTERM),
   safetensors + JSON, atomic (alignkit.training.run.checkpoint)
5. final/: the pipeline with the LoRA merged into its UNet, a directory
   `DiffusionPipeline.from_pretrained` loads

Under torchrun (`--strategy ddp`; fsdp2 is refused) every rank runs this loop on the same
step order: `--batch-size` stays the global number of pairs, each rank takes its rows of the
step's pairs (`distributed.shard_rows`) and keeps its rows of noise drawn for the whole batch
(`noise.BatchPart`), so the ranks together see what one process sees. The loss is normalised
by the global number of teaching pairs, the trainable gradients are summed over ranks after the
round's backward (`sum_gradients`), then clipped; the parameters stay bit-identical on every
rank. Rewards score each rank's own images; metrics are global; rank 0 alone writes
config.yaml, metrics.jsonl, checkpoints and final/.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alignkit.diffusion.data import has_image_pairs, load_image_pairs, load_prompts
from alignkit.diffusion.noise import BatchPart
from alignkit.diffusion.pipeline import add_unet_lora, load_pipeline, write_final_pipeline
from alignkit.diffusion.rewards import load_image_reward
from alignkit.diffusion.rounds import SamplerSettings, image_pair_round, pair_losses, sampled_round
from alignkit.training.run.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from alignkit.training.run.distributed import (
    all_gather_json,
    all_reduce_sum,
    barrier,
    current,
    default_device,
    shard_rows,
    sum_over_ranks,
)
from alignkit.training.run.interrupt import RunInterrupted, StopSignals
from alignkit.training.run.metrics import open_metrics
from alignkit.training.run.result import TrainResult
from alignkit.training.run.schedule import adamw, build_scheduler

log = logging.getLogger("alignkit")
DEFAULT_LORA_RANK = 4
DEFAULT_LR = {"lora": 3e-4, "full": 3e-5}
"""D3PO's config/base.py trains LoRA at 3e-5 on Stable Diffusion with batch 1 and 20 steps
per round; our default for LoRA is 3e-4 (diffusers' text-to-image LoRA script's 1e-4 range,
a little higher for fewer, larger batches) and 3e-5 for the whole UNet."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s noise: independent of what earlier steps drew."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Rows of step `step` (1-based): consecutive slices of a permutation seeded per epoch;
    the last slice of an epoch wraps into the next permutation when n % batch != 0."""
    start = (step - 1) * batch
    indices = []
    for position in range(start, start + batch):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        indices.append(int(order[offset]))
    return indices


def total_steps(config, rows: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * math.ceil(rows / config.batch_size)))


def device_of(config) -> str:
    return default_device(current(), config.device) or ("cuda" if torch.cuda.is_available() else "cpu")


def sum_gradients(params: list[torch.nn.Parameter], bucket_elements: int = 1 << 25) -> None:
    """Under torchrun: replace each gradient by its sum over ranks (a missing one counts as
    zeros), in flat buckets of at most `bucket_elements` per all-reduce; every rank ends with the
    same gradients. One process: nothing to do."""
    if not current().distributed:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    bucket: list[torch.nn.Parameter] = []

    def flush() -> None:
        if bucket:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            bucket.clear()

    size = 0
    for param in params:
        if bucket and (size + param.numel() > bucket_elements or param.grad.dtype != bucket[0].grad.dtype):
            flush()
            size = 0
        bucket.append(param)
        size += param.numel()
    flush()


def dtype_of(config) -> torch.dtype:
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    return names.get(config.dtype, torch.float32)


class DiffusionRun:
    """One d3po or prdp run in the locked directory `config.output` (see the module docstring)."""

    def __init__(self, task, pipeline=None, data: Any = None, reward: Any = None):
        self.task, self.config, self.hparams = task, task.config, task.hparams
        self.run_dir = Path(self.config.output)
        self.source = data if data is not None else self.config.data
        self.reward_spec = reward if reward is not None else self.config.reward
        self.pipeline = pipeline
        self.ranks = current()

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        c, h = self.config, self.hparams
        self.offline_pairs = self.task.name == "d3po" and self.reward_spec is None
        if self.offline_pairs:
            if self.source is None:
                raise ValueError("d3po needs --data with prompt, image_chosen, image_rejected "
                                 "(or prompts and --reward to sample and compare pairs)")
            self.pairs, self.rows = load_image_pairs(self.source), None
            count = len(self.pairs)
        else:
            if self.reward_spec is None:
                raise ValueError(f"{self.task.name} needs --reward: a built-in image reward (redness, brightness, "
                                 "aesthetic) or file.py:function returning one number per image")
            if self.source is not None and has_image_pairs(self.source):
                raise ValueError(f"--data {self.source}: image pairs train d3po without --reward; "
                                 f"{self.task.name} with --reward samples its own images from prompt-only data")
            self.rows, self.pairs = load_prompts(self.source), None
            self.reward = load_image_reward(self.reward_spec)
            self.reward_name = self.reward_spec if isinstance(self.reward_spec, str) else getattr(
                self.reward_spec, "__name__", "reward")
            count = len(self.rows.prompts)
        self.steps = total_steps(c, count)
        self.count = count
        self.batch = min(c.batch_size, count)
        if self.ranks.distributed and self.batch < self.ranks.world:
            raise ValueError(f"--batch-size {c.batch_size}: a step of {self.batch} pair(s) (the data has {count} rows) "
                             f"cannot be split over {self.ranks.world} ranks; give every rank at least one pair")
        if self.pipeline is None:
            self.pipeline = load_pipeline(c.model, device=device_of(c), dtype=dtype_of(c))
        self.settings = SamplerSettings(int(h["num_steps"]), float(h["eta"]), float(h["guidance_scale"]),
                                        h["resolution"])
        base_unet = self.pipeline.unet
        self.full = c.adapter == "none"
        if self.full:
            self.unet = base_unet
            self.unet.requires_grad_(True)
            frozen = copy.deepcopy(base_unet).requires_grad_(False) if self.task.name == "d3po" else None
            self.reference = lambda: contextlib.nullcontext(frozen)
        else:
            self.unet = add_unet_lora(base_unet, rank=c.lora_r or DEFAULT_LORA_RANK, alpha=c.lora_alpha)
            self.reference = self._lora_off
        self.unet.train()
        lr = c.lr if c.lr is not None else DEFAULT_LR["full" if self.full else "lora"]
        trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.trainable = trainable
        self.optimizer = adamw(trainable, lr=lr, weight_decay=c.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, c, self.steps)
        self.latent_cache: dict[int, tuple] = {}

    @contextlib.contextmanager
    def _lora_off(self):
        with self.unet.disable_adapter():
            yield self.unet

    # -- one step ------------------------------------------------------------------------------
    def round_pairs(self, step: int):
        """This rank's pairs of step `step`'s global batch (all of them in one process)."""
        c = self.config
        indices = batch_indices(self.count, self.batch, step, c.seed)
        shard = shard_rows(len(indices), self.ranks)
        part = BatchPart(step_generator(c.seed, step), len(indices),
                         tuple(shard.positions) if self.ranks.distributed else None)
        mine = shard.take(indices)
        if self.offline_pairs:
            return image_pair_round(self.pipeline, self.pairs, mine, self.settings, part, self.latent_cache)
        prompts, columns = self.rows.take(mine)
        self.unet.eval()
        try:
            return sampled_round(self.pipeline, self.unet, prompts, columns, self.reward, self.reward_name,
                                 self.settings, part, shared_noise=self.task.name == "d3po")
        finally:
            self.unet.train()

    def train_step(self, step: int) -> dict[str, float]:
        pairs = self.round_pairs(step)
        teaching = float(all_reduce_sum(pairs.weights.double().sum().reshape(1)))  # ties weigh 0
        epochs = int(self.hparams.get("inner_epochs", 1))
        metrics: dict[str, float] = {}
        for _ in range(epochs):
            self.optimizer.zero_grad(set_to_none=True)
            metrics = pair_losses(self.pipeline, self.unet, pairs, self.task.name, self.hparams, self.settings,
                                  reference=self.reference, teaching=teaching, global_pairs=self.batch)
            metrics = sum_over_ranks(metrics)  # each rank's share of the global loss and metrics
            sum_gradients(self.trainable)
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm
                                                  if self.config.max_grad_norm > 0 else float("inf"))
            if torch.isfinite(norm):  # the same global norm on every rank
                self.optimizer.step()
            metrics["grad_norm"] = float(norm)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {**pairs.metrics, **metrics}

    # -- the loop ------------------------------------------------------------------------------
    def resume_checkpoint(self) -> Path | None:
        """With --resume, the newest intact checkpoint, chosen by rank 0 (which owns the
        directory and sets damaged ones aside) and told to every rank."""
        if not self.config.resume:
            return None
        found = resumable_checkpoint(self.run_dir) if self.ranks.is_main else None
        if self.ranks.distributed:
            found = all_gather_json(found and str(found))[0]
        return Path(found) if found else None

    def run(self, callbacks=()) -> TrainResult:
        c = self.config
        main = self.ranks.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved = copy.copy(c)
            if callable(saved.reward):  # alignkit.train(reward=fn): recorded by name
                saved.reward = f"<python callable {getattr(saved.reward, '__qualname__', 'reward')}>"
            saved.save(self.run_dir / "config.yaml")
        self.prepare()
        checkpoint = self.resume_checkpoint()
        start, last = 0, {}
        if checkpoint is not None:
            meta = load_checkpoint(checkpoint, self.unet, self.optimizer, self.scheduler)
            start, last = int(meta["step"]), meta["extras"].get("last", {})
            log.info("resumed from %s (step %d)", checkpoint, start)
        writer = open_metrics(self.run_dir, main, resume_step=start if checkpoint else None,
                              tensorboard=c.tensorboard)
        try:
            with StopSignals() as stop:
                for step in range(start + 1, self.steps + 1):
                    last = self.train_step(step)
                    if step % c.logging_steps == 0 or step == self.steps:
                        writer.write(step, {"loss": last["loss"], **last})
                    stopping = stop.requested() and step < self.steps  # (a collective: every rank asks)
                    every = c.save_steps and step % c.save_steps == 0
                    if step < self.steps and (stopping or every):
                        save_checkpoint(self.run_dir, step, self.unet, self.optimizer, self.scheduler,
                                        extras={"last": last}, keep=c.save_total_limit, ranks=self.ranks)
                    for callback in callbacks:
                        callback(step, last)
                    if stopping:
                        raise RunInterrupted(self.run_dir, step, checkpoint_dir(self.run_dir, step), stop.name)
        finally:
            writer.close()
        final = self.run_dir / "final"
        if main:
            write_final_pipeline(self.pipeline, self.unet, final)
            log.info("final pipeline written to %s", final)
        barrier()
        return TrainResult(self.run_dir, final, self.steps, {**last, "steps": self.steps}, {}, self.unet, None)
