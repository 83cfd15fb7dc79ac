"""The online loop: PPO, GRPO, Dr. GRPO, DAPO, RLOO, ReMax, REINFORCE++ and online DPO are
presets (`presets.py`) of this one loop. `build_online_roles` (`build.py`) makes the roles
(`roles.py`); `OnlineDriver` runs each step as calls to them, over the step's global batch:

1. generate   B prompts x G samples from the rollout engine (engine seed = f(seed, step, round));
              drpo: samples roll in prefixes of offline responses first (`reset.py`)
2. score      decode, reward role (function or reward model); missing-EOS penalty; PPO-max
              normalisation/clipping; ReMax scores a greedy response as its baseline.
              A reward may be dense, per token or per segment (Fine-Grained RLHF,
              `alignkit.rewards.dense`): the sampler carries those (N, L) beside the sums
              DAPO's dynamic sampling keeps only groups whose rewards are not all equal and
              repeats 1-2 on the next B prompts until B groups are kept (`sampling.py`)
3. log-probs  reference log-probs (none when beta = 0), old log-probs (taken from the
              engine when the update is exactly on-policy at temperature 1 and the engine
              samples the trained module), critic values
4. KL         per-token k1/k2/k3 of old vs reference; beta x KL shapes the reward
              (kl_in="reward") or is added to the loss (kl_in="loss")
5. advantages one registered estimator (alignkit.advantages), or ma_ppo's GAE over macro
              actions (`macro.py`); whitening/clipping; dense rewards at their tokens for GAE
              and REINFORCE++, their sums for the others
6. update     the policy role (`PolicyTrainer.update`, `trainer.py`): K epochs x M minibatches
              (x micro-batches) of policy loss + aggregation (+ beta KL) (+ vf_coef clipped
              value loss); grad clip; optimizer step; one LR-schedule step
7. log        rollout engine weight sync, metrics.jsonl, KL controller, atomic checkpoint
              (trainer state + beta, reward statistics and the data cursor); on SIGINT or
              SIGTERM a checkpoint, then RunInterrupted (`run/interrupt.py`); at step 0, every
              --eval-steps and the last step, validation on --eval-data (`validation.py`)

The run directory is checked and locked first (`run/rundir.py`: another run's directory, or a
--resume with changed config or data, is refused).

The driver keeps the run's own state: beta (the KL controller), the running reward statistics
and the prompt cursor (in `PromptSampler`). A step left without training rows (dynamic
sampling with rounds_exhausted="train") skips 3-6 but still steps the LR schedule, logs and
checkpoints.

Old log-probs and the temperature: the engine returns log softmax(logits / T). With T = 1
those ARE the policy's log-probs, so an exactly on-policy update (epochs_per_batch = 1,
minibatches = 1) reuses them (for the reward-shaping KL) and takes the ratio against the
detached current log-probs (rho = 1 exactly, as TRL). With T != 1, or several updates per
batch, the old log-probs are recomputed by a no-grad forward at temperature 1: the loss,
the KL and the reference always use the untempered policy.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alignkit.data import (
    DataError,
    RowTable,
    detect_kind,
    load_rows,
    tokenize_prompts,
    validate_rows,
)
from alignkit.models.packing import padding_free
from alignkit.objectives import KL
from alignkit.objectives.kl import capped
from alignkit.objectives.policy import truncated_importance_weights
from alignkit.rewards.runner import reward_batch, reward_columns
from alignkit.training.online.async_rollout import Prefetcher
from alignkit.training.online.build import OnlineRoles, build_online_roles
from alignkit.training.online.cgpo import kl_regularised
from alignkit.training.online.dpa import DirectionalPrompts
from alignkit.training.online.image_rewards import image_reward_columns
from alignkit.training.online.images import (
    check_image_run,
    image_prompt_rows,
    placeholder_token_ids,
)
from alignkit.training.online.kl_control import RunningMeanStd, make_kl_controller
from alignkit.training.online.reset import load_reset_responses, rollin_metrics
from alignkit.training.online.roles import SequenceBatch
from alignkit.training.online.safe import CostWindow, lagrange_step
from alignkit.training.online.sampling import PromptSampler, StepSamples, step_seed
from alignkit.training.online.server_rollout import logprob_diff
from alignkit.training.online.settings import OnlineSettings
from alignkit.training.online.steps import (
    check_group_baseline,
    compute_advantages,
    no_reward_variance,
    places_dense,
    reward_varies,
    summary_stats,
    uses_group_baseline,
)
from alignkit.training.online.trainer import Experience
from alignkit.training.online.turns import (
    check_multi_turn_settings,
    episode_runner,
    over_policy_tokens,
)
from alignkit.training.online.validation import NoValidation, make_validation
from alignkit.training.run import distributed
from alignkit.training.run.adapters import uses_adapter
from alignkit.training.run.checkpoint import checkpoint_dir
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.degenerate import SKIPPED, DegenerateWatch, data_metrics
from alignkit.training.run.distributed import init_ranks
from alignkit.training.run.hft import half_fine_tuning
from alignkit.training.run.interrupt import RunInterrupted, StopSignals
from alignkit.training.run.metrics import open_metrics, progress_postfix
from alignkit.training.run.result import TrainResult, write_final
from alignkit.training.run.rundir import RunDir, open_run_dir
from alignkit.training.run.schedule import default_lr
from alignkit.training.run.seed import seed_everything
from alignkit.training.run.threads import configure_threads

log = logging.getLogger("alignkit")
MACRO_SEED_ROUND = 104_723
"""ma_ppo's random macro actions draw from step_seed(seed, step, this), a stream of their own."""


def run_online(config: TrainConfig, *, model=None, tokenizer=None, data: Any = None, reward: Any = None,
               callbacks: tuple = (), eval_data: Any = None, gold_reward: Any = None) -> TrainResult:
    """Train an online preset; see the module docstring for the steps (and `validation.py` for
    --eval-data's held-out prompts, `eval_data` here, scored also by `gold_reward`)."""
    from alignkit.training.run.registry import ALGORITHMS

    s: OnlineSettings = ALGORITHMS[config.algorithm].make_task(config)
    check_group_baseline(s, config.algorithm, config.allow_degenerate)
    check_multi_turn_settings(config, s)
    ranks = init_ranks(config.strategy, config.device)
    configure_threads(config)
    config.hparams = dataclasses.asdict(s)  # config.yaml records every resolved choice
    if config.lr is None:  # resolved before the run's fingerprint (the default build_online_roles uses)
        config.lr = default_lr(config.algorithm, lora=uses_adapter(config))
    # the run directory: checked, locked, resumed from its newest intact checkpoint (run/rundir.py)
    with open_run_dir(config, data=data, eval_data=eval_data) as run, padding_free(config.padding_free):
        return _train_in(run, s, config, ranks, model, tokenizer, data, reward, callbacks,
                         eval_data=eval_data, gold_reward=gold_reward)


def _train_in(run: RunDir, s: OnlineSettings, config: TrainConfig, ranks, model, tokenizer, data, reward,
              callbacks: tuple, *, eval_data: Any = None, gold_reward: Any = None) -> TrainResult:
    """Everything after the run directory: prompts, roles, the driver's steps, final/."""
    run_dir, resume_from = run.path, run.resume_from
    seed_everything(config.seed)

    table = load_prompt_table(data if data is not None else config.data, split=config.split,
                              data_format=config.data_format)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(
        config.epochs * len(table) / config.batch_size)
    check_image_run(config, s, table, model)  # image prompts: refused settings fail before anything loads
    roles = build_online_roles(config, s, total_steps=total_steps, model=model, tokenizer=tokenizer,
                               reward=reward)
    if ranks.is_main:
        config.save(run_dir / "config.yaml")
    driver = OnlineDriver(config, s, roles, table, run_dir, total_steps)
    driver.validation = make_validation(config, s, roles, total_steps=total_steps, exact_engine=driver.exact_engine,
                                        eval_data=eval_data, gold_reward=gold_reward)
    if hasattr(driver.validation, "episodes"):  # multi-turn: held-out conversations on the same runner
        driver.validation.episodes = driver.sampler.episodes
    if resume_from is not None:
        start_step = driver.resume(resume_from)
    else:
        start_step = 0
        if not roles.rollout.shares_policy:
            driver.sync_rollout(0)  # an engine with its own copy samples the policy's weights from step 1
    try:
        driver.run(start_step, callbacks)
    finally:
        driver.close()
        getattr(roles.rollout, "close", lambda: None)()

    final_dir = write_final(roles.model, roles.processor or roles.tokenizer, run_dir, ranks)
    return TrainResult(run_dir, final_dir, total_steps, driver.last, driver.validation.last, roles.model,
                       roles.tokenizer)


def load_prompt_table(source: Any, *, split: str | None = None, data_format: str = "auto") -> RowTable:
    """Prompt rows (other formats' prompts work too; extra columns reach the reward), validated."""
    table = load_rows(source, split=split, data_format=data_format)
    if len(table) == 0:
        raise DataError(str(source), None, "the prompt data has no rows")
    validate_rows(table, detect_kind(table))
    return table


def prompt_rows(table: RowTable, tokenizer, config: TrainConfig) -> tuple[list[list[int]], list[str], list[dict], Any]:
    """(token ids, text, extra columns) of every prompt row, and the truncation counts."""
    prompt_ids, stats = tokenize_prompts(table, tokenizer, max_prompt_length=config.max_prompt_length,
                                         chat=bool(config.chat_template))
    log.info("prompts: %s", stats.summary())
    texts = [row["prompt"] if isinstance(row.get("prompt"), str) else tokenizer.decode(ids)
             for row, ids in zip(table.rows, prompt_ids, strict=True)]
    columns = [reward_columns(row) for row in table.rows]  # + a conversational prompt's messages
    return prompt_ids, texts, columns, stats


def initial_validation(evaluated: dict[str, float]) -> dict[str, float]:
    """The validation before step 1, as the first row's `eval_start/*` (and time/eval_start_s)
    keys: a row holds its step's training metrics, and no training happened at step 0
    (`alignkit.eval.report.validation_points` draws them at step 0)."""
    return {key.replace("eval/", "eval_start/", 1).replace("time/eval_s", "time/eval_start_s"): value
            for key, value in evaluated.items()}


def directional_prompts(s: OnlineSettings, config: TrainConfig, table: RowTable, tokenizer) -> DirectionalPrompts | None:
    """dpa: the prompts under a drawn direction each (training/online/dpa.py); else None."""
    if not s.dpa:
        return None
    first, second = (name.strip() for name in s.dpa_attributes.split(","))
    return DirectionalPrompts(table.rows, tokenizer, attributes=(first, second), max_angle=s.dpa_max_angle,
                              max_prompt_length=config.max_prompt_length, chat=bool(config.chat_template),
                              seed=config.seed)


class OnlineDriver:
    """Steps 1-7 of each training step as role calls; keeps beta (the KL controller), the
    running reward statistics and, in its `PromptSampler`, the prompt cursor."""

    def __init__(self, config: TrainConfig, s: OnlineSettings, roles: OnlineRoles, table: RowTable,
                 run_dir: Path, total_steps: int) -> None:
        self.config, self.s, self.roles, self.run_dir, self.total_steps = config, s, roles, run_dir, total_steps
        self.kl_control = make_kl_controller(s.beta, s.kl_target, s.kl_horizon)
        self.reward_stats = RunningMeanStd()
        prompt_inputs, suppressed = None, ()  # a VLM's image prompts: pixel inputs per row (online/images.py)
        if check_image_run(config, s, table, roles.model):
            suppressed = placeholder_token_ids(roles.model.config)
            prompt_ids, prompt_inputs, texts, stats = image_prompt_rows(table, roles.processor, config, roles.device)
            columns = image_reward_columns(table)  # images opened: a VLM reward or cost model reads them
        else:
            prompt_ids, texts, columns, stats = prompt_rows(table, roles.tokenizer, config)
        self.first_row = data_metrics(stats, responses=False)  # run totals, in the first logged row
        self.flags: dict[str, bool] = {}  # the last step's degenerate-step flags (DegenerateWatch)
        resets = load_reset_responses(table, roles.tokenizer, s, chat=bool(config.chat_template),
                                      engine=roles.rollout)  # drpo: the offline responses rolled in
        self.sampler = PromptSampler(roles.rollout, roles.reward, roles.tokenizer, prompt_ids, texts, columns,
                                     s, batch_size=config.batch_size, seed=config.seed, device=roles.device,
                                     reward_stats=self.reward_stats, cost=roles.cost, opponent=roles.opponent,
                                     directions=directional_prompts(s, config, table, roles.tokenizer),
                                     reset_responses=resets, episodes=episode_runner(config, s, roles.tokenizer, roles.rollout),
                                     rows=table.rows, prompt_inputs=prompt_inputs, suppress_token_ids=suppressed)
        self.log_lambda = math.log(s.lambda_init)  # safe_ppo's Lagrange multiplier (training/online/safe.py)
        self.cost_window = CostWindow(s.cost_window)
        self.resumed_at: int | None = None
        self.validation = NoValidation()  # held-out prompts sampled and scored (validation.py)
        self.last: dict[str, float] = {}
        # the engine's temperature-1 log-probs are the policy's own (it samples the policy's weights)
        self.exact_engine = getattr(roles.rollout, "exact_logprobs", roles.rollout.shares_policy)
        self.prefetch = Prefetcher() if s.async_rollout else None
        # HFT halves the policy's blocks (a critic trains whole): the trainer drops the frozen grads
        roles.trainer.hft = half_fine_tuning(config, roles.model, run_dir, is_main=distributed.current().is_main)
        if self.prefetch is not None and roles.rollout.shares_policy:
            raise ValueError("--set async_rollout=true needs a rollout engine with its own copy of the weights "
                             "(--rollout vllm): the in-process engine samples the module being updated")

    def resume(self, checkpoint: Path) -> int:
        """Restore the trainer and the driver's state from `checkpoint`; returns its step."""
        meta = self.roles.trainer.load(checkpoint)
        step, extras = int(meta["step"]), meta["extras"]
        self.sync_rollout(step)  # an engine with its own copy samples the restored weights
        self.kl_control.value = float(extras["beta"])
        self.reward_stats.load_state(extras["reward_stats"])
        self.sampler.load_state(extras, step)
        if self.s.lagrangian:
            self.log_lambda = float(extras["log_lambda"])
            self.cost_window.load_state(extras["cost_window"])
        self.resumed_at = step
        if step >= min(self.config.logging_steps, self.total_steps):
            self.first_row = {}  # the kept metrics.jsonl has the run totals already
        log.info("resumed from %s (step %d)", checkpoint, step)
        return step

    def run(self, start_step: int, callbacks: tuple) -> None:
        """Steps start_step + 1 .. total_steps, each followed by its bookkeeping."""
        config = self.config
        is_main = distributed.current().is_main
        writer = open_metrics(self.run_dir, is_main, resume_step=self.resumed_at, tensorboard=config.tensorboard)
        bar = tqdm(total=self.total_steps, initial=start_step, desc=config.algorithm,
                   disable=not (config.progress and is_main), dynamic_ncols=True)
        watch = DegenerateWatch([SKIPPED, no_reward_variance(self.s)], steps=self.total_steps - start_step,
                                allow=config.allow_degenerate)
        stop = StopSignals().install()  # Ctrl-C / SIGTERM: finish the step, checkpoint, RunInterrupted
        try:
            if start_step == 0 and self.validation.due(0):  # the policy before any update, in the first row
                self.first_row.update(initial_validation(self.validation.evaluate(0)))
            for step in range(start_step + 1, self.total_steps + 1):
                metrics = self.train_step(step)
                evaluated = self.validation.evaluate(step) if self.validation.due(step) else {}
                # every row holds the step's training metrics (DESIGN: always step and loss), so a
                # validation between logging steps logs its step too
                if step % config.logging_steps == 0 or step == self.total_steps or evaluated:
                    self.last, self.first_row = writer.write(step, {**metrics, **evaluated, **self.first_row}), {}
                metrics.update(evaluated)
                bar.set_postfix({**progress_postfix(metrics), "reward": f"{metrics['reward/mean']:.3f}"})
                bar.update(1)
                watch.observe(step, self.flags)  # may stop the run
                stopping = stop.requested() and step < self.total_steps
                if stopping or (config.save_steps and step % config.save_steps == 0 and step < self.total_steps):
                    self.save(step)
                for callback in callbacks:
                    callback(step, metrics)
                if stopping:
                    raise RunInterrupted(self.run_dir, step, checkpoint_dir(self.run_dir, step), stop.name)
        finally:
            stop.restore()
            bar.close()
            writer.close()

    def save(self, step: int) -> None:
        """Checkpoint: the trainer's state with the driver's (beta, reward statistics, cursor);
        with a prefetch pending, the cursor and statistics from before it."""
        cursor, stats = self.sampler.state(), self.reward_stats.state()
        if self.prefetch is not None and self.prefetch.pending:
            cursor, stats = self.prefetch.snapshot
        extras = {"beta": self.kl_control.value, "reward_stats": stats, **cursor}
        if self.s.lagrangian:
            extras.update(log_lambda=self.log_lambda, cost_window=self.cost_window.state())
        self.roles.trainer.save(self.run_dir, step, keep=self.config.save_total_limit, extras=extras)

    def collect(self, step: int) -> StepSamples:
        """Steps 1-2 of `step`, reward errors naming the step."""
        with reward_batch(step=step, max_steps=self.total_steps):
            return self.sampler.collect(step)

    def start_prefetch(self, step: int) -> None:
        """Async rollout: generate step + 1 in the background during this step's update, unless
        this is the last step or a checkpoint step (see `async_rollout.py`)."""
        saves = self.config.save_steps and step % self.config.save_steps == 0
        if self.prefetch is not None and step < self.total_steps and not saves:
            snapshot = (self.sampler.state(), self.reward_stats.state())
            self.prefetch.submit(step + 1, self.collect, snapshot)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        if self.sampler.episodes is not None:
            self.sampler.episodes.close()

    def train_step(self, step: int) -> dict[str, float]:
        """Steps 1-7 of training step `step` (bookkeeping aside); returns its metrics."""
        s, roles = self.s, self.roles
        started = time.perf_counter()
        metrics: dict[str, float] = {"beta": self.kl_control.value}

        # 1-2. generate and score (dynamic sampling: rounds until B groups with signal); async:
        # prefetched during the previous step's update, from the weights before it
        prefetched = self.prefetch.take(step) if self.prefetch is not None else None
        samples = prefetched if prefetched is not None else self.collect(step)
        if self.prefetch is not None:
            metrics["rollout/staleness"] = 1.0 if prefetched is not None else 0.0
        metrics.update(samples.metrics(s.dynamic_sampling))
        scored = time.perf_counter()
        signal_rows = samples.unfiltered or (samples.rewards, getattr(samples.rollout, "group_index", None))
        dense_values = None  # dense rewards that the advantage places at their tokens also carry a signal
        if samples.dense is not None and places_dense(s):
            dense_values = samples.dense[samples.rollout.response_mask.to(samples.dense.device)]
        self.flags = {"no_reward_variance": samples.rollout is None or (s.distill_loss == "none" and not reward_varies(
            *signal_rows, uses_group_baseline(s), samples.baseline, dense_values))}  # distill: the teacher's KL
        if samples.rollout is None:
            if samples.extra_metrics.get("filter/kept_samples") == 0.0:
                log.warning("step %d: sample_filter=%s kept no sample; update skipped", step, s.sample_filter)
            else:
                log.warning("step %d: no prompt group with reward variance in %d generation round(s); "
                            "update skipped", step, samples.rounds)
            metrics.update({"loss": 0.0, **roles.trainer.skip_update(), "time/step_s": scored - started})
            return metrics
        batch = SequenceBatch.from_rollout(samples.rollout, roles.tokenizer.pad_token_id).to(roles.device)
        mask = batch.response_mask  # (N, L)
        rollin = samples.rollout.rollin_mask  # (N, L) drpo's rolled-in tokens, else None
        if rollin is not None:
            rollin = rollin.to(roles.device)
            metrics.update(rollin_metrics(rollin))

        # 3. reference and old log-probs, values (no gradients)
        old_logp, ref_logp, old_values, engine_metrics = self.logprobs_and_values(samples, batch)
        metrics.update(engine_metrics)
        referenced = time.perf_counter()

        # 4. KL of the sampling policy to the reference, per token
        kl_penalty = None
        if ref_logp is not None:
            kl_tokens = torch.where(mask, capped(KL[s.kl_estimator](old_logp, ref_logp), s.kl_cap), 0.0)  # (N, L)
            metrics["kl"] = kl_tokens.sum(-1).mean().item()  # summed over tokens, mean over samples
            if s.distill_loss != "none":  # the reference is the teacher: the student's reverse KL to it
                metrics["distill/reverse_kl"] = torch.where(mask, old_logp - ref_logp, 0.0).sum(-1).mean().item()
            if s.kl_in == "reward" and s.objective == "policy_gradient":
                kl_penalty = self.kl_control.value * kl_tokens
            if s.cgpo_kl_threshold is not None:  # CRPG's KL factor on the constrained reward (cgpo.py)
                samples.rewards = kl_regularised(samples.rewards, old_logp, ref_logp, mask, s.cgpo_kl_threshold)

        # 5. advantages
        group_index = samples.rollout.group_index.to(roles.device)  # (N,)
        advantages = returns = None
        if s.lagrangian:  # safe_ppo: lambda's step on the recent episodes' mean cost, before the advantages
            metrics.update(self.step_lagrange(samples.costs))
        if s.objective == "policy_gradient":
            dense = None if samples.dense is None else samples.dense.to(roles.device)  # (N, L)
            lagrange, macro_seed = math.exp(self.log_lambda), step_seed(self.config.seed, step, MACRO_SEED_ROUND)
            advantages, returns = over_policy_tokens(  # multi-turn: over the policy's tokens only (turns.py)
                lambda mask, kl_penalty, values, ref_logp, dense: compute_advantages(
                    s, samples.rewards, group_index, mask, kl_penalty, values, samples.baseline, samples.costs,
                    lagrange, ref_logp, macro_seed, dense),
                mask, {"kl_penalty": kl_penalty, "values": old_values, "ref_logp": ref_logp, "dense": dense})
            metrics.update(summary_stats("advantages", advantages, mask))

        # 6. K epochs of minibatch updates
        tis = None
        if s.tis_cap > 0 and not self.exact_engine and s.objective == "policy_gradient":
            tis, tis_metrics = truncated_importance_weights(
                old_logp, samples.rollout.response_logprobs.to(roles.device), mask, s.tis_cap)
            metrics.update(tis_metrics)
        ref_dist = None
        if (s.objective == "sft" and s.beta > 0 or s.objective == "distill") and roles.reference is not None:
            ref_dist = roles.reference.distributions(batch)  # SuperHF's KL prior; GKD's teacher
        experience = Experience(batch, samples.rewards, group_index, old_logp, ref_logp, advantages, returns,
                                old_values, beta=self.kl_control.value, step=step, tis_weights=tis,
                                ref_dist=ref_dist, rollin_mask=rollin)
        self.start_prefetch(step)
        metrics.update(roles.trainer.update(experience))
        self.flags["skipped"] = metrics.get("updates_skipped", 0.0) == 1.0  # every optimizer update skipped
        updated = time.perf_counter()

        # 7. sync the engine (once the prefetch, sampled from the old weights, is done), adapt
        # beta, timings (the caller logs and checkpoints)
        if self.prefetch is not None:
            metrics.update(self.prefetch.wait())
        synced_from = time.perf_counter()
        self.sync_rollout(step)
        if not roles.rollout.shares_policy:  # the engine's copy: its version must be the step
            metrics["rollout/weight_version"] = float(roles.rollout.version)
        trained_at = time.perf_counter()
        if "kl" in metrics and s.objective == "policy_gradient":
            self.kl_control.update(metrics["kl"], len(samples.rewards))
        metrics.update({
            "throughput/tokens_per_s": int(batch.attention_mask.sum()) / max(trained_at - started, 1e-9),
            "time/logprobs_s": referenced - scored, "time/training_s": updated - referenced,
            "time/sync_s": trained_at - synced_from, "time/step_s": trained_at - started,
        })
        return metrics

    def step_lagrange(self, costs) -> dict[str, float]:
        """safe_ppo: add the step's costs to the window, step log lambda on its mean; metrics."""
        window_mean = self.cost_window.add(costs.tolist())
        self.log_lambda = lagrange_step(self.log_lambda, window_mean, self.s.cost_limit, self.s.lambda_lr,
                                        self.s.lambda_max)
        return {"cost/mean": costs.mean().item(), "cost/window_mean": window_mean,
                "lambda": math.exp(self.log_lambda)}

    def sync_rollout(self, version: int) -> None:
        """Make the rollout engine sample the trainer's current weights (nothing to copy when
        it samples the trained module itself)."""
        rollout, trainer = self.roles.rollout, self.roles.trainer
        if rollout.shares_policy:
            source = None
        elif getattr(rollout, "wants_base", False):  # adapter-only sync's first call: the base, then the adapter
            source = itertools.chain(trainer.weights(adapters=False), trainer.weights(merged=False))
        else:
            source = trainer.weights(merged=getattr(rollout, "merged_weights", True))
        rollout.update_weights(source, version)

    def logprobs_and_values(self, samples: StepSamples, batch: SequenceBatch):
        """Step 3: (old log-probs, reference log-probs or None, old values or None), each (N, L),
        and the engine-vs-trainer log-prob metrics (when the trainer recomputed an external
        engine's log-probs at temperature 1)."""
        s, roles = self.s, self.roles
        engine_metrics: dict[str, float] = {}
        if s.async_rollout:  # ratios against the sampling policy: the engine's own log-probs
            old_logp = samples.rollout.response_logprobs.to(roles.device) * batch.response_mask
        elif roles.trainer.on_policy and s.temperature == 1.0 and self.exact_engine:
            old_logp = samples.rollout.response_logprobs.to(roles.device) * batch.response_mask  # engine = policy
        else:
            old_logp = roles.trainer.logps(batch)
            if not self.exact_engine and s.temperature == 1.0:  # an external engine's log-probs against ours
                engine_metrics = logprob_diff(samples.rollout.response_logprobs, old_logp, batch.response_mask)
        ref_logp = roles.reference.logps(batch) if roles.reference is not None else None
        old_values = roles.critic.values(batch) if roles.critic is not None else None
        return old_logp, ref_logp, old_values, engine_metrics
