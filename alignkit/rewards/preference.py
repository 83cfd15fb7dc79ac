"""Pairwise preference model: P(y_a > y_b | x) from one sequence holding both responses
(general preference model of NLHF, Munos et al. 2023; ALGORITHMS.md §1.3).

The model is a sequence classifier with one output (a logit) read at the last real token of

    template.format(prompt=x, a=y_a, b=y_b)   (default: DEFAULT_TEMPLATE)

Each template field is tokenised on its own (no BPE merge across a seam), the prompt keeps
its end, and the two responses share the remaining budget equally (each keeps its start),
so training (`alignkit train preference_model`) and inference build identical ids.
Position bias is removed at inference by symmetrising: P = (p(a, b) + 1 - p(b, a)) / 2.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.models import load_model
from alignkit.objectives.reward_losses import symmetrize_preference

DEFAULT_TEMPLATE = (
    "{prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\nIs Response A better than Response B?"
)


def _flatten(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value)


def _bos_prefix(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_special[:1] == [bos] else []


def encode_preference(
    tokenizer: Any,
    prompt: Any,
    response_a: Any,
    response_b: Any,
    *,
    template: str = DEFAULT_TEMPLATE,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
) -> tuple[list[int], bool]:
    """Token ids of one (prompt, a, b) triple and whether anything was truncated.

    The template must use the fields {prompt}, {a} and {b}; the sequence ends with eos.
    """
    pieces = list(string.Formatter().parse(template))
    fields = [name for _, name, _, _ in pieces if name]
    if sorted(fields) != ["a", "b", "prompt"]:
        raise ValueError(f"template must use {{prompt}}, {{a}} and {{b}} once each; got {fields}")
    values = {"prompt": _flatten(prompt), "a": _flatten(response_a), "b": _flatten(response_b)}
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    literal_ids = [encode(literal) if literal else [] for literal, _, _, _ in pieces]
    field_ids = {name: encode(values[name]) for name in fields}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fixed = len(_bos_prefix(tokenizer)) + sum(len(ids) for ids in literal_ids) + len(eos)
    truncated = False
    prompt_limit = max(1, max_length - fixed - 2)
    if max_prompt_length is not None:
        prompt_limit = min(prompt_limit, max_prompt_length)
    if len(field_ids["prompt"]) > prompt_limit:
        field_ids["prompt"], truncated = field_ids["prompt"][-prompt_limit:], True
    share = max(1, (max_length - fixed - len(field_ids["prompt"])) // 2)
    for name in ("a", "b"):
        if len(field_ids[name]) > share:
            field_ids[name], truncated = field_ids[name][:share], True
    ids = list(_bos_prefix(tokenizer))
    for (_, name, _, _), literal in zip(pieces, literal_ids, strict=True):
        ids += literal
        if name:
            ids += field_ids[name]
    return ids + eos, truncated


class PreferenceJudge:
    """A trained pairwise preference model: `prob(prompts, a, b) -> Tensor (B,)` in [0, 1].

    `path_or_model`: a directory written by `alignkit train preference_model` (its
    `preference_model.json` gives the template) or a loaded sequence classifier (pass the
    tokenizer). `prob` is symmetrised over both orders; `prob_one_order` is the raw p(a, b).
    """

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        template: str | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
        device: str | None = None,
    ) -> None:
        manifest: dict[str, Any] = {}
        if isinstance(path_or_model, str | Path):
            manifest_file = Path(path_or_model) / "preference_model.json"
            if manifest_file.is_file():
                manifest = json.loads(manifest_file.read_text())
            model, loaded = load_model(str(path_or_model), kind="reward", device=device)
            tokenizer = tokenizer or loaded
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer together with a loaded model")
            model = path_or_model
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template = template or manifest.get("template", DEFAULT_TEMPLATE)
        self.max_length = int(manifest.get("max_length", max_length))
        self.batch_size = batch_size

    @torch.no_grad()
    def logits(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> Tensor:
        """Logit of p(a, b) per row (one order only): (B,)."""
        from alignkit.data import pad_left
        from alignkit.models import reward_scores

        sequences = [
            encode_preference(
                self.tokenizer, p, a, b, template=self.template, max_length=self.max_length
            )[0]
            for p, a, b in zip(prompts, responses_a, responses_b, strict=True)
        ]
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(sequences), self.batch_size):
            input_ids, mask = pad_left(
                sequences[start : start + self.batch_size], self.tokenizer.pad_token_id
            )
            parts.append(
                reward_scores(self.model, input_ids.to(device), mask.to(device)).float().cpu()
            )
        return torch.cat(parts).reshape(-1) if parts else torch.zeros(0)

    def prob_one_order(
        self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]
    ) -> Tensor:
        return torch.sigmoid(self.logits(prompts, responses_a, responses_b))

    def prob(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> Tensor:
        """Symmetrised P(a > b | x) = (p(a, b) + 1 - p(b, a)) / 2: (B,)."""
        forward = self.prob_one_order(prompts, responses_a, responses_b)
        backward = self.prob_one_order(prompts, responses_b, responses_a)
        return symmetrize_preference(forward, backward)

    __call__ = prob
