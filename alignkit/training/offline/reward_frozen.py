"""Reward models on FROZEN features, trained by their own loop (the offline loop calls
`task.run`): features are computed once, the heads train in seconds.

- `rm_multi`      ArmoRM (Wang et al. 2024): ridge attribute heads + verbosity de-correlation
                  + prompt-conditioned gate on a frozen backbone.
- `rm_embedding`  frozen all-MiniLM-L6-v2 sentence embedding + small head, Bradley-Terry.

Importing this module registers every reward-model algorithm: it imports
`tasks_reward_runners` (rm_ensemble), which imports `tasks_reward` (rm_ranked, cost,
rm_bayes, preference_model, rm_segment). Both heads checkpoint and resume through
`train_pairwise` (features are recomputed: they are deterministic).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit.data import DataError, load_rows, rating_columns
from alignkit.rewards.embedding_rm import DEFAULT_TEMPLATE, EmbeddingRewardModel
from alignkit.rewards.multi_objective import (
    GatingNetwork,
    embed_texts,
    fit_attribute_heads,
    penalize,
    score_head,
    verbosity_penalties,
)
from alignkit.training.offline.reward import register_reward_algorithms
from alignkit.training.offline.reward_runners import HEAD_LR, _Runner, pair_columns, train_pairwise

log = logging.getLogger("alignkit")


@dataclass
class MultiObjectiveTask(_Runner):
    """ArmoRM two stages on a frozen backbone (see `alignkit.rewards.multi_objective`).

    Data: `--data ratings.jsonl` (prompt, completion, one numeric column per attribute; null
    = unrated, skipped) and `--set pairs=pairs.jsonl` for the gate. The verbosity attribute
    (`--set verbosity=COLUMN`, default "verbosity") is de-correlated from the others on
    `reference=FILE` (default: the pairs' responses); without that column no penalty is
    applied (logged). Gate defaults are ArmoRM's: 3 x 1024, dropout 0.2, T = 10, lr 1e-3.
    """

    data_kinds: tuple[str, ...] = ("ratings",)

    def __post_init__(self) -> None:
        self._resolve_hparams(
            "rm_multi",
            {
                "pairs": ...,
                "attributes": None,
                "verbosity": "verbosity",
                "threshold": 0.03,
                "reference": None,
                "val_fraction": 0.2,
                "gate_hidden_layers": 3,
                "gate_width": 1024,
                "gate_dropout": 0.2,
                "temperature": 10.0,
            },
        )

    def _ratings(self, source) -> tuple[list[Any], list[Any], list[str], np.ndarray]:
        table = load_rows(source)
        wanted = self.hparams["attributes"]
        attributes = (
            wanted.split(",") if isinstance(wanted, str) else list(wanted or rating_columns(table))
        )
        if not attributes:
            raise DataError(table.source, None, "rm_multi needs numeric attribute columns")
        labels = np.full((len(table), len(attributes)), np.nan)
        for i, row in enumerate(table.rows):
            if not isinstance(row.get("completion"), str | list) or "prompt" not in row:
                raise table.error(i, "ratings rows need 'prompt' and 'completion'")
            for k, name in enumerate(attributes):
                value = row.get(name)
                if value is not None and not isinstance(value, int | float):
                    raise table.error(i, f"column {name!r} must be a number or null, got {value!r}")
                labels[i, k] = np.nan if value is None else float(value)
        return (
            [r["prompt"] for r in table.rows],
            [r["completion"] for r in table.rows],
            attributes,
            labels,
        )

    def run(self, model=None, tokenizer=None, data=None, eval_data=None, callbacks=()):
        from alignkit.models import save_pretrained_merged
        from alignkit.training.run.seed import seed_everything

        run_dir, c = self._begin(), self.config
        seed_everything(c.seed)
        prompts, completions, attributes, labels = self._ratings(
            data if data is not None else c.data
        )
        pairs = self._table(self.hparams["pairs"], "pairs", ("pairwise",))
        model, tokenizer = self._load(model, tokenizer, num_labels=len(attributes))
        scorer = self._scorer(model, tokenizer)
        # 1. ridge heads on frozen last-token features
        features, _ = embed_texts(scorer, prompts, completions)
        weights, alphas, errors = fit_attribute_heads(
            features.double().numpy(),
            labels,
            val_fraction=float(self.hparams["val_fraction"]),
            seed=c.seed,
        )
        weight = torch.tensor(weights, dtype=torch.float32)  # (K, H)
        # 2. verbosity de-correlation on a reference set
        pair_prompts, chosen, rejected = pair_columns(pairs)
        chosen_x, prompt_x = embed_texts(scorer, pair_prompts, chosen, with_prompt=True)
        rejected_x, _ = embed_texts(scorer, pair_prompts, rejected)
        verbosity = self.hparams["verbosity"]
        v_index = attributes.index(verbosity) if verbosity in attributes else None
        penalties = np.zeros(len(attributes))
        if v_index is None:
            log.warning("rm_multi: no %r attribute column; no verbosity penalty", verbosity)
        else:
            if self.hparams["reference"]:
                ref = load_rows(self.hparams["reference"])
                ref_x, _ = embed_texts(
                    scorer,
                    [r["prompt"] for r in ref.rows],
                    [r.get("completion", r.get("chosen")) for r in ref.rows],
                )
            else:
                ref_x = torch.cat([chosen_x, rejected_x])
            penalties = verbosity_penalties(
                (ref_x @ weight.T).double().numpy(),
                v_index,
                threshold=float(self.hparams["threshold"]),
            )
        lam = torch.tensor(penalties, dtype=torch.float32)
        # 3. gate on the prompt embedding, fed the PENALISED rewards (reference-script pitfall)
        chosen_r = penalize(chosen_x @ weight.T, lam, v_index)
        rejected_r = penalize(rejected_x @ weight.T, lam, v_index)
        gate = GatingNetwork(
            prompt_x.shape[1],
            len(attributes),
            hidden_layers=int(self.hparams["gate_hidden_layers"]),
            width=int(self.hparams["gate_width"]),
            dropout=float(self.hparams["gate_dropout"]),
            temperature=float(self.hparams["temperature"]),
        )

        def gated(idx: Tensor) -> tuple[Tensor, Tensor]:
            gates = gate.gates(prompt_x[idx])  # one gate per prompt for both responses
            return gate.beta * (gates * chosen_r[idx]).sum(-1), gate.beta * (
                gates * rejected_r[idx]
            ).sum(-1)

        writer, checkpoint = self._open_writer(run_dir)  # --resume: the gate's newest checkpoint
        if checkpoint is None:  # (a resumed run kept its step-0 row)
            writer.write(
                0,
                {
                    "loss": float("nan"),
                    **{f"stage1/val_mse/{a}": e for a, e in zip(attributes, errors, strict=True)},
                },
            )
        gate.train()
        last = train_pairwise(
            list(gate.parameters()),
            gated,
            len(chosen_r),
            c,
            lr=self.user_lr or 1e-3,
            seed=c.seed,
            writer=writer,
            run_dir=run_dir,
            checkpoint=checkpoint,
            callbacks=callbacks,
        )
        writer.close()
        gate.eval()
        # 4. save: backbone + ridge heads as the score head, gate, manifest
        with torch.no_grad():
            score_head(model).weight.copy_(weight.to(score_head(model).weight))
        final = save_pretrained_merged(model, tokenizer, run_dir / "final")
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().contiguous() for k, v in gate.state_dict().items()},
            final / "gating.safetensors",
        )
        manifest = {
            "attributes": attributes,
            "verbosity": verbosity,
            "verbosity_index": -1 if v_index is None else v_index,
            "penalties": penalties.tolist(),
            "ridge_alphas": alphas,
            "ridge_val_mse": errors,
            "threshold": float(self.hparams["threshold"]),
            "gating": gate.config,
            "note": "score head = ridge heads (raw r_i); the gate weights the verbosity-penalised r'_i",
        }
        (final / "multi_objective.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return self._result(run_dir, last, {}, tokenizer)


@dataclass
class EmbeddingRewardTask(_Runner):
    """Frozen all-MiniLM-L6-v2 embedding of template(prompt, response) + linear head
    (`hidden=0`) or MLP, Bradley-Terry. `--model` is ignored (the encoder is MiniLM;
    `--set encoder_dir=DIR` uses another sentence-transformers checkpoint)."""

    def __post_init__(self) -> None:
        self._resolve_hparams(
            "rm_embedding",
            {
                "hidden": 0,
                "template": DEFAULT_TEMPLATE,
                "encoder_dir": None,
            },
        )

    def run(self, model=None, tokenizer=None, data=None, eval_data=None, callbacks=()):
        from alignkit.training.run.seed import seed_everything

        run_dir, c = self._begin(), self.config
        seed_everything(c.seed)
        table = self._table(data if data is not None else c.data, "training")
        reward_model = EmbeddingRewardModel(
            hidden=int(self.hparams["hidden"]),
            template=self.hparams["template"],
            model_dir=self.hparams["encoder_dir"],
        )
        prompts, chosen, rejected = pair_columns(table)
        chosen_x, rejected_x = (
            reward_model.embed(prompts, chosen),
            reward_model.embed(prompts, rejected),
        )
        head = reward_model.head.train()
        writer, checkpoint = self._open_writer(run_dir)  # --resume: the head's newest checkpoint
        last = train_pairwise(
            list(head.parameters()),
            lambda idx: (head(chosen_x[idx]), head(rejected_x[idx])),
            len(chosen_x),
            c,
            lr=self.user_lr or HEAD_LR,
            seed=c.seed,
            writer=writer,
            run_dir=run_dir,
            checkpoint=checkpoint,
            callbacks=callbacks,
        )
        writer.close()
        head.eval()
        reward_model.save(run_dir / "final")
        eval_metrics = self._held_out_accuracy(eval_data, lambda: reward_model)
        return self._result(run_dir, last, eval_metrics)


def _register() -> None:
    specs = [
        (
            "rm_multi",
            "ratings (prompt+completion+attributes) + pairs=FILE",
            "frozen backbone + heads + gate",
            "ArmoRM multi-objective RM with MoE gating (Wang et al. 2024)",
            MultiObjectiveTask,
        ),
        (
            "rm_embedding",
            "prompt+chosen+rejected",
            "frozen all-MiniLM-L6-v2 + head",
            "Embedding reward model, Bradley-Terry head (Ouyang et al. 2022 loss)",
            EmbeddingRewardTask,
        ),
    ]
    register_reward_algorithms(specs)


_register()
