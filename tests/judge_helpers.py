"""A scripted judge LM for the judge tests: a real nn.Module run by `LLMJudge`'s batched forward,
whose next-token logits at the last position are set from the decoded text, so the judge's
answer is known in advance."""

from __future__ import annotations

import re
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from alignkit.rewards.judge import LLMJudge

POINTWISE_RESPONSE = re.compile(r"Response: (.*?)\n\nIs the response", re.DOTALL)
PAIRWISE_RESPONSES = re.compile(r"Output of model 0: (.*?)\n\nOutput of model 1: (.*?)\n\nWhich", re.DOTALL)


class ScriptedJudgeLM(nn.Module):
    """logits[first answer token] = gap(text), logits[second answer token] = 0, every other
    token -1e4, at every position; `gap` sees the decoded (unpadded) judge input."""

    def __init__(self, tokenizer, gap: Callable[[str], float]) -> None:
        super().__init__()
        self.tokenizer, self.gap = tokenizer, gap
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, so the judge finds a device
        self.answer_ids: tuple[int, int] = (0, 1)
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.calls += 1
        rows, width = input_ids.shape
        logits = torch.full((rows, width, len(self.tokenizer)), -1e4)
        for row in range(rows):
            text = self.tokenizer.decode(input_ids[row][attention_mask[row].bool()])
            logits[row, :, self.answer_ids[0]] = float(self.gap(text))
            logits[row, :, self.answer_ids[1]] = 0.0
        return SimpleNamespace(logits=logits + self.weight)


def scripted_judge(tokenizer, gap: Callable[[str], float], **options) -> LLMJudge:
    """An `LLMJudge` over a `ScriptedJudgeLM` whose answer tokens are the judge's own."""
    model = ScriptedJudgeLM(tokenizer, gap)
    judge = LLMJudge(model, tokenizer, **options)
    model.answer_ids = (judge.first_ids[0], judge.second_ids[0])
    return judge


def pointwise_response(text: str) -> str:
    return POINTWISE_RESPONSE.search(text).group(1)


def pairwise_responses(text: str) -> tuple[str, str]:
    match = PAIRWISE_RESPONSES.search(text)
    return match.group(1), match.group(2)
