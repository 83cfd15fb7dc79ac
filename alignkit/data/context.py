"""Ground-truth context for reward models: Factually Augmented RLHF (Sun et al. 2023, LLaVA-RLHF).

A reward model trained with `--set rm_context_columns=caption,options` reads, besides the prompt
and the response, the named columns of the row (a caption of the image, the options of a
multiple-choice question, ...): facts the policy never sees, so the reward can check the
response against them instead of guessing. `prompt_with_context` is the one place that writes
them into the reward model's input, used when the RM trains (`rm`, `cost`) and when it scores
(`RewardModelScorer`, the `rm:DIR` reward spec), for text and image rows alike.

Format: after the prompt's text, a block

    <blank line>Facts (for the reward model only):
    caption: a red square on a white background
    options: red | green | blue

one line per column in the order given; a list value is joined with " | ". A string prompt gets
the block appended; a conversational prompt gets it appended to its last user message (as a
text part when that message holds content parts, so image placeholders stay where they are).
LLaVA-RLHF appends the image captions (and for multiple-choice data the options) to the reward
model's prompt the same way; the wording of the header is ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CONTEXT_HEADER = "Facts (for the reward model only):"


def context_block(row: Mapping[str, Any], columns: Sequence[str]) -> str:
    """The facts block of `row` for `columns` (see the module docstring). Raises KeyError naming
    the first column the row lacks (or holds None for)."""
    lines = [CONTEXT_HEADER]
    for column in columns:
        value = row.get(column)
        if value is None:
            raise KeyError(column)
        text = " | ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        lines.append(f"{column}: {text}")
    return "\n\n" + "\n".join(lines)


def prompt_with_context(prompt: Any, row: Mapping[str, Any], columns: Sequence[str]) -> Any:
    """`prompt` (a string or a message list) with the facts block of `row` appended; the input
    is not modified. With no columns, `prompt` itself.

    >>> prompt_with_context("Colour?", {"caption": "a red square"}, ["caption"])
    'Colour?\\n\\nFacts (for the reward model only):\\ncaption: a red square'
    """
    if not columns:
        return prompt
    block = context_block(row, columns)
    if isinstance(prompt, str):
        return prompt + block
    messages = [dict(m) for m in prompt]
    users = [k for k, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("a conversational prompt needs a user message to carry the reward model's context")
    last = messages[users[-1]]
    content = last.get("content")
    last["content"] = content + block if isinstance(content, str) else [*content, {"type": "text", "text": block}]
    return messages


def parse_context_columns(value: Any) -> list[str]:
    """`rm_context_columns` as a list of column names: "caption,options" or a list.

    >>> parse_context_columns("caption, options"), parse_context_columns(["caption"]), parse_context_columns(None)
    (['caption', 'options'], ['caption'], [])
    """
    if value is None or value == "":
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(name).strip() for name in names if str(name).strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"rm_context_columns names a column twice: {names}")
    return names


def table_with_context(table: Any, columns: Sequence[str], prompt_key: str = "prompt") -> Any:
    """A `RowTable` whose rows' prompts carry their facts block (origins kept for errors); a row
    lacking a named column is an error naming the file, row and column."""
    from alignkit.data.table import RowTable

    if not columns:
        return table
    rows = []
    for i, row in enumerate(table.rows):
        if row.get(prompt_key) is None:
            raise table.error(i, f"rm_context_columns needs a {prompt_key!r} column to append the context to")
        try:
            rows.append({**row, prompt_key: prompt_with_context(row[prompt_key], row, columns)})
        except KeyError as err:
            raise table.error(i, f"rm_context_columns names column {err.args[0]!r}, which this row lacks") from None
    return RowTable(rows, list(table.origins))


CONTEXT_FILE = "reward_context.json"  # in a reward model's final/: {"context_columns": [...]}


def saved_context_columns(directory: Any) -> list[str]:
    """The context columns a saved reward model was trained with ([] when none)."""
    import json
    from pathlib import Path

    path = Path(directory) / CONTEXT_FILE
    if not path.is_file():
        return []
    return parse_context_columns(json.loads(path.read_text()).get("context_columns"))
