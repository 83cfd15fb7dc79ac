"""Scalar heads on top of a decoder: reward models (and, later, value heads).

A sequence-classification model maps the final hidden state of the last real token to
`num_labels` scores:  r(x) = w^T h_{last(x)}  (+ b). HF's own forward finds "last" by
searching for the pad id, which breaks when pad == eos and the sequence ends with eos; here the
attention mask decides, for left and right padding alike, and the head runs on B rows only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkit.models.logprobs import _unwrap_peft, position_ids_from_mask

# Attribute names of the classification head in transformers' *ForSequenceClassification.
_HEAD_NAMES = ("score", "classifier")


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token per row: (B, T) 0/1 mask -> (B,) long.

    last(b) = max{t : mask[b, t] = 1} = T - 1 - argmax(flip(mask[b])), which is right for
    right padding (1 1 1 0 0 -> 2), left padding (0 0 1 1 1 -> 4) and no padding. An all-zero
    row gives T - 1.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    length = attention_mask.shape[1]
    flipped_first = attention_mask.flip(-1).ne(0).int().argmax(-1)
    return length - 1 - flipped_first


def _score_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, score head) of a sequence-classification model."""
    inner = _unwrap_peft(model)
    head = next((getattr(inner, n) for n in _HEAD_NAMES if hasattr(inner, n)), None)
    backbone = getattr(inner, "base_model", None)
    if head is None or backbone is None or backbone is inner:
        raise ValueError(
            f"{type(inner).__name__} has no score head: reward_scores needs a sequence-"
            "classification model (load_model(..., kind='reward'))"
        )
    return backbone, head


def reward_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Scores of a sequence-classification model at each row's last real token.

    Shapes: input_ids, attention_mask (B, T) -> (B,) float32 when `num_labels == 1`, else
    (B, num_labels). The backbone runs once; the head sees only the B gathered rows (B, H).
    Works through a peft wrapper (LoRA layers and `modules_to_save` heads stay active).
    `position_ids` default to `position_ids_from_mask`, so left- and right-padded copies of
    the same text get the same score.
    """
    backbone, head = _score_head(model)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_hidden = hidden[rows, last_token_index(attention_mask).to(hidden.device)]  # (B, H)
    scores = head(last_hidden).float()  # (B, num_labels)
    return scores.squeeze(-1) if scores.shape[-1] == 1 else scores
