"""`HFEngine`: an in-process KV-cache sampler for any transformers causal LM (peft too).

The decode loop, per chunk of prompts (at most `max_batch_size` samples):

1. left-pad the prompts, positions counted from each prompt's first real token;
2. prefill each prompt ONCE (only the last position's logits are computed);
3. repeat every cache row `n` times (one per sample of the group) into a cache whose
   full-attention layers are preallocated for the whole generation;
4. each step: draw one token per live sample from counter-based noise (a function of
   seed, sample index and step, so draws never depend on the batch around a sample), score
   it under the unfiltered policy, record it;
5. drop the rows that just emitted a stop token from the cache and the batch, so late
   steps only pay for unfinished samples; stop when none is left or at `max_new_tokens`.

Roll-in (DR-PO's dataset reset, `prefixes`): a row's first k response tokens are forced to a
given prefix instead of drawn (teacher forcing, as TRIL's `RollinProcessor` sets every other
logit to -inf), scored under the policy like sampled ones and never ending the sample; the
policy samples from position k on. The prompt is still prefilled once per group.

The engine sees token ids only (nanochat's Engine "knows nothing about tokenization").
A vision-language prompt also carries its pixel inputs as opaque model inputs
(`prompt_inputs`, see `alignkit.rollout.multimodal`): only the prefill reads them, so the
vision tower runs once per prompt and the group's samples share the image features through
the repeated KV cache.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.rollout.kv_cache import expand_to_preallocated, select_rows
from alignkit.rollout.multimodal import (
    ModelInputs,
    check_prompt_inputs,
    left_padded_inputs,
    multimodal_positions,
)
from alignkit.rollout.sampling import counter_uniform, sample_next_tokens
from alignkit.rollout.types import Rollout, SamplingParams


def _forward_kwarg_names(model: nn.Module) -> tuple[str, str | None]:
    """Names the model's forward uses for the cache and for "logits of the last k positions".

    transformers 5 calls the cache `cache` (`past_key_values` is a deprecated alias); 4.x
    calls it `past_key_values` and the logits option `num_logits_to_keep`.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    logits_name = next(
        (name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None
    )
    return cache_name, logits_name


def _new_cache(model: nn.Module) -> Any:
    """An empty `DynamicCache` laid out for `model` (sliding-window layers where it has them)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x takes no config
        return DynamicCache()


@torch.no_grad()
def copy_named_weights(model: nn.Module, items: Iterable[tuple[str, Tensor]]) -> int:
    """Copy each (name, tensor) into `model`'s parameter or buffer of that name (tied names
    included), cast to its dtype; returns how many were copied. A name the model lacks raises
    KeyError: a weight that lands nowhere would leave the engine sampling stale weights."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    copied = 0
    for name, tensor in items:
        if name not in targets:
            raise KeyError(f"{name} is not a parameter of the engine's model")
        target = targets[name]
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        copied += 1
    return copied


class HFEngine:
    """KV-cache sampling for a transformers causal LM, with a hand-written decode loop.

    Args:
        model: a `PreTrainedModel` causal LM or a peft wrapper of one; it is only called
            forward, in eval mode under `torch.inference_mode()` (its mode is restored).
        pad_id: id used to left-pad prompts and right-pad responses.
        eos_ids: ids that end a sample, on top of `SamplingParams.stop_token_ids` (unless
            `SamplingParams.ignore_eos`).
        max_batch_size: most samples (rows) decoded together; prompts are processed in chunks
            of `max(1, max_batch_size // n)`. None: all at once. Results do not depend on it.
        drop_finished: remove finished samples from the batch (True) or keep decoding them
            and discard their tokens (False; for tests and comparisons).
        preallocate_cache: write keys/values into buffers sized for the whole generation
            instead of concatenating every step (falls back to plain caches where unsupported).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        eos_ids: Sequence[int] = (),
        max_batch_size: int | None = None,
        drop_finished: bool = True,
        preallocate_cache: bool = True,
    ) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.pad_id = int(pad_id)
        self.eos_ids = tuple(int(token) for token in eos_ids)
        self.max_batch_size = max_batch_size
        self.drop_finished = drop_finished
        self.preallocate_cache = preallocate_cache
        self._cache_kwarg, self._logits_kwarg = _forward_kwarg_names(model)

    def update_weights(self, state_dict: Mapping[str, Tensor] | None = None) -> None:
        """Nothing to do when the engine shares the trained module; else copy `state_dict`
        into it (`copy_named_weights`: an unknown name is an error)."""
        if state_dict is not None:
            copy_named_weights(self.model, state_dict.items())

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 prefixes: Sequence[Sequence[int]] | None = None,
                 prompt_inputs: Sequence[ModelInputs | None] | None = None) -> Rollout:
        """Sample `n` responses per prompt. Row `i * n + j` is sample `j` of prompt `i`.

        `prefixes`: one token list per row (B x n), forced as that row's first response tokens
        (empty: none), each shorter than `max_new_tokens`; `Rollout.rollin_mask` marks them.
        `prompt_inputs`: one dict of model inputs per prompt (None: none), a VLM prompt's pixel
        inputs (`alignkit.rollout.multimodal`); the rollout carries them per row."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompt_ids or any(len(prompt) == 0 for prompt in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty prompts")
        if prefixes is not None:
            if len(prefixes) != len(prompt_ids) * n:
                raise ValueError(f"prefixes: one per row ({len(prompt_ids) * n}), got {len(prefixes)}")
            if any(len(prefix) >= sampling.max_new_tokens for prefix in prefixes):
                raise ValueError(f"prefixes must be shorter than max_new_tokens ({sampling.max_new_tokens}): "
                                 "the policy generates at least the last token")
        if prompt_inputs is not None:
            check_prompt_inputs(prompt_inputs, prompt_ids)
        seed = sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids |= set(self.eos_ids)
        per_chunk = len(prompt_ids)
        if self.max_batch_size is not None:
            per_chunk = max(1, self.max_batch_size // n)

        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                chunks = [
                    self._generate_chunk(
                        prompt_ids[first : first + per_chunk], first, n, sampling, seed, stop_ids,
                        None if prefixes is None else prefixes[first * n : (first + per_chunk) * n],
                        None if prompt_inputs is None else prompt_inputs[first : first + per_chunk],
                    )
                    for first in range(0, len(prompt_ids), per_chunk)
                ]
        finally:
            self.model.train(was_training)

        lengths = torch.cat([chunk[2] for chunk in chunks])
        decoded_rows = sum(chunk[4] for chunk in chunks)
        width = int(lengths.max().item())
        response_ids = torch.cat([chunk[0][:, :width] for chunk in chunks])
        response_logprobs = torch.cat([chunk[1][:, :width] for chunk in chunks])
        stopped = torch.cat([chunk[3] for chunk in chunks]).tolist()
        positions = torch.arange(width, device=lengths.device)
        response_mask = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (N, L)
        group_index = torch.arange(len(prompt_ids), device=lengths.device).repeat_interleave(n)
        rollin_mask = None
        if prefixes is not None:  # (N, L), True on the forced tokens
            forced_lengths = torch.tensor([len(prefix) for prefix in prefixes], device=lengths.device)
            rollin_mask = positions.unsqueeze(0) < forced_lengths.unsqueeze(1)
        return Rollout(
            prompt_ids=[list(prompt) for prompt in prompt_ids for _ in range(n)],
            response_ids=response_ids,
            response_logprobs=response_logprobs,
            response_mask=response_mask,
            finish_reason=["stop" if hit else "length" for hit in stopped],
            group_index=group_index,
            extras={
                "seconds": time.perf_counter() - started,
                "generated_tokens": int(lengths.sum().item()),
                "decoded_rows": decoded_rows,  # rows fed to decode forwards, summed over steps
                "seed": seed,
            },
            rollin_mask=rollin_mask,
            prompt_inputs=None if prompt_inputs is None else [prompt_inputs[i // n] for i in range(len(prompt_ids) * n)],
        )

    def _new_cache(self) -> Any:
        """The decode cache of one chunk (a subclass sampling several models keeps several)."""
        return _new_cache(self.model)

    def _forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor, cache: Any,
        **model_inputs: Tensor,
    ) -> Tensor:
        """One forward with the cache; returns the last position's logits (rows, V).
        `model_inputs`: the prefill's pixel inputs (none while decoding)."""
        return self._model_forward(self.model, input_ids, attention_mask, position_ids, cache, **model_inputs)

    def _model_forward(
        self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor,
        cache: Any, **model_inputs: Tensor,
    ) -> Tensor:
        """`model`'s forward with `cache`: the last position's logits (rows, V)."""
        kwargs: dict[str, Any] = {self._cache_kwarg: cache, **model_inputs}
        if self._logits_kwarg is not None:
            kwargs[self._logits_kwarg] = 1
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        return output.logits[:, -1]

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        first_prompt: int,
        n: int,
        sampling: SamplingParams,
        seed: int,
        stop_ids: set[int],
        prefixes: Sequence[Sequence[int]] | None = None,
        prompt_inputs: Sequence[ModelInputs | None] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Decode one chunk: (tokens, logprobs) (N, max_new), lengths, stopped (N,), decoded rows.
        `prefixes`: the chunk's rows' forced first tokens; `prompt_inputs`: its prompts' model
        inputs (see `generate`)."""
        device = next(self.model.parameters()).device
        max_new = sampling.max_new_tokens
        prompt_len = max(len(prompt) for prompt in prompts)
        batch = len(prompts)

        # 1. left-padded prompts; the mask also covers the columns of the tokens to come.
        input_ids = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        full_mask = torch.ones((batch, prompt_len + max_new), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            pad = prompt_len - len(prompt)
            input_ids[row, pad:] = torch.tensor(prompt, dtype=torch.long)
            full_mask[row, :pad] = 0
        input_ids, full_mask = input_ids.to(device), full_mask.to(device)
        prompt_mask = full_mask[:, :prompt_len]
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp_(min=0)  # (B, P)
        # a VLM's pixel inputs (prefill only), and its 3-D positions where it has M-RoPE
        model_inputs = left_padded_inputs(prompt_inputs, prompt_len, device) if prompt_inputs else {}
        rope = multimodal_positions(self.model, input_ids, prompt_mask, model_inputs) if model_inputs else None
        if rope is not None:
            position_ids = rope[0]  # (3, B, P)

        # 2. prefill once per prompt; 3. one cache row per sample.
        cache = self._new_cache()
        # Without left padding the mask is plain causal: let the model skip building it.
        padded = any(len(prompt) != prompt_len for prompt in prompts)
        logits = self._forward(
            input_ids, prompt_mask if padded else None, position_ids, cache, **model_inputs
        )  # (B, V)
        cache = expand_to_preallocated(
            cache, n, prompt_len + max_new, preallocate=self.preallocate_cache
        )
        logits = logits.repeat_interleave(n, dim=0)  # (N, V)
        full_mask = full_mask.repeat_interleave(n, dim=0)  # (N, P + max_new)
        first_positions = prompt_mask.sum(-1)  # (B,) the first generated token's position: real prompt tokens
        if rope is not None:  # M-RoPE: a generated token's position is its index + the prompt's delta
            first_positions = first_positions + rope[1]
        first_positions = first_positions.repeat_interleave(n)  # (N,)
        rows = batch * n
        # global sample index: a data-parallel rank's samples draw the noise one process draws
        sample_ids = sampling.first_sample + first_prompt * n + torch.arange(rows, device=device)
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

        out_tokens = torch.full((rows, max_new), self.pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((rows, max_new), dtype=torch.float32, device=device)
        lengths = torch.full((rows,), max_new, dtype=torch.long, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        active = torch.arange(rows, device=device)  # chunk row of each batch row
        live = torch.ones(rows, dtype=torch.bool, device=device)  # batch row still recording
        decoded_rows = 0

        forced = None  # (rows, max_new): the token each row is forced to at each step, -1 = sample
        if prefixes is not None:
            forced = torch.full((rows, max_new), -1, dtype=torch.long)
            for row, prefix in enumerate(prefixes):
                forced[row, : len(prefix)] = torch.tensor(list(prefix), dtype=torch.long)
            forced = forced.to(device)
        noise = None  # (rows, max_new): every step's uniforms at once, the same as step by step
        if not sampling.is_greedy:
            steps = torch.arange(max_new, device=device).unsqueeze(0)
            noise = counter_uniform(seed, sample_ids.unsqueeze(-1), steps)
        for step in range(max_new):
            # 4. draw and score one token per batch row.
            uniforms = None if noise is None else noise[active, step]
            forced_now = None if forced is None else forced[active, step]  # (A,)
            tokens, logprobs = sample_next_tokens(logits, sampling, uniforms, forced_now)  # (A,), (A,)
            recording = active[live]
            out_tokens[recording, step] = tokens[live]
            out_logprobs[recording, step] = logprobs[live]
            hit = torch.isin(tokens, stop_tensor) & live if len(stop_ids) else None
            if hit is not None and forced_now is not None:
                hit = hit & (forced_now < 0)  # a rolled-in token never ends the sample
            if hit is not None and bool(hit.any()):
                lengths[active[hit]] = step + 1
                stopped[active[hit]] = True
                live = live & ~hit
                # 5. drop finished rows from the batch and its cache.
                if self.drop_finished and bool(live.any()):
                    keep = live.nonzero().squeeze(-1)
                    select_rows(cache, keep)
                    active, tokens, live = active[keep], tokens[keep], live[keep]
            if step == max_new - 1 or not bool(live.any()):
                break
            step_mask = full_mask[active, : prompt_len + step + 1] if padded else None  # (A, P+t+1)
            step_positions = (first_positions[active] + step).unsqueeze(-1)  # (A, 1)
            if rope is not None:
                step_positions = step_positions.unsqueeze(0).expand(3, -1, -1)  # (3, A, 1)
            logits = self._forward(tokens.unsqueeze(-1), step_mask, step_positions, cache)
            decoded_rows += len(active)
        return out_tokens, out_logprobs, lengths, stopped, decoded_rows
