"""Segment-level (process) rewards for fine-grained RLHF (Wu et al. 2023; ALGORITHMS.md §1.8).

A segment reward model is a sequence classifier used token-wise: its head is applied to the
hidden state of EVERY token (`token_scores`), and the score at the last token of a segment
(sentence, or sub-sentence split at , ; :) is that segment's reward. Training
(`alignkit train rm_segment`) puts a label on each segment-end token only.

Segment ends are character positions in the completion; they are mapped to token indices
through the tokenizer's offset mapping (a fast tokenizer is needed), separately for the
reward tokenizer and for the POLICY tokenizer, so the rewards land on the policy's own
tokens even when the two tokenizers differ (the pitfall of §1.8: the reference code
re-tokenises prefixes for the same reason).

In the online loop the scorer is a dense reward (`alignkit.rewards.dense`): called with the
policy's sampled `completion_ids`, it returns each completion's (end_token_index, reward)
pairs on THOSE tokens (`segment_end_tokens` over the decoded prefixes, `token_char_ends`),
not on a re-tokenisation of the text, which need not give the sampled ids back.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.models import load_model, position_ids_from_mask
from alignkit.models.heads import _HEAD_NAMES

log = logging.getLogger("alignkit")

GRANULARITIES = {"sentence": r"[.!?]+", "subsentence": r"[.!?,;:]+"}


def split_segments(text: str, granularity: str = "sentence") -> list[tuple[int, int]]:
    """Character spans [start, end) of the segments of `text`, in order.

    A segment ends after a run of punctuation ([.!?] for sentences, also [,;:] for
    sub-sentences) or at the end of the text; the whitespace before a segment belongs to it,
    trailing whitespace does not, and whitespace-only pieces are dropped.

    >>> split_segments("Hi there. Bye, now!", "subsentence")
    [(0, 9), (9, 14), (14, 19)]
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {sorted(GRANULARITIES)}; got {granularity!r}")
    spans, start = [], 0
    for match in re.finditer(GRANULARITIES[granularity], text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    result = []
    for begin, end in spans:
        piece = text[begin:end]
        if piece.strip():
            result.append((begin, begin + len(piece.rstrip())))
    return result


def segment_texts(text: str, granularity: str = "sentence") -> list[str]:
    return [text[a:b] for a, b in split_segments(text, granularity)]


def end_token_indices(offsets: list[tuple[int, int]], char_ends: list[int]) -> list[int]:
    """Index of the token holding the last character of each segment.

    token(e) = max{t : start_t < e} for a segment ending (exclusively) at character e.
    Shapes: offsets [T] of (start, end) char spans, char_ends [S] -> [S] (clamped to >= 0).
    """
    indices = []
    for end in char_ends:
        found = 0
        for t, (start, stop) in enumerate(offsets):
            if start < end and stop > start:
                found = t
        indices.append(found)
    return indices


def token_char_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """Where each token of `ids` ends in their decoded text: e_t = len(decode(ids[: t + 1]))
    (special tokens skipped, so a stop token ends where the text does), kept non-decreasing
    (a prefix cut inside a multi-byte character may decode a replacement character)."""
    ends, furthest = [], 0
    for t in range(len(ids)):
        furthest = max(furthest, len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)))
        ends.append(furthest)
    return ends


def segment_end_tokens(token_ends: list[int], char_ends: list[int]) -> list[int]:
    """The token holding the last character of each segment: t(e) = min{t : e_t >= e} for a
    segment ending (exclusively) at character e, clamped to the last token.

    Shapes: token_ends [T] (`token_char_ends`), char_ends [S] -> [S].

    >>> segment_end_tokens([3, 7, 9, 9], [7, 9])
    [1, 2]
    """
    last = max(len(token_ends) - 1, 0)
    return [next((t for t, end in enumerate(token_ends) if end >= char_end), last) for char_end in char_ends]


def encode_completion(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and their character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("segment rewards need a fast tokenizer (for the offset mapping)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def encode_segments(
    tokenizer: Any,
    prompt: str,
    completion: str,
    granularity: str,
    max_length: int,
    spans: list[tuple[int, int]] | None = None,
) -> tuple[list[int], list[int], int]:
    """(ids of prompt + completion, segment-end positions in those ids, number of segments).

    `spans` gives the segments' character spans explicitly (default: `split_segments`).
    Segments cut off by `max_length` get no position (so fewer positions than segments).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix = [bos] if bos is not None and with_special[:1] == [bos] else []
    prompt_ids = prefix + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    prompt_ids = prompt_ids[-max(1, max_length // 2) :]
    completion_ids, offsets = encode_completion(tokenizer, completion)
    spans = spans if spans is not None else split_segments(completion, granularity)
    ends = end_token_indices(offsets, [end for _, end in spans])
    budget = max_length - len(prompt_ids)
    positions = [len(prompt_ids) + e for e in ends if e < budget]
    return prompt_ids + completion_ids[:budget], positions, len(spans)


def token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The score head applied at every position of a sequence classifier: (B, T) -> (B, T).

    (Its first output when num_labels > 1.) Padding side does not matter: positions come from
    the attention mask.
    """
    head = next(getattr(model, name) for name in _HEAD_NAMES if hasattr(model, name))
    hidden = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return head(hidden).float()[..., 0]


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value)


def _completion_text(value: Any) -> str:
    """A completion's own text: the content of the last message of a conversational one (the
    online loop passes [{"role": "assistant", "content": text}] with conversational prompts)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


class SegmentRewardScorer:
    """Per-segment rewards of a trained segment reward model (`alignkit train rm_segment`).

    `segment_rewards(prompts, completions) -> list[Tensor (S_i,)]`: one score per segment.
    `token_rewards(prompts, completions, policy_tokenizer=None, padded=False)`: per-token
    rewards over the completion's tokens (policy tokenizer if given, else the RM's), zero
    except at segment-end tokens, where the segment's reward sits. `padded=True` returns a
    right-padded (B, T) tensor instead of a list. `values=(bad, good)` maps a segment to
    `good` when its score is > 0 (P(no error) > 1/2 for a BCE-trained model) else `bad`, as
    the fine-grained RLHF reference does (e.g. (-0.3, 0.3) for relevance); None keeps raw
    scores.

    Called as a reward, `scorer(prompts, completions, completion_ids)` gives each completion's
    per-segment rewards as (end_token_index, reward) pairs over its `completion_ids`, decoded
    with `policy_tokenizer` (default: the reward model's own tokenizer): the online loop's
    dense reward contract. Segments cut off by `max_length` get no reward (logged).
    """

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        granularity: str | None = None,
        values: tuple[float, float] | None = None,
        max_length: int = 1024,
        device: str | None = None,
        policy_tokenizer: Any = None,
    ) -> None:
        manifest: dict[str, Any] = {}
        if isinstance(path_or_model, str | Path):
            manifest_file = Path(path_or_model) / "segment_rm.json"
            if manifest_file.is_file():
                manifest = json.loads(manifest_file.read_text())
            model, loaded = load_model(str(path_or_model), kind="reward", device=device)
            tokenizer = tokenizer or loaded
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with a loaded model")
        else:
            model = path_or_model
        self.model, self.tokenizer = model.eval(), tokenizer
        self.granularity = granularity or manifest.get("granularity", "sentence")
        self.values = values
        self.max_length = max_length
        self.policy_tokenizer = policy_tokenizer
        self.__name__ = f"SegmentRewardScorer({path_or_model})" if isinstance(path_or_model, str | Path) else (
            "SegmentRewardScorer")

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                 **columns: Any) -> list[list[tuple[int, float]]]:
        """Per-segment rewards on the sampled tokens: for each completion, (end_token_index,
        reward) of each segment, end_token_index counted in its `completion_ids`."""
        if completion_ids is None:
            raise ValueError(f"{self.__name__} puts each segment's reward on a token of the sampled response: "
                             "call it with completion_ids (the online loop passes them)")
        texts = [_completion_text(c) for c in completions]
        tokenizer = self.policy_tokenizer or self.tokenizer
        pairs, cut = [], 0
        for text, ids, scores in zip(texts, completion_ids, self.segment_rewards(prompts, texts), strict=True):
            ends = segment_end_tokens(token_char_ends(tokenizer, list(ids)),
                                      [end for _, end in split_segments(text, self.granularity)])
            cut += len(ends) - len(scores)
            pairs.append([(index, value) for index, value in zip(ends, scores.tolist(), strict=False)])
        if cut:
            log.warning("%s: %d segment(s) past max_length=%d tokens got no reward", self.__name__, cut,
                        self.max_length)
        return pairs

    @torch.no_grad()
    def segment_rewards(self, prompts: list[Any], completions: list[Any]) -> list[Tensor]:
        device = next(self.model.parameters()).device
        results = []
        for prompt, completion in zip(prompts, completions, strict=True):
            ids, positions, _ = encode_segments(
                self.tokenizer, _text(prompt), _text(completion), self.granularity, self.max_length
            )
            input_ids = torch.tensor([ids], device=device)
            scores = token_scores(self.model, input_ids, torch.ones_like(input_ids))[0].cpu()
            segment = scores[torch.tensor(positions, dtype=torch.long)]
            if self.values is not None:
                bad, good = self.values
                segment = torch.where(segment > 0, torch.tensor(good), torch.tensor(bad))
            results.append(segment)
        return results

    def token_rewards(
        self,
        prompts: list[Any],
        completions: list[Any],
        policy_tokenizer: Any = None,
        padded: bool = False,
    ) -> list[Tensor] | Tensor:
        """Rewards on the completion tokens, placed at segment-end tokens: [T_i] or (B, T)."""
        tokenizer = policy_tokenizer or self.tokenizer
        rewards = []
        for completion, segment in zip(
            completions, self.segment_rewards(prompts, completions), strict=True
        ):
            text = _text(completion)
            ids, offsets = encode_completion(tokenizer, text)
            ends = end_token_indices(
                offsets, [end for _, end in split_segments(text, self.granularity)]
            )
            row = torch.zeros(len(ids))
            for index, value in zip(ends[: len(segment)], segment.tolist(), strict=True):
                row[index] += value
            rewards.append(row)
        if not padded:
            return rewards
        width = max((len(r) for r in rewards), default=0)
        out = torch.zeros(len(rewards), width)
        for n, row in enumerate(rewards):
            out[n, : len(row)] = row
        return out
