"""Reward models trained by a loop of their own (the offline loop calls `task.run`), and the
shared pieces of such loops (`train_pairwise` on precomputed features, `_Runner`).

- `rm_ensemble`   k Bradley-Terry RMs (Coste et al. 2023): k full runs of `rm` with seeds
                  seed..seed+k-1 (head init and data order differ), or `shared_trunk=True`:
                  one frozen trunk, k linear heads on its precomputed last-token features.

`rm_multi` and `rm_embedding` are in `tasks_reward_frozen.py`. Every run writes
`metrics.jsonl` (step + loss), `config.yaml` and `final/` like the offline loop.
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
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.metrics import MetricsWriter, open_metrics
from alignkit.training.run.schedule import lr_multiplier

log = logging.getLogger("alignkit")
HEAD_LR = 1e-2  # default for heads on frozen features (the RM default 1e-5 is for whole models)


def train_pairwise(
    parameters: list[torch.nn.Parameter],
    pair_scores: Callable[[Tensor], tuple[Tensor, Tensor]],
    n: int,
    config: TrainConfig,
    *,
    lr: float,
    seed: int,
    writer: MetricsWriter | None = None,
) -> dict[str, float]:
    """Bradley-Terry on precomputed features: L = -log sigma(r_w - r_l), AdamW, warm-up/decay.

    `pair_scores(indices (b,)) -> (r_w (b,), r_l (b,))`. Data order: a seeded permutation per
    epoch. Steps: `config.max_steps`, else `config.epochs` passes. Returns the last metrics.
    """
    batch = min(config.batch_size, n)
    steps = (
        config.max_steps
        if config.max_steps > 0
        else math.ceil(config.epochs * math.ceil(n / batch))
    )
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    warmup = int(round(config.warmup_ratio * steps))
    generator = torch.Generator().manual_seed(seed)
    order, cursor, last = torch.randperm(n, generator=generator), 0, {}
    for step in range(1, steps + 1):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        indices = order[cursor : cursor + batch]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_multiplier(step - 1, steps, warmup, config.scheduler)
        chosen, rejected = pair_scores(indices)
        loss = -F.logsigmoid(chosen - rejected).mean()
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
        }
        if writer is not None and (step % config.logging_steps == 0 or step == steps):
            writer.write(step, last)
    return {**last, "steps": steps}


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
        given), read before `resolve_hparams` fills in the whole-model RM default."""
        self.user_lr = self.config.lr
        self.hparams = resolve_hparams(name, self.config, accepted)

    def _begin(self) -> Path:
        run_dir = Path(self.config.output)
        if self.config.resume:
            raise ValueError(
                f"{self.config.algorithm}: --resume is not supported (runs take seconds)"
            )
        (run_dir / "final").mkdir(parents=True, exist_ok=True)
        if distributed.current().is_main:
            self.config.save(run_dir / "config.yaml")
        return run_dir

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
        from alignkit.training.offline.loop import run_offline
        from alignkit.training.run.seed import seed_everything

        run_dir, k = self._begin(), int(self.hparams["members"])
        final = run_dir / "final"
        member_dirs = [run_dir / "members" / f"member_{i}" for i in range(k)]
        table = self._table(data if data is not None else self.config.data, "training")
        if not self.hparams["shared_trunk"]:
            for i, member_dir in enumerate(member_dirs):
                sub = copy.deepcopy(self.config)
                sub.algorithm, sub.seed, sub.output, sub.lr = (
                    "rm",
                    self.config.seed + i,
                    str(member_dir),
                    self.user_lr,
                )
                coef = float(self.hparams["center_rewards_coefficient"])
                sub.hparams = {"center_rewards_coefficient": coef} if coef else {}
                member_model = copy.deepcopy(model) if model is not None else None
                result = run_offline(
                    sub, model=member_model, tokenizer=tokenizer, data=table, eval_data=eval_data
                )
                if distributed.current().is_main:
                    shutil.rmtree(final / f"member_{i}", ignore_errors=True)
                    shutil.move(str(result.final_dir), final / f"member_{i}")
                distributed.barrier()
                tokenizer = tokenizer or result.tokenizer
        else:
            seed_everything(self.config.seed)
            model, tokenizer = self._load(model, tokenizer, num_labels=1)
            scorer = self._scorer(model, tokenizer)
            prompts, chosen, rejected = pair_columns(table)
            chosen_x, _ = embed_texts(scorer, prompts, chosen)  # (N, H) frozen trunk
            rejected_x, _ = embed_texts(scorer, prompts, rejected)
            head = score_head(model)
            for i, member_dir in enumerate(member_dirs):
                torch.manual_seed(self.config.seed + i)
                weight = torch.nn.Parameter(torch.randn(1, chosen_x.shape[1]) * 0.02)
                member_dir.mkdir(parents=True, exist_ok=True)
                writer = MetricsWriter(member_dir)
                train_pairwise(
                    [weight],
                    lambda idx, w=weight: (chosen_x[idx] @ w[0], rejected_x[idx] @ w[0]),
                    len(chosen_x),
                    self.config,
                    lr=self.user_lr or HEAD_LR,
                    seed=self.config.seed + i,
                    writer=writer,
                )
                writer.close()
                with torch.no_grad():
                    head.weight.copy_(weight.to(head.weight))
                from alignkit.models import save_pretrained_merged

                save_pretrained_merged(model, tokenizer, final / f"member_{i}")
        last = merge_member_metrics(run_dir, member_dirs)
        last["steps"] = last.get("step", 0)
        if distributed.current().is_main:
            self._write_manifest(final, table, k)
        distributed.barrier()
        eval_metrics = self._held_out_accuracy(eval_data, lambda: EnsembleScorer(final))
        return self._result(run_dir, last, eval_metrics, tokenizer)

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
