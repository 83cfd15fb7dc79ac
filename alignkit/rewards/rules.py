"""Built-in rule rewards: sentiment, length, format (regex), numeric answers, JSON validity.

Every class here follows the `RewardFunction` contract: an instance is called as
`reward(prompts, completions, **columns)` and returns a float32 tensor (B,). They are cheap,
deterministic and need no model, so they double as gold rewards in demos and tests. A
completion may be text or, for conversational prompts, a message list (`completion_text`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

import torch
from torch import Tensor


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the contents of a message list
    (`[{"role": "assistant", "content": ...}]`, how conversational completions arrive)."""
    if isinstance(completion, list):
        return "\n".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return completion


@functools.lru_cache(maxsize=1)
def _vader_analyzer() -> Any:
    """The shared VADER analyser; its lexicon is read from the package once, on first use."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class VaderSentiment:
    """VADER compound sentiment of the completion, in [-1, 1] (Hutto & Gilbert 2014).

    compound = s / sqrt(s^2 + 15), s = sum of the rule-adjusted lexicon valences of the
    text's words (VADER's `normalize` with alpha = 15). The prompt is ignored.
    This is the demo's gold reward. About 60 us per short review on one CPU core, so a
    batch of a few hundred takes tens of milliseconds; identical completions in a batch are
    scored once.

    >>> reward = VaderSentiment()
    >>> reward(["Review:"], ["This movie was wonderful, I loved it!"]).item() > 0.5
    True
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        analyzer = _vader_analyzer()
        cache: dict[str, float] = {}
        scores = []
        for text in map(completion_text, completions):
            if text not in cache:
                cache[text] = analyzer.polarity_scores(text)["compound"]
            scores.append(cache[text])
        return torch.tensor(scores, dtype=torch.float32)


class LengthTarget:
    """Penalise distance from a target length: r = -|len(completion) - target| / scale.

    `unit="words"` counts whitespace-separated words, `unit="chars"` counts characters.
    `scale` defaults to `target` (so r = -relative error, 0 at the target, -1 at zero length
    or at twice the target).

    >>> LengthTarget(4, unit="words")(["p"], ["one two three four five six"]).item()
    -0.5
    """

    def __init__(self, target: int, unit: str = "words", scale: float | None = None) -> None:
        if unit not in ("words", "chars"):
            raise ValueError(f"LengthTarget unit must be 'words' or 'chars'; got {unit!r}")
        if target < 0:
            raise ValueError(f"LengthTarget target must be >= 0; got {target}")
        scale = float(target) if scale is None else float(scale)
        if not scale > 0:
            raise ValueError(f"LengthTarget scale must be > 0; got {scale} (set it when target=0)")
        self.target, self.unit, self.scale = target, unit, scale

    def _length(self, text: str) -> int:
        return len(text.split()) if self.unit == "words" else len(text)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        lengths = torch.tensor([self._length(completion_text(t)) for t in completions], dtype=torch.float32)
        return -(lengths - self.target).abs() / self.scale


class RegexMatch:
    """Format reward: `reward` if `re.search(pattern, completion)` matches, else `penalty`.

    Anchor the pattern (`^...$`) and pass `flags=re.DOTALL` for whole-completion formats
    such as `^<think>.*</think>\\s*<answer>.*</answer>$`.

    >>> RegexMatch(r"\\d+")(["p", "p"], ["answer 42", "no digits"]).tolist()
    [1.0, 0.0]
    """

    def __init__(
        self, pattern: str, reward: float = 1.0, penalty: float = 0.0, flags: int = 0
    ) -> None:
        try:
            self.pattern = re.compile(pattern, flags)
        except re.error as err:
            raise ValueError(f"RegexMatch: invalid pattern {pattern!r}: {err}") from err
        self.reward, self.penalty = float(reward), float(penalty)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        texts = map(completion_text, completions)
        hits = [self.reward if self.pattern.search(t) else self.penalty for t in texts]
        return torch.tensor(hits, dtype=torch.float32)


# A number: 1,234,567.89 (comma-grouped) or 1234.5 or .5, with optional sign.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def extract_final_number(text: str) -> float | None:
    """The final numeric answer in `text`, GSM8K style, or None when there is none.

    If "####" occurs, the first number after the last "####" is the answer; otherwise the
    last number in the text. Thousands commas and a leading "$" are ignored.

    >>> extract_final_number("She pays 3 * $1,200 = $3,600.\\n#### 3,600")
    3600.0
    >>> extract_final_number("So the answer is -7.")
    -7.0
    """
    text = str(text)
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        if match is None:
            return None
        token = match.group()
    else:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        token = numbers[-1]
    value = float(token.replace(",", ""))
    return value if math.isfinite(value) else None


class NumericAnswerMatch:
    """GSM8K-style exact-answer reward: 1.0 if the completion's final number equals the answer.

    r = 1[ |extract(completion) - extract(answer)| <= tol ], where `extract` is
    `extract_final_number` (after "####" if present, else the last number; commas stripped).
    The reference comes from the `answer` column (or `answer_column`), which may be a GSM8K
    solution ending in "#### 42", a bare "42", or a number. A completion without a number
    scores 0.0; an answer without a number raises ValueError (a data bug).

    >>> NumericAnswerMatch()(["q"], ["... so she has 18 eggs."], answer=["... #### 18"]).item()
    1.0
    """

    def __init__(self, answer_column: str = "answer", tol: float = 1e-6) -> None:
        self.answer_column, self.tol = answer_column, tol

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        if self.answer_column not in columns:
            raise ValueError(
                f"NumericAnswerMatch needs the {self.answer_column!r} column; got columns "
                f"{sorted(columns)}"
            )
        answers = columns[self.answer_column]
        if len(answers) != len(completions):
            raise ValueError(
                f"{len(answers)} values in column {self.answer_column!r} for "
                f"{len(completions)} completions"
            )
        scores = []
        for completion, answer in zip(completions, answers, strict=True):
            target = (
                float(answer)
                if isinstance(answer, (int, float)) and not isinstance(answer, bool)
                else extract_final_number(answer)
            )
            if target is None:
                raise ValueError(f"no number in {self.answer_column!r} value {answer!r}")
            predicted = extract_final_number(completion_text(completion))
            hit = predicted is not None and abs(predicted - target) <= self.tol
            scores.append(1.0 if hit else 0.0)
        return torch.tensor(scores, dtype=torch.float32)


_JSON_FENCE = re.compile(r"```json[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return False
    return True


class JsonValid:
    """1.0 if the completion parses as JSON, or else its first ```json fenced block does; else 0.0.

    Surrounding whitespace is ignored. Any JSON value counts (object, array, string, number).

    >>> JsonValid()(["p", "p"], ['{"a": 1}', "{a: 1}"]).tolist()
    [1.0, 0.0]
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        scores = []
        for text in map(completion_text, completions):
            valid = _parses_as_json(text.strip())
            if not valid:
                fence = _JSON_FENCE.search(text)
                valid = fence is not None and _parses_as_json(fence.group(1).strip())
            scores.append(1.0 if valid else 0.0)
        return torch.tensor(scores, dtype=torch.float32)
