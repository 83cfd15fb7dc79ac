"""Reward (and cost) models on a vision-language model: a linear score head on the language
model's last hidden state at each row's last real token, r(x, y) = w^T h_last (no bias, as
transformers' *ForSequenceClassification heads).

transformers has no sequence-classification class for Qwen2-VL or LLaVA, so
`VisionLanguageForSequenceClassification` wraps the `AutoModelForImageTextToText` model (its
multimodal body fills the image tokens with image features) and adds `score`. It follows the
conventions `reward_scores`, `apply_lora(task="reward")` and `save_pretrained_merged` rely on:
`base_model` is the body returning hidden states, `score` the head, the class name ends in
`ForSequenceClassification`, and `type(model)(config)` builds an empty copy.

A saved VLM reward model is the VLM's own checkpoint (`AutoModelForImageTextToText` and
`AutoProcessor` load it; its LM head is kept, untouched) plus `reward_head.safetensors` holding
`score.weight` (num_labels, hidden). `load_vlm_reward` reads both; from a plain VLM checkpoint
the head starts at random (N(0, 0.02), as transformers initialises classifier heads), and
`require_trained_head` tells the two apart by the stored tensor names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

REWARD_HEAD_FILE = "reward_head.safetensors"


class VisionLanguageForSequenceClassification(nn.Module):
    """An image-text-to-text model (`vlm`) with a score head `score` (hidden -> num_labels)."""

    base_model_prefix = "vlm"  # what peft's sequence-classification wrapper looks up

    def __init__(self, config: Any, vlm: nn.Module | None = None, num_labels: int | None = None) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText

        self.vlm = vlm if vlm is not None else AutoModelForImageTextToText.from_config(config)
        labels = num_labels if num_labels is not None else getattr(config, "reward_num_labels", 1)
        self.config = self.vlm.config
        self.config.reward_num_labels = int(labels)
        hidden = self.config.get_text_config().hidden_size
        self.score = nn.Linear(hidden, int(labels), bias=False)

    @property
    def base_model(self) -> nn.Module:
        """The multimodal body (vision tower, projector, language model): hidden states out."""
        return self.vlm.model

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def tie_weights(self) -> None:
        self.vlm.tie_weights()

    def forward(self, input_ids, attention_mask, **pixel_inputs) -> torch.Tensor:
        """Scores at each row's last real token (see `alignkit.models.reward_scores`)."""
        from alignkit.models.heads import reward_scores

        return reward_scores(self, input_ids, attention_mask, pixel_inputs=pixel_inputs)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """The VLM checkpoint into `directory`, and the head as `reward_head.safetensors`."""
        from safetensors.torch import save_file

        self.vlm.save_pretrained(directory, **kwargs)
        head = {"score.weight": self.score.weight.detach().contiguous().cpu()}
        save_file(head, str(Path(directory) / REWARD_HEAD_FILE), metadata={"num_labels": str(self.num_labels)})


def is_vlm_reward_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a saved VLM reward model (a VLM checkpoint with its head file)."""
    return (Path(path) / REWARD_HEAD_FILE).is_file()


def load_vlm_reward(
    name_or_path: str, *, dtype: Any = None, device: str | None = None, num_labels: int = 1
) -> tuple[VisionLanguageForSequenceClassification, Any]:
    """(reward model, processor) of a VLM checkpoint: `load_vlm`, then the head from
    `reward_head.safetensors` when the checkpoint has one (its `num_labels` wins), else a fresh
    head of `num_labels` outputs."""
    from safetensors import safe_open

    from alignkit.models.loading import load_vlm, resolve_model_path

    vlm, processor = load_vlm(name_or_path, dtype=dtype, device=device)
    head_file = Path(resolve_model_path(name_or_path)) / REWARD_HEAD_FILE
    weight = None
    if head_file.is_file():
        with safe_open(str(head_file), framework="pt") as handle:
            weight = handle.get_tensor("score.weight")
        num_labels = weight.shape[0]
    model = VisionLanguageForSequenceClassification(vlm.config, vlm=vlm, num_labels=num_labels)
    with torch.no_grad():
        if weight is not None:
            model.score.weight.copy_(weight)
        else:
            model.score.weight.normal_(0.0, 0.02)
    parameter = next(vlm.parameters())
    return model.to(device=parameter.device, dtype=parameter.dtype), processor

