"""Render rows to text (chat templates included) and tokenise them with a shared prompt.

The prompt is tokenised once and shared by every response of a row, and each response is
tokenised on its own (`add_special_tokens=False`), so chosen and rejected start at the same
position with the same prompt ids and no BPE merge crosses the prompt/response seam.

Truncation policy (counted in `TruncationStats`, never silent, never a dropped example):
1. the prompt is cut to `max_prompt_length` keeping its END (left truncation);
2. each response is cut to `max_length - len(prompt)` keeping its START;
3. if the prompt leaves no room for one response token, the prompt is left-truncated further
   to `max_length - 1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.formats import FORMAT_COLUMNS, split_implicit_prompt
from alignkit.data.table import RowTable

Response = str | list[dict[str, Any]]


@dataclass
class TruncationStats:
    """How many examples were tokenised and how many prompts / responses were cut.

    `truncated_responses` counts responses, so a pair can contribute two.
    """

    examples: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def summary(self) -> str:
        """One log line, e.g. `"100 examples: 3 prompts truncated (kept end), 5 responses ..."`."""
        return (
            f"{self.examples} examples: {self.truncated_prompts} prompts truncated "
            f"(kept their end), {self.truncated_responses} responses truncated "
            f"(kept their start)"
        )


@dataclass
class PairExample:
    """A tokenised preference pair: shared prompt ids, chosen and rejected response ids.

    `row` is the index into the source `RowTable`; `extras` holds its numeric columns
    (e.g. `margin`).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Padded length this pair needs: prompt plus the longer response."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class SeqExample:
    """A tokenised prompt + completion (SFT, unpaired, ratings); `extras` e.g. label, reward."""

    prompt_ids: list[int]
    completion_ids: list[int]
    row: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class RankedExample:
    """A tokenised prompt with several scored responses (ranked data)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    scores: list[float]
    row: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(ids) for ids in self.response_ids)


# --------------------------------------------------------------------------- rendering


def _prompt_and_responses(
    row: Mapping[str, Any], response_keys: Sequence[str]
) -> tuple[Response, list[Response]]:
    """Pull the prompt and responses out of a row, resolving `messages` and implicit prompts.

    `messages` are read when the row lacks what `response_keys` name (an SFT row without a
    `completion`; a prompt request without a `prompt`): UltraFeedback rows carry `prompt`,
    `chosen`, `rejected` and `messages`, and each trainer reads the columns of its format.
    """
    missing = row.get("prompt") is None if not response_keys else all(
        row.get(key) is None for key in response_keys
    )
    if missing and row.get("messages") is not None:
        messages = list(row["messages"])
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        # The last assistant turn is the completion; validation rejects anything after it.
        return messages[:last], [messages[last:]]
    if "chosen" in row and "rejected" in row:
        row = split_implicit_prompt(row)  # shared leading messages become (or repeat) the prompt
    return row["prompt"], [row[key] for key in response_keys]


def _render(
    prompt: Response,
    responses: Sequence[Response],
    tokenizer: Any,
    *,
    apply_chat_template: bool = False,
) -> tuple[str, list[str]]:
    """Text of the prompt and of each response (the response text ends with eos)."""
    eos = tokenizer.eos_token or ""
    conversational = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if not conversational and not (apply_chat_template and has_template):
        return prompt, [r if not eos or r.endswith(eos) else r + eos for r in responses]
    if not has_template:
        raise ValueError("conversational rows need a tokenizer with a chat template")

    prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(
        prompt_messages, add_generation_prompt=True, tokenize=False
    )
    response_texts = []
    for response in responses:
        response_messages = (
            response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        )
        full_text = tokenizer.apply_chat_template(
            prompt_messages + response_messages, tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render the prompt (with add_generation_prompt=True) "
                "as a prefix of prompt + response, so the response tokens cannot be located; "
                f"prompt renders as {prompt_text[-80:]!r}, prompt + response as "
                f"{full_text[: len(prompt_text) + 20][-100:]!r}"
            )
        text = full_text[len(prompt_text) :]
        # Templates put a newline after the end-of-turn token; the response ends AT eos so the
        # model learns to stop there (and sampling stops there too).
        stripped = text.rstrip()
        if eos and stripped.endswith(eos):
            text = stripped
        elif eos:
            text = text + eos
        response_texts.append(text)
    return prompt_text, response_texts


def render_prompt_and_responses(
    row: Mapping[str, Any],
    tokenizer: Any,
    response_keys: Sequence[str],
    *,
    apply_chat_template: bool = False,
) -> tuple[str, list[str]]:
    """Render a row to `(prompt_text, [response_text, ...])`, one per key in `response_keys`.

    Standard text rows: the prompt as-is, each response + eos (unless it already ends with
    it). Conversational rows: the prompt is `apply_chat_template(prompt_messages,
    add_generation_prompt=True)` and a response is the template of prompt + response messages
    minus that prefix, ending at eos. `messages` rows: the last assistant message is the
    completion, everything before it the prompt. Conversational pairs without a prompt are
    split at their shared leading messages. `apply_chat_template=True` wraps string prompts
    (and responses) as user (assistant) messages when the tokenizer has a chat template.
    """
    prompt, responses = _prompt_and_responses(row, response_keys)
    return _render(prompt, responses, tokenizer, apply_chat_template=apply_chat_template)


# --------------------------------------------------------------------------- token ids


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos_prefix(tokenizer: Any) -> list[int]:
    """`[bos]` if the tokenizer normally prepends bos when adding special tokens, else `[]`."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    bos = _bos_prefix(tokenizer)
    # A chat template may already have written the bos token into the text.
    return [ids if ids[: len(bos)] == bos else bos + ids for ids in _encode(tokenizer, texts)]


def _check_lengths(max_length: int, max_prompt_length: int | None) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def _truncate(
    prompt_ids: list[int],
    responses: list[list[int]],
    max_length: int,
    max_prompt_length: int | None,
    stats: TruncationStats,
) -> tuple[list[int], list[list[int]]]:
    """Apply the module's truncation policy to one example and count what was cut."""
    limit = max_length - 1  # leave room for at least one response token
    if max_prompt_length is not None:
        limit = min(limit, max_prompt_length)
    if len(prompt_ids) > limit:
        prompt_ids = prompt_ids[-limit:]
        stats.truncated_prompts += 1
    budget = max_length - len(prompt_ids)
    cut = [ids[:budget] for ids in responses]
    stats.truncated_responses += sum(len(ids) > budget for ids in responses)
    stats.examples += 1
    return prompt_ids, cut


def _extras(row: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar numeric / boolean columns of a row (label, margin, reward, ratings)."""
    return {
        key: value
        for key, value in row.items()
        if (key == "label" or key not in FORMAT_COLUMNS) and isinstance(value, int | float | bool)
    }


def _render_table(
    table: RowTable, tokenizer: Any, chat: bool, rows_to_items: Any
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Render and tokenise every row; `rows_to_items(row) -> (prompt, [responses])`."""
    prompt_texts: list[str] = []
    response_texts: list[list[str]] = []
    for i, row in enumerate(table.rows):
        try:
            prompt, responses = rows_to_items(row)
            prompt_text, texts = _render(prompt, responses, tokenizer, apply_chat_template=chat)
        except (KeyError, ValueError, TypeError) as exc:
            raise table.error(i, f"cannot render row: {exc}") from exc
        prompt_texts.append(prompt_text)
        response_texts.append(texts)
    prompt_ids = _encode_prompts(tokenizer, prompt_texts)
    flat = _encode(tokenizer, [text for texts in response_texts for text in texts])
    response_ids, start = [], 0
    for texts in response_texts:
        response_ids.append(flat[start : start + len(texts)])
        start += len(texts)
    return prompt_ids, response_ids


def tokenize_pairwise(
    table: RowTable,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    chat: bool = False,
) -> tuple[list[PairExample], TruncationStats]:
    """Tokenise pairwise rows into `PairExample`s sharing one prompt tokenisation.

    `chat=True` renders string prompts/responses through the tokenizer's chat template.
    """
    _check_lengths(max_length, max_prompt_length)
    prompts, responses = _render_table(
        table, tokenizer, chat, lambda row: _prompt_and_responses(row, ("chosen", "rejected"))
    )
    stats = TruncationStats()
    examples = []
    for i, (prompt_ids, (chosen_ids, rejected_ids)) in enumerate(
        zip(prompts, responses, strict=True)
    ):
        prompt_ids, (chosen_ids, rejected_ids) = _truncate(
            prompt_ids, [chosen_ids, rejected_ids], max_length, max_prompt_length, stats
        )
        examples.append(
            PairExample(prompt_ids, chosen_ids, rejected_ids, i, _extras(table.rows[i]))
        )
    return examples, stats


def tokenize_sft(
    table: RowTable,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    chat: bool = False,
) -> tuple[list[SeqExample], TruncationStats]:
    """Tokenise prompt + completion rows (SFT, unpaired, ratings) into `SeqExample`s."""
    _check_lengths(max_length, max_prompt_length)
    prompts, responses = _render_table(
        table, tokenizer, chat, lambda row: _prompt_and_responses(row, ("completion",))
    )
    stats = TruncationStats()
    examples = []
    for i, (prompt_ids, (completion_ids,)) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids, (completion_ids,) = _truncate(
            prompt_ids, [completion_ids], max_length, max_prompt_length, stats
        )
        examples.append(SeqExample(prompt_ids, completion_ids, i, _extras(table.rows[i])))
    return examples, stats


def tokenize_ranked(
    table: RowTable,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    chat: bool = False,
) -> tuple[list[RankedExample], TruncationStats]:
    """Tokenise ranked rows (prompt + completions + scores) into `RankedExample`s."""
    _check_lengths(max_length, max_prompt_length)
    prompts, responses = _render_table(
        table, tokenizer, chat, lambda row: (row["prompt"], list(row["completions"]))
    )
    stats = TruncationStats()
    examples = []
    for i, (prompt_ids, response_ids) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids, response_ids = _truncate(
            prompt_ids, response_ids, max_length, max_prompt_length, stats
        )
        row = table.rows[i]
        examples.append(
            RankedExample(
                prompt_ids, response_ids, [float(s) for s in row["scores"]], i, _extras(row)
            )
        )
    return examples, stats


def tokenize_prompts(
    table: RowTable, tokenizer: Any, *, max_prompt_length: int | None, chat: bool = False
) -> tuple[list[list[int]], TruncationStats]:
    """Tokenise prompts for generation, left-truncated to `max_prompt_length` (end kept).

    Rows of any format work: `messages` rows give everything before the last assistant turn.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    prompts, _ = _render_table(
        table, tokenizer, chat, lambda row: (_prompt_and_responses(row, ())[0], [])
    )
    stats = TruncationStats(examples=len(prompts))
    result = []
    for prompt_ids in prompts:
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            stats.truncated_prompts += 1
        result.append(prompt_ids)
    return result, stats
