"""`treg`: DPO (or SimPO) plus T-REG's token-level reward regulariser (equations and evidence in
`alignkit.objectives.treg`).

Before training, the frozen reference (the initial policy, or `--ref-model`) scores every
response twice, after the prompt wrapped in `better_template` and in `worse_template`; the
per-token contrast gives the token rewards r_t, cached in `DIR/treg_token_rewards.safetensors`
(with the DPO reference sums in `DIR/reference_logps.safetensors`). Training then costs one
forward per step like DPO: the reward-weighted sum sum_t r_t log pi(y_t) comes from the same
per-token log-probs as the sequence sums.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data import PairExample, RowTable, collate_pairs, tokenize_pairwise
from alignkit.data.formats import split_implicit_prompt
from alignkit.models import token_logps
from alignkit.objectives.registry import PairLogps
from alignkit.objectives.treg import BASES, contrastive_token_rewards, treg
from alignkit.training.offline.pairwise_options import scored_mask
from alignkit.training.offline.reference import attach_reference_logps
from alignkit.training.offline.reference_values import attach_reference_values
from alignkit.training.offline.tasks import (
    Metrics,
    PairData,
    accepted_hparams,
    check_hparams,
    implicit_reward_metrics,
    tokenize_options,
)
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

log = logging.getLogger("alignkit")

# Our own wording of the paper's two opposite instructions (its templates are not public).
PROMPT_OPTIONS: dict[str, Any] = {
    "better_template": "{prompt}\n\nGive a response that is helpful, correct, coherent and concise.",
    "worse_template": "{prompt}\n\nGive a response that is unhelpful, incorrect, incoherent and verbose.",
    "accept_unverified": False,
}
UNVERIFIED = (
    "treg: T-REG's official code (wzhouad/T-REG) and the method section of its paper could not "
    "be obtained, so this implementation follows the paper's equations as two independent "
    "summaries state them (token reward, regulariser, sequence weight, total loss), with our own "
    "prompt templates; see alignkit/objectives/treg.py. Train with it knowingly: "
    "--set accept_unverified=true"
)
SIDES = ("better", "worse")


def wrap_prompt(prompt: str | list[dict[str, Any]], template: str) -> str | list[dict[str, Any]]:
    """The prompt inside `template` (its `{prompt}` placeholder); for a conversation, the last
    user message's content is wrapped and every other message kept."""
    if isinstance(prompt, str):
        return template.replace("{prompt}", prompt)
    messages = copy.deepcopy(list(prompt))
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        raise ValueError("the conversation has no user message to wrap with the contrastive instruction")
    last = messages[users[-1]]
    last["content"] = template.replace("{prompt}", str(last["content"]))
    return messages


def contrast_table(table: RowTable, template: str) -> RowTable:
    """The rows with their prompt wrapped by `template` (implicit prompts split off first)."""
    rows = []
    for i, row in enumerate(table.rows):
        if row.get("prompt") is None:
            row = split_implicit_prompt(row)
        try:
            rows.append({**row, "prompt": wrap_prompt(row["prompt"], template)})
        except (KeyError, ValueError) as exc:
            raise table.error(i, f"cannot build T-REG's contrastive prompt: {exc}") from exc
    return RowTable(rows, list(table.origins))


def response_aligned(values: list[Tensor], response_mask: Tensor) -> Tensor:
    """Scatter one 1-D tensor per row (its response tokens, in order) into (R, T) at the
    row's response positions; 0 elsewhere. Lengths must equal the rows' response lengths."""
    mask = response_mask.bool()
    lengths = mask.sum(-1).tolist()
    if [len(v) for v in values] != lengths:
        raise ValueError(f"token values of lengths {[len(v) for v in values]} for responses of {lengths}")
    out = torch.zeros(mask.shape, dtype=torch.float32)
    if values:
        out[mask] = torch.cat(values).float()
    return out


def response_values(per_token: Tensor, response_mask: Tensor) -> list[Tensor]:
    """The inverse of `response_aligned`: each row's values at its response positions."""
    mask = response_mask.bool()
    return [per_token[row][mask[row]] for row in range(per_token.shape[0])]


@dataclass
class TRegTask(PairData):
    """T-REG (Zhou et al. 2025): L_base + alpha * w * (L_REG(y_w) + L_REG(y_l)); see
    `alignkit.objectives.treg`. Hyper-parameters: beta, alpha, base (dpo | simpo), gamma (SimPO
    margin), better_template / worse_template (with `{prompt}`), accept_unverified.

    Extra cost: 2 no-grad reference forwards per response once before training (the token
    rewards); per training step one forward and backward, like DPO.
    """

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("pairwise",)
    hparams: dict[str, Any] = field(init=False, default_factory=dict)
    prompts: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        loss_defaults = {k: v for k, v in accepted_hparams(treg).items() if v is not inspect.Parameter.empty}
        given = dict(self.config.hparams)
        check_hparams("treg", given, loss_defaults | PROMPT_OPTIONS)
        if not given.get("accept_unverified", False):
            raise ValueError(UNVERIFIED)
        self.hparams = {**loss_defaults, **{k: v for k, v in given.items() if k in loss_defaults}}
        if self.hparams["base"] not in BASES:
            raise ValueError(f"treg: base must be one of {BASES}, got {self.hparams['base']!r}")
        self.prompts = {side: str(given.get(f"{side}_template", PROMPT_OPTIONS[f"{side}_template"]))
                        for side in SIDES}
        for side, template in self.prompts.items():
            if "{prompt}" not in template:
                raise ValueError(f"treg: {side}_template must contain {{prompt}}, got {template!r}")
        if self.prompts["better"] == self.prompts["worse"]:
            raise ValueError("treg: better_template and worse_template are identical, so every token reward is 0")

    @property
    def needs_reference(self) -> bool:
        return self.hparams["base"] == "dpo"

    # -- before training -----------------------------------------------------------------------
    def prepare(self, model, tokenizer, splits: dict[str, tuple[Any, list]], run_dir) -> None:
        """DPO's reference sums, then the contrastive token rewards of every response."""
        train, evaluation = splits["train"][1], splits["eval"][1]
        if self.needs_reference:
            attach_reference_logps(self, model, tokenizer, train, evaluation, self.config, run_dir)
        for table, examples in splits.values():
            if table is None or not examples:
                continue
            for side, template in self.prompts.items():
                wrapped, _ = tokenize_pairwise(contrast_table(table, template), tokenizer,
                                               **tokenize_options(self.config))
                for example, contrast in zip(examples, wrapped, strict=True):
                    example.extras[f"{side}_prompt_ids"] = contrast.prompt_ids
        key = json.dumps(self.prompts, sort_keys=True)
        attach_reference_values(self, model, tokenizer, train, evaluation, self.config, run_dir,
                                cache="treg_token_rewards", key=key)
        for _, examples in splits.values():
            for example in examples or []:
                for side in SIDES:
                    example.extras.pop(f"{side}_prompt_ids", None)
        rewards = torch.cat([torch.cat([ex.extras["chosen_token_rewards"], ex.extras["rejected_token_rewards"]])
                             for ex in train])
        log.info("T-REG token rewards: mean %+.3f, %.1f%% positive, over %d tokens",
                 float(rewards.mean()), 100 * float((rewards > 0).float().mean()), rewards.numel())

    @torch.no_grad()
    def reference_logps(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        sums = self.token_logps(model, batch).sum(-1)
        half = sums.shape[0] // 2
        return sums[:half], sums[half:]

    @torch.no_grad()
    def reference_values(self, model, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """r_t of every chosen and rejected token: the evaluator's log-probs after the better
        prompt against those after the worse prompt."""
        per_side = {}
        for side in SIDES:
            sub = {k: batch[f"{side}/{k}"] for k in ("input_ids", "attention_mask", "response_mask")}
            per_side[side] = response_values(self.token_logps(model, sub), sub["response_mask"])
        rewards = [contrastive_token_rewards(b, w) for b, w in zip(per_side["better"], per_side["worse"], strict=True)]
        half = len(rewards) // 2
        return {"chosen_token_rewards": rewards[:half], "rejected_token_rewards": rewards[half:]}

    # -- batches and the loss ------------------------------------------------------------------
    def collate(self, examples: list[PairExample], pad_id: int) -> dict[str, Tensor]:
        """`collate_pairs` plus `token_rewards` (2B, T) at the response positions once they are
        known, and the contrastive batches `better/*`, `worse/*` while they are computed."""
        batch = collate_pairs(examples, pad_id)
        extras = examples[0].extras
        if "chosen_token_rewards" in extras:
            values = [ex.extras["chosen_token_rewards"] for ex in examples]
            values += [ex.extras["rejected_token_rewards"] for ex in examples]
            batch["token_rewards"] = response_aligned(values, batch["response_mask"])
        for side in SIDES:
            if f"{side}_prompt_ids" in extras:
                contrast = [PairExample(ex.extras[f"{side}_prompt_ids"], ex.chosen_ids, ex.rejected_ids, ex.row)
                            for ex in examples]
                sub = collate_pairs(contrast, pad_id)
                batch.update({f"{side}/{k}": sub[k] for k in ("input_ids", "attention_mask", "response_mask")})
        return batch

    def token_logps(self, model, batch: dict[str, Tensor]) -> Tensor:
        return token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                           chunk_size=self.config.logp_chunk_size)

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        per_token = self.token_logps(model, batch)  # (2B, T), 0 off the response
        mask = scored_mask(batch)
        rewards = batch["token_rewards"] * mask
        sums, counts, weighted = per_token.sum(-1), mask.sum(-1).float(), (per_token * rewards).sum(-1)
        half = sums.shape[0] // 2
        logps = PairLogps(
            chosen=sums[:half], rejected=sums[half:],
            chosen_tokens=counts[:half], rejected_tokens=counts[half:],
            ref_chosen=batch.get("ref_chosen"), ref_rejected=batch.get("ref_rejected"),
        )
        per_pair = treg(logps, weighted[:half], weighted[half:], **self.hparams)
        loss = per_pair.mean()
        with torch.no_grad():
            base = treg(logps, torch.zeros_like(weighted[:half]), torch.zeros_like(weighted[half:]), **self.hparams)
            token_counts = counts.clamp(min=1)
            extra = {
                "loss/base": base.mean(),
                "loss/regulariser": (per_pair - base).mean(),
                "token_rewards/chosen": (rewards[:half].sum(-1) / token_counts[:half]).mean(),
                "token_rewards/rejected": (rewards[half:].sum(-1) / token_counts[half:]).mean(),
            }
        return loss, {**implicit_reward_metrics(loss, logps, float(self.hparams["beta"])), **extra}


def _register() -> None:
    register_algorithm(AlgorithmSpec(
        "treg", "pairwise (token rewards)", "prompt+chosen+rejected",
        "policy (+ reference log-probs and contrastive token rewards cached once)",
        "T-REG (Zhou et al. 2025, T-REG: Preference Optimization with Token-Level Reward Regularization;"
        " form from secondary sources, needs accept_unverified=true)",
        TRegTask))


_register()
