"""Reward-model scorers: any sequence-classification checkpoint as a `RewardFunction` on text.

`RewardModelScorer(path)` scores `(prompts, completions)` the way `alignkit train rm` trained
it: each row is rendered and tokenised by `alignkit.data.tokenize_sft` with the REWARD
model's own tokenizer (chat template when the inputs are conversational, or when
`chat_template=True`), batched by length, and read at the last real token through
`alignkit.models.reward_scores`, so left and right padding give the same score.

Different tokenizers (ALGORITHMS.md §0 pitfall 4): the scorer always works on text. Inputs
that are token ids (lists of ints) are decoded with `policy_tokenizer` (special tokens
skipped) and re-tokenised with the reward tokenizer, as safe-rlhf's `batch_retokenize` does.

Images and context: a vision-language reward model (`alignkit.models.vlm_reward`) scores rows
with an `images` column (passed as `images=` beside the prompts, one list per row, PIL images
or paths) through its processor, as `alignkit train rm` tokenised them. A reward model trained
with `rm_context_columns` (Factually Augmented RLHF) reads those columns of every row,
appended to its prompt by `alignkit.data.context.prompt_with_context`; the columns come from
the checkpoint's `reward_context.json` unless `context_columns=` says otherwise.

Normalisation (the output scale of an RM is arbitrary, §1.1): `normalize="running"` keeps a
running mean/variance of every score seen (Welford, float64) and returns
(r - mean) / std after adding the batch; `normalize="reference"` uses the mean/std of a
reference set given once (`reference=(prompts, completions)` or `fit_reference`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.data import RowTable, tokenize_sft
from alignkit.data.context import parse_context_columns, prompt_with_context, saved_context_columns
from alignkit.data.image_tokenize import collate_image_sequences, tokenize_sft_images
from alignkit.models import is_vlm_dir, load_model, reward_scores
from alignkit.models.heads import require_trained_head
from alignkit.models.loading import resolve_model_path

NORMALIZE_MODES = (None, "running", "reference")


class ScoreNormalizer:
    """Mean/std of scores: running (Welford) or fixed from a reference set.

    `update(scores)` adds finite values (NaN rows from a broken input never corrupt the
    statistics); `apply(scores)` returns (scores - mean) / max(std, eps). Shapes: (B,) or
    (B, K) (statistics per column).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.eps = eps

    def update(self, scores: Tensor) -> None:
        values = scores.detach().double().cpu().reshape(scores.shape[0], -1)
        values = values[torch.isfinite(values).all(dim=1)]
        if values.shape[0] == 0:
            return
        if self.mean is None:
            self.mean = torch.zeros(values.shape[1], dtype=torch.float64)
            self.m2 = torch.zeros(values.shape[1], dtype=torch.float64)
        # Chan et al.'s parallel update of (count, mean, M2) with a whole batch.
        n_b = values.shape[0]
        mean_b = values.mean(dim=0)
        m2_b = ((values - mean_b) ** 2).sum(dim=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / total
        self.count = total

    @property
    def std(self) -> Tensor:
        if self.mean is None or self.count < 2:
            return torch.ones(1 if self.mean is None else self.mean.shape[0], dtype=torch.float64)
        return (self.m2 / (self.count - 1)).sqrt()

    def apply(self, scores: Tensor) -> Tensor:
        if self.mean is None:
            return scores
        mean = self.mean.to(scores.dtype)
        std = self.std.to(scores.dtype).clamp(min=self.eps)
        if scores.ndim == 1:
            mean, std = mean[0], std[0]
        return (scores - mean.to(scores.device)) / std.to(scores.device)

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": self.std.tolist(),
        }


def saved_num_labels(path: str | Path) -> int:
    """`num_labels` of a saved sequence classifier (1 for a causal-LM checkpoint or a hub id
    that is not cached), so multi-output heads (BRME, ArmoRM) load with their own shape."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return 1
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return 1
    from transformers import AutoConfig

    # transformers leaves num_labels out of config.json when it equals its default (2)
    return int(AutoConfig.from_pretrained(path).num_labels)


def _as_text(value: Any, policy_tokenizer: Any, what: str) -> Any:
    """A string or message list as is; token ids decoded with the policy tokenizer."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        if policy_tokenizer is None:
            raise ValueError(f"{what} given as token ids: pass policy_tokenizer= to decode them")
        return policy_tokenizer.decode(value, skip_special_tokens=True)
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(m, dict) for m in value)
    ):
        return value
    raise TypeError(f"{what} must be text, a message list or token ids; got {type(value).__name__}")


class RewardModelScorer:
    """A sequence-classification reward model as a `RewardFunction` on text.

    `path_or_model`: a directory / hub id (loaded with `load_model(kind="reward")`; a
    checkpoint without a score head, such as a causal LM, is refused: its head would be
    random) or a loaded model (then pass `tokenizer`). `__call__(prompts, completions) -> Tensor (B,)` (or (B, K)
    for `num_labels = K`); `raw_scores` skips normalisation. `padding_side` only changes how
    batches are padded (the score is the same either way).
    """

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 16,
        normalize: str | None = None,
        reference: tuple[Sequence[Any], Sequence[Any]] | None = None,
        policy_tokenizer: Any = None,
        chat_template: bool | None = None,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        padding_side: str = "right",
        device: str | None = None,
        dtype: Any = None,
        context_columns: str | Sequence[str] | None = None,
    ) -> None:
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}; got {normalize!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        saved_columns: list[str] = []
        if isinstance(path_or_model, str | Path):
            self.path: str | None = str(path_or_model)
            resolved = resolve_model_path(self.path)
            if is_vlm_dir(resolved):  # a score head on a VLM: the processor tokenises image rows
                from alignkit.models.vlm_reward import load_vlm_reward

                model, loaded_tokenizer = load_vlm_reward(self.path, device=device, dtype=dtype)
            else:
                model, loaded_tokenizer = load_model(
                    self.path,
                    kind="reward",
                    device=device,
                    dtype=dtype,
                    num_labels=saved_num_labels(self.path),
                )
            require_trained_head(self.path, model, "reward model")
            tokenizer = tokenizer or loaded_tokenizer
            saved_columns = saved_context_columns(resolved)
        else:
            if tokenizer is None:
                raise ValueError("pass the reward model's tokenizer together with a loaded model")
            self.path, model = None, path_or_model
        # a VLM processor (it carries the tokenizer) or None for a text reward model
        self.processor = tokenizer if hasattr(tokenizer, "image_processor") else None
        tokenizer = tokenizer.tokenizer if self.processor is not None else tokenizer
        self.context_columns = parse_context_columns(context_columns) if context_columns is not None else saved_columns
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.policy_tokenizer = policy_tokenizer
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.padding_side = padding_side
        self.normalize = normalize
        self.normalizer = ScoreNormalizer()
        self.__name__ = f"RewardModelScorer({self.path or type(model).__name__})"
        if reference is not None:
            self.fit_reference(*reference)
        elif normalize == "reference":
            raise ValueError("normalize='reference' needs reference=(prompts, completions)")

    # ------------------------------------------------------------------ tokens
    def encode(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[int]]:
        """Token ids of prompt + completion per row, exactly as the RM trainer built them."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [
            {
                "prompt": _as_text(p, self.policy_tokenizer, "prompt"),
                "completion": _as_text(c, self.policy_tokenizer, "completion"),
            }
            for p, c in zip(prompts, completions, strict=True)
        ]
        examples, _ = tokenize_sft(
            RowTable(rows),
            self.tokenizer,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            chat=bool(self.chat_template),
        )
        return [e.prompt_ids + e.completion_ids for e in examples]

    def _pad(self, sequences: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full(
            (len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long
        )
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for n, ids in enumerate(sequences):
            span = (
                slice(0, len(ids))
                if self.padding_side == "right"
                else slice(width - len(ids), width)
            )
            input_ids[n, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[n, span] = 1
        return input_ids.to(device), attention_mask.to(device)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> Tensor:
        """Raw scores of tokenised sequences, batched in length order: (N,) or (N, K), CPU."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        parts = []
        for start in range(0, len(order), self.batch_size):
            chunk = [sequences[i] for i in order[start : start + self.batch_size]]
            input_ids, attention_mask = self._pad(chunk, device)
            parts.append(reward_scores(self.model, input_ids, attention_mask).float().cpu())
        scores = torch.cat(parts)
        result = torch.empty_like(scores)
        result[torch.tensor(order)] = scores
        return result

    @torch.no_grad()
    def score_image_rows(self, prompts: Sequence[Any], completions: Sequence[Any], images: Sequence[Any]) -> Tensor:
        """Raw scores of rows with images through the VLM processor (right-padded batches in row
        order, as `alignkit train rm` built them): (N,) or (N, K), CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} rows of images")
        rows = [
            {"prompt": _as_text(p, self.policy_tokenizer, "prompt"),
             "completion": _as_text(c, self.policy_tokenizer, "completion"), "images": list(i or [])}
            for p, c, i in zip(prompts, completions, images, strict=True)
        ]
        examples, _ = tokenize_sft_images(RowTable(rows), self.processor, max_length=self.max_length)
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(examples), self.batch_size):
            batch = collate_image_sequences(examples[start : start + self.batch_size], self.tokenizer.pad_token_id)
            pixels = {k: v.to(device) for k, v in batch["pixel_inputs"].items()}
            scores = reward_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   pixel_inputs=pixels)
            parts.append(scores.float().cpu())
        return torch.cat(parts)

    def with_context(self, prompts: Sequence[Any], columns: dict[str, Any]) -> list[Any]:
        """The prompts with each row's context columns appended (`prompt_with_context`)."""
        missing = [c for c in self.context_columns if c not in columns]
        if missing:
            raise ValueError(f"{self.__name__} reads context column(s) {missing}; pass them beside the prompts "
                             f"(got columns {sorted(columns)})")
        return [
            prompt_with_context(_as_text(p, self.policy_tokenizer, "prompt"), {c: columns[c][i] for c in self.context_columns},
                                self.context_columns)
            for i, p in enumerate(prompts)
        ]

    # ------------------------------------------------------------------ scoring
    def raw_scores(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        """Unnormalised scores (B,) or (B, K). `columns`: the rows' other columns (`images` for a
        VLM reward model, the context columns it was trained with)."""
        if len(completions) == 0:
            return torch.zeros(0)
        if self.context_columns:
            prompts = self.with_context(prompts, columns)
        if self.processor is not None and columns.get("images") is not None:
            return self.score_image_rows(prompts, completions, columns["images"])
        return self.score_ids(self.encode(prompts, completions))

    def fit_reference(self, prompts: Sequence[Any], completions: Sequence[Any]) -> ScoreNormalizer:
        """Fix the normalisation to the mean/std of a reference set (e.g. SFT samples)."""
        self.normalizer = ScoreNormalizer()
        self.normalizer.update(self.raw_scores(prompts, completions))
        if self.normalize is None:
            self.normalize = "reference"
        return self.normalizer

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        scores = self.raw_scores(prompts, completions, **columns)
        if self.normalize == "running":
            self.normalizer.update(scores)
        if self.normalize is not None:
            scores = self.normalizer.apply(scores)
        return scores
