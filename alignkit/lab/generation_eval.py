"""`evaluate_model`: gold reward, sampled KL, win rate, length and diversity of one policy.

1. sample `samples` completions per prompt from the policy (or take pre-generated ones);
2. gold reward: mean over all samples, percentile-bootstrap interval over PROMPTS (the
   samples of one prompt are correlated, so prompts are the independent units);
3. KL(policy || reference) from the policy's own samples, k1 and k3 summed over tokens
   (`alignkit.eval.kl`); reference = a second model, or the policy with its LoRA adapter off;
4. the reference's own samples (same prompts, decoding settings and seed) for a win rate
   under a judge, both orders, ties half, plus the length-controlled win rate
   (`alignkit.eval.winrate`), and a paired reward difference;
5. length statistics and Kirk et al.'s per-input / across-input diversity.

Runs in-process on loaded models (the demo passes its models, nothing is reloaded). Lives in
`lab/`, above `rollout/` (sampling), `rewards/` (`score_safely`) and `eval/` (the pure metrics
it calls).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from alignkit.eval.diversity import default_embedder, diversity_metrics
from alignkit.eval.kl import response_logps, sequence_kl
from alignkit.eval.stats import bootstrap_ci, paired_bootstrap_diff
from alignkit.eval.winrate import RewardJudge, judged_win_rate, length_controlled_win_rate
from alignkit.models import adapter_disabled, is_peft
from alignkit.rewards import score_safely
from alignkit.rollout import HFEngine, SamplingParams

log = logging.getLogger("alignkit")

KL_ESTIMATOR = (
    "k1 = sum_t (log pi - log pi_ref) per sampled response, mean over samples "
    "(unbiased); k3 = sum_t (exp(-u_t) - 1 + u_t) (unbiased, non-negative terms)"
)


def safe_scores(fn: Any, prompts: list[str], texts: list[str]) -> Tensor:
    """`score_safely(fn, prompts, texts)` scores, (B,) or (B, K): a failing row raises
    `RewardError` naming it."""
    return score_safely(fn, prompts, texts)[0]


def first_scores(fn: Any, prompts: list[str], texts: list[str]) -> np.ndarray:
    """The first objective of `safe_scores` as float64 numpy, (B,)."""
    return safe_scores(fn, prompts, texts).reshape(len(texts), -1)[:, 0].double().numpy()


def prompt_text(prompt: Any) -> str:
    """The text a reward function sees: the string, or the last user turn of a conversation."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1]["content"])
    return str(prompt)


def encode_prompts(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    """Token ids ready for generation: the chat template (generation prompt added) when the
    tokenizer has one (a plain string becomes one user turn), else the raw text."""
    ids = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            ids.append(list(tokenizer(prompt_text(prompt))["input_ids"]))
    return ids


@contextmanager
def progress_bar(enabled: bool, desc: str, total: int, unit: str) -> Iterator[Any]:
    """A tqdm bar on stderr (a disabled one when `enabled` is False), closed on exit."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """eos plus `<|endoftext|>` / `<|im_end|>` where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    found = {tokenizer.eos_token_id} | {vocab.get(t) for t in ("<|endoftext|>", "<|im_end|>")}
    return tuple(sorted(i for i in found if i is not None))


@dataclass
class Samples:
    """Completions grouped by prompt plus the right-padded token rows that produced them."""

    texts: list[list[str]]
    input_ids: Tensor  # (P*K, T)
    attention_mask: Tensor  # (P*K, T)
    response_mask: Tensor  # (P*K, T)
    truncated: list[bool]  # per row: hit max_new_tokens without a stop token
    logprobs: Tensor | None = None
    """(P*K, T) float32: the sampler's log-prob of each response token at the sampling
    temperature (unfiltered, `Rollout.response_logprobs` in sequence coordinates), 0 elsewhere;
    None for completions given as text."""

    @property
    def token_lengths(self) -> list[int]:
        return self.response_mask.sum(-1).tolist()


def sample(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    max_batch_size: int = 64,
    disable_adapter: bool = False,
    progress: Any = None,
) -> Samples:
    """`n` samples per prompt with `HFEngine` (rows grouped by prompt).

    Prompts are decoded in chunks of `max(1, max_batch_size // n)`, the engine's own chunks,
    each a `generate` call whose noise starts at its first global sample index, so the
    samples are those of one call; `progress` (a tqdm bar) advances by each chunk's prompts.
    """
    stops = stop_token_ids(tokenizer)
    engine = HFEngine(
        model, pad_id=tokenizer.pad_token_id, eos_ids=stops, max_batch_size=max_batch_size
    )
    per_chunk = max(1, max_batch_size // n)
    rollouts = []
    with adapter_disabled(model) if disable_adapter else nullcontext():
        for first in range(0, len(prompt_ids), per_chunk):
            chunk = prompt_ids[first : first + per_chunk]
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_token_ids=stops,
                first_sample=first * n,
            )
            rollouts.append(engine.generate(chunk, n, params))
            if progress is not None:
                progress.update(len(chunk))
    texts = [
        tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True).strip()
        for rollout in rollouts
        for ids, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu(), strict=True)
    ]
    input_ids, attention_mask, response_mask = _right_padded(
        [[t.cpu() for t in rollout.to_sequences(tokenizer.pad_token_id)] for rollout in rollouts],
        tokenizer.pad_token_id,
    )
    # response_mask holds each row's generated tokens in order, as the rollouts' own masks do
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32).masked_scatter(
        response_mask,
        torch.cat([r.response_logprobs.cpu()[r.response_mask.cpu().bool()] for r in rollouts]).float(),
    )
    return Samples(
        [texts[i * n : (i + 1) * n] for i in range(len(prompt_ids))],
        input_ids,
        attention_mask,
        response_mask,
        [reason == "length" for rollout in rollouts for reason in rollout.finish_reason],
        logprobs,
    )


def _right_padded(parts: list[list[Tensor]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate chunks of (input_ids, attention_mask, response_mask) rows, right-padded to
    the widest chunk (pad id, 0, False)."""
    width = max(part[0].shape[1] for part in parts)
    out = []
    for index, fill in enumerate((pad_id, 0, False)):
        out.append(
            torch.cat(
                [
                    torch.nn.functional.pad(part[index], (0, width - part[index].shape[1]), value=fill)
                    for part in parts
                ]
            )
        )
    return out[0], out[1], out[2]


def tokenize_completions(
    tokenizer: Any, prompt_ids: list[list[int]], groups: list[list[str]]
) -> Samples:
    """Token rows for pre-generated completions (text + eos, re-tokenised; KL on these rows
    is exact for the re-tokenised sequence, which may differ from the sampled ids)."""
    rows = []
    for ids, group in zip(prompt_ids, groups, strict=True):
        for text in group:
            response = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [
                tokenizer.eos_token_id
            ]
            rows.append((ids, response))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        input_ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        attention_mask[row, : len(prompt) + len(response)] = 1
        response_mask[row, len(prompt) : len(prompt) + len(response)] = True
    return Samples(
        [list(g) for g in groups], input_ids, attention_mask, response_mask, [False] * len(rows)
    )


def _reward_summary(scores: np.ndarray, k: int, confidence: float, seed: int) -> dict[str, float]:
    per_prompt = scores.reshape(-1, k).mean(axis=1)
    mean, low, high = bootstrap_ci(per_prompt, confidence=confidence, seed=seed)
    return {
        "gold_reward": float(scores.mean()),
        "ci_low": low,
        "ci_high": high,
        "gold_reward_std": float(scores.std()),
    }


def _length_summary(samples: Samples) -> dict[str, float]:
    words = [len(t.split()) for g in samples.texts for t in g]
    return {
        "mean_length_words": float(np.mean(words)),
        "mean_length_tokens": float(np.mean(samples.token_lengths)),
        "median_length_tokens": float(np.median(samples.token_lengths)),
        "truncated_fraction": float(np.mean(samples.truncated)),
    }


def evaluate_model(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    *,
    reward: Any,
    reference: Any = "auto",
    judge: Any = None,
    samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    completions: list[list[str]] | None = None,
    reference_completions: list[list[str]] | None = None,
    embedder: Any = "minilm",
    lc_method: str = "logistic",
    confidence: float = 0.95,
    max_batch_size: int = 64,
    n_examples: int = 4,
    name: str = "policy",
    reference_name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate one policy (see the module docstring); returns a JSON-ready dict.

    model, tokenizer: the loaded policy (model may be None when `completions` are given and
        no KL is wanted). prompts: strings or conversations (lists of role/content dicts).
    reward: the gold reward, a `RewardFunction` `(prompts, completions) -> (B,)`.
    reference: "auto" (the policy with its adapter off when it is a peft model, else none),
        "adapter", None, or a loaded model sharing the policy's tokenizer.
    judge: a `PairwiseJudge` (`prob(prompts, a, b)`) or a reward callable; default: `reward`.
    completions / reference_completions: pre-generated samples grouped by prompt, K each.
    progress: show tqdm bars on stderr while sampling and scoring.

    Keys (flat ones match `report.MethodResult`): gold_reward, ci_low, ci_high,
    gold_reward_std, kl, kl_k3, kl_ci_low, kl_ci_high, kl_estimator, mean_length_words,
    mean_length_tokens, median_length_tokens, truncated_fraction, win_rate, win_rate_ci_low,
    win_rate_ci_high, lc_win_rate, win_rate_details, diversity, reference_metrics,
    reward_diff_vs_reference, samples, completions (all texts, grouped by prompt), n, prompts,
    samples_per_prompt, model, reference, settings.
    """
    if embedder == "minilm":  # load once for the policy and the reference
        embedder = default_embedder()
    if reference == "auto":
        reference = "adapter" if model is not None and is_peft(model) else None
    if reference == "adapter" and not is_peft(model):
        raise ValueError("reference='adapter' needs a peft (LoRA) policy")
    texts_for_reward = [prompt_text(p) for p in prompts]
    prompt_ids = encode_prompts(tokenizer, prompts)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def draw(disable_adapter: bool, policy: Any, who: str) -> Samples:
        with progress_bar(progress, f"sampling {who}", len(prompt_ids), "prompt") as bar:
            return sample(
                policy,
                tokenizer,
                prompt_ids,
                samples,
                max_batch_size=max_batch_size,
                disable_adapter=disable_adapter,
                progress=bar,
                **settings,
            )

    def score(texts: list[str], who: str) -> np.ndarray:
        with progress_bar(progress, f"scoring {who}", len(texts), "completion") as bar:
            values = first_scores(reward, flat_prompts, texts)
            bar.update(len(texts))
        return values

    # 1. policy samples
    if completions is None:
        policy = draw(False, model, "policy")
    else:
        policy = tokenize_completions(tokenizer, prompt_ids, completions)
    k = len(policy.texts[0])
    if any(len(g) != k for g in policy.texts):
        raise ValueError("every prompt needs the same number of completions")
    flat_prompts = [p for p in texts_for_reward for _ in range(k)]
    flat = [t for g in policy.texts for t in g]

    # 2. gold reward
    scores = score(flat, "policy")
    result: dict[str, Any] = {
        "model": name,
        "reference": None,
        "prompts": len(prompts),
        "samples_per_prompt": k,
        "n": len(flat),
        "settings": settings,
    }
    result.update(_reward_summary(scores, k, confidence, seed))
    result.update(_length_summary(policy))

    # 3. sampled KL to the reference
    result.update(kl=None, kl_k3=None, kl_ci_low=None, kl_ci_high=None, kl_estimator=KL_ESTIMATOR)
    if model is not None and reference is not None:
        result["reference"] = reference_name or (
            "base (adapter disabled)" if reference == "adapter" else "reference"
        )
        rows = (policy.input_ids, policy.attention_mask, policy.response_mask)
        # the sampler's own log-probs of the tokens it drew (same temperature, unfiltered);
        # completions given as text are scored by a forward pass
        logps = policy.logprobs
        if logps is None:
            logps = response_logps(model, *rows, temperature=temperature, group_size=k)
        ref_model = model if reference == "adapter" else reference
        ref_logps = response_logps(
            ref_model, *rows, temperature=temperature, group_size=k,
            disable_adapter=reference == "adapter",
        )
        kl = sequence_kl(logps, ref_logps, policy.response_mask)
        k1, k3 = kl["k1"].numpy(), kl["k3"].numpy()
        _, low, high = bootstrap_ci(
            k1.reshape(-1, k).mean(axis=1), confidence=confidence, seed=seed
        )
        result.update(kl=float(k1.mean()), kl_k3=float(k3.mean()), kl_ci_low=low, kl_ci_high=high)

    # 4. reference samples, win rate, paired reward difference
    if reference_completions is None and reference is not None:
        ref_policy = draw(reference == "adapter", model if reference == "adapter" else reference, "reference")
        reference_completions = ref_policy.texts
    else:
        ref_policy = (
            tokenize_completions(tokenizer, prompt_ids, reference_completions)
            if reference_completions
            else None
        )
    result.update(
        win_rate=None,
        win_rate_ci_low=None,
        win_rate_ci_high=None,
        lc_win_rate=None,
        win_rate_details=None,
        reference_metrics=None,
        reward_diff_vs_reference=None,
    )
    ref_flat: list[str] = []
    ref_scores = np.zeros(0)
    if ref_policy is not None:
        result["reference"] = result["reference"] or reference_name or "reference completions"
        ref_flat = [t for g in ref_policy.texts for t in g]
        if len(ref_flat) != len(flat):
            raise ValueError(
                f"{len(ref_flat)} reference completions for {len(flat)} policy completions"
            )
        ref_scores = score(ref_flat, "reference")
        ref_metrics = _reward_summary(ref_scores, k, confidence, seed)
        ref_metrics.update(_length_summary(ref_policy))
        ref_metrics["diversity"] = (
            diversity_metrics(ref_policy.texts, embedder=embedder)
            if embedder is not False
            else None
        )
        result["reference_metrics"] = ref_metrics
        diff = paired_bootstrap_diff(
            scores.reshape(-1, k).mean(1), ref_scores.reshape(-1, k).mean(1), seed=seed
        )
        result["reward_diff_vs_reference"] = {
            "mean": diff[0],
            "ci_low": diff[1],
            "ci_high": diff[2],
        }
        win_judge = judge if judge is not None else reward
        if not hasattr(win_judge, "prob") and callable(win_judge):  # a reward: isolate bad rows
            win_judge = RewardJudge(win_judge, score=safe_scores)
        with progress_bar(progress, "judging policy vs reference", len(flat), "pair") as bar:
            details = judged_win_rate(
                win_judge,
                flat_prompts,
                flat,
                ref_flat,
                confidence=confidence,
                seed=seed,
                clusters=[i // k for i in range(len(flat))],
            )
            bar.update(len(flat))
        lengths = np.array(policy.token_lengths), np.array(ref_policy.token_lengths)
        details["length_controlled"] = length_controlled_win_rate(
            details["outcomes"], *lengths, method=lc_method
        )
        details["judge"] = "reward" if judge is None else type(judge).__name__
        result.update(
            win_rate=details["win_rate"],
            win_rate_ci_low=details["ci_low"],
            win_rate_ci_high=details["ci_high"],
            lc_win_rate=details["length_controlled"]["lc_win_rate"],
            win_rate_details=details,
        )

    # 5. diversity and examples
    result["diversity"] = (
        diversity_metrics(policy.texts, embedder=embedder) if embedder is not False else None
    )
    examples = []
    for i in range(min(n_examples, len(prompts))):
        row = {
            "prompt": texts_for_reward[i],
            "completion": flat[i * k],
            "reward": float(scores[i * k]),
        }
        if ref_flat:
            row.update(
                reference_completion=ref_flat[i * k], reference_reward=float(ref_scores[i * k])
            )
        examples.append(row)
    result["samples"] = examples
    result["completions"] = [list(group) for group in policy.texts]  # grouped by prompt, k each
    return result
