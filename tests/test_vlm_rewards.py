"""Visual verifiable rewards: IoU (Visual-RFT), choice accuracy (CLS-RL), think/answer format."""

from __future__ import annotations

import pytest
import torch

from alignkit.rewards import BoxIoU, ChoiceAccuracy, ThinkAnswerFormat, load_reward
from alignkit.rewards.visual import box_iou, matched_iou_reward, parse_boxes


def test_box_iou_worked_example():
    """a = [0,0,4,4] (area 16), b = [2,0,6,4] (area 16); overlap 2*4 = 8; union 16+16-8 = 24."""
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)
    assert box_iou((0, 0, 1, 1), (1, 1, 2, 2)) == 0.0  # touching corners
    assert box_iou((3, 3, 1, 1), (0, 0, 4, 4)) == 0.0  # degenerate box


def test_parse_boxes_ranks_by_confidence_and_drops_duplicates():
    text = "{'Position': [0, 0, 1, 1], 'Confidence': 0.2}, {'Position': [5, 5, 9, 9], 'Confidence': 0.9}"
    assert parse_boxes(text) == [(5, 5, 9, 9), (0, 0, 1, 1)]
    assert parse_boxes("[1,2,3,4] then [1, 2, 3, 4] then [-1.5, 0, 2e1, 3]") == [(1, 2, 3, 4), (-1.5, 0, 20, 3)]
    assert parse_boxes("no boxes, [1, 2, 3]") == []


def test_matched_iou_greedy_in_rank_order():
    """truth g1 = [0,0,4,4], g2 = [10,0,14,4]. predictions, in order:
    p1 = [2,0,6,4]:   IoU(p1, g1) = 8/24 = 1/3 < 0.5 -> scores 0, consumes nothing;
    p2 = [0,0,4,3]:   IoU(p2, g1) = 12/16 = 0.75      -> scores 0.75, consumes g1;
    p3 = [10,0,14,4]: IoU(p3, g2) = 1                 -> scores 1, consumes g2.
    r = (0 + 0.75 + 1) / max(3, 2) = 1.75 / 3."""
    truth = [(0, 0, 4, 4), (10, 0, 14, 4)]
    predicted = [(2, 0, 6, 4), (0, 0, 4, 3), (10, 0, 14, 4)]
    assert matched_iou_reward(predicted, truth) == pytest.approx(1.75 / 3)
    # a consumed truth box is not matched twice: the second copy of g1 scores 0
    assert matched_iou_reward([(0, 0, 4, 4), (0, 0, 4, 3.9)], [(0, 0, 4, 4)]) == pytest.approx(0.5)
    # one missed box out of two: r = 1 / 2
    assert matched_iou_reward([(0, 0, 4, 4)], truth) == pytest.approx(0.5)
    assert matched_iou_reward([], truth) == 0.0
    assert matched_iou_reward([(0, 0, 1, 1)], []) == 0.0
    assert matched_iou_reward([], []) == 1.0


def test_iou_reward_reads_the_answer_and_the_boxes_column():
    reward = load_reward("iou")
    assert isinstance(reward, BoxIoU)
    completions = [
        "<think>the red square is top left</think><answer>[0, 0, 4, 3]</answer>",
        "[9, 9, 10, 10] <answer>[0, 0, 4, 4]</answer>",  # boxes outside <answer> are ignored
        [{"role": "assistant", "content": "[20, 20, 30, 30]"}],
    ]
    boxes = [[[0, 0, 4, 4]], [0, 0, 4, 4], "<answer>[{'Position': [20, 20, 30, 30], 'Confidence': 1}]</answer>"]
    torch.testing.assert_close(reward(["q"] * 3, completions, boxes=boxes), torch.tensor([0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="needs the 'boxes' column"):
        reward(["q"], ["[0,0,1,1]"])
    with pytest.raises(ValueError, match=r"row 2: column 'boxes' holds \[0, 1\]"):
        reward(["q", "q"], ["a", "b"], boxes=[[], [[0, 1]]])
    assert load_reward("iou", threshold=0.8)(["q"], ["[0, 0, 4, 3]"], boxes=[[[0, 0, 4, 4]]]).item() == 0.0


def test_choice_accuracy_normalises_case_and_whitespace():
    reward = load_reward("choice_accuracy")
    assert isinstance(reward, ChoiceAccuracy)
    completions = [
        "<think>four sides</think><answer>  Red\n Square </answer>",
        "red square",  # no tags: the whole text is the answer
        "<answer>circle</answer> red square",
        "<answer>red squares</answer>",
    ]
    scores = reward(["q"] * 4, completions, answer=["red square"] * 4)
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="row 1: column 'answer' must be one label"):
        reward(["q"], ["a"], answer=[None])


def test_think_format():
    reward = load_reward("think_format")
    assert isinstance(reward, ThinkAnswerFormat)
    completions = [
        "<think>it is round</think><answer>circle</answer>",
        "\n<think>\nround\n</think>\n<answer>\ncircle\n</answer>\n",
        "<answer>circle</answer>",
        "<think>a</think><answer>b</answer> trailing words",
        "<think>a</think><answer>b</answer><answer>c</answer>",
        "<think>a <answer>x</answer></think><answer>b</answer>",
    ]
    torch.testing.assert_close(reward(["q"] * 6, completions), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
