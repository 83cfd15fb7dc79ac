"""Anthropic HH-RLHF rows: `chosen` and `rejected` are whole transcripts
("\\n\\nHuman: ...\\n\\nAssistant: ...") with no prompt column.

The shared beginning of the two transcripts, up to their last shared "\\n\\nAssistant:", is
the prompt, as a conversation (Human turns become user messages, Assistant turns assistant
messages); what follows is each response, as assistant messages.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from alignkit.data.table import RowTable

log = logging.getLogger("alignkit")

DATA_FORMATS = ("auto", "hh")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript(value: Any) -> str | None:
    """`value` as an HH transcript (starting with "\\n\\nHuman:"), or None if it is not one."""
    if not isinstance(value, str):
        return None
    text = "\n\n" + value if value.startswith("Human:") else value
    return text if text.startswith(HUMAN) and ASSISTANT in text else None


def looks_like_hh(row: Mapping[str, Any]) -> bool:
    """True for a row in the HH-RLHF schema: transcript `chosen` and `rejected`, no prompt."""
    return (
        row.get("prompt") is None
        and _transcript(row.get("chosen")) is not None
        and _transcript(row.get("rejected")) is not None
    )


def transcript_messages(text: str) -> list[dict[str, str]]:
    """The turns of a transcript as `{"role", "content"}` messages (contents stripped).

    >>> transcript_messages("\\n\\nHuman: hi\\n\\nAssistant: hello")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    parts = _TURN.split(text)  # [before, role, content, role, content, ...]
    return [
        {"role": _ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def split_hh_row(row: Mapping[str, Any]) -> dict[str, Any] | str:
    """The row with `prompt` (messages) and `chosen`/`rejected` (assistant messages), or a
    description of why it is not an HH-RLHF row."""
    if row.get("prompt") is not None:
        return "has a 'prompt' column; HH-RLHF rows hold only chosen and rejected transcripts"
    for column in ("chosen", "rejected"):
        if _transcript(row.get(column)) is None:
            return (
                f"column '{column}' is not an HH-RLHF transcript "
                "(text starting with '\\n\\nHuman:' and holding an '\\n\\nAssistant:' turn)"
            )
    chosen, rejected = str(_transcript(row["chosen"])), str(_transcript(row["rejected"]))
    cut = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
    if cut < 0:
        return "'chosen' and 'rejected' share no conversation up to an '\\n\\nAssistant:' turn"
    return {
        **row,
        "prompt": transcript_messages(chosen[:cut]),
        "chosen": transcript_messages(chosen[cut:]),
        "rejected": transcript_messages(rejected[cut:]),
    }


def apply_data_format(table: RowTable, data_format: str) -> RowTable:
    """Rows in alignkit's own schema: `hh` splits HH-RLHF transcripts (see the module);
    `auto` does so when the first row is one, and leaves other tables as they are."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}")
    if not table.rows or (data_format == "auto" and not looks_like_hh(table.rows[0])):
        return table
    rows = []
    for i, row in enumerate(table.rows):
        split = split_hh_row(row)
        if isinstance(split, str):
            raise table.error(i, f"not an Anthropic HH-RLHF row: {split}")
        rows.append(split)
    how = "--data-format hh" if data_format == "hh" else "detected"
    log.info("%s: Anthropic HH-RLHF transcripts (%s): prompt = the shared turns, "
             "chosen/rejected = the final assistant turns", table.source, how)
    return RowTable(rows, list(table.origins))
