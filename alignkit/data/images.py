"""Images in datasets: the `images` column and `{"type": "image"}` placeholders (TRL's VLM format).

A row of any kind may carry `images`: a list of image files (paths relative to the data
file's directory, or absolute), PIL images (a `datasets` Image feature decodes to them) or
`{"bytes": ..., "path": ...}` dicts (an undecoded Image feature). Message contents may then be
lists of content parts, `{"type": "text", "text": ...}` and `{"type": "image"}`, as
transformers' chat templates expect:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
     "images": ["shapes/0001.png"]}

Every sequence the model reads from a row (prompt + completion, prompt + chosen, prompt +
rejected, each ranked completion, or the messages) must hold as many placeholders as the row
has images; validation opens every image file once (PIL `verify`, no full decode).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignkit.data.table import RowTable

IMAGE_PART_TYPES = ("text", "image")
_RESPONSE_COLUMNS = ("completion", "chosen", "rejected")


def content_text(content: Any) -> str:
    """The text of a message content: the string, or its text parts joined (images dropped).

    >>> content_text([{"type": "image"}, {"type": "text", "text": "What colour?"}])
    'What colour?'
    """
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text")


def content_parts_problem(where: str, content: list[Any]) -> str | None:
    """Why a content-part list is malformed (`where` names the column and message), or None."""
    for k, part in enumerate(content, start=1):
        if not isinstance(part, Mapping) or part.get("type") not in IMAGE_PART_TYPES:
            return f"{where}, content part {k} must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {part!r}"
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            return f"{where}, content part {k}: a text part needs a string 'text'"
    return None


def has_content_parts(value: Any) -> bool:
    """True when `value` is a message list with at least one content-part list."""
    return isinstance(value, list) and any(
        isinstance(m, Mapping) and isinstance(m.get("content"), list) for m in value
    )


def count_placeholders(value: Any) -> int:
    """Number of `{"type": "image"}` parts in a message list (0 for text or anything else)."""
    if not isinstance(value, list):
        return 0
    return sum(
        1
        for message in value
        if isinstance(message, Mapping) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping) and part.get("type") == "image"
    )


def sequence_placeholder_counts(row: Mapping[str, Any]) -> list[int]:
    """Placeholders in each sequence the model reads from `row` (see the module docstring)."""
    prompt = count_placeholders(row.get("prompt"))
    responses = [row[c] for c in _RESPONSE_COLUMNS if row.get(c) is not None]
    if isinstance(row.get("completions"), list):
        responses += row["completions"]
    if not responses:
        return [count_placeholders(row.get("messages")) if row.get("messages") is not None else prompt]
    return [prompt + count_placeholders(response) for response in responses]


def image_base_dir(file: str) -> Path:
    """The directory relative image paths of rows from `file` are resolved against (the data
    file's own directory; the working directory for in-memory rows)."""
    path = Path(file)
    return path.parent if path.is_file() else Path(".")


def open_image(item: Any, base_dir: Path, *, verify_only: bool = False) -> Any:
    """`item` (path, PIL image or `{"bytes", "path"}` dict) as an RGB PIL image; with
    `verify_only`, only check it is readable (PIL `verify`) and return None. Raises ValueError
    saying what is wrong (missing file, not an image, unreadable bytes)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return None if verify_only else item.convert("RGB")
    if isinstance(item, Mapping) and (item.get("bytes") or item.get("path")):
        source: Any = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        shown = f"image bytes ({item.get('path') or 'no path'})" if item.get("bytes") else f"image {item['path']!r}"
    elif isinstance(item, str | Path) and str(item):
        source = Path(item) if Path(item).is_absolute() else base_dir / item
        shown = f"image {str(item)!r}"
        if not source.is_file():
            raise ValueError(f"{shown} not found (looked for {str(source)!r})")
    else:
        raise ValueError(f"an image must be a file path, a PIL image or {{'bytes', 'path'}}, got {type(item).__name__}")
    try:
        with Image.open(source) as image:
            if verify_only:
                image.verify()
                return None
            return image.convert("RGB")
    except UnidentifiedImageError as err:
        raise ValueError(f"{shown} cannot be read: not an image format PIL identifies") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{shown} cannot be read: {type(err).__name__}: {err}") from err


def check_images(table: RowTable) -> None:
    """Check the `images` column and the placeholders of every row; raise `DataError` at the
    first problem: `images` not a list, an image missing or unreadable, a sequence whose
    placeholder count differs from the row's image count, or content-part lists in a row
    without `images` that has no placeholders either (text data: write string contents)."""
    for i, row in enumerate(table.rows):
        images = row.get("images")
        if images is not None and not isinstance(images, list | tuple):
            raise table.error(i, f"column 'images' must be a list of images, got {type(images).__name__}")
        images = list(images or [])
        base_dir = image_base_dir(table.origin(i)[0])
        for k, item in enumerate(images):
            try:
                open_image(item, base_dir, verify_only=True)
            except ValueError as err:
                raise table.error(i, f"images[{k}]: {err}") from None
        counts = sequence_placeholder_counts(row)
        wrong = [count for count in counts if count != len(images)]
        if wrong:
            raise table.error(
                i,
                f"the row has {len(images)} image(s) but {wrong[0]} {{'type': 'image'}} placeholder(s) "
                "in a sequence; every prompt + response needs one placeholder per image",
            )
        if not images and any(has_content_parts(row.get(c)) for c in row if c != "images"):
            raise table.error(
                i, "content-part lists ({'type': ...}) are for rows with an 'images' column; "
                "write plain string contents for text-only rows"
            )


def uses_images(table: RowTable) -> bool:
    """True when any row has an `images` column or content-part lists."""
    return any(
        row.get("images") is not None or any(has_content_parts(value) for value in row.values())
        for row in table.rows
    )
