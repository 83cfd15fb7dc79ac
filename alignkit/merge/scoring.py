"""Held-out scores of a merged state dict (greedy soup) and the completion batches HMA learns on.

- `completion_batches(path, tokenizer, ...)`: prompt/completion (or messages) rows, checked
  like SFT data, tokenised and collated into right-padded batches;
- `mean_logp(model, batches)`: Σ log π(y|x) / Σ |y| over every completion token — the
  negative NLL per token, higher is better;
- `nll_scorer`, `reward_scorer`, `eval_scorer`: `score(state_dict) -> float` closures for
  `greedy_soup`; the reward one decodes each prompt greedily (fixed max_new_tokens) and averages
  a reward spec; the eval one runs `alignkit eval`'s `evaluate_model` on the prompts and reads
  one of its metrics (`alignkit.lab.eval_metrics`), negated when lower is better.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.merge.io import MergeInput, load_into

log = logging.getLogger("alignkit")


def completion_batches(source: str, tokenizer: Any, *, flag: str, max_length: int, batch_size: int,
                       chat: bool = False) -> list[dict[str, Tensor]]:
    """Batches (input_ids, attention_mask, response_mask) of an SFT-format file; a bad row is a
    DataError naming the file and row; truncations are logged with their count."""
    from alignkit.data import collate_sequences, load_rows, tokenize_sft, validate_rows

    table = load_rows(source)
    if not table.rows:
        raise ValueError(f"{flag} {source}: no rows")
    validate_rows(table, "sft")
    examples, stats = tokenize_sft(table, tokenizer, max_length=max_length, chat=chat)
    if stats.truncated_prompts or stats.truncated_responses:
        log.warning("%s %s: %d prompt(s) and %d completion(s) truncated to --max-length %d", flag, source,
                    stats.truncated_prompts, stats.truncated_responses, max_length)
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collate_sequences(examples[start:start + batch_size], tokenizer.pad_token_id)
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")})
    return batches


def summed_logps(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(Σ log π over the batch's completion tokens, their count), both scalars."""
    from alignkit.models import sequence_logps

    device = next(model.parameters()).device
    logps, lengths = sequence_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask",
                                                                            "response_mask")))
    return logps.sum(), lengths.sum()


@torch.no_grad()
def mean_logp(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Σ log π(y|x) / Σ |y| over every completion token of `batches` (= −NLL per token)."""
    total, count = 0.0, 0.0
    for batch in batches:
        logp, tokens = summed_logps(model, batch)
        total, count = total + float(logp), count + float(tokens)
    if count == 0:
        raise ValueError("no completion tokens to score")
    return total / count


def nll_scorer(template: MergeInput, batches: list[dict[str, Tensor]]) -> Callable[[Mapping[str, Tensor]], float]:
    """score(state) = mean_logp of the template holding `state` (negative NLL per token)."""

    def score(state: Mapping[str, Tensor]) -> float:
        model = load_into(template.model, {**state, **template.fixed}, template.aliases)
        return mean_logp(model.eval(), batches)

    return score


def reward_scorer(template: MergeInput, prompts: list[Any], reward: Any, *, max_new_tokens: int,
                  batch_size: int = 32) -> Callable[[Mapping[str, Tensor]], float]:
    """score(state) = mean reward of the template's greedy completions (one per prompt, at most
    `max_new_tokens` each) for `prompts`, scored by `reward(prompts, completions)`."""
    from alignkit.lab.generation_eval import encode_prompts, first_scores, prompt_text, sample

    tokenizer = template.tokenizer
    prompt_ids = encode_prompts(tokenizer, prompts)
    texts_for_reward = [prompt_text(p) for p in prompts]

    def score(state: Mapping[str, Tensor]) -> float:
        model = load_into(template.model, {**state, **template.fixed}, template.aliases).eval()
        drawn = sample(model, tokenizer, prompt_ids, 1, max_new_tokens=max_new_tokens, temperature=0.0,
                       max_batch_size=batch_size)
        completions = [group[0] for group in drawn.texts]
        return float(first_scores(reward, texts_for_reward, completions).mean())

    return score


def eval_scorer(template: MergeInput, prompts: list[Any], metric: str, direction: str, reward: Any, *,
                reference: Any = None, samples: int, max_new_tokens: int, temperature: float, seed: int,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> Callable[[Mapping[str, Tensor]], float]:
    """score(state) = s · m, m = `metric` of `evaluate_model` (what `alignkit eval` runs) on the
    template holding `state`: `samples` completions per prompt at `temperature`, the same `seed`
    for every candidate, gold reward `reward`, KL and win rate against `reference` (a loaded model
    sharing the tokenizer, or None); s = +1 for direction "max", −1 for "min" (greedy_soup keeps
    higher scores). `on_result(result)` sees each evaluate_model result."""
    from alignkit.lab.eval_metrics import EMBEDDING_METRICS, eval_metric_value
    from alignkit.lab.generation_eval import evaluate_model

    sign = 1.0 if direction == "max" else -1.0
    if metric in EMBEDDING_METRICS:
        from alignkit.eval.diversity import default_embedder

        embedder: Any = default_embedder()  # loaded once, not per candidate
    else:
        embedder = None if metric.startswith("diversity/") else False  # False: no diversity at all

    def score(state: Mapping[str, Tensor]) -> float:
        model = load_into(template.model, {**state, **template.fixed}, template.aliases).eval()
        result = evaluate_model(model, template.tokenizer, prompts, reward=reward, reference=reference,
                                samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, embedder=embedder)
        if on_result is not None:
            on_result(result)
        return sign * eval_metric_value(result, metric)

    return score
