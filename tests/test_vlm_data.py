"""Image datasets: the `images` column, `{"type": "image"}` placeholders, and clear errors for
missing files, corrupt bytes and placeholder counts that do not match."""

from __future__ import annotations

import io
import json

import pytest

from alignkit.data import load_rows
from alignkit.data.errors import DataError
from alignkit.data.formats import validate_rows
from alignkit.data.images import content_text, open_image, sequence_placeholder_counts
from alignkit.data.table import RowTable
from alignkit.testing_vlm import draw_shape_image

QUESTION = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]


def _sft_row(image: str | object, answer: str = "red", placeholders: int = 1) -> dict:
    content = [{"type": "image"}] * placeholders + QUESTION[1:]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
    }


def _write(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for colour in ("red", "blue"):
        draw_shape_image("square", colour).save(tmp_path / "img" / f"{colour}.png")
    return tmp_path


def test_relative_paths_resolve_against_the_data_file(image_dir):
    path = _write(image_dir, [_sft_row("img/red.png"), _sft_row("img/blue.png", "blue")])
    table = load_rows(path)
    validate_rows(table, "sft")
    image = open_image(table.rows[1]["images"][0], image_dir)
    assert image.size == (56, 56) and image.getpixel((28, 28)) == (30, 60, 220)


def test_missing_image_names_file_row_and_path(image_dir):
    path = _write(image_dir, [_sft_row("img/red.png"), _sft_row("img/green.png")])
    with pytest.raises(DataError) as caught:
        validate_rows(load_rows(path), "sft")
    message = str(caught.value)
    assert message.startswith(f"{path}, row 2: images[0]: image 'img/green.png' not found")
    assert str(image_dir / "img" / "green.png") in message
    assert "\n" not in message


def test_corrupt_image_bytes_are_an_error(image_dir):
    (image_dir / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    path = _write(image_dir, [_sft_row("img/broken.png")])
    with pytest.raises(DataError, match=r"row 1: images\[0\]: image 'img/broken.png' cannot be read"):
        validate_rows(load_rows(path), "sft")
    with pytest.raises(DataError, match=r"images\[0\]: image bytes \(x.png\) cannot be read"):
        validate_rows(RowTable([_sft_row({"bytes": b"garbage", "path": "x.png"})]), "sft")


def test_placeholder_count_must_match_the_images(image_dir):
    path = _write(image_dir, [_sft_row("img/red.png"), _sft_row("img/red.png", placeholders=2)])
    with pytest.raises(DataError, match=r"row 2: the row has 1 image\(s\) but 2 \{'type': 'image'\} placeholder"):
        validate_rows(load_rows(path), "sft")
    no_images = _sft_row("img/red.png")
    del no_images["images"]
    with pytest.raises(DataError, match=r"row 1: the row has 0 image\(s\) but 1"):
        validate_rows(RowTable([no_images]), "sft")


def test_pil_images_and_bytes_are_accepted():
    buffer = io.BytesIO()
    draw_shape_image("circle", "green").save(buffer, format="PNG")
    rows = [_sft_row(draw_shape_image()), _sft_row({"bytes": buffer.getvalue(), "path": None}, "green")]
    table = RowTable(rows)
    validate_rows(table, "sft")
    assert open_image(rows[1]["images"][0], base_dir=None).getpixel((28, 28)) == (30, 180, 30)


def test_pairwise_placeholders_counted_per_sequence(image_dir):
    """Explicit prompt: prompt (1) + chosen (0) = 1 = images. Implicit prompt: the image sits in
    both chosen and rejected, each a whole sequence: 1 each."""
    prompt = [{"role": "user", "content": QUESTION}]
    explicit = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
        "images": [draw_shape_image()],
    }
    implicit = {
        "chosen": prompt + [{"role": "assistant", "content": "red"}],
        "rejected": prompt + [{"role": "assistant", "content": "blue"}],
        "images": [draw_shape_image()],
    }
    assert sequence_placeholder_counts(explicit) == [1, 1]
    assert sequence_placeholder_counts(implicit) == [1, 1]
    validate_rows(RowTable([explicit, implicit]), "pairwise")
    lopsided = {**explicit, "chosen": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}]}
    with pytest.raises(DataError, match="1 image\\(s\\) but 2"):
        validate_rows(RowTable([lopsided]), "pairwise")


def test_content_parts_are_checked_and_text_rows_stay_strict():
    bad_part = _sft_row(draw_shape_image())
    bad_part["messages"][0]["content"].append({"type": "video"})
    with pytest.raises(DataError, match="content part 3 must be"):
        validate_rows(RowTable([bad_part]), "sft")
    text_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                               {"role": "assistant", "content": "yes"}]}
    with pytest.raises(DataError, match="content-part lists .* are for rows with an 'images' column"):
        validate_rows(RowTable([text_parts]), "sft")
    with pytest.raises(DataError, match="column 'images' must be a list"):
        validate_rows(RowTable([{**_sft_row("x.png"), "images": "x.png"}]), "sft")
    empty_answer = _sft_row(draw_shape_image(), answer=" ")
    with pytest.raises(DataError, match="last \\(assistant\\) message is empty"):
        validate_rows(RowTable([empty_answer]), "sft")
    assert content_text(QUESTION) == "What colour is the square?"
