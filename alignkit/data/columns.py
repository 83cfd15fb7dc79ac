"""What the well-known columns hold, so every loader and check treats them alike.

Text columns stay strings whatever they look like (a CSV cell "3" is the text "3"); number
columns must hold a finite number in every row that uses them (a NaN `margin` would turn every
loss into NaN); id columns are labels, never numbers to learn from.
"""

from __future__ import annotations

# Columns whose values are text (or conversations): never converted to numbers.
TEXT_COLUMNS = frozenset(
    {"prompt", "completion", "messages", "chosen", "rejected", "completions", "system"}
)
# Per-row numbers some loss or report reads (the reward model's margin, published scores).
NUMBER_COLUMNS = ("margin", "score", "score_chosen", "score_rejected")
# Numeric bookkeeping columns: neither ratings nor numbers to convert.
ID_COLUMNS = frozenset({"id", "idx", "index", "uid", "row", "row_id", "example_id"})


def is_id_column(name: str) -> bool:
    """True for identifier columns (`id`, `prompt_id`, ...): labels, not quantities."""
    return name in ID_COLUMNS or name.endswith("_id")


def is_text_column(name: str) -> bool:
    """True for columns that hold text: the format's text columns and identifiers."""
    return name in TEXT_COLUMNS or is_id_column(name)
