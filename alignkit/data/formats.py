"""Dataset formats: detect which one a table is in, and check every row against it.

The formats are TRL's (standard text or conversational lists of `{"role", "content"}`):

    prompt     prompt
    sft        prompt + completion, or messages
    pairwise   prompt + chosen + rejected, or conversational chosen + rejected (implicit prompt)
    ranked     prompt + completions + scores
    unpaired   prompt + completion + label
    ratings    prompt + completion + one numeric column per attribute
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from alignkit.data.columns import is_id_column
from alignkit.data.errors import DataError
from alignkit.data.images import check_images, content_parts_problem, content_text, uses_images
from alignkit.data.row_checks import (
    check_number_columns,
    check_one_style,
    first_item_problem,
    number_problem,
)
from alignkit.data.table import RowTable

KINDS = ("prompt", "sft", "pairwise", "ranked", "unpaired", "ratings")

EXPECTED_COLUMNS = (
    "prompt-only {prompt}; SFT {prompt, completion} or {messages}; "
    "pairwise {prompt, chosen, rejected} or conversational {chosen, rejected}; "
    "ranked {prompt, completions, scores}; unpaired {prompt, completion, label}; "
    "ratings {prompt, completion, <numeric attribute columns>}"
)

# Columns with a fixed meaning in some format; never taken for a rating attribute.
FORMAT_COLUMNS = frozenset(
    {"prompt", "completion", "messages", "chosen", "rejected", "completions", "scores", "label"}
)


def is_conversational(value: Any) -> bool:
    """True if `value` is a non-empty list of `{"role", "content"}` dicts (a conversation).

    A whole row also counts: then it is conversational if any format column holds one.
    """
    if isinstance(value, Mapping):
        return any(is_conversational(value.get(key)) for key in FORMAT_COLUMNS)
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def rating_columns(source: RowTable | Mapping[str, Any]) -> list[str]:
    """Numeric columns that are rating attributes (not a format column, not an id column)."""
    rows = source.rows if isinstance(source, RowTable) else [source]
    columns = source.columns if isinstance(source, RowTable) else list(source)
    found = []
    for column in columns:
        if column in FORMAT_COLUMNS or is_id_column(column):
            continue
        values = [row[column] for row in rows if row.get(column) is not None]
        if values and all(_is_number(v) for v in values):
            found.append(column)
    return found


def detect_kind(
    columns: RowTable | Mapping[str, Any] | Iterable[str],
    accepted: Iterable[str] | None = None,
) -> str:
    """The dataset format of a table, a single row, or a collection of column names.

    Also accepts a `datasets.Dataset` (its column names). Returns one of `KINDS`.
    Telling "ratings" from "sft" needs values, so pass a `RowTable`
    or a row for that; with bare column names, prompt + completion is always "sft".
    A table can fit several formats (UltraFeedback has chosen/rejected and `messages`): the
    first that is in `accepted` wins (the formats a trainer takes), else the first that fits.
    Raises `DataError(file, None, ...)` listing the expected column sets if nothing matches.
    """
    file = columns.source if isinstance(columns, RowTable) else "<data>"
    if isinstance(columns, RowTable | Mapping):
        names = set(columns.columns if isinstance(columns, RowTable) else columns)
        ratings = bool(rating_columns(columns))
    elif hasattr(columns, "column_names"):  # a datasets.Dataset
        names, ratings = set(columns.column_names), False
    else:
        names, ratings = set(columns), False
    kinds = _fitting_kinds(names, ratings)
    if kinds:
        wanted = [kind for kind in kinds if kind in set(accepted or ())]
        return (wanted or kinds)[0]
    raise DataError(
        file,
        None,
        f"cannot tell the dataset format from columns "
        f"{sorted(names)}; expected one of: {EXPECTED_COLUMNS}",
    )


def _fitting_kinds(names: set[str], ratings: bool) -> list[str]:
    """Every format whose columns are all in `names`, most specific first."""
    kinds = []
    if {"chosen", "rejected"} <= names:
        kinds.append("pairwise")
    if {"prompt", "completions", "scores"} <= names:
        kinds.append("ranked")
    if {"prompt", "completion", "label"} <= names:
        kinds.append("unpaired")
    if {"prompt", "completion"} <= names:
        kinds.append("ratings" if ratings else "sft")
    if "messages" in names and "sft" not in kinds:
        kinds.append("sft")
    if not kinds and "prompt" in names:
        kinds.append("prompt")
    return kinds


def _shared_length(first: list[Any], second: list[Any]) -> int:
    """How many leading messages two conversations have in common (all but the last turn
    when they are identical, so that each keeps a response)."""
    if first == second:
        return max(len(first) - 1, 0)
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return shared


def _prompt_repeated(prompt: Any, shared: list[Any]) -> bool:
    """True when the shared leading messages already hold `prompt` (UltraFeedback's chosen and
    rejected repeat the user turn that its `prompt` column also holds)."""
    if isinstance(prompt, list):
        return bool(prompt) and shared[: len(prompt)] == prompt
    if isinstance(prompt, str):
        return any(
            isinstance(m, Mapping) and m.get("role") == "user"
            and isinstance(m.get("content"), str) and m["content"].strip() == prompt.strip()
            for m in shared
        )
    return False


def split_implicit_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """Give a conversational pair its shared leading messages as prompt.

    `chosen = [u, a1]`, `rejected = [u, a2]` becomes `prompt = [u]`, `chosen = [a1]`,
    `rejected = [a2]`: when there is no `prompt`, or when the shared messages repeat the
    prompt (UltraFeedback: `prompt` is the text of `u`). Other rows are returned unchanged
    (as a dict).
    """
    row = dict(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (is_conversational(chosen) and is_conversational(rejected)):
        return row
    shared = _shared_length(chosen, rejected)
    if row.get("prompt") is not None and not _prompt_repeated(row["prompt"], chosen[:shared]):
        return row
    row.update(
        prompt=list(chosen[:shared]), chosen=list(chosen[shared:]), rejected=list(rejected[shared:])
    )
    return row


# --------------------------------------------------------------------------- row checks
# Each check returns a problem description, or None when the row is fine.


def _messages_problem(column: str, value: list[Any]) -> str | None:
    for k, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            return f"column '{column}', message {k} is a {type(message).__name__}, not a dict"
        for key in ("role", "content"):
            if key not in message:
                return f"column '{column}', message {k} is missing '{key}'"
        if not isinstance(message["role"], str):
            return f"column '{column}', message {k}: 'role' must be a string"
        if isinstance(message["content"], list):  # content parts (images); see data/images.py
            problem = content_parts_problem(f"column '{column}', message {k}", message["content"])
            if problem:
                return problem
        elif not isinstance(message["content"], str):
            return f"column '{column}', message {k}: 'content' must be a string or a list of content parts"
    return None


def _text_problem(column: str, value: Any, *, allow_empty: bool = False) -> str | None:
    """`value` must be a string or a list of messages; empty only where allowed."""
    if value is None:
        return f"column '{column}' is missing"
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            return f"column '{column}' is empty"
        return None
    if isinstance(value, list):
        problem = _messages_problem(column, value)
        if problem:
            return problem
        if not allow_empty and not any(content_text(m["content"]).strip() for m in value):
            return f"column '{column}' is empty" + ("" if value else " (no messages)")
        return None
    return (
        f"column '{column}' must be a string or a list of {{'role', 'content'}} messages, "
        f"got {type(value).__name__}"
    )


def _check_prompt(row: Mapping[str, Any], *, allow_empty: bool = True) -> str | None:
    return _text_problem(
        "prompt", row.get("prompt"), allow_empty=allow_empty and isinstance(row.get("prompt"), str)
    )


def _check_prompt_only(row: Mapping[str, Any], **_: Any) -> str | None:
    return _check_prompt(row, allow_empty=False)


def uses_messages(row: Mapping[str, Any]) -> bool:
    """True for an SFT row whose `messages` are the example (it has no `completion`)."""
    return row.get("completion") is None and row.get("messages") is not None


def _check_sft(row: Mapping[str, Any], **_: Any) -> str | None:
    if uses_messages(row):
        messages = row["messages"]
        problem = _text_problem("messages", messages)
        if problem:
            return problem
        if not isinstance(messages, list):
            return "column 'messages' must be a list of {'role', 'content'} messages"
        if messages[-1]["role"] != "assistant":
            return (
                "the last message in 'messages' must come from the assistant (it is the "
                f"completion), got role {messages[-1]['role']!r}"
            )
        if not content_text(messages[-1]["content"]).strip():
            return "column 'messages': the last (assistant) message is empty"
        return None
    return _check_prompt(row) or _text_problem("completion", row.get("completion"))


def _check_pairwise(row: Mapping[str, Any], *, allow_identical_pairs: bool) -> str | None:
    for column in ("chosen", "rejected"):
        if row.get(column) is None:
            return f"column '{column}' is missing"
    if row.get("prompt") is None and not (
        is_conversational(row["chosen"]) and is_conversational(row["rejected"])
    ):
        return (
            "column 'prompt' is missing (without it, 'chosen' and 'rejected' must be "
            "conversations that share their leading prompt messages)"
        )
    problem = _text_problem("chosen", row["chosen"]) or _text_problem("rejected", row["rejected"])
    if problem:
        return problem
    if row["chosen"] == row["rejected"]:
        return None if allow_identical_pairs else _identical_problem()
    split = split_implicit_prompt(row)
    if split.get("prompt") is not row.get("prompt"):  # the prompt is their shared messages
        problem = _shared_prompt_problem(split)
        if problem:
            return problem
    problem = (
        _check_prompt(split)
        or _text_problem("chosen", split["chosen"])
        or _text_problem("rejected", split["rejected"])
    )
    return problem or _repeated_prompt_problem(split)


def _shared_prompt_problem(split: Mapping[str, Any]) -> str | None:
    """What is wrong with a pair whose prompt was taken from its shared leading messages."""
    if not split["prompt"]:
        return "'chosen' and 'rejected' share no leading prompt messages"
    for column in ("chosen", "rejected"):
        if not split[column]:
            return f"column '{column}' has no messages after the prompt it shares"
    return None


def _repeated_prompt_problem(row: Mapping[str, Any]) -> str | None:
    """A response that starts with a user turn after an explicit prompt would render the
    prompt twice; the responses must hold the assistant's turns."""
    for column in ("chosen", "rejected"):
        value = row[column]
        if is_conversational(value) and value[0]["role"] == "user":
            return (
                f"column '{column}' starts with a user message that is not the 'prompt' column's "
                "text; put only the assistant's turns in 'chosen' and 'rejected' (or drop "
                "'prompt' so their shared leading messages become the prompt)"
            )
    return None


def _identical_problem() -> str:
    return (
        "columns 'chosen' and 'rejected' are identical "
        "(pass allow_identical_pairs=True to keep such pairs)"
    )


def _check_ranked(row: Mapping[str, Any], **_: Any) -> str | None:
    problem = _check_prompt(row)
    if problem:
        return problem
    completions, scores = row.get("completions"), row.get("scores")
    if completions is None:
        return "column 'completions' is missing"
    if scores is None:
        return "column 'scores' is missing"
    if not isinstance(completions, list) or is_conversational(completions):
        return "column 'completions' must be a list of responses"
    if len(completions) < 2:
        return f"column 'completions' needs at least 2 responses, got {len(completions)}"
    problem = first_item_problem("completions", completions, _text_problem)
    if problem:
        return problem
    if not isinstance(scores, list):
        return f"column 'scores' must be a list of numbers, got {type(scores).__name__}"
    if len(scores) != len(completions):
        return f"column 'scores' has {len(scores)} values but 'completions' has {len(completions)}"
    return first_item_problem("scores", scores, number_problem)


def _check_unpaired(row: Mapping[str, Any], **_: Any) -> str | None:
    problem = _check_prompt(row) or _text_problem("completion", row.get("completion"))
    if problem:
        return problem
    label = row.get("label")
    if label is None:
        return "column 'label' is missing"
    if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
        return None
    return f"column 'label' must be true/false or 0/1, got {label!r}"


def _make_ratings_check(columns: list[str]) -> Callable[..., str | None]:
    def check(row: Mapping[str, Any], **_: Any) -> str | None:
        problem = _check_prompt(row) or _text_problem("completion", row.get("completion"))
        for column in columns:
            problem = problem or number_problem(column, row.get(column))
        return problem

    return check


def validate_rows(table: RowTable, kind: str, *, allow_identical_pairs: bool = False) -> None:
    """Check every row of `table` against format `kind`; raise `DataError` at the first bad one.

    The error names the file, the 1-based row and the problem: a missing column, a wrong
    type, an empty response, identical chosen and rejected (unless `allow_identical_pairs`),
    a message without role/content, a NaN score or rating, a missing or unreadable image, a
    placeholder count that differs from the row's image count (`alignkit.data.images`).
    """
    checks: dict[str, Callable[..., str | None]] = {
        "prompt": _check_prompt_only,
        "sft": _check_sft,
        "pairwise": _check_pairwise,
        "ranked": _check_ranked,
        "unpaired": _check_unpaired,
    }
    if kind == "ratings":
        columns = rating_columns(table)
        if not columns:
            raise DataError(
                table.source,
                None,
                "ratings data needs at least one numeric "
                "attribute column besides prompt and completion",
            )
        checks["ratings"] = _make_ratings_check(columns)
    if kind not in checks:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    check = checks[kind]
    for i, row in enumerate(table.rows):
        problem = check(row, allow_identical_pairs=allow_identical_pairs)
        if problem:
            raise table.error(i, problem)
    check_one_style(table, lambda row: _is_conversational_row(row, kind))
    check_number_columns(table)
    if uses_images(table):
        check_images(table)


def _is_conversational_row(row: Mapping[str, Any], kind: str) -> bool:
    """True when the columns a `kind` row is read from hold conversations (message lists)."""
    if kind == "sft" and uses_messages(row):
        return True
    columns = {"pairwise": ("prompt", "chosen", "rejected"), "ranked": ("prompt", "completions"),
               "prompt": ("prompt",)}.get(kind, ("prompt", "completion"))
    values = [row.get(column) for column in columns]
    if kind == "ranked" and isinstance(values[1], list):
        values = [values[0], *values[1]]
    return any(is_conversational(value) for value in values)
