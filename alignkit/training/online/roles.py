"""The roles the online loop talks to: rollout engine, policy, reference, reward, critic.

Each role is a small interface (a `Protocol`) with an in-process implementation. Its methods
take and return a *global* batch (all N samples of the step) and split it into micro-batches
themselves; only `PolicyRole.forward`, the micro-batch forward the update is built from, sees
one micro-batch. The driver in `loop.py` only calls these methods, so a role can live on
another process or machine by implementing them: under torchrun every rank runs the driver and
the roles split rows across ranks (`distributed_rollout.py`); Ray actor groups are next.

| role          | methods                                                   | in process              |
|---------------|-----------------------------------------------------------|-------------------------|
| RolloutEngine | generate, update_weights(source, version), shares_policy  | HFRollout, CopyRollout, ShardedRollout |
| PolicyRole    | forward, logps, update(experience), weights, save, load   | PolicyTrainer           |
| ReferenceRole | logps                                                     | AdapterReference, ModelReference |
| RewardRole    | score                                                     | FunctionReward, ModelReward |
| CriticRole    | values                                                    | PolicyTrainer           |

The critic's parameters are trained by the policy role: the policy and value losses share one
backward, one gradient clip and one optimizer step, so the critic role only reads values.

A vision-language rollout's rows carry their prompts' pixel inputs (`SequenceBatch.prompt_inputs`):
every teacher-forced forward (policy, reference, critic) runs the VLM's multimodal body on them,
so image tokens hold the image features, and as prompt tokens they are never scored.

Token-level tensors use *response coordinates*: (N, L) with position 0 the first generated
token, exactly like `Rollout.response_ids`; `SequenceBatch` holds the full prompt + response
rows a teacher-forced forward needs and converts between the two.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from alignkit.models import adapter_disabled, is_peft, reward_scores
from alignkit.models.heads import _score_head
from alignkit.models.logprobs import (
    decoder_and_head,
    linear_head_logps,
    position_ids_from_mask,
    vlm_body_states,
    vlm_predictor_states,
)
from alignkit.models.packing import predictor_states
from alignkit.models.vlm import is_vlm_config, module_role
from alignkit.rewards.base import unconverted
from alignkit.rewards.dense import DenseRewards, Scores
from alignkit.rewards.runner import RewardRunner
from alignkit.rollout import HFEngine, Rollout, SamplingParams
from alignkit.rollout.multimodal import right_padded_inputs


def last_true(mask: Tensor) -> int:
    """The largest column index holding a True in (N, L) `mask` (-1 when there is none)."""
    columns = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return int((mask * columns).max().item()) - 1 if mask.numel() else -1


@dataclass
class SequenceBatch:
    """Prompt + response rows for a forward pass, and the response-coordinate mask.

    input_ids, attention_mask, sequence_mask: (N, S), sequence_mask True on response tokens;
    response_mask: (N, L), True on generated tokens (same count per row as sequence_mask). In a
    multi-turn rollout both are True only on the policy's tokens, so they may have holes.
    prompt_inputs: per row, its prompt's pixel inputs (a VLM rollout; `Rollout.prompt_inputs`).
    """

    input_ids: Tensor
    attention_mask: Tensor
    sequence_mask: Tensor
    response_mask: Tensor
    prompt_inputs: list[dict[str, Tensor] | None] | None = None

    @classmethod
    def from_rollout(cls, rollout: Rollout, pad_id: int) -> SequenceBatch:
        """The rollout's rows; in a multi-turn rollout both masks cover only the policy's own
        tokens (`Rollout.policy_mask`): the environment's tokens are context, never predicted,
        trained on or in the KL."""
        input_ids, attention_mask, sequence_mask = rollout.to_sequences(pad_id)
        if rollout.env_mask is not None:
            sequence_mask = sequence_mask.clone()
            starts = [len(prompt) for prompt in rollout.prompt_ids]
            for row, start in enumerate(starts):
                env = rollout.env_mask[row]
                sequence_mask[row, start : start + env.shape[0]] &= ~env[: sequence_mask.shape[1] - start]
        return cls(input_ids, attention_mask, sequence_mask, rollout.policy_mask.bool(), rollout.prompt_inputs)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Tensor) -> SequenceBatch:
        """Rows `rows` (1-D index), trimmed to the widest selected row (less padding)."""
        attention = self.attention_mask[rows]
        width = int(attention.sum(-1).max().item()) if len(rows) else 1
        response = self.response_mask[rows]
        length = max(last_true(response) + 1 if len(rows) else 1, 1)  # the mask may have holes (multi-turn)
        inputs = None if self.prompt_inputs is None else [self.prompt_inputs[i] for i in rows.tolist()]
        return SequenceBatch(
            self.input_ids[rows, :width], attention[:, :width],
            self.sequence_mask[rows, :width], response[:, :length], inputs,
        )

    def to(self, device: torch.device) -> SequenceBatch:
        inputs = self.prompt_inputs
        if inputs is not None:  # each prompt's tensors moved once, still shared by its rows
            moved: dict[int, dict[str, Tensor]] = {}
            for one in inputs:
                if one is not None and id(one) not in moved:
                    moved[id(one)] = {key: value.to(device) for key, value in one.items()}
            inputs = [None if one is None else moved[id(one)] for one in inputs]
        return SequenceBatch(*(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.sequence_mask, self.response_mask)), inputs)

    def model_inputs(self) -> dict[str, Tensor]:
        """The rows' pixel inputs for one forward over these right-padded rows: each tensor
        concatenated over the rows in order (one copy per row: a group's samples repeat their
        prompt's images), token-aligned ones (`mm_token_type_ids`) laid over each row's prompt
        positions, 0 elsewhere; {} without pixel inputs."""
        return right_padded_inputs(self.prompt_inputs or [], self.input_ids)

    def predictor_rows(self, decoder: nn.Module) -> tuple[Tensor, Tensor]:
        """Hidden states that predict response tokens, and those tokens: (M, H), (M,).

        The logits at position t - 1 predict token t; M = number of response tokens, in the
        row-major order of `response_mask` (padding-free when enabled: `models.packing`).
        """
        predict = (self.sequence_mask & self.attention_mask.bool())[:, 1:]  # (N, S-1)
        hidden = predictor_states(decoder, self.input_ids, self.attention_mask, predict,
                                  position_ids_from_mask(self.attention_mask))
        return hidden, self.input_ids[:, 1:][predict]

    def scatter(self, values: Tensor) -> Tensor:
        """(M,) values of the response tokens -> (N, L) response coordinates, 0 elsewhere."""
        out = values.new_zeros(self.response_mask.shape)
        return out.masked_scatter(self.response_mask, values)


def batch_predictors(model: nn.Module, batch: SequenceBatch) -> tuple[Tensor, Tensor, nn.Module]:
    """(hidden states that predict the response tokens (M, H), those tokens (M,), the output
    layer): through the decoder, or a VLM batch's multimodal body with its pixel inputs."""
    pixel_inputs = batch.model_inputs()
    if pixel_inputs:
        predict = (batch.sequence_mask & batch.attention_mask.bool())[:, 1:]
        hidden, head = vlm_predictor_states(model, batch.input_ids, batch.attention_mask, predict, pixel_inputs,
                                            batch.prompt_inputs)
        return hidden, batch.input_ids[:, 1:][predict], head
    parts = decoder_and_head(model)
    if parts is None:
        raise ValueError(
            f"{type(model).__name__}: the online loop needs a model whose logits are lm_head(hidden)"
        )
    decoder, head = parts
    predictors, targets = batch.predictor_rows(decoder)  # (M, H), (M,)
    return predictors, targets, head


def response_logps(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    value_head: nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward: log-probs, entropies and (with `value_head`) values, all (N, L).

    values[i, t] = V(s_t) = value_head(h_{t-1}): the state before token t is generated, the
    same hidden state whose logits produce token t. Log-probs at temperature 1.
    """
    predictors, targets, head = batch_predictors(model, batch)  # (M, H), (M,)
    logps, entropy = linear_head_logps(head, predictors, targets, chunk_size, 1.0, with_entropy)
    values = None
    if value_head is not None:
        values = batch.scatter(value_head(predictors).squeeze(-1).float())
    return batch.scatter(logps), batch.scatter(entropy), values


def response_distributions(model: nn.Module, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """One forward keeping the whole next-token distribution: log-probs (N, L), entropies (N, L)
    and log softmax over the vocabulary (N, L, V), at temperature 1, zero off the response.
    Memory grows with V: for the few rows of a filtered batch (SuperHF's KL prior)."""
    predictors, targets, head = batch_predictors(model, batch)  # (M, H), (M,)
    log_dist = torch.log_softmax(head(predictors).float(), dim=-1)  # (M, V)
    logps = log_dist.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_dist.exp() * log_dist).sum(-1)
    full = log_dist.new_zeros((*batch.response_mask.shape, log_dist.shape[-1]))
    full[batch.response_mask] = log_dist
    return batch.scatter(logps), batch.scatter(entropy), full


# --------------------------------------------------------------------------- roles


class RolloutEngine(Protocol):
    """Samples the policy: B prompts x n samples, with the sampled tokens' log-probs."""

    shares_policy: bool
    """True when the engine samples the trained module itself: its log-probs at temperature 1
    are then exactly the policy's, and `update_weights` needs no source."""
    exact_logprobs: bool
    """True when its temperature-1 log-probs are the policy's own (the module itself, or an
    exact copy refreshed after every update): the on-policy shortcut may reuse them. Optional;
    defaults to `shares_policy`. An external engine (vLLM) is not exact."""
    merged_weights: bool
    """Whether `update_weights` wants LoRA merged into HF names (default) or the policy's own
    trained parameters by name (an engine holding a copy of the module). Optional."""
    supports_rollin: bool
    """Whether `generate` takes `prefixes` (one forced token list per row: DR-PO's roll-in,
    marked by `Rollout.rollin_mask`). Optional; defaults to False."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 prefixes: list[list[int]] | None = None) -> Rollout: ...

    def update_weights(self, source: Iterable[tuple[str, Tensor]] | None, version: int) -> None:
        """Sample from the policy's weights after optimizer step `version` from now on; `source`
        yields (HF parameter name, full tensor) pairs, or is None when `shares_policy`."""
        ...


class PolicyRole(Protocol):
    """The trained policy (and critic parameters): log-probs, the update, weights, checkpoints."""

    def forward(
        self, batch: SequenceBatch, *, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(N, L) log-probs, entropies and values (None without a shared value head) of one
        micro-batch, with gradients when enabled."""
        ...

    def logps(self, batch: SequenceBatch) -> Tensor:
        """(N, L) log-probs at temperature 1 of a global batch, no gradient."""
        ...

    def update(self, experience: Any) -> dict[str, float]:
        """Step 6 on one step's `Experience`: every optimizer step of it; returns its metrics."""
        ...

    def weights(self) -> Iterator[tuple[str, Tensor]]:
        """(HF parameter name, full tensor) of the policy, LoRA merged."""
        ...

    def save(self, run_dir: Path, step: int, *, keep: int | None, extras: dict) -> None: ...

    def load(self, checkpoint: Path) -> dict[str, Any]: ...


class ReferenceRole(Protocol):
    def logps(self, batch: SequenceBatch) -> Tensor:
        """(N, L) log-probs of the frozen reference over a global batch, no gradient."""
        ...

    def distributions(self, batch: SequenceBatch) -> Tensor:
        """(N, L, V) log softmax over the vocabulary, no gradient (SuperHF's KL prior only)."""
        ...


class RewardRole(Protocol):
    def score(
        self, batch: SequenceBatch, prompts: list[str], completions: list[str], columns: dict[str, list]
    ) -> tuple[Scores, int]:
        """(N,) float32 scores, or `DenseRewards` (tokens (N, L) in response coordinates), and
        the number of rows that got the error penalty."""
        ...


class CriticRole(Protocol):
    def values(self, batch: SequenceBatch) -> Tensor:
        """(N, L) V(s_t) for each response token of a global batch, no gradient."""
        ...


def in_chunks(fn: Callable[[SequenceBatch], Tensor], batch: SequenceBatch, size: int) -> Tensor:
    """fn over row chunks of at most `size` rows of `batch` (0: one chunk), reassembled to a
    float32 (N, L, ...) tensor (the trailing dimensions are fn's)."""
    out = None
    for rows in chunks(torch.arange(len(batch), device=batch.input_ids.device), size):
        part = fn(batch.select(rows))
        if out is None:
            out = torch.zeros((*batch.response_mask.shape, *part.shape[2:]), device=batch.input_ids.device)
        out[rows, : part.shape[1]] = part.float()
    return out


def eos_ids(tokenizer: Any, model: nn.Module) -> tuple[int, ...]:
    """The ids that end a sample: the tokenizer's eos and the generation config's."""
    found = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        found.add(generation_eos)
    elif generation_eos:
        found.update(generation_eos)
    return tuple(sorted(token for token in found if token is not None))


class HFRollout:
    """The rollout engine colocated with the policy: `HFEngine` sampling the trained module
    itself (a transformers causal LM, peft too), so weights never need copying."""

    shares_policy = True
    supports_rollin = True

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch_size: int | None = None) -> None:
        self.model, self.version = model, 0
        self.engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids(tokenizer, model),
                               max_batch_size=max_batch_size)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 prefixes: list[list[int]] | None = None, prompt_inputs: list | None = None) -> Rollout:
        return self.engine.generate(prompt_ids, n, sampling, prefixes, prompt_inputs)

    def update_weights(self, source: Iterable[tuple[str, Tensor]] | None, version: int) -> None:
        """The engine samples the live module: nothing to copy, only the version is recorded."""
        if source is not None:
            raise ValueError("HFRollout samples the trained module itself: pass source=None")
        self.version = version


class AdapterReference:
    """Reference = the policy's base weights with its LoRA adapter switched off (no copy)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, rows_per_forward: int = 0) -> None:
        if not is_peft(model):
            raise ValueError("AdapterReference needs a peft model")
        self.model, self.chunk_size, self.rows_per_forward = model, chunk_size, rows_per_forward

    @torch.no_grad()
    def logps(self, batch: SequenceBatch) -> Tensor:
        return in_chunks(self._logps, batch, self.rows_per_forward)

    def _logps(self, batch: SequenceBatch) -> Tensor:
        with adapter_disabled(self.model):
            return response_logps(self.model, batch, chunk_size=self.chunk_size)[0]

    @torch.no_grad()
    def distributions(self, batch: SequenceBatch) -> Tensor:
        """(N, L, V) log softmax of the reference over the vocabulary at each response token."""
        def one(rows: SequenceBatch) -> Tensor:
            with adapter_disabled(self.model):
                return response_distributions(self.model, rows)[2]
        return in_chunks(one, batch, self.rows_per_forward)


class ModelReference:
    """Reference = a separate frozen copy of the initial policy (or --ref-model)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, rows_per_forward: int = 0) -> None:
        self.model, self.chunk_size = model.eval().requires_grad_(False), chunk_size
        self.rows_per_forward = rows_per_forward

    @torch.no_grad()
    def logps(self, batch: SequenceBatch) -> Tensor:
        return in_chunks(self._logps, batch, self.rows_per_forward)

    def _logps(self, batch: SequenceBatch) -> Tensor:
        return response_logps(self.model, batch, chunk_size=self.chunk_size)[0]

    @torch.no_grad()
    def distributions(self, batch: SequenceBatch) -> Tensor:
        """(N, L, V) log softmax of the reference over the vocabulary at each response token."""
        return in_chunks(lambda rows: response_distributions(self.model, rows)[2], batch, self.rows_per_forward)


class FunctionReward:
    """A reward function on text: `fn(prompts, completions, **columns) -> (N,)`, called by a
    `RewardRunner`: TRL's conventions (conversational prompts as messages, `completion_ids`,
    `trainer_state`), a deadline of `timeout` seconds and `workers` scoring threads.

    The function may instead return dense rewards, per token or per segment of each sample's
    `completion_ids` (`alignkit.rewards.dense`): `score` then gives `DenseRewards` of the
    batch's response width L (tokens (N, L), 0 past each sample's tokens)."""

    model_backed = False
    """True for a reward model behind the function (rm_segment's): under torchrun each rank
    scores its block of rows (`ShardedReward`) instead of every row."""

    def __init__(self, fn: Callable[..., Any], on_error: str = "raise", *, timeout: float | None = None,
                 workers: int = 0) -> None:
        self.fn, self.on_error = fn, on_error
        self.runner = RewardRunner(fn, on_error=on_error, timeout=timeout, workers=workers)

    @property
    def name(self) -> str:
        """The function's `module:function` (or the spec it was loaded from)."""
        return self.runner.name

    def score(self, batch, prompts, completions, columns) -> tuple[Scores, int]:
        mask = batch.response_mask
        scores, penalised = self.runner(prompts, completions, columns,
                                        completion_ids=lambda: response_token_ids(batch),
                                        token_counts=mask.sum(-1).tolist())
        if isinstance(scores, DenseRewards):
            return scores.padded(mask.shape[1]), penalised
        return scores.float(), penalised

    def drain(self) -> dict[str, Tensor]:
        """Per-sample scores the function logs beside its reward (`fn.drain()`, e.g. RLHS's
        `rlhs/hindsight` and `rlhs/foresight`) since the last call; {} for most functions."""
        drain = getattr(unconverted(self.fn), "drain", None)
        return drain() if callable(drain) else {}


class ModelReward:
    """A sequence-classification reward model scoring prompt + response at the last real token.

    Token ids go straight in when the reward model shares the policy's vocabulary; otherwise
    the text is re-tokenised with the reward model's tokenizer (ALGORITHMS.md §0 pitfall 4).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, policy_tokenizer: Any, batch_size: int = 32) -> None:
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.same_vocab = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, batch, prompts, completions, columns):
        device = next(self.model.parameters()).device
        if self.same_vocab:
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
            self.tokenizer.padding_side = "right"
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
            ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        scores = [reward_scores(self.model, ids[i : i + self.batch_size], mask[i : i + self.batch_size])
                  for i in range(0, ids.shape[0], self.batch_size)]
        return torch.cat(scores).float().cpu(), 0


class ValueModel(nn.Module):
    """A separate critic: a decoder backbone and a linear value head on every position. For a
    vision-language policy the backbone is its multimodal body (vision tower frozen, projector
    and language model trained), so the critic reads the same pixel inputs as the policy."""

    def __init__(self, backbone: nn.Module, head: nn.Module, multimodal: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.multimodal = backbone, head, multimodal

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """Copy of the policy's decoder (a VLM's multimodal body) + a zero-initialised head
        (V = 0 at the start)."""
        if is_vlm_config(getattr(policy, "config", None)) and getattr(policy, "model", None) is not None:
            body = copy.deepcopy(policy.model)
            for name, parameter in body.named_parameters():
                parameter.requires_grad = module_role(name) != "vision"
            return cls(body, zero_value_head(policy.config.get_text_config().hidden_size), multimodal=True)
        decoder = decoder_and_head(policy)
        if decoder is None:
            raise ValueError("cannot build a critic from this policy; pass --set critic_init=DIR")
        return cls(copy.deepcopy(decoder[0]), zero_value_head(policy.config.hidden_size))

    @classmethod
    def from_reward_model(cls, reward_model: nn.Module) -> ValueModel:
        """Backbone and score head of a reward model (PPO-max: critic initialised from the RM)."""
        backbone, head = _score_head(reward_model)
        return cls(backbone, head)

    def values(self, batch: SequenceBatch) -> Tensor:
        """(N, L) V(s_t) of one micro-batch, with gradients when enabled."""
        pixel_inputs = batch.model_inputs() if self.multimodal else {}
        if pixel_inputs:
            predict = (batch.sequence_mask & batch.attention_mask.bool())[:, 1:]
            predictors = vlm_body_states(self.backbone, batch.input_ids, batch.attention_mask, predict, pixel_inputs,
                                         batch.prompt_inputs)
            return batch.scatter(self.head(predictors).squeeze(-1).float())
        predictors, _ = batch.predictor_rows(self.backbone)
        return batch.scatter(self.head(predictors).squeeze(-1).float())


def zero_value_head(hidden_size: int) -> nn.Linear:
    """A hidden -> 1 linear head with zero weight and bias (V = 0 at the start)."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def response_token_ids(batch: SequenceBatch) -> list[list[int]]:
    """Each row's generated token ids (the stop token included), as TRL's `completion_ids`."""
    ids, mask = batch.input_ids.cpu(), batch.sequence_mask.cpu()
    return [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]


def decode_completions(tokenizer: Any, rollout: Rollout) -> list[str]:
    """Completion text of each row (special tokens such as EOS dropped)."""
    lengths = rollout.lengths.tolist()
    rows = [rollout.response_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def chunks(indices: Tensor, size: int) -> Sequence[Tensor]:
    """Split a 1-D index tensor into pieces of at most `size` (size <= 0: one piece)."""
    if size <= 0 or size >= len(indices):
        return [indices]
    return list(torch.split(indices, size))
