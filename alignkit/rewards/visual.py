"""Verifiable visual rewards: box IoU (Visual-RFT), choice accuracy (CLS-RL), think/answer format.

Like the rule rewards in `rules.py`, each class is called as `reward(prompts, completions,
**columns)` and returns a float32 tensor (B,); completions may be text or message lists.
The answer of a completion is the text inside its first `<answer>...</answer>` when there is
one, else the whole completion (`answer_text`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from alignkit.rewards.rules import completion_text

Box = tuple[float, float, float, float]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# A box `[x1, y1, x2, y2]`, optionally followed (Visual-RFT's dict format) by its confidence:
# `{'Position': [x1, y1, x2, y2], 'Confidence': 0.9}`.
_BOX = re.compile(
    rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"
    rf"(?:\s*,\s*['\"]?confidence['\"]?\s*:\s*({_NUM}))?",
    re.IGNORECASE,
)
# One tag pair's content: anything that opens or closes no think/answer tag.
_UNTAGGED = r"(?:(?!</?(?:think|answer)>).)*"
_THINK_ANSWER = re.compile(rf"\s*<think>{_UNTAGGED}</think>\s*<answer>{_UNTAGGED}</answer>\s*", re.DOTALL)


def answer_text(text: str) -> str:
    """The content of the first `<answer>...</answer>` in `text`, else `text` itself.

    >>> answer_text("<think>red</think><answer> Circle </answer>")
    ' Circle '
    """
    match = _ANSWER.search(text)
    return match.group(1) if match else text


def parse_boxes(text: str) -> list[Box]:
    """The `[x1, y1, x2, y2]` boxes in `text`, most confident first, duplicates dropped.

    A box may carry a Visual-RFT confidence (`{'Position': [..], 'Confidence': 0.9}`); boxes
    are ranked by it, highest first. An unstated confidence counts as 1, and ties keep the
    order the boxes appear in (so plain `[..]` lists rank in answer order).

    >>> parse_boxes("[1, 2, 3, 4] and [0.5,0,1,1] and [1,2,3,4]")
    [(1.0, 2.0, 3.0, 4.0), (0.5, 0.0, 1.0, 1.0)]
    """
    found: list[tuple[float, Box]] = []
    seen: set[Box] = set()
    for match in _BOX.finditer(text):
        box = tuple(float(match.group(k)) for k in range(1, 5))
        if box in seen or not all(math.isfinite(v) for v in box):
            continue
        seen.add(box)  # type: ignore[arg-type]
        confidence = float(match.group(5)) if match.group(5) is not None else 1.0
        found.append((confidence, box))  # type: ignore[arg-type]
    found.sort(key=lambda pair: -pair[0])
    return [box for _, box in found]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes; a degenerate box has area 0.

    >>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))  # overlap 2, union 4 + 4 - 2
    0.3333333333333333
    """
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    return inter / (area_a + area_b - inter)


def matched_iou_reward(predicted: list[Box], truth: list[Box], threshold: float = 0.5) -> float:
    """Visual-RFT's IoU reward for one answer (its `sort_and_calculate_iou` +
    `compute_reward_iou_v2`, Liu et al. 2025, arXiv 2503.01785).

    Greedy matching in confidence order: each predicted box p_i takes the still-unmatched
    ground-truth box g of largest IoU; it scores u_i = IoU(p_i, g) and consumes g when
    u_i > threshold, else it scores 0 and consumes nothing. Then

        r = sum_i u_i / max(n_pred, n_true),

    so a missed ground-truth box and a spurious prediction each cost a share. Deviation
    (labelled): no boxes predicted for no ground-truth boxes scores 1 (Visual-RFT scores
    every answer without boxes 0, even a correct empty one).

    >>> matched_iou_reward([(0, 0, 2, 2), (5, 5, 6, 6)], [(0, 0, 2, 2)])  # (1 + 0) / 2
    0.5
    """
    if not predicted and not truth:
        return 1.0
    unmatched = list(range(len(truth)))
    total = 0.0
    for box in predicted:
        if not unmatched:
            break
        best = max(unmatched, key=lambda j: box_iou(box, truth[j]))
        overlap = box_iou(box, truth[best])
        if overlap > threshold:
            total += overlap
            unmatched.remove(best)
    return total / max(len(predicted), len(truth))


def _column(columns: dict[str, Any], name: str, reward: str, size: int) -> list[Any]:
    if name not in columns:
        raise ValueError(f"{reward} needs the {name!r} column; got columns {sorted(columns)}")
    values = list(columns[name])
    if len(values) != size:
        raise ValueError(f"{len(values)} values in column {name!r} for {size} completions")
    return values


def truth_boxes(value: Any, row: int, column: str = "boxes") -> list[Box]:
    """A `boxes` value as a list of boxes: `[[x1, y1, x2, y2], ...]`, one flat box
    `[x1, y1, x2, y2]`, `[]`, or text holding boxes (Visual-RFT's `solution` strings)."""
    if isinstance(value, str):
        return parse_boxes(value)
    if isinstance(value, list | tuple) and len(value) == 4 and all(_is_number(v) for v in value):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"row {row + 1}: column {column!r} must be a list of [x1, y1, x2, y2] boxes, got {value!r}")
    boxes = []
    for box in value:
        if not (isinstance(box, list | tuple) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"row {row + 1}: column {column!r} holds {box!r}, not a box [x1, y1, x2, y2] of finite numbers")
        boxes.append(tuple(float(v) for v in box))
    return boxes  # type: ignore[return-value]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class BoxIoU:
    """Detection reward (Visual-RFT): `matched_iou_reward` of the boxes in the completion's
    answer against the row's `boxes` column (or `boxes_column`); in [0, 1].

    >>> BoxIoU()(["q"], ["<answer>[0, 0, 2, 2]</answer>"], boxes=[[[0, 0, 2, 2]]]).item()
    1.0
    """

    def __init__(self, boxes_column: str = "boxes", threshold: float = 0.5) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"iou threshold must be in [0, 1), got {threshold}")
        self.boxes_column, self.threshold = boxes_column, float(threshold)

    def __call__(self, prompts: list[str], completions: list[Any], **columns: Any) -> Tensor:
        values = _column(columns, self.boxes_column, "iou", len(completions))
        scores = []
        for row, (completion, value) in enumerate(zip(completions, values, strict=True)):
            truth = truth_boxes(value, row, self.boxes_column)
            predicted = parse_boxes(answer_text(completion_text(completion)))
            scores.append(matched_iou_reward(predicted, truth, self.threshold))
        return torch.tensor(scores, dtype=torch.float32)


def normalise_choice(text: str) -> str:
    """Case-folded, whitespace collapsed to single spaces, ends stripped.

    >>> normalise_choice("  Red\\n  Circle ")
    'red circle'
    """
    return " ".join(str(text).split()).casefold()


class ChoiceAccuracy:
    """Classification reward (CLS-RL, Li et al. 2025): 1 when the completion's answer
    (`answer_text`) equals the row's `answer` column after `normalise_choice`, else 0.

    >>> ChoiceAccuracy()(["q", "q"], ["<answer>Square</answer>", "circle"], answer=["square", "square"]).tolist()
    [1.0, 0.0]
    """

    def __init__(self, answer_column: str = "answer") -> None:
        self.answer_column = answer_column

    def __call__(self, prompts: list[str], completions: list[Any], **columns: Any) -> Tensor:
        answers = _column(columns, self.answer_column, "choice_accuracy", len(completions))
        scores = []
        for row, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
            if answer is None or isinstance(answer, list | dict):
                raise ValueError(f"row {row + 1}: column {self.answer_column!r} must be one label, got {answer!r}")
            predicted = normalise_choice(answer_text(completion_text(completion)))
            scores.append(1.0 if predicted == normalise_choice(answer) else 0.0)
        return torch.tensor(scores, dtype=torch.float32)


class ThinkAnswerFormat:
    """Format reward (DeepSeek-R1, Visual-RFT, CLS-RL): 1 when the whole completion is
    `<think>...</think><answer>...</answer>` (whitespace allowed around and between the two
    parts; neither part may contain another think/answer tag), else 0.

    >>> ThinkAnswerFormat()(["q", "q"], ["<think>a</think>\\n<answer>b</answer>", "<answer>b</answer>"]).tolist()
    [1.0, 0.0]
    """

    def __call__(self, prompts: list[str], completions: list[Any], **columns: Any) -> Tensor:
        hits = [1.0 if _THINK_ANSWER.fullmatch(completion_text(c)) else 0.0 for c in completions]
        return torch.tensor(hits, dtype=torch.float32)
