"""Whole conversations as one token sequence, with a mask on every assistant turn.

A `messages` row (system, user, assistant, user, assistant, ...) is rendered with the
tokenizer's chat template and cut into consecutive text pieces: everything before an
assistant turn (system prompt, user turns, the template's role headers and the generation
prompt) and the assistant turn itself, from the first character the model would generate after
the generation prompt up to and including its end-of-turn (eos) token. Each piece is
tokenised on its own (`add_special_tokens=False`), as `tokenize.py` tokenises a prompt and its
response, so no BPE merge crosses a seam and an assistant turn's ids are those the model emits
after that generation prompt. `agent_mask` is True exactly on the assistant pieces' tokens:
multi-turn behaviour cloning trains on every agent turn and never on a user turn.

Truncation (counted in `TruncationStats.truncated_responses`, never silent): a conversation
longer than `max_length` keeps its START; turns past the cut are lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data.collate import _numeric_extras
from alignkit.data.table import RowTable
from alignkit.data.tokenize import TruncationStats, _bos_prefix, _encode, _extras

AGENT_ROLE = "assistant"


@dataclass
class TurnsExample:
    """A tokenised conversation: `input_ids` and `agent_mask` (same length), the source row
    index and its numeric columns (`extras`, e.g. the dialogue's `reward`)."""

    input_ids: list[int]
    agent_mask: list[bool]
    row: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def agent_tokens(self) -> int:
        return sum(self.agent_mask)


def _template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=False
    )


def conversation_pieces(messages: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[tuple[str, bool]]:
    """The templated conversation as consecutive (text, is_agent_turn) pieces whose texts
    concatenate to the template of `messages` up to the last assistant turn's eos.

    An assistant turn i is template(messages[:i+1]) minus template(messages[:i],
    add_generation_prompt=True), ending AT eos (the newline a template writes after it goes to
    the next piece). Raises ValueError when the template does not render each shorter
    conversation as a prefix of the longer one (then the turns cannot be located) or when no
    message comes from the assistant.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversations need a tokenizer with a chat template")
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    covered = ""  # rendered text already placed in pieces
    for i, message in enumerate(messages):
        if message["role"] != AGENT_ROLE:
            continue
        before = _template(tokenizer, messages[:i], True)
        through = _template(tokenizer, messages[: i + 1], False)
        if not before.startswith(covered) or not through.startswith(before):
            raise ValueError(
                f"the chat template does not render message {i + 1}'s conversation as a prefix of "
                f"the next one, so its assistant turn cannot be located; before it renders as "
                f"{before[-60:]!r}, through it as {through[len(before) - 20 : len(before) + 40]!r}"
            )
        turn = through[len(before) :]
        stripped = turn.rstrip()
        turn = stripped if eos and stripped.endswith(eos) else turn + eos
        pieces += [(before[len(covered) :], False), (turn, True)]
        covered = before + turn
    if not pieces:
        raise ValueError("the conversation has no assistant message to train on")
    return pieces


def tokenize_conversation(
    messages: Sequence[Mapping[str, Any]], tokenizer: Any
) -> tuple[list[int], list[bool]]:
    """(input_ids, agent_mask) of one conversation, pieces tokenised separately (module doc);
    bos is prepended when the tokenizer normally adds it and the template did not write it."""
    pieces = conversation_pieces(messages, tokenizer)
    encoded = _encode(tokenizer, [text for text, _ in pieces])
    ids: list[int] = []
    mask: list[bool] = []
    for piece_ids, (_, is_agent) in zip(encoded, pieces, strict=True):
        ids += piece_ids
        mask += [is_agent] * len(piece_ids)
    bos = _bos_prefix(tokenizer)
    if bos and ids[: len(bos)] != bos:
        ids, mask = bos + ids, [False] * len(bos) + mask
    return ids, mask


def tokenize_turns(
    table: RowTable, tokenizer: Any, *, max_length: int
) -> tuple[list[TurnsExample], TruncationStats]:
    """Tokenise every `messages` row of `table` into a `TurnsExample` (module docstring).

    A row that cannot be rendered, or whose first assistant turn lies wholly past `max_length`,
    raises the table's error naming the file and row."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stats = TruncationStats()
    examples = []
    for i, row in enumerate(table.rows):
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise table.error(i, "column 'messages' must be a list of {'role', 'content'} messages")
        try:
            ids, mask = tokenize_conversation(messages, tokenizer)
        except (KeyError, ValueError, TypeError) as exc:
            raise table.error(i, f"cannot render the conversation: {exc}") from exc
        stats.examples += 1
        if len(ids) > max_length:
            if not any(mask[:max_length]):
                raise table.error(i, f"the first assistant turn starts at token {mask.index(True)}, past "
                                     f"--max-length {max_length}: nothing of the conversation would train; "
                                     "raise --max-length or shorten the turns before it")
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated_responses += 1
        examples.append(TurnsExample(ids, mask, i, _extras(row)))
    return examples, stats


def collate_turns(examples: list[TurnsExample], pad_id: int) -> dict[str, Tensor]:
    """Right-pad conversations: `input_ids`, `attention_mask` (B, T) long, `response_mask`
    (B, T) bool = the agent mask (False on padding), `rows` (B,), numeric extras (B,)."""
    if not examples:
        raise ValueError("collate_turns needs at least one example")
    width = max(ex.length for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)  # (B, T)
    for n, ex in enumerate(examples):
        input_ids[n, : ex.length] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[n, : ex.length] = 1
        response_mask[n, : ex.length] = torch.tensor(ex.agent_mask, dtype=torch.bool)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
             "rows": torch.tensor([ex.row for ex in examples], dtype=torch.long)}
    batch.update(_numeric_extras([ex.extras for ex in examples]))
    return batch
