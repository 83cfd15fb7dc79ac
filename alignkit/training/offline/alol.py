"""A-LoL tasks (`alol`, `alol_ref_free`, `alol_seq`, `alol_kl`; Baheti et al. 2024): offline
policy gradient on `prompt` + `completion` rows scored by a sequence-level reward.

Preparation, before the first step (`prepare`), on the frozen reference (the initial policy or
`--ref-model`):

1. sample `value_samples` completions per training prompt with `HFEngine` and score them with the
   reward function (`--set reward=module:function`, or a Python callable via `alignkit.train`);
2. fit the value head V_ref(x) = w . h(x) + b, h(x) = the reference's final hidden state at the
   last prompt token, by closed-form ridge regression on those rewards (R^2 is logged);
3. R(x, y) of each dataset row = its `reward` column (`reward_column`) if the data has one, else
   the reward function applied to the row's completion; A = R - V_ref(x);
4. keep only A > 0 (kept / total counted in the log and in `filter_counts`), i.e. uniform
   sampling among positive-advantage examples, which rescales the epoch by the positive
   fraction as the reference code does; evaluation rows are filtered the same way;
5. cache the reference's per-token log-probs of the kept rows (not for `alol_ref_free`).

Deviation from the reference code: LoL-RL fits V on greedy reference outputs for the *dev* set
with an attention/MLP head trained by AdamW; here V is fitted on `value_samples` sampled
outputs per *training* prompt with a linear ridge head (closed form, deterministic).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.agents.reward_specs import load_reward  # rewards.load_reward + rlhs:CONFIG.yaml
from alignkit.data import RowTable, SeqExample, pad_left
from alignkit.models import position_ids_from_mask, token_logps
from alignkit.objectives.alol import ALOL, REFERENCE_FREE_ALOL, fit_value_head, r_squared
from alignkit.rewards import reward_name, score_safely
from alignkit.rollout import HFEngine, SamplingParams
from alignkit.training.offline.reference import load_reference
from alignkit.training.offline.reference_values import attach_reference_values
from alignkit.training.offline.tasks import Metrics, SequenceData, accepted_hparams, check_hparams
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

log = logging.getLogger("alignkit")

VALUE_HPARAMS = {
    "reward": None,  # reward spec string or callable (required: it scores the reference's samples)
    "reward_column": "reward",
    "value_samples": 2,
    "value_max_new_tokens": 64,
    "value_temperature": 1.0,
    "value_ridge": 1e-3,
}


def response_span(values: Tensor, batch: dict[str, Tensor]) -> list[Tensor]:
    """Per example, the (B, T) `values` on its response positions, in order."""
    mask = batch["response_mask"].bool()
    return [row[m] for row, m in zip(values, mask, strict=True)]


@dataclass
class AlolTask(SequenceData):
    config: TrainConfig
    variant: str = "alol"
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft", "ratings")
    hparams: dict[str, Any] = field(init=False, default_factory=dict)
    filter_counts: dict[str, tuple[int, int]] = field(init=False, default_factory=dict)
    value_r2: float = field(init=False, default=float("nan"))
    value_head: tuple[Tensor, Tensor] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.loss_fn = ALOL[self.variant]
        accepted = {k: v for k, v in accepted_hparams(self.loss_fn).items()
                    if k not in ("response_mask", "advantages", "ref_token_logps", "ref_logps")}
        check_hparams(self.variant, self.config.hparams, {**accepted, **VALUE_HPARAMS})
        merged = {**accepted, **VALUE_HPARAMS, **self.config.hparams}
        self.hparams = {k: merged[k] for k in accepted}
        self.value_options = {k: merged[k] for k in VALUE_HPARAMS}
        # `--reward` (TrainConfig.reward, shared with the online loop) or `--set reward=...`
        reward = getattr(self.config, "reward", None) or self.value_options["reward"]
        self.value_options["reward"] = reward
        if callable(reward):  # the task keeps the callable; config.yaml gets a readable name
            name = f"<python callable {reward_name(reward)}>"
            if getattr(self.config, "reward", None) is reward:
                self.config.reward = name
            else:
                self.config.hparams["reward"] = name
        if reward is None:
            raise ValueError(
                f"{self.variant} needs a reward function to score the reference's own samples for its "
                "value head: --reward module:function (or reward=<callable> in alignkit.train)"
            )

    @property
    def needs_reference(self) -> bool:
        return self.variant not in REFERENCE_FREE_ALOL

    def collate(self, examples: list[SeqExample], pad_id: int) -> dict[str, Tensor]:
        """`collate_sequences`, plus `ref_token_logps` (B, T) once they are cached."""
        batch = super().collate(examples, pad_id)
        if all("ref_token_logps" in ex.extras for ex in examples):
            grid = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
            grid[batch["response_mask"]] = torch.cat([ex.extras["ref_token_logps"] for ex in examples])
            batch["ref_token_logps"] = grid
        return batch

    # ------------------------------------------------------------------ preparation

    def reward_fn(self):
        reward = self.value_options["reward"]
        return reward if callable(reward) else load_reward(reward)

    @torch.no_grad()
    def prompt_features(self, model, prompts: list[list[int]], pad_id: int) -> Tensor:
        """Final hidden state at the last prompt token: (N, H) float32 on CPU."""
        device = next(model.parameters()).device
        features = []
        size = max(1, self.config.batch_size)
        for start in range(0, len(prompts), size):
            input_ids, mask = pad_left(prompts[start : start + size], pad_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        output_hidden_states=True, use_cache=False)
            features.append(out.hidden_states[-1][:, -1].float().cpu())  # left padding: last = real
        return torch.cat(features)

    def fit_value(self, reference, tokenizer, prompt_ids: list[list[int]], prompt_texts: list[str]) -> None:
        """Steps 1-2: sample from the reference, score, fit the ridge value head."""
        k = int(self.value_options["value_samples"])
        engine = HFEngine(reference, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                          max_batch_size=max(k, self.config.batch_size * k))
        sampling = SamplingParams(max_new_tokens=int(self.value_options["value_max_new_tokens"]),
                                  temperature=float(self.value_options["value_temperature"]),
                                  seed=self.config.seed)
        rollout = engine.generate(prompt_ids, k, sampling)
        completions = [tokenizer.decode(ids[m], skip_special_tokens=True)
                       for ids, m in zip(rollout.response_ids, rollout.response_mask, strict=True)]
        rewards, _ = score_safely(self.reward_fn(), [p for p in prompt_texts for _ in range(k)], completions)
        features = self.prompt_features(reference, prompt_ids, tokenizer.pad_token_id)
        features = features.repeat_interleave(k, dim=0)
        weight, bias = fit_value_head(features, rewards.float(), float(self.value_options["value_ridge"]))
        self.value_head = (weight, bias)
        self.value_r2 = float(r_squared(features @ weight + bias, rewards.float()))
        log.info("%s value head: R^2 %.3f on %d reference samples (%d per prompt)",
                 self.variant, self.value_r2, len(completions), k)

    def advantages(self, reference, tokenizer, table: RowTable, examples: list[SeqExample]) -> Tensor:
        """Step 3: A = R - V_ref(x) for every example, (N,)."""
        column = self.value_options["reward_column"]
        if column in table.columns:
            for ex in examples:
                if not isinstance(table.rows[ex.row].get(column), int | float):
                    raise table.error(ex.row, f"column '{column}' must be a number for A-LoL")
            rewards = torch.tensor([float(table.rows[ex.row][column]) for ex in examples])
        else:
            prompts = [tokenizer.decode(ex.prompt_ids, skip_special_tokens=True) for ex in examples]
            texts = [tokenizer.decode(ex.completion_ids, skip_special_tokens=True) for ex in examples]
            rewards, _ = score_safely(self.reward_fn(), prompts, texts)
        weight, bias = self.value_head
        values = self.prompt_features(reference, [ex.prompt_ids for ex in examples], tokenizer.pad_token_id) @ weight + bias
        for ex, value in zip(examples, values.tolist(), strict=True):
            ex.extras["value"] = value
        return rewards.float() - values

    def prepare(self, model, tokenizer, splits, run_dir) -> None:
        reference, owned = load_reference(self.config, model, tokenizer)
        train_table, train = splits["train"]
        texts = [tokenizer.decode(ex.prompt_ids, skip_special_tokens=True) for ex in train]
        self.fit_value(reference, tokenizer, [ex.prompt_ids for ex in train], texts)
        for name, (table, examples) in splits.items():
            if table is None or not examples:
                continue
            advantage = self.advantages(reference, tokenizer, table, examples)
            for ex, a in zip(examples, advantage.tolist(), strict=True):
                ex.extras["advantage"] = a
            total = len(examples)
            examples[:] = [ex for ex in examples if ex.extras["advantage"] > 0]
            self.filter_counts[name] = (len(examples), total)
            log.info("%s: %d of %d %s examples have a positive advantage (the rest are skipped)",
                     self.variant, len(examples), total, name)
        if not train:
            raise ValueError(f"{self.variant}: no training example has a positive advantage R - V_ref(x)")
        if owned:
            del reference
            gc.collect()
        if self.needs_reference:
            attach_reference_values(self, model, tokenizer, train, splits["eval"][1], self.config, run_dir)

    @torch.no_grad()
    def reference_values(self, model, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                            chunk_size=self.config.logp_chunk_size)
        return {"ref_token_logps": response_span(logps, batch)}

    # ------------------------------------------------------------------ training

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        per_token = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                chunk_size=self.config.logp_chunk_size)  # (B, T)
        mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
        ref_tokens = batch.get("ref_token_logps")
        ref_logps = ref_tokens.sum(-1) if ref_tokens is not None else None
        per_example = self.loss_fn(per_token, mask, batch["advantage"], ref_token_logps=ref_tokens,
                                   ref_logps=ref_logps, **self.hparams)
        loss = per_example.mean()
        logps = per_token.sum(-1).detach()
        metrics: Metrics = {"loss": loss.detach(), "advantage/mean": batch["advantage"].mean(),
                            "logps/completion": logps.mean()}
        if ref_logps is not None:
            metrics["kl"] = (logps - ref_logps).mean()
            epsilon = self.hparams.get("clip_epsilon")
            if epsilon is not None:
                ratio = torch.exp(logps - ref_logps)
                metrics["clip_ratio"] = ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).float().mean()
        return loss, metrics


def _register() -> None:
    from functools import partial

    paper = "A-LoL (Baheti et al. 2024, Leftover Lunch: Advantage-based Offline RL for LMs)"
    labels = {"alol": "", "alol_ref_free": " ref-free", "alol_seq": " seq", "alol_kl": " KL"}
    for name in ALOL:
        models = "policy" if name in REFERENCE_FREE_ALOL else "policy (+ reference log-probs cached once)"
        register_algorithm(AlgorithmSpec(
            name, "pointwise", "prompt+completion [+reward] + reward function",
            models + "; value head fitted once on reference samples",
            paper.replace("A-LoL", "A-LoL" + labels[name], 1), partial(AlolTask, variant=name)))


_register()
