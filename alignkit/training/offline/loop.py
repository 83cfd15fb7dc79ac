"""The offline trainer: one loop for SFT, reward models and every pairwise preference loss.

1. resolve and lock the run directory (fresh, or the newest intact checkpoint of `--resume`;
   `run/rundir.py` refuses another run's directory and changed config or data)
2. load and validate the data, tokenise it, log truncation counts
3. load the model; compute reference log-probs once (then no reference stays in memory)
4. wrap with LoRA or SSF if asked; AdamW + warm-up/decay schedule; HFT's rounds if asked
5. for each step: grad_accum micro-batches (length-bucketed) -> (HFT: drop the frozen half's
   gradients) -> clip -> step, skipping
   non-finite steps without touching the weights; log, evaluate, checkpoint atomically
   (with the task's own state, if it keeps one); on SIGINT/SIGTERM checkpoint and stop
6. write `final/` (LoRA merged, SSF folded) that `from_pretrained` loads

Under torchrun every rank runs this same loop (`distributed.py`): each global micro-batch is
split by rows, the task's loss runs inside the DDP/FSDP2-wrapped `TaskForward`, losses are
scaled to global normalisers, metrics are averaged over ranks, and rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alignkit.data import (
    EVAL_SPLITS,
    DataError,
    RowTable,
    detect_kind,
    length_bucketed_batches,
    load_rows,
    validate_rows,
)
from alignkit.data.images import uses_images
from alignkit.models import (
    apply_lora,
    count_parameters,
    is_vlm_dir,
    load_model,
    load_vlm,
    resolve_model_path,
)
from alignkit.models.packing import padding_free
from alignkit.models.vlm import is_vlm_config, set_vlm_trainable, vlm_train_parts
from alignkit.models.vlm_reward import load_vlm_reward
from alignkit.training.offline.reference import attach_reference_logps
from alignkit.training.offline.tasks import make_task
from alignkit.training.run.adapters import adapter_kind, attach_ssf, uses_adapter
from alignkit.training.run.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    load_extra_tensors,
    save_checkpoint,
)
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.degenerate import (
    IDENTICAL_PAIRS,
    SKIPPED,
    DegenerateWatch,
    NonFiniteStop,
    batch_identical,
    check_identical_pairs,
    data_metrics,
)
from alignkit.training.run.distributed import (
    Ranks,
    Shard,
    all_ranks_true,
    all_reduce_sum,
    barrier,
    default_device,
    init_ranks,
    loss_scale,
    reduce_metrics,
    rows_in_use,
    shard_rows,
    split_random_streams,
    split_weighted,
)
from alignkit.training.run.hft import half_fine_tuning
from alignkit.training.run.interrupt import RunInterrupted, StopSignals
from alignkit.training.run.metrics import (
    mean_metrics,
    open_metrics,
    progress_postfix,
    to_float,
)
from alignkit.training.run.result import TrainResult, write_final
from alignkit.training.run.rundir import RunDir, open_run_dir
from alignkit.training.run.schedule import build_optimizer, build_scheduler, default_lr
from alignkit.training.run.seed import seed_everything
from alignkit.training.run.threads import configure_threads
from alignkit.training.run.validate import split_holdout
from alignkit.training.run.wrapping import TaskForward, full_tensor, gradient_sync, wrap

log = logging.getLogger("alignkit")
Callback = Callable[[int, dict[str, float]], None]

# Optional task hooks (a task defines only those it needs):
#   prepare(model, tokenizer, splits, run_dir)   after tokenising; splits = {name: (table, examples)};
#                                                it replaces the default reference cache (call it)
#   attach_model(model)                          after LoRA wrapping, before the optimizer
#   on_step_end(step, model)                     after each optimizer step (skipped ones too)
#   checkpoint_state() -> (json dict, tensors)   saved with every checkpoint
#   restore_state(json dict, tensors)            on --resume
#   run(model, tokenizer, data, eval_data, callbacks) -> TrainResult   a whole loop of its own
#   num_labels                                   outputs of a reward model's score head
#   write_final(final_dir)                       extra files next to final/ (e.g. brme.json)
#   images_problem() -> str | None               why it cannot train on image rows (None: it can);
#                                                a task without it refuses them


def _hook(task, name: str) -> Callable[..., Any] | None:
    return getattr(task, name, None)


def loss_units(task, batch: dict[str, torch.Tensor], n_rows: int) -> float:
    """What the task's loss is a mean over in this micro-batch: its scored tokens when the task
    defines `loss_tokens` (SFT), otherwise its rows (pairs, examples, prompts)."""
    count_tokens = getattr(task, "loss_tokens", None)
    return float(count_tokens(batch)) if count_tokens is not None else float(n_rows)


def collate_shard(task, examples: list, indices: list[int], shard: Shard, pad_id: int) -> dict[str, torch.Tensor]:
    """This rank's rows of the global micro-batch `indices`. A task whose rows depend on the
    whole batch (KTO's mismatched pairs) collates the global batch with `collate_shard`."""
    hook = getattr(task, "collate_shard", None)
    if hook is not None:
        return hook([examples[i] for i in indices], shard.positions, pad_id)
    return task.collate([examples[i] for i in shard.take(indices)], pad_id)


def micro_step(engine, task, examples, indices, pad_id, ranks: Ranks, device, scale_by: float = 1.0):
    """One micro-batch on this rank: (loss already scaled to the global normaliser, global
    metrics, tokens of the global micro-batch). `scale_by` divides by grad_accum."""
    shard = shard_rows(len(indices), ranks)
    batch = to_device(collate_shard(task, examples, indices, shard, pad_id), device)
    units = shard.weight * loss_units(task, batch, len(shard.positions))
    tokens = int(batch["attention_mask"].sum()) if shard.weight > 0 else 0
    # one all-reduce for both counts of the global micro-batch (one process: a copy)
    total_units, total_tokens = all_reduce_sum(torch.tensor([units, tokens], dtype=torch.float64)).tolist()
    scale = loss_scale(units, total_units, ranks)
    with rows_in_use(shard.positions, len(indices)):
        loss, metrics = engine(batch)
    metrics, weights = split_weighted(metrics)
    local = {k: to_float(v) for k, v in metrics.items()}
    tokens = int(total_tokens)
    scaled = loss if scale == 1.0 and scale_by == 1.0 else loss * scale / scale_by
    return scaled, reduce_metrics(local, units, weights), tokens


def vlm_parts_to_train(config: TrainConfig, model) -> tuple[str, ...] | None:
    """`--vlm-train`'s parts for a vision-language model, None for a text model (where any
    value but auto is an error)."""
    if not is_vlm_config(getattr(model, "config", None)):
        if config.vlm_train != "auto":
            raise ValueError(f"--vlm-train {config.vlm_train!r} applies to vision-language models only")
        return None
    return vlm_train_parts(config.vlm_train, lora=config.lora_r > 0)


def image_encoder(config: TrainConfig, task, processor, tables: list[RowTable | None], tokenizer):
    """What tokenises the data: the VLM's processor when any table has images, else the
    tokenizer. Images with a text-only model, or with a task that does not take them (its
    `images_problem()` says why; tasks without the hook do not), are errors."""
    if not any(table is not None and uses_images(table) for table in tables):
        return tokenizer
    if processor is None:
        raise ValueError(
            f"the data has images but --model {config.model!r} is not a vision-language model "
            "(its config.json has no vision_config)"
        )
    hook = getattr(task, "images_problem", None)
    problem = hook() if hook is not None else "data with images trains with sft, rm, cost and the pairwise family only so far"
    if problem:
        raise ValueError(f"--algorithm {config.algorithm}: {problem}")
    return processor


def load_table(source: Any, task, config: TrainConfig, role: str) -> RowTable:
    split = config.split if role == "training" else EVAL_SPLITS  # a split directory: its test split
    table = load_rows(source, split=split, data_format=config.data_format)
    if len(table) == 0:
        raise DataError(str(source), None, f"the {role} data has no rows")
    kind = detect_kind(table, accepted=task.data_kinds)
    if kind not in task.data_kinds:
        raise DataError(
            table.origin(0)[0],
            None,
            f"{config.algorithm} needs {' or '.join(task.data_kinds)} data, got {kind} "
            f"(columns {sorted(table.columns)})",
        )
    validate_rows(table, kind, allow_identical_pairs=config.allow_identical_pairs)
    return table


def micro_batches(lengths: list[int], config: TrainConfig, start: int) -> Iterator[list[int]]:
    """Endless stream of micro-batch index lists, epoch after epoch, from micro-batch `start`.

    The order of epoch e depends only on (seed, e), so a resumed run sees the same batches.
    """
    per_epoch = math.ceil(len(lengths) / config.batch_size)
    epoch, offset = divmod(start, per_epoch)
    while True:
        batches = length_bucketed_batches(
            lengths, config.batch_size, seed=config.seed, epoch=epoch
        )
        yield from batches[offset:]
        epoch, offset = epoch + 1, 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors (and the tensors of nested dicts, e.g. a VLM batch's `pixel_inputs`) on `device`."""
    return {
        k: (v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v)
        for k, v in batch.items()
    }


@torch.no_grad()
def evaluate(engine, task, examples, pad_id: int, config: TrainConfig, device, ranks: Ranks) -> dict[str, float]:
    """Mean of the task's metrics over held-out examples, prefixed `eval/` (rows split over ranks)."""
    was_training = engine.training
    engine.eval()
    parts = []
    order = sorted(range(len(examples)), key=lambda i: task.length(examples[i]))
    for start in range(0, len(order), config.batch_size):
        _, metrics, _ = micro_step(engine, task, examples, order[start : start + config.batch_size], pad_id,
                                   ranks, device)
        parts.append(metrics)
    engine.train(was_training)
    return {f"eval/{k}": v for k, v in mean_metrics(parts).items()}


def run_replicated(task, config: TrainConfig, model, tokenizer, data, eval_data, callbacks, ranks: Ranks):
    """A loop of its own that is not data-parallel (heads fitted on frozen features, seconds):
    every rank runs it whole, without collectives, rank 0 into the run directory and the others
    into a scratch directory removed afterwards; every rank returns rank 0's paths."""
    import shutil
    import tempfile

    run_dir = Path(config.output)
    scratch = None if ranks.is_main else Path(tempfile.mkdtemp(prefix=f"alignkit-rank{ranks.rank}-"))
    if scratch is not None:
        log.warning("%s fits its heads in one process: rank %d repeats it into scratch files",
                    config.algorithm, ranks.rank)
        config.output = str(scratch / "run")
    try:
        result = task.run(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, callbacks=callbacks)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            config.output = str(run_dir)
    barrier()
    return dataclasses.replace(result, output_dir=run_dir, final_dir=run_dir / "final")


def run_offline(
    config: TrainConfig,
    *,
    model=None,
    tokenizer=None,
    data: Any = None,
    eval_data: Any = None,
    callbacks: tuple[Callback, ...] = (),
) -> TrainResult:
    """Train `config.algorithm`; see the module docstring for the steps."""
    ranks = init_ranks(config.strategy, config.device)
    configure_threads(config)
    seed_everything(config.seed)
    task = make_task(config)
    if config.lr is None and not hasattr(task, "run"):  # resolved before the run's fingerprint
        config.lr = default_lr(config.algorithm, lora=uses_adapter(config))
    # 1. run directory: checked, locked, resumed from its newest intact checkpoint (run/rundir.py)
    with open_run_dir(config, data=data, eval_data=eval_data) as run, padding_free(config.padding_free):
        return _train_in(run, task, config, ranks, model, tokenizer, data, eval_data, callbacks)


def _train_in(run: RunDir, task, config: TrainConfig, ranks: Ranks, model, tokenizer, data, eval_data,
              callbacks: tuple[Callback, ...]) -> TrainResult:
    """Steps 2-6 (or the task's own loop) in the locked run directory `run`."""
    run_dir, resume_from = run.path, run.resume_from
    if hasattr(task, "run"):  # algorithms with their own loop (reward ensembles, frozen-feature heads)
        if ranks.distributed and not getattr(task, "data_parallel", False):
            return run_replicated(task, config, model, tokenizer, data, eval_data, callbacks, ranks)
        return task.run(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, callbacks=callbacks)

    # 2. data
    table = load_table(data if data is not None else config.data, task, config, "training")
    eval_table = None
    eval_source = eval_data if eval_data is not None else config.eval_data
    if eval_source is not None:
        eval_table = load_table(eval_source, task, config, "evaluation")
    elif config.eval_holdout:
        table, eval_table = split_holdout(table, config.eval_holdout, config.seed)

    # 3. model and tokens (a VLM brings its processor, which tokenises image rows)
    processor = None
    if model is None and task.model_kind in ("causal_lm", "reward") and is_vlm_dir(resolve_model_path(config.model)):
        options = {"dtype": None if config.dtype == "auto" else config.dtype, "device": default_device(ranks, config.device)}
        if task.model_kind == "reward":  # a score head on the VLM's language model
            model, processor = load_vlm_reward(config.model, num_labels=getattr(task, "num_labels", 1), **options)
        else:
            model, processor = load_vlm(config.model, **options)
        tokenizer = processor.tokenizer
    elif model is None:
        model, tokenizer = load_model(
            config.model,
            kind=task.model_kind,
            dtype=None if config.dtype == "auto" else config.dtype,
            device=default_device(ranks, config.device),
            trust_remote_code=config.trust_remote_code,
            num_labels=getattr(task, "num_labels", 1),
        )
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a loaded model")
    pad_id = tokenizer.pad_token_id
    encoder = image_encoder(config, task, processor, [table, eval_table], tokenizer)
    examples, stats = task.tokenize(table, encoder)
    log.info("training data: %s", stats.summary())
    identical = check_identical_pairs(task, examples, config.allow_degenerate)  # None: not pairs
    first_row = data_metrics(stats, identical)  # run totals, written with the first logged step
    eval_examples = []
    if eval_table is not None:
        eval_examples, eval_stats = task.tokenize(eval_table, encoder)
        log.info("evaluation data: %s", eval_stats.summary())
    if _hook(task, "prepare"):
        splits = {"train": (table, examples), "eval": (eval_table, eval_examples)}
        task.prepare(model, tokenizer, splits, run_dir)
    elif getattr(task, "needs_reference", False):
        attach_reference_logps(task, model, tokenizer, examples, eval_examples, config, run_dir)

    # 4. adapters, optimizer, schedule (a VLM's vision tower stays frozen unless --vlm-train names it)
    vlm_parts = vlm_parts_to_train(config, model)
    if config.lora_r > 0:
        targets = config.lora_target_modules
        model = apply_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task=task.model_kind,
            train_vlm_parts=vlm_parts or (),
        )
    elif adapter_kind(config) == "ssf":
        model = attach_ssf(model, config, task.model_kind)
    elif vlm_parts is not None:
        set_vlm_trainable(model, ("language", *vlm_parts))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if uses_adapter(config):
            model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    if _hook(task, "attach_model"):
        task.attach_model(model)
    device = next(model.parameters()).device
    forward = TaskForward(model, task.loss)
    unused = getattr(task, "unused_parameters", False)
    engine = wrap(forward, ranks, device, unused_parameters=unused) if ranks.distributed else forward
    split_random_streams(config.seed, ranks)  # ranks draw their own dropout masks
    if ranks.distributed and config.algorithm == "aot":
        log.warning("aot sorts log-ratios within each rank's rows, not across the global batch")
    engine.train()
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s", f"{trainable:,}", f"{total:,}")
    if config.lr is None:
        config.lr = default_lr(config.algorithm, lora=uses_adapter(config))
    lengths = [task.length(e) for e in examples]
    steps_per_epoch = math.ceil(math.ceil(len(examples) / config.batch_size) / config.grad_accum)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    hft = half_fine_tuning(config, model, run_dir, is_main=ranks.is_main)
    if ranks.is_main:
        config.save(run_dir / "config.yaml")

    start_step = 0
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer, scheduler)
        start_step = int(meta["step"])
        if _hook(task, "restore_state"):
            task.restore_state(meta["extras"].get("task", {}), load_extra_tensors(resume_from))
        log.info("resumed from %s (step %d)", resume_from, start_step)
        if start_step >= min(config.logging_steps, total_steps):
            first_row = {}  # the kept metrics.jsonl has the run totals already
    writer = open_metrics(
        run_dir, ranks.is_main, resume_step=start_step if resume_from is not None else None,
        tensorboard=config.tensorboard,
    )

    # 5. the loop
    stream = micro_batches(lengths, config, start_step * config.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    skipped = 0
    watch = DegenerateWatch([SKIPPED] + ([IDENTICAL_PAIRS] if identical is not None else []),
                            steps=total_steps - start_step, allow=config.allow_degenerate)
    bar = tqdm(
        total=total_steps, initial=start_step, desc=config.algorithm,
        disable=not (config.progress and ranks.is_main), dynamic_ncols=True,
    )
    stop = StopSignals().install()  # Ctrl-C / SIGTERM: finish the step, checkpoint, RunInterrupted
    try:
        for step in range(start_step + 1, total_steps + 1):
            started = time.perf_counter()
            parts, tokens, identical_step = [], 0, True
            hft_metrics = hft.enter_step(step) if hft is not None else {}
            for micro in range(config.grad_accum):
                indices = next(stream)
                identical_step = identical_step and batch_identical(task, examples, indices)
                with gradient_sync(engine, micro == config.grad_accum - 1):
                    loss, metrics, micro_tokens = micro_step(
                        engine, task, examples, indices, pad_id, ranks, device, config.grad_accum)
                    loss.backward()
                parts.append(metrics)
                tokens += micro_tokens
            if hft is not None:
                hft.drop_frozen_grads()  # this round's frozen half: no clip share, no update, no decay
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
                params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            ))
            finite = all_ranks_true(all(math.isfinite(m["loss"]) for m in parts) and bool(torch.isfinite(grad_norm)))
            if finite:
                optimizer.step()
            else:
                skipped += 1
                if config.nonfinite == "stop":
                    raise NonFiniteStop(step)
                log.warning("step %d: non-finite loss or gradient; step skipped", step)
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if _hook(task, "on_step_end"):
                task.on_step_end(step, model)
            elapsed = time.perf_counter() - started
            metrics = mean_metrics(parts)
            metrics.update(
                {
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "epoch": step / steps_per_epoch,
                    "throughput/tokens_per_s": tokens / max(elapsed, 1e-9),
                    "skipped_steps": skipped,
                    **hft_metrics,
                }
            )
            every = config.eval_steps and step % config.eval_steps == 0
            if eval_examples and (every or step == total_steps):
                eval_metrics = evaluate(engine, task, eval_examples, pad_id, config, device, ranks)
                metrics.update(eval_metrics)
            if step % config.logging_steps == 0 or step == total_steps:
                last, first_row = writer.write(step, {**metrics, **first_row}), {}
            bar.set_postfix(progress_postfix(metrics))
            bar.update(1)
            watch.observe(step, {"skipped": not finite, "identical_pairs": identical_step})  # may stop the run
            stopping = stop.requested() and step < total_steps
            if stopping or (config.save_steps and step % config.save_steps == 0 and step < total_steps):
                state, tensors = task.checkpoint_state() if _hook(task, "checkpoint_state") else ({}, {})
                save_checkpoint(
                    run_dir, step, model, optimizer, scheduler,
                    extras={"task": state}, keep=config.save_total_limit, extra_tensors=tensors, ranks=ranks,
                )
            for callback in callbacks:
                callback(step, metrics)
            if stopping:
                raise RunInterrupted(run_dir, step, checkpoint_dir(run_dir, step), stop.name)
    finally:
        stop.restore()
        bar.close()
        writer.close()

    # 6. the final checkpoint
    final_dir = write_final(model, processor if processor is not None else tokenizer, run_dir, ranks, task)
    return TrainResult(run_dir, final_dir, total_steps, last, eval_metrics, model, tokenizer)
