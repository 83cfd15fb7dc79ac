"""What goes into and comes out of a rollout engine: token ids only, never text.

`SamplingParams` says how to sample, `Rollout` holds the sampled responses with their
log-probs and masks, and `RolloutEngine` is the protocol every engine (the in-process
`HFEngine`, a vLLM engine, a remote one) implements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to sample responses.

    Filtering order (as in HF's logits warpers): temperature, then top-k, then top-p, then
    min-p. `temperature == 0` or `greedy=True` picks the arg-max token.
    """

    max_new_tokens: int = 64
    """Most tokens generated per sample; a sample that reaches it ends with "length"."""
    temperature: float = 1.0
    """Logits are divided by it before sampling and before the returned log-probs."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p x the top token's probability (0 = off)."""
    greedy: bool = False
    """Arg-max decoding (ties to the lowest token id, like `torch.argmax`)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a sample (the stop token is kept in the response and its mask)."""
    seed: int | None = None
    """Seed of the sampling noise; None draws one from torch's global generator."""
    ignore_eos: bool = False
    """Do not stop on the engine's `eos_ids` (only on `stop_token_ids`); for benchmarks."""
    first_sample: int = 0
    """Global index of this call's first sample. Noise is keyed on (seed, sample index, step),
    so a data-parallel rank that samples rows k.. of a batch passes k and draws the same noise
    one process would."""
    suppress_token_ids: tuple[int, ...] = ()
    """Token ids never drawn (a VLM's image placeholders: a sampled one would claim image
    features that do not exist). A filter like top-k: the returned log-probs stay those of the
    unfiltered policy."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def is_greedy(self) -> bool:
        """True when the arg-max token is chosen (greedy flag, temperature 0)."""
        return self.greedy or self.temperature == 0.0


@dataclass
class Rollout:
    """Responses sampled for a batch of prompts, `n` per prompt (N = B * n rows).

    Row `i * n + j` is sample `j` of prompt `i`; `group_index[row] == i`.

    `response_logprobs[r, t]` is log softmax(logits / temperature)[token] of the *unfiltered*
    policy: top-k / top-p / min-p change which tokens can be drawn, not the returned values.
    With temperature 1 these are exactly the policy's log-probs (the "old log-probs" of
    PPO/GRPO); with another temperature they follow the TRL/verl convention of scoring the
    temperature-scaled policy. Greedy decoding scores with the given temperature too, except
    temperature 0, which is scored at temperature 1. Padded positions hold 0.
    """

    prompt_ids: list[list[int]]
    """The prompt of each row, unpadded; length N."""
    response_ids: Tensor
    """(N, L) int64 sampled tokens, right-padded with the engine's pad id."""
    response_logprobs: Tensor
    """(N, L) float32 log-prob of each sampled token (see the class docstring)."""
    response_mask: Tensor
    """(N, L) bool, True on generated tokens, the stop token included."""
    finish_reason: list[str]
    """Per row: "stop" (a stop/EOS token was generated) or "length" (max_new_tokens hit)."""
    group_index: Tensor
    """(N,) int64, index of the prompt each row was sampled from."""
    extras: dict[str, object] = field(default_factory=dict)
    """Engine-specific statistics (timings, token counts); never needed for training."""
    rollin_mask: Tensor | None = None
    """(N, L) bool, True on rolled-in tokens: the first tokens of a row forced to a given prefix
    (DR-PO's dataset reset) rather than sampled; they are in `response_ids`, `response_mask` and
    `response_logprobs` like sampled ones. None when the call forced nothing."""
    env_mask: Tensor | None = None
    """(N, L) bool, True on tokens a tool or an environment wrote into a multi-turn conversation
    (`alignkit.agents`): they are in `response_ids` and `response_mask` (the sequence is the
    whole conversation) but never trained on and never in the KL; their log-probs are 0.
    None for single-turn rollouts."""
    prompt_inputs: list[dict[str, Tensor] | None] | None = None
    """Per row, its prompt's model inputs (a VLM prompt's pixel inputs, shared by the rows of
    a group, not copied; see `alignkit.rollout.multimodal`), for the teacher-forced forwards
    that score the rows; None when the prompts had none."""

    @property
    def policy_mask(self) -> Tensor:
        """(N, L) bool, True on the tokens the policy sampled: `response_mask` without the
        environment's tokens."""
        return self.response_mask if self.env_mask is None else self.response_mask & ~self.env_mask

    @property
    def lengths(self) -> Tensor:
        """(N,) int64 number of generated tokens per row (stop token included)."""
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def to_sequences(self, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """Full prompt + response rows, right-padded, for a teacher-forced forward pass.

        Returns `(input_ids, attention_mask, response_mask)`, each (N, T) with
        T = max(len(prompt) + length). `response_mask[r, t]` is True where `input_ids[r, t]` is
        a generated token; its log-prob comes from the logits at position t - 1, i.e.
        `log_softmax(logits[:, :-1]).gather(-1, input_ids[:, 1:])` masked by
        `response_mask[:, 1:]` lines up with `response_logprobs[response_mask]`.
        """
        lengths = self.lengths.tolist()
        total = [len(p) + n for p, n in zip(self.prompt_ids, lengths, strict=True)]
        width = max(total)
        rows = len(self.prompt_ids)
        device = self.response_ids.device
        input_ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((rows, width), dtype=torch.long, device=device)
        response_mask = torch.zeros((rows, width), dtype=torch.bool, device=device)
        for row, (prompt, length) in enumerate(zip(self.prompt_ids, lengths, strict=True)):
            start = len(prompt)
            input_ids[row, :start] = torch.tensor(prompt, dtype=torch.long, device=device)
            input_ids[row, start : start + length] = self.response_ids[row, :length]
            attention_mask[row, : start + length] = 1
            response_mask[row, start : start + length] = True
        return input_ids, attention_mask, response_mask


@runtime_checkable
class RolloutEngine(Protocol):
    """Token ids in, token ids + log-probs + masks out. Knows nothing of text or rewards."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """Sample `n` responses for each prompt; rows are grouped by prompt (see `Rollout`).
        An engine that samples vision-language models (`HFEngine`) also takes
        `prompt_inputs=`, one dict of pixel inputs per prompt (`alignkit.rollout.multimodal`)."""
        ...

    def update_weights(self, state_dict: Mapping[str, Tensor] | None = None) -> None:
        """Make the engine sample from the trainer's current weights.

        An in-process engine shares the policy module, so it has nothing to do; an engine
        holding its own copy (vLLM, a remote worker) loads `state_dict`.
        """
        ...
