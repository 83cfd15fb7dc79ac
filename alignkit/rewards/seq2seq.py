"""A trained seq2seq reward model (`alignkit train rm_seq2seq`) as a per-token reward
(Zhou et al. 2024; the maths and what the paper pins are in `alignkit.objectives.seq2seq_rm`).

The RM is a causal LM. Its input for a prompt x and a response y is `render_source(template, x,
y)`; it was trained to write the preferred response after that input. Scoring feeds y again as
the output (teacher forcing) and rewards each token of y by whether the RM's greedy choice there
is that token.

`final/seq2seq_rm.json` records the template and the two scores. Called as a reward,
`scorer(prompts, completions, completion_ids)` returns per-token rewards over each completion's
`completion_ids` (the online loop's dense contract, `alignkit.rewards.dense`): with the policy's
own tokenizer (same vocabulary as the RM's) the sampled ids are scored as they are; with another
tokenizer each RM token's reward goes to the policy token holding its last character. Without
`completion_ids` it returns each completion's summed reward (one number per row).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.data.tokenize import _bos_prefix
from alignkit.models import load_model
from alignkit.models.logprobs import predictors_and_head
from alignkit.objectives.seq2seq_rm import divergence_token_rewards
from alignkit.rewards.process import segment_end_tokens, token_char_ends

log = logging.getLogger("alignkit")

MANIFEST = "seq2seq_rm.json"
DEFAULT_TEMPLATE = "{prompt}\nResponse:{response}\nBetter response:"
"""The RM's input; the target (the preferred response) follows it directly."""


def as_text(value: Any) -> str:
    """A prompt or response as plain text: a conversation becomes 'role: content' lines, a
    response given as messages is its last message's content."""
    if isinstance(value, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in value if isinstance(m, dict))
    return str(value)


def response_text(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def render_source(template: str, prompt: Any, response: Any) -> str:
    """The RM's input for (prompt, response): `template` with {prompt} and {response} filled."""
    return template.format(prompt=as_text(prompt), response=response_text(response))


def check_template(template: str, where: str) -> None:
    """A template must hold {prompt} and {response} and nothing else to fill."""
    try:
        template.format(prompt="", response="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where}: template {template!r} can only use {{prompt}} and {{response}} ({err})") from None
    if "{prompt}" not in template or "{response}" not in template:
        raise ValueError(f"{where}: template {template!r} must contain {{prompt}} and {{response}}")


@torch.no_grad()
def greedy_predictions(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, predict_mask: Tensor,
                       chunk_size: int = 1024) -> Tensor:
    """argmax of the logits at t - 1 for every True of `predict_mask` (B, T - 1) -> (N,) token ids,
    computed from hidden states in chunks (no (B, T, V) logits tensor)."""
    predictors, head = predictors_and_head(model, input_ids, attention_mask, predict_mask)
    chosen = [head(predictors[start : start + chunk_size]).argmax(-1) for start in range(0, len(predictors), chunk_size)]
    return torch.cat(chosen) if chosen else input_ids.new_zeros(0)


class Seq2SeqRewardScorer:
    """Per-token rewards of a seq2seq reward model; see the module docstring.

    `token_rewards(prompts, completions, completion_ids=None) -> list[Tensor (n_i,)]`: one reward
    per token of each completion (its `completion_ids` in the RM's vocabulary, or the RM's own
    tokens of `completion + eos`). Tokens past `max_length` (default: the training run's) get 0
    (counted in the log).
    """

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        template: str | None = None,
        match_reward: float | None = None,
        mismatch_reward: float | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        device: str | None = None,
        policy_tokenizer: Any = None,
    ) -> None:
        manifest: dict[str, Any] = {}
        if isinstance(path_or_model, str | Path):
            manifest_file = Path(path_or_model) / MANIFEST
            if not manifest_file.is_file():
                raise ValueError(f"{path_or_model}: no {MANIFEST}; pass a final/ written by `alignkit train rm_seq2seq`")
            manifest = json.loads(manifest_file.read_text())
            model, loaded = load_model(str(path_or_model), kind="causal_lm", device=device)
            tokenizer = tokenizer or loaded
        elif tokenizer is None:
            raise ValueError("Seq2SeqRewardScorer: pass the tokenizer together with a loaded model")
        else:
            model = path_or_model
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template = template or manifest.get("template", DEFAULT_TEMPLATE)
        check_template(self.template, "Seq2SeqRewardScorer")
        self.match_reward = float(manifest.get("match_reward", 1.0) if match_reward is None else match_reward)
        self.mismatch_reward = float(manifest.get("mismatch_reward", -1.0) if mismatch_reward is None
                                     else mismatch_reward)
        self.max_length = int(max_length or manifest.get("max_length", 1024))
        self.batch_size = batch_size
        self.policy_tokenizer = policy_tokenizer
        self.same_vocabulary = policy_tokenizer is None or policy_tokenizer.get_vocab() == tokenizer.get_vocab()
        self.__name__ = (f"Seq2SeqRewardScorer({path_or_model})" if isinstance(path_or_model, str | Path)
                         else "Seq2SeqRewardScorer")

    def _rows(self, prompts: list[Any], completions: list[Any], targets: list[list[int]]):
        """(input ids, number of scored target tokens) of each row: bos + source, then the target,
        the source cut from its start (and the target from its end) to fit max_length."""
        bos = _bos_prefix(self.tokenizer)  # as SFT prompts get it
        rows, cut = [], 0
        for prompt, completion, target in zip(prompts, completions, targets, strict=True):
            source = self.tokenizer(render_source(self.template, prompt, completion),
                                    add_special_tokens=False)["input_ids"]
            source = bos + list(source)
            kept = target[: max(self.max_length - 1, 1)]
            cut += len(target) - len(kept)
            room = self.max_length - len(kept)
            source = source[-room:] if len(source) > room else source
            rows.append((source + list(kept), len(kept)))
        if cut:
            log.warning("%s: %d response token(s) past max_length=%d got reward 0", self.__name__, cut,
                        self.max_length)
        return rows

    def token_rewards(self, prompts: list[Any], completions: list[Any],
                      completion_ids: list[list[int]] | None = None) -> list[Tensor]:
        if completion_ids is None:
            eos = self.tokenizer.eos_token or ""
            texts = [response_text(c) + eos for c in completions]
            completion_ids = [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] \
                if texts else []
        rows = self._rows(list(prompts), list(completions), [list(ids) for ids in completion_ids])
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        results: list[Tensor] = []
        for start in range(0, len(rows), self.batch_size):
            part = rows[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in part)
            input_ids = torch.full((len(part), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for n, (ids, scored) in enumerate(part):
                input_ids[n, : len(ids)] = torch.tensor(ids)
                attention_mask[n, : len(ids)] = 1
                target_mask[n, len(ids) - scored : len(ids)] = True
            target_mask[:, 0] = False
            input_ids, attention_mask, target_mask = (t.to(device) for t in (input_ids, attention_mask, target_mask))
            predicted = torch.zeros_like(input_ids)
            predicted[target_mask] = greedy_predictions(self.model, input_ids, attention_mask, target_mask[:, 1:])
            rewards = divergence_token_rewards(predicted, input_ids, target_mask, match_reward=self.match_reward,
                                               mismatch_reward=self.mismatch_reward).cpu()
            for n, (_, scored) in enumerate(part):
                rewards_row = rewards[n][target_mask[n].cpu()]
                results.append(torch.cat([rewards_row, torch.zeros(len(completion_ids[start + n]) - scored)]))
        return results

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                 **columns: Any) -> list[list[float]] | Tensor:
        """Per-token rewards over each completion's `completion_ids` (dense), or (N,) totals without them."""
        if completion_ids is None:
            return torch.stack([r.sum() for r in self.token_rewards(prompts, completions)]) if completions else \
                torch.zeros(0)
        if self.same_vocabulary:
            return [r.tolist() for r in self.token_rewards(prompts, completions, completion_ids)]
        texts = [response_text(c) for c in completions]
        own = self.token_rewards(prompts, texts)  # the RM's tokens of text + eos
        dense = []
        for text, ids, rewards in zip(texts, completion_ids, own, strict=True):
            eos = self.tokenizer.eos_token or ""
            rm_ids = self.tokenizer(text + eos, add_special_tokens=False)["input_ids"]
            homes = segment_end_tokens(token_char_ends(self.policy_tokenizer, list(ids)),
                                       token_char_ends(self.tokenizer, list(rm_ids)))
            row = [0.0] * len(ids)
            for home, value in zip(homes, rewards.tolist(), strict=True):
                if row:
                    row[home] += value
            dense.append(row)
        return dense
