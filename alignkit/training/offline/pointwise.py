"""Weighted-SFT tasks on `prompt` + `completion` rows: `crlft` (OpenChat C-RLFT, class-conditioned
reward-weighted NLL) and `ift` (intuitive fine-tuning, temporal residual connection +
relation-propagation weights). Neither needs a reference model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.data import RowTable, SeqExample, TruncationStats
from alignkit.models import position_ids_from_mask, token_logps
from alignkit.models.logprobs import _chunked, _scatter, decoder_and_head
from alignkit.objectives.crlft import crlft
from alignkit.objectives.ift import ift
from alignkit.training.offline.tasks import Metrics, SequenceData, check_hparams, scored_tokens
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.distributed import Weighted
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

log = logging.getLogger("alignkit")


CRLFT_DEFAULTS: dict[str, Any] = {
    "class_column": "source",
    "class_rewards": {"gpt4": 1.0, "gpt3.5": 0.1},
    "conditions": {"gpt4": "GPT4 Correct", "gpt3.5": "GPT3"},
    "prompt_template": "{condition} User: {prompt}\n{condition} Assistant:",
}


@dataclass
class CRLFTTask(SequenceData):
    """C-RLFT (Wang et al. 2023): the prompt of a row of class c is rendered with
    `prompt_template.format(condition=conditions.get(c, c), prompt=prompt)` and its response
    tokens weigh r_c = `class_rewards[c]`:

        L = sum_b r_{c_b} sum_t -log pi(y_t | x, c, y_<t) / sum_b |y_b|

    At inference, format prompts with the expert class's condition (e.g. "GPT4 Correct").
    """

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft", "ratings")
    needs_reference: bool = False
    options: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        check_hparams("crlft", self.config.hparams, CRLFT_DEFAULTS)
        self.options = {**CRLFT_DEFAULTS, **self.config.hparams}
        if not self.options["class_rewards"]:
            raise ValueError("crlft: class_rewards must map at least one class to a reward")

    def condition_prompt(self, prompt: str, source: str) -> str:
        condition = (self.options["conditions"] or {}).get(source, source)
        return self.options["prompt_template"].format(condition=condition, prompt=prompt)

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[SeqExample], TruncationStats]:
        column, rewards = self.options["class_column"], self.options["class_rewards"]
        rows = []
        for i, row in enumerate(table.rows):
            source = row.get(column)
            if source is None:
                raise table.error(i, f"column '{column}' is missing (crlft needs each row's data source class)")
            if str(source) not in rewards:
                raise table.error(i, f"class {source!r} has no reward; class_rewards has {sorted(rewards)}")
            if not isinstance(row.get("prompt"), str):
                raise table.error(i, "crlft needs a string 'prompt' to prefix with the class condition")
            rows.append({**row, "prompt": self.condition_prompt(row["prompt"], str(source)),
                         "class_reward": float(rewards[str(source)])})
        return super().tokenize(RowTable(rows, list(table.origins)), tokenizer)

    loss_tokens = staticmethod(scored_tokens)  # a token mean

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        per_token = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                chunk_size=self.config.logp_chunk_size)
        mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
        tokens = mask[:, 1:].sum().clamp(min=1)
        loss = crlft(per_token, mask, batch["class_reward"]).sum() / tokens
        nll = -(per_token * mask).sum() / tokens
        return loss, {"loss": loss.detach(), "nll": nll.detach(), "weights/mean": batch["class_reward"].mean()}


@dataclass
class IFTTask(SequenceData):
    """IFT (Hua et al. 2024); see `alignkit.objectives.ift`. Cost per step: 2 forwards (the
    first without gradients) + 1 backward, vs SFT's 1 + 1. Input embeddings are used detached,
    as the reference code reads them from a frozen copy of the embedding table (so they are not
    trained; with tied embeddings the output head still is)."""

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft",)
    unused_parameters: bool = True  # the (untied) input embeddings get no gradient
    needs_reference: bool = False
    lambda_: float = field(init=False, default=0.2)
    gamma: float = field(init=False, default=0.95)

    def __post_init__(self) -> None:
        check_hparams("ift", self.config.hparams, {"lambda_": 0.2, "gamma": 0.95})
        self.lambda_ = float(self.config.hparams.get("lambda_", 0.2))
        self.gamma = float(self.config.hparams.get("gamma", 0.95))
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"ift: lambda_ must be in [0, 1], got {self.lambda_}")

    def _hidden(self, model, parts, **inputs) -> tuple[Tensor, nn.Module]:
        if parts is None:  # models whose logits are not W h: full logits, identity head
            return model(**inputs, use_cache=False).logits, nn.Identity()
        decoder, head = parts
        return decoder(**inputs, use_cache=False).last_hidden_state, head

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        mask = batch["response_mask"].bool() & attention_mask.bool()
        predict_mask = mask[:, 1:]  # (B, T-1): logits at t-1 predict token t
        targets = input_ids[:, 1:][predict_mask]  # (N,)
        position_ids = position_ids_from_mask(attention_mask)
        parts = decoder_and_head(model)
        embed = model.get_input_embeddings()
        chunk = self.config.logp_chunk_size

        # 1. no-grad forward on the ground truth: predicted next tokens (and the plain NLL)
        with torch.no_grad():
            true_embeds = embed(input_ids)  # (B, T, H)
            hidden, head = self._hidden(model, parts, inputs_embeds=true_embeds,
                                        attention_mask=attention_mask, position_ids=position_ids)
            predictors = hidden[:, :-1][predict_mask]  # (N, H)
            predicted, nll_sum = [], hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, predictors.shape[0], chunk):
                logits = head(predictors[start : start + chunk]).float()
                predicted.append(logits.argmax(-1))
                nll_sum = nll_sum - logits.log_softmax(-1).gather(
                    -1, targets[start : start + chunk].unsqueeze(-1)).sum()
            del hidden, predictors
            mixed_ids = input_ids.clone()
            if predicted:
                mixed_ids[:, 1:][predict_mask] = torch.cat(predicted)
            # 2. temporal residual connection (prompt and padding positions keep their tokens)
            inputs_embeds = (1 - self.lambda_) * true_embeds + self.lambda_ * embed(mixed_ids)

        # 3. forward with gradients on the mixed embeddings, CE against the ground truth
        hidden, head = self._hidden(model, parts, inputs_embeds=inputs_embeds,
                                    attention_mask=attention_mask, position_ids=position_ids)
        logps, _ = _chunked(head, hidden[:, :-1][predict_mask], targets, chunk, 1.0, False)
        per_token = _scatter(logps, predict_mask)  # (B, T)
        loss = ift(per_token, mask, self.gamma).mean()
        tokens = predict_mask.sum().clamp(min=1)
        weight = predict_mask.sum()  # token means: ranks weigh by their tokens, not rows
        return loss, {"loss": loss.detach(), "nll": Weighted(nll_sum / tokens, weight),
                      "nll/mixed": Weighted(-(per_token.detach() * mask).sum() / tokens, weight)}


def _register() -> None:
    register_algorithm(AlgorithmSpec(
        "crlft", "pointwise", "prompt+completion+source (class -> reward via class_rewards)", "policy",
        "C-RLFT (Wang et al. 2023, OpenChat: Advancing Open-source LMs with Mixed-Quality Data)", CRLFTTask))
    register_algorithm(AlgorithmSpec(
        "ift", "sft", "prompt+completion | messages", "policy (2 forwards + 1 backward per step)",
        "IFT (Hua et al. 2024, Intuitive Fine-Tuning)", IFTTask))


_register()
