"""Reward models trained by a loop of their own (the offline loop calls `task.run`), and the
shared pieces of such loops (`train_pairwise` on precomputed features, `_Runner`).

- `rm_ensemble`   k Bradley-Terry RMs (Coste et al. 2023): k full runs of `rm` with seeds
                  seed..seed+k-1 (head init and data order differ), or `shared_trunk=True`:
                  one frozen trunk, k linear heads on its precomputed last-token features.

`rm_multi` and `rm_embedding` are in `reward_frozen.py`. Every run writes `metrics.jsonl`
(step + loss), `config.yaml` and `final/` like the offline loop, honours --save-steps and
resumes exactly: heads trained by `train_pairwise` checkpoint their parameters, optimizer, data
order and RNG; an ensemble resumes member by member (a finished member is kept, the
interrupted one continues from its own checkpoints in members/member_i).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from alignkit.data import load_rows, split_implicit_prompt
from alignkit.rewards.ensemble import EnsembleScorer, member_statistics
from alignkit.rewards.multi_objective import (
    embed_texts,
    score_head,
)
from alignkit.rewards.scorer import RewardModelScorer
from alignkit.training.offline.reward import RewardTask, register_reward_algorithms, resolve_hparams
from alignkit.training.run import distributed
from alignkit.training.run.checkpoint import (
    STATE_FILE,
    checkpoint_dir,
    optimizer_tensors,
    restore_optimizer,
    resumable_checkpoint,
    write_checkpoint,
)
from alignkit.training.run.config import TrainConfig, field_types
from alignkit.training.run.interrupt import RunInterrupted, StopSignals
from alignkit.training.run.metrics import MetricsWriter, open_metrics
from alignkit.training.run.rundir import holds_run, override_keys
from alignkit.training.run.schedule import adamw, lr_multiplier

log = logging.getLogger("alignkit")
HEAD_LR = 1e-2  # default for heads on frozen features (the RM default 1e-5 is for whole models)
HEADS_CHECKPOINT = "heads"  # state.json `kind` of a train_pairwise checkpoint
MEMBER_DONE = "member_done.json"  # members/member_i/ of an ensemble whose final/member_i is written


def train_pairwise(
    parameters: list[torch.nn.Parameter],
    pair_scores: Callable[[Tensor], tuple[Tensor, Tensor]],
    n: int,
    config: TrainConfig,
    *,
    lr: float,
    seed: int,
    writer: MetricsWriter | None = None,
    run_dir: Path | None = None,
    checkpoint: Path | None = None,
    callbacks: tuple = (),
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, float]:
    """Bradley-Terry on precomputed features: L = -log sigma(r_w - r_l), AdamW, warm-up/decay.

    `pair_scores(indices (b,)) -> (r_w (b,), r_l (b,))`, or `(r_w, r_l, {name: term})` whose
    scalar terms are added to the loss and logged as loss/NAME. Data order: a seeded permutation per
    epoch. Steps: `config.max_steps`, else `config.epochs` passes. Returns the last metrics.
    With `run_dir`, a checkpoint of the heads (parameters, optimizer, data order, RNG states)
    is written to run_dir/checkpoints every --save-steps steps and when SIGINT/SIGTERM stops
    the run (then RunInterrupted); `checkpoint` (one written so) continues exactly from it.
    `generators` are the caller's own random streams (rm_vpl's context and z draws), saved in
    the checkpoint and restored with it. Each of `callbacks` is called as callback(step, metrics) after every step.
    """
    batch = min(config.batch_size, n)
    steps = (
        config.max_steps
        if config.max_steps > 0
        else math.ceil(config.epochs * math.ceil(n / batch))
    )
    optimizer = adamw(parameters, lr=lr, weight_decay=config.weight_decay)
    warmup = int(round(config.warmup_ratio * steps))
    generator = torch.Generator().manual_seed(seed)
    order, cursor, last, start = torch.randperm(n, generator=generator), 0, {}, 0
    if checkpoint is not None:
        start, order, cursor, last = load_heads(checkpoint, parameters, optimizer, generator, generators)
        log.info("resumed from %s (step %d)", checkpoint, start)
    with StopSignals() as stop:
        for step in range(start + 1, steps + 1):
            if cursor + batch > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            indices = order[cursor : cursor + batch]
            cursor += batch
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_multiplier(step - 1, steps, warmup, config.scheduler)
            chosen, rejected, *extra = pair_scores(indices)
            terms = extra[0] if extra else {}  # named terms added to the loss (rm_vpl's KL)
            loss = -F.logsigmoid(chosen - rejected).mean() + sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            last = {
                "loss": float(loss.detach()),
                "lr": optimizer.param_groups[0]["lr"],
                "rewards/chosen": float(chosen.detach().mean()),
                "rewards/rejected": float(rejected.detach().mean()),
                "rewards/margins": float((chosen - rejected).detach().mean()),
                "rewards/accuracies": float((chosen > rejected).float().mean()),
                **{f"loss/{name}": float(term.detach()) for name, term in terms.items()},
            }
            if writer is not None and (step % config.logging_steps == 0 or step == steps):
                writer.write(step, last)
            stopping = run_dir is not None and stop.received is not None and step < steps
            every = config.save_steps and step % config.save_steps == 0
            if run_dir is not None and step < steps and (stopping or every):
                save_heads(run_dir, step, parameters, optimizer, generator, order, cursor, last,
                           keep=config.save_total_limit, generators=generators)
            for callback in callbacks:
                callback(step, last)
            if stopping:
                raise RunInterrupted(run_dir, step, checkpoint_dir(run_dir, step), stop.name)
    return {**last, "steps": steps}


def save_heads(run_dir: Path, step: int, parameters: list[torch.nn.Parameter], optimizer, generator,
               order: Tensor, cursor: int, last: dict, keep: int,
               generators: dict[str, torch.Generator] | None = None) -> Path:
    """Checkpoint `step` of `train_pairwise` (this process only: heads train in one process)."""
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors = {
        "weights.safetensors": {f"param.{i}": p.detach().clone() for i, p in enumerate(parameters)},
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": {"order": order.clone(), "generator": generator.get_state(),
                            "torch_cpu": torch.get_rng_state(),
                            **{f"generator.{name}": g.get_state() for name, g in (generators or {}).items()}},
    }
    meta = {"kind": HEADS_CHECKPOINT, "cursor": cursor, "last": last, "optimizer": opt_meta}
    return write_checkpoint(run_dir, step, tensors, meta, keep)


def load_heads(path: Path, parameters: list[torch.nn.Parameter], optimizer, generator,
               generators: dict[str, torch.Generator] | None = None):
    """Restore a `save_heads` checkpoint; returns (step, order, cursor, last metrics)."""
    meta = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / "weights.safetensors"))
    shapes = [tuple(weights.get(f"param.{i}", torch.empty(0)).shape) for i in range(len(parameters))]
    if meta.get("kind") != HEADS_CHECKPOINT or shapes != [tuple(p.shape) for p in parameters]:
        raise ValueError(f"{path}: not a checkpoint of these heads (another algorithm or shape); "
                         "start afresh with --overwrite")
    with torch.no_grad():
        for i, param in enumerate(parameters):
            param.copy_(weights[f"param.{i}"])
    restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    rng = load_file(str(path / "rng.safetensors"))
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    for name, own in (generators or {}).items():
        if f"generator.{name}" not in rng:
            raise ValueError(f"{path}: the checkpoint has no state for the {name!r} random stream "
                             "(written by an older alignkit); start afresh with --overwrite")
        own.set_state(rng[f"generator.{name}"])
    return int(meta["step"]), rng["order"], int(meta["cursor"]), meta["last"]


def pair_columns(table) -> tuple[list[Any], list[Any], list[Any]]:
    rows = [split_implicit_prompt(row) for row in table.rows]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def merge_member_metrics(run_dir: Path, member_dirs: list[Path]) -> dict[str, float]:
    """DIR/metrics.jsonl from the members' files: per step the mean of every metric over
    members, plus `member_{i}/loss`."""
    per_member = [
        [
            json.loads(line)
            for line in (d / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        for d in member_dirs
    ]
    writer, last = open_metrics(run_dir, distributed.current().is_main), {}
    for records in zip(*per_member, strict=False):
        numeric = [{k: v for k, v in r.items() if isinstance(v, int | float)} for r in records]
        keys = set.intersection(*(set(r) for r in numeric)) - {"step"}
        merged = {k: sum(r[k] for r in numeric) / len(numeric) for k in keys}
        merged.update({f"member_{i}/loss": r["loss"] for i, r in enumerate(numeric)})
        last = writer.write(int(records[0]["step"]), merged)
    writer.close()
    return last


@dataclass
class _Runner(RewardTask):
    """A reward-model task that trains in its own loop (`run`), with the pieces runs share."""

    def _resolve_hparams(self, name: str, accepted: dict[str, Any]) -> None:
        """`hparams` from `resolve_hparams`; `user_lr` keeps the --lr given (None when not
        given). `config.lr` stays as given too (the runner's default is not the whole-model RM
        default `resolve_hparams` fills in), so config.yaml and --resume read it the same way."""
        self.user_lr = self.config.lr
        self.hparams = resolve_hparams(name, self.config, accepted)
        self.config.lr = self.user_lr

    def _begin(self) -> Path:
        """The run directory (checked and locked by the offline loop) with final/ and config.yaml."""
        run_dir = Path(self.config.output)
        (run_dir / "final").mkdir(parents=True, exist_ok=True)
        if distributed.current().is_main:
            self.config.save(run_dir / "config.yaml")
        return run_dir

    def _open_writer(self, run_dir: Path, tensorboard: bool | None = None) -> tuple[MetricsWriter, Path | None]:
        """(metrics writer of `run_dir`, checkpoint to resume from or None): with --resume the
        newest intact checkpoint in run_dir/checkpoints, and metrics.jsonl kept up to its step."""
        checkpoint = resumable_checkpoint(run_dir) if self.config.resume else None
        step = json.loads((checkpoint / STATE_FILE).read_text())["step"] if checkpoint else None
        tensorboard = self.config.tensorboard if tensorboard is None else tensorboard
        return MetricsWriter(run_dir, resume_step=step, tensorboard=tensorboard), checkpoint

    def _table(self, source: Any, role: str, kinds: tuple[str, ...] | None = None):
        from alignkit.training.offline.loop import load_table

        saved, self.data_kinds = self.data_kinds, kinds or self.data_kinds
        try:
            return load_table(source, self, self.config, role)
        finally:
            self.data_kinds = saved

    def _scorer(self, model, tokenizer) -> RewardModelScorer:
        c = self.config
        return RewardModelScorer(
            model,
            tokenizer,
            batch_size=max(c.batch_size, 16),
            chat_template=c.chat_template,
            max_length=c.max_length,
            max_prompt_length=c.max_prompt_length,
        )

    def _load(self, model, tokenizer, num_labels: int):
        from alignkit.models import load_model

        if model is not None:
            return model, tokenizer
        c = self.config
        return load_model(
            c.model,
            kind="reward",
            num_labels=num_labels,
            trust_remote_code=c.trust_remote_code,
            dtype=None if c.dtype == "auto" else c.dtype,
            device=None if c.device == "auto" else c.device,
        )

    def _held_out_accuracy(
        self, eval_data: Any, make_scorer: Callable[[], Callable[[list, list], Tensor]]
    ) -> dict[str, float]:
        """{"eval/rewards/accuracies": mean of 1[r(x, y_w) > r(x, y_l)]} over the pairs of
        `eval_data` (else --eval-data) scored by `make_scorer()`; {} when there are none (the
        scorer is then not built)."""
        if eval_data is None and not self.config.eval_data:
            return {}
        source = eval_data if eval_data is not None else self.config.eval_data
        prompts, chosen, rejected = pair_columns(self._table(source, "evaluation"))
        score = make_scorer()
        accuracy = (score(prompts, chosen) > score(prompts, rejected)).float().mean()
        return {"eval/rewards/accuracies": float(accuracy)}

    def _result(self, run_dir: Path, last: dict, eval_metrics: dict, tokenizer=None):
        from alignkit.training.run.result import TrainResult

        return TrainResult(
            run_dir,
            run_dir / "final",
            int(last.get("steps", 0)),
            last,
            eval_metrics,
            None,
            tokenizer,
        )


@dataclass
class EnsembleRewardTask(_Runner):
    """k reward models, saved as final/member_{i}/ + final/ensemble.json (see EnsembleScorer).

    Members are z-scored on a reference set (the training responses, or `reference=FILE`)
    before aggregation: OUR DEVIATION from Coste et al.'s code, which aggregates raw scores.
    """

    @property
    def data_parallel(self) -> bool:
        """Under torchrun the members train data-parallel (each a full `rm` run); the shared
        trunk's heads on precomputed features run in one process."""
        return not self.hparams["shared_trunk"]

    def __post_init__(self) -> None:
        self._resolve_hparams(
            "rm_ensemble",
            {
                "members": 5,
                "shared_trunk": False,
                "aggregation": "mean",
                "uwo_lambda": 0.5,
                "unbiased_variance": False,
                "center_rewards_coefficient": 0.0,
                "reference": None,
            },
        )

    def run(self, model=None, tokenizer=None, data=None, eval_data=None, callbacks=()):
        run_dir, k = self._begin(), int(self.hparams["members"])
        final = run_dir / "final"
        member_dirs = [run_dir / "members" / f"member_{i}" for i in range(k)]
        table = self._table(data if data is not None else self.config.data, "training")
        try:
            if not self.hparams["shared_trunk"]:
                tokenizer = self._train_members(member_dirs, final, model, tokenizer, table, eval_data, callbacks)
            else:
                tokenizer = self._train_heads(member_dirs, final, model, tokenizer, table, callbacks)
        except RunInterrupted as stop:  # a member stopped: the ensemble's directory is what resumes
            raise stop.for_run(run_dir) from None
        last = merge_member_metrics(run_dir, member_dirs)
        last["steps"] = last.get("step", 0)
        if distributed.current().is_main:
            self._write_manifest(final, table, k)
        distributed.barrier()
        eval_metrics = self._held_out_accuracy(eval_data, lambda: EnsembleScorer(final))
        return self._result(run_dir, last, eval_metrics, tokenizer)

    def _member_done(self, member_dir: Path, final: Path, i: int, agree: bool) -> bool:
        """Whether member i finished in an earlier invocation (--resume skips it); with `agree`
        (data-parallel members) every rank gets rank 0's answer, else each rank decides on its
        own directory (heads replicated on every rank, without collectives)."""
        done = bool(self.config.resume) and (member_dir / MEMBER_DONE).is_file() and (final / f"member_{i}").is_dir()
        done = distributed.all_gather_json(done)[0] if agree else done
        if done:
            log.info("rm_ensemble: member %d finished before; --resume keeps it", i)
        return done

    def _mark_done(self, member_dir: Path, i: int) -> None:
        if distributed.current().is_main:
            (member_dir / MEMBER_DONE).write_text(json.dumps({"member": i}) + "\n")

    def _train_members(self, member_dirs: list[Path], final: Path, model, tokenizer, table, eval_data, callbacks):
        """k ordinary `rm` runs in members/member_i (seed + i); --resume skips finished members
        and resumes the interrupted one from its own checkpoints. `callbacks` see each member's
        steps. Returns the tokenizer."""
        from alignkit.training.offline.loop import run_offline

        for i, member_dir in enumerate(member_dirs):
            if self._member_done(member_dir, final, i, agree=True):
                continue
            sub = copy.deepcopy(self.config)
            sub.algorithm, sub.seed, sub.output, sub.lr = "rm", self.config.seed + i, str(member_dir), self.user_lr
            sub.resume = str(member_dir) if self.config.resume and holds_run(member_dir) else None
            sub.overwrite = False
            coef = float(self.hparams["center_rewards_coefficient"])
            sub.hparams = {"center_rewards_coefficient": coef} if coef else {}
            fields = set(field_types()) | {"data", "eval_data"} | set(sub.hparams)
            sub.override = ",".join(sorted(override_keys(self.config.override) & fields))  # the member's keys
            member_model = copy.deepcopy(model) if model is not None else None
            result = run_offline(sub, model=member_model, tokenizer=tokenizer, data=table, eval_data=eval_data,
                                 callbacks=callbacks)
            if distributed.current().is_main:
                shutil.rmtree(final / f"member_{i}", ignore_errors=True)
                shutil.move(str(result.final_dir), final / f"member_{i}")
            self._mark_done(member_dir, i)
            distributed.barrier()
            tokenizer = tokenizer or result.tokenizer
        return tokenizer

    def _train_heads(self, member_dirs: list[Path], final: Path, model, tokenizer, table, callbacks):
        """One frozen trunk, k linear heads on its last-token features (each checkpointed in
        members/member_i); --resume skips finished heads. Returns the tokenizer."""
        from alignkit.models import save_pretrained_merged
        from alignkit.training.run.seed import seed_everything

        seed_everything(self.config.seed)
        model, tokenizer = self._load(model, tokenizer, num_labels=1)
        scorer = self._scorer(model, tokenizer)
        prompts, chosen, rejected = pair_columns(table)
        chosen_x, _ = embed_texts(scorer, prompts, chosen)  # (N, H) frozen trunk
        rejected_x, _ = embed_texts(scorer, prompts, rejected)
        head = score_head(model)
        for i, member_dir in enumerate(member_dirs):
            if self._member_done(member_dir, final, i, agree=False):
                continue
            torch.manual_seed(self.config.seed + i)
            weight = torch.nn.Parameter(torch.randn(1, chosen_x.shape[1]) * 0.02)
            member_dir.mkdir(parents=True, exist_ok=True)
            writer, checkpoint = self._open_writer(member_dir, tensorboard=False)
            try:
                train_pairwise(
                    [weight],
                    lambda idx, w=weight: (chosen_x[idx] @ w[0], rejected_x[idx] @ w[0]),
                    len(chosen_x),
                    self.config,
                    lr=self.user_lr or HEAD_LR,
                    seed=self.config.seed + i,
                    writer=writer,
                    run_dir=member_dir,
                    checkpoint=checkpoint,
                    callbacks=callbacks,
                )
            finally:
                writer.close()
            with torch.no_grad():
                head.weight.copy_(weight.to(head.weight))
            save_pretrained_merged(model, tokenizer, final / f"member_{i}")
            self._mark_done(member_dir, i)
        return tokenizer

    def _write_manifest(self, final: Path, table, k: int) -> None:
        if self.hparams["reference"]:
            ref = load_rows(self.hparams["reference"])
            ref_rows = [split_implicit_prompt(r) for r in ref.rows]
            key = "completion" if "completion" in ref.columns else "chosen"
            prompts, completions = [r["prompt"] for r in ref_rows], [r[key] for r in ref_rows]
            described = f"{self.hparams['reference']} ({len(prompts)} responses)"
        else:
            p, c, r = pair_columns(table)
            prompts, completions = p + p, c + r
            described = f"training responses, chosen and rejected ({len(prompts)})"
        raw = EnsembleScorer(
            final_members := [
                RewardModelScorer(
                    final / f"member_{i}",
                    batch_size=max(self.config.batch_size, 16),
                    max_length=self.config.max_length,
                    chat_template=self.config.chat_template,
                )
                for i in range(k)
            ],
            normalize=False,
        ).raw_member_scores(prompts, completions)
        del final_members
        means, stds = member_statistics(raw)
        manifest = {
            "members": [f"member_{i}" for i in range(k)],
            "aggregation": self.hparams["aggregation"],
            "uwo_lambda": float(self.hparams["uwo_lambda"]),
            "unbiased_variance": bool(self.hparams["unbiased_variance"]),
            "normalization": {"mean": means, "std": stds, "reference": described},
            "normalization_note": "members z-scored before aggregation: alignkit's deviation "
            "from Coste et al.'s code, which aggregates raw scores",
            "shared_trunk": bool(self.hparams["shared_trunk"]),
            "seeds": [self.config.seed + i for i in range(k)],
        }
        (final / "ensemble.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _register() -> None:
    specs = [
        (
            "rm_ensemble",
            "prompt+chosen+rejected",
            "k reward models (or frozen trunk + k heads)",
            "Reward model ensembles, mean/WCO/UWO (Coste et al. 2023)",
            EnsembleRewardTask,
        ),
    ]
    register_reward_algorithms(specs)


_register()
