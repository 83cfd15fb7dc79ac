"""The online loop: PPO, GRPO, Dr. GRPO, DAPO, RLOO, ReMax, REINFORCE++ and online DPO are
presets (`online_presets.py`) of this one loop. Each step:

1. generate   B prompts x G samples from the current policy (engine seed = f(seed, step, round))
2. score      decode, reward function or reward model; missing-EOS penalty; PPO-max
              normalisation/clipping; ReMax scores a greedy response as its baseline.
              DAPO's dynamic sampling keeps only groups whose rewards are not all equal and
              repeats 1-2 on the next B prompts until B groups are kept (`online_sampling.py`)
3. log-probs  reference log-probs (none when beta = 0), old log-probs (taken from the
              engine when the update is exactly on-policy at temperature 1), critic values
4. KL         per-token k1/k2/k3 of old vs reference; beta x KL shapes the reward
              (kl_in="reward") or is added to the loss (kl_in="loss")
5. advantages one registered estimator (alignkit.advantages); whitening/clipping
6. update     K epochs x M minibatches (x micro-batches): policy loss + aggregation
              (+ beta KL) (+ vf_coef clipped value loss); grad clip; optimizer step
7. log        metrics.jsonl, KL controller, atomic checkpoint (with the data cursor)

A step left without training rows (dynamic sampling with rounds_exhausted="train") skips 3-6
but still steps the LR schedule, logs and checkpoints.

Old log-probs and the temperature: the engine returns log softmax(logits / T). With T = 1
those ARE the policy's log-probs, so an exactly on-policy update (epochs_per_batch = 1,
minibatches = 1) reuses them (for the reward-shaping KL) and takes the ratio against the
detached current log-probs (rho = 1 exactly, as TRL). With T != 1, or several updates per
batch, the old log-probs are recomputed by a no-grad forward at temperature 1: the loss,
the KL and the reference always use the untempered policy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alignkit.data import DataError, detect_kind, load_rows, tokenize_prompts, validate_rows
from alignkit.models import (
    apply_lora,
    count_parameters,
    is_peft,
    load_model,
    save_pretrained_merged,
)
from alignkit.objectives import KL
from alignkit.rewards import load_reward
from alignkit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.training.config import TrainConfig
from alignkit.training.kl_control import RunningMeanStd, make_kl_controller
from alignkit.training.metrics import MetricsWriter, progress_postfix
from alignkit.training.offline import TrainResult, seed_everything
from alignkit.training.online_presets import OnlineSettings, needs_reference
from alignkit.training.online_roles import (
    AdapterReference,
    FunctionReward,
    HFPolicy,
    ModelReference,
    ModelReward,
    SequenceBatch,
    ValueModel,
    zero_value_head,
)
from alignkit.training.online_sampling import PromptSampler, step_seed
from alignkit.training.online_steps import (
    best_worst_pairs,
    compute_advantages,
    in_chunks,
    pairwise_update,
    policy_gradient_update,
    summary_stats,
)
from alignkit.training.schedule import build_scheduler, default_lr

log = logging.getLogger("alignkit")


class Trainable(nn.Module):
    """Policy and critic in one module, so one checkpoint holds every trained parameter."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic


def _prompt_rows(table, tokenizer, config: TrainConfig):
    prompt_ids, stats = tokenize_prompts(table, tokenizer, max_prompt_length=config.max_prompt_length,
                                         chat=bool(config.chat_template))
    log.info("prompts: %s", stats.summary())
    texts = [row["prompt"] if isinstance(row.get("prompt"), str) else tokenizer.decode(ids)
             for row, ids in zip(table.rows, prompt_ids, strict=True)]
    return prompt_ids, texts


def _load_reward(config: TrainConfig, reward: Any, tokenizer, settings: OnlineSettings):
    """The reward role: a callable or spec given in Python, --reward, or --reward-model DIR."""
    spec = reward if reward is not None else config.reward
    if spec is not None:
        fn = load_reward(spec) if isinstance(spec, str) else spec
        return FunctionReward(fn, on_error=settings.reward_on_error)
    if config.reward_model is None:
        raise ValueError(f"{config.algorithm} needs a reward: --reward module:function or --reward-model DIR")
    model, rm_tokenizer = load_model(config.reward_model, kind="reward", dtype=_dtype(config),
                                     device=_device(config), trust_remote_code=config.trust_remote_code)
    return ModelReward(model, rm_tokenizer, tokenizer)


def _dtype(config: TrainConfig):
    return None if config.dtype == "auto" else config.dtype


def _device(config: TrainConfig):
    return None if config.device == "auto" else config.device


def run_online(config: TrainConfig, *, model=None, tokenizer=None, data: Any = None, reward: Any = None,
               callbacks: tuple = ()) -> TrainResult:
    """Train an online preset; see the module docstring for the steps."""
    from alignkit.training.registry import ALGORITHMS

    s: OnlineSettings = ALGORITHMS[config.algorithm].make_task(config)
    run_dir = Path(config.resume or config.output)
    resume_from = latest_checkpoint(run_dir) if config.resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    config.output = str(run_dir)
    config.hparams = dataclasses.asdict(s)  # config.yaml records every resolved choice
    seed_everything(config.seed)

    # Data: prompt-only rows (other formats' prompts work too; extra columns reach the reward).
    table = load_rows(data if data is not None else config.data)
    if len(table) == 0:
        raise DataError(str(config.data), None, "the prompt data has no rows")
    kind = detect_kind(table)
    validate_rows(table, kind)
    # Models: policy (+ LoRA), critic, reference, reward.
    if model is None:
        model, tokenizer = load_model(config.model, dtype=_dtype(config), device=_device(config),
                                      trust_remote_code=config.trust_remote_code)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a loaded model")
    prompt_ids, prompt_texts = _prompt_rows(table, tokenizer, config)
    columns = [{k: v for k, v in row.items() if k not in ("prompt", "messages")} for row in table.rows]
    reference_copy = None
    if needs_reference(s) and config.lora_r == 0:
        if config.ref_model:
            reference_copy, _ = load_model(config.ref_model, dtype=_dtype(config), device=_device(config))
        else:
            import copy

            reference_copy = copy.deepcopy(model)
    critic = value_head = None
    if s.critic == "separate":
        if s.critic_init:
            rm, _ = load_model(s.critic_init, kind="reward", dtype=_dtype(config), device=_device(config))
            critic = ValueModel.from_reward_model(rm)
        else:
            critic = ValueModel.from_policy(model)
    elif s.critic == "shared":
        value_head = zero_value_head(model.config.hidden_size).to(next(model.parameters()).device)
    if config.lora_r > 0:
        targets = config.lora_target_modules
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=targets if targets == "all-linear" else targets.split(","))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora_r > 0:
            model.enable_input_require_grads()
    model.eval()  # dropout off for sampling, old, reference and training log-probs alike
    policy = HFPolicy(model, tokenizer, chunk_size=config.logp_chunk_size,
                      max_batch_size=s.generation_batch_size or None, value_head=value_head)
    reference = None
    if needs_reference(s):
        reference = (AdapterReference(model, config.logp_chunk_size) if is_peft(model)
                     else ModelReference(reference_copy, config.logp_chunk_size))
    scorer = _load_reward(config, reward, tokenizer, s)
    trainable = Trainable(model, critic if critic is not None else value_head)
    trainable.eval()
    trained, total = count_parameters(trainable)
    log.info("parameters: %s trainable of %s", f"{trained:,}", f"{total:,}")

    # Optimizer (critic in its own group) and schedule: one scheduler step per training step.
    if config.lr is None:
        config.lr = default_lr(config.algorithm, lora=config.lora_r > 0)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]
    if trainable.critic is not None:
        groups.append({"params": list(trainable.critic.parameters()), "lr": s.critic_lr or config.lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(
        config.epochs * len(prompt_ids) / config.batch_size)
    scheduler = build_scheduler(optimizer, config, total_steps)
    config.save(run_dir / "config.yaml")
    kl_control = make_kl_controller(s.beta, s.kl_target, s.kl_horizon)
    reward_stats = RunningMeanStd()
    start_step, extras = 0, {}
    if resume_from is not None:
        meta = load_checkpoint(resume_from, trainable, optimizer, scheduler)
        start_step, extras = int(meta["step"]), meta["extras"]
        kl_control.value = float(extras["beta"])
        reward_stats = RunningMeanStd(**extras["reward_stats"])
        log.info("resumed from %s (step %d)", resume_from, start_step)
    device = next(model.parameters()).device
    sampler = PromptSampler(policy, scorer, tokenizer, prompt_ids, prompt_texts, columns, s,
                            batch_size=config.batch_size, seed=config.seed, device=device,
                            reward_stats=reward_stats)
    sampler.load_state(extras, start_step)  # the data cursor
    writer = MetricsWriter(run_dir, resume_step=start_step if resume_from is not None else None,
                           tensorboard=config.tensorboard)
    on_policy = s.epochs_per_batch == 1 and s.minibatches == 1
    last: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=start_step, desc=config.algorithm, disable=not config.progress,
               dynamic_ncols=True)

    def end_step(step: int, metrics: dict[str, float]) -> None:
        """Step 7's bookkeeping: metrics.jsonl, progress bar, checkpoint, callbacks."""
        nonlocal last
        if step % config.logging_steps == 0 or step == total_steps:
            last = writer.write(step, metrics)
        bar.set_postfix({**progress_postfix(metrics), "reward": f"{metrics['reward/mean']:.3f}"})
        bar.update(1)
        if config.save_steps and step % config.save_steps == 0 and step < total_steps:
            save_checkpoint(run_dir, step, trainable, optimizer, scheduler, keep=config.save_total_limit,
                            extras={"beta": kl_control.value, "reward_stats": reward_stats.state(),
                                    **sampler.state()})
        for callback in callbacks:
            callback(step, metrics)

    try:
        for step in range(start_step + 1, total_steps + 1):
            started = time.perf_counter()
            metrics: dict[str, float] = {"beta": kl_control.value}

            # 1-2. generate and score (dynamic sampling: rounds until B groups with signal)
            samples = sampler.collect(step)
            metrics.update(samples.metrics(s.dynamic_sampling))
            rollout, rewards = samples.rollout, samples.rewards
            scored = time.perf_counter()
            if rollout is None:
                log.warning("step %d: no prompt group with reward variance in %d generation round(s); "
                            "update skipped", step, samples.rounds)
                metrics.update({"loss": 0.0, "lr": scheduler.get_last_lr()[0], "time/step_s": scored - started})
                with warnings.catch_warnings():  # the schedule stays a function of the step
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    scheduler.step()
                end_step(step, metrics)
                continue
            batch = SequenceBatch.from_rollout(rollout, tokenizer.pad_token_id).to(device)
            mask = batch.response_mask  # (N, L)
            group_index = rollout.group_index.to(device)  # (N,)

            # 3. reference and old log-probs, values (no gradients)
            with torch.no_grad():
                if on_policy and s.temperature == 1.0:
                    old_logp = rollout.response_logprobs.to(device) * mask  # (N, L) engine = policy
                else:
                    old_logp = in_chunks(lambda b: policy.forward(b)[0], batch, s.micro_batch_size)
                ref_logp = in_chunks(reference.logps, batch, s.micro_batch_size) if reference else None
                old_values = None
                if trainable.critic is not None:
                    value_fn = critic.values if critic is not None else (lambda b: policy.forward(b)[2])
                    old_values = in_chunks(value_fn, batch, s.micro_batch_size)
            referenced = time.perf_counter()

            # 4. KL of the sampling policy to the reference, per token
            kl_penalty = None
            if ref_logp is not None:
                kl_tokens = torch.where(mask, KL[s.kl_estimator](old_logp, ref_logp), 0.0)  # (N, L)
                metrics["kl"] = kl_tokens.sum(-1).mean().item()  # summed over tokens, mean over samples
                if s.kl_in == "reward" and s.objective == "policy_gradient":
                    kl_penalty = kl_control.value * kl_tokens

            # 5. advantages
            if s.objective == "policy_gradient":
                advantages, returns = compute_advantages(s, rewards, group_index, mask, kl_penalty, old_values,
                                                         samples.baseline)
                metrics.update(summary_stats("advantages", advantages, mask))

            # 6. K epochs of minibatch updates
            updates: list[dict[str, float]] = []
            train_policy = step > s.critic_warmup_steps
            for epoch in range(s.epochs_per_batch):
                generator = torch.Generator().manual_seed(step_seed(config.seed, step) + epoch + 1)
                if s.objective == "pairwise":
                    units = best_worst_pairs(rewards, group_index)
                else:
                    units = torch.randperm(len(rewards), generator=generator).to(device)
                for minibatch in units.chunk(s.minibatches) if len(units) else []:
                    optimizer.zero_grad(set_to_none=True)
                    if s.objective == "pairwise":
                        part = pairwise_update(policy, batch, minibatch, ref_logp, s)
                    else:
                        part = policy_gradient_update(policy, critic, batch, minibatch, s, old_logp, ref_logp,
                                                       advantages, returns, old_values, on_policy,
                                                       kl_control.value, train_policy)
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
                    if torch.isfinite(grad_norm):
                        optimizer.step()
                    else:
                        log.warning("step %d: non-finite gradient; update skipped", step)
                    part["grad_norm"] = float(grad_norm)
                    updates.append(part)
            optimizer.zero_grad(set_to_none=True)
            metrics["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()
            trained_at = time.perf_counter()

            # 7. log, adapt beta, checkpoint
            if "kl" in metrics and s.objective == "policy_gradient":
                kl_control.update(metrics["kl"], len(rewards))
            for key in {k for u in updates for k in u}:
                metrics[key] = sum(u[key] for u in updates if key in u) / sum(key in u for u in updates)
            metrics.setdefault("loss", 0.0)
            metrics.update({
                "throughput/tokens_per_s": int(batch.attention_mask.sum()) / max(trained_at - started, 1e-9),
                "time/logprobs_s": referenced - scored, "time/training_s": trained_at - referenced,
                "time/step_s": trained_at - started,
            })
            end_step(step, metrics)
    finally:
        bar.close()
        writer.close()

    final_dir = save_pretrained_merged(model, tokenizer, run_dir / "final")
    log.info("final model written to %s", final_dir)
    return TrainResult(run_dir, final_dir, total_steps, last, {}, model, tokenizer)
