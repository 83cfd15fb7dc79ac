"""Rewards of the calculator example (`--reward examples/calculator_tools/reward.py:correct`).

With `--tools` and no `--env` the episode ends at the first turn without a tool call, and the
reward scores that final answer (`completions`); it also gets the row's `answer` column and
the whole conversation (`conversation`, a list of messages per row).

- `correct`: r = 1 if a number in the final answer equals the answer, else 0. Numbers are
  read with thousands separators removed ("476,216" is 476216), so "964 * 494 = 476216" is
  right and "The answer is 47621." is wrong. An episode whose last turn is still a tool call
  (cut by max_turns) has no final answer and scores 0, even when the call's text holds the
  number (`{"expression": "665444"}`, seen after a light warm-start). This is the reward of
  the reported run.
- `correct_with_call_bonus`: `correct` + 0.1 when the conversation holds a calculator result
  (a tool message that is not an error), so a group with no right answer still prefers the
  samples that used the tool. Not the reported run's reward.
"""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
CALL_BONUS = 0.1


def numbers_in(text: str) -> list[float]:
    """Every number written in `text`, thousands separators removed.

    >>> numbers_in("964 * 494 = 476,216.")
    [964.0, 494.0, 476216.0]
    """
    return [float(match.replace(",", "")) for match in NUMBER.findall(text)]


def is_correct(final_answer: str, answer: str) -> bool:
    """Whether a number in `final_answer` equals `answer` (a number, as text)."""
    try:
        target = float(answer)
    except (TypeError, ValueError):
        raise ValueError(f"the answer column must hold a number, got {answer!r}") from None
    return any(value == target for value in numbers_in(final_answer))


def used_calculator(conversation: list[dict[str, Any]]) -> bool:
    """Whether a tool message of the conversation is a result, not an error."""
    return any(m.get("role") == "tool" and not str(m.get("content", "")).startswith("Error:") for m in conversation)


def ends_with_call(conversation: list[dict[str, Any]]) -> bool:
    """Whether the last assistant turn of the conversation is a tool call (no final answer)."""
    last = next((m for m in reversed(conversation) if m.get("role") == "assistant"), {})
    return bool(last.get("tool_calls"))


def correct(prompts: list[str], completions: list[str], answer: list[str],
            conversation: list[list[dict[str, Any]]] | None = None, **_: Any) -> list[float]:
    """1.0 where the final answer contains the right number, else 0.0 (0.0 as well where the
    conversation, when given, ends with a tool call)."""
    conversations = conversation if conversation is not None else [[] for _ in completions]
    return [float(is_correct(text, target) and not ends_with_call(messages))
            for text, target, messages in zip(completions, answer, conversations, strict=True)]


def correct_with_call_bonus(prompts: list[str], completions: list[str], answer: list[str],
                            conversation: list[list[dict[str, Any]]], **_: Any) -> list[float]:
    """`correct` + CALL_BONUS where the conversation holds a calculator result."""
    scores = correct(prompts, completions, answer, conversation)
    return [score + CALL_BONUS * used_calculator(messages) for score, messages in zip(scores, conversation, strict=True)]
