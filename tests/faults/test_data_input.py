"""Fault cases of data loading: CSV types, byte-order marks, encodings, split directories,
mixed row styles and per-row numbers."""

from __future__ import annotations

import json
import logging
import math

import datasets
import pytest

from alignkit.data import load_rows
from faults.helpers import assert_one_line_error, pairs, run_cli, write_jsonl


def train(algorithm: str, model, data, out, *extra: str):
    """`alignkit train ALGORITHM` on `data` for one step of a tiny model."""
    return run_cli("train", algorithm, "--model", model, "--data", data, "--output", out,
                   "--max-steps", "1", "--batch-size", "2", "--no-progress", *extra)


def write_csv(path, header: list[str], rows: list[list[str]], *, prefix: bytes = b"") -> str:
    text = "\n".join(",".join(cells) for cells in [header, *rows]) + "\n"
    path.write_bytes(prefix + text.encode("utf-8"))
    return str(path)


def test_csv_cells_that_look_like_numbers_stay_text(tiny_model_dir, tmp_path):
    """CSV whose prompts are "1", "2", ... and responses "true"/"0.5" -> they stay strings and dpo trains"""
    rows = [[str(i), "true", "0.5"] for i in range(1, 5)]
    data = write_csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected"], rows)
    assert load_rows(data).rows[0] == {"prompt": "1", "chosen": "true", "rejected": "0.5"}
    run = train("dpo", tiny_model_dir, data, tmp_path / "run")
    assert run.code == 0, run.err


def test_csv_margin_that_is_not_a_number_names_line_and_column(tiny_model_dir, tmp_path):
    """CSV `margin` cell "abc" on line 3 -> one-line error naming the file, line 3 and 'margin'"""
    rows = [[f"q{i}", f"good {i}", f"bad {i}", "abc" if i == 1 else "0.5"] for i in range(4)]
    data = write_csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected", "margin"], rows)
    assert_one_line_error(train("rm", tiny_model_dir, data, tmp_path / "run"), "train",
                          "pairs.csv", "line 3", "'margin'", "'abc'")


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_byte_order_mark_is_dropped(tiny_model_dir, tmp_path, suffix):
    """A JSONL/JSON/CSV file starting with a UTF-8 byte-order mark -> the mark is dropped and dpo trains"""
    rows = pairs(4)
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix == "json":
        text = json.dumps(rows)
    else:
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_rows(path).columns == ["prompt", "chosen", "rejected"]
    run = train("dpo", tiny_model_dir, path, tmp_path / "run")
    assert run.code == 0, run.err


@pytest.mark.parametrize("suffix, where", [("jsonl", "row 3"), ("csv", "line 3"), ("json", "line 3")])
def test_file_that_is_not_utf8_names_the_line(tiny_model_dir, tmp_path, suffix, where):
    """A data file with a Latin-1 byte on line 3 -> one-line error naming the file and line 3"""
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        lines = [json.dumps(r) for r in pairs(4)]
    elif suffix == "csv":
        lines = ["prompt,chosen,rejected"] + [f"{r['prompt']},{r['chosen']},{r['rejected']}" for r in pairs(4)]
    else:
        lines = ["["] + [json.dumps(r) + "," for r in pairs(3)] + [json.dumps(pairs(4)[3]), "]"]
    data = "\n".join(lines).encode("utf-8").split(b"\n")
    data[2] = data[2].replace(b"good", b"caf\xe9 good")
    path.write_bytes(b"\n".join(data) + b"\n")
    line = assert_one_line_error(train("dpo", tiny_model_dir, path, tmp_path / "run"), "train",
                                 f"pairs.{suffix}", where, "not valid UTF-8")
    assert "byte 0xe9" in line


def split_directory(tmp_path, layout: str):
    """A dataset directory with a 6-row train split and a 3-row test split in `layout`."""
    folder = tmp_path / layout
    train_rows, test_rows = pairs(6), [{**r, "prompt": "held out " + r["prompt"]} for r in pairs(3)]
    if layout == "jsonl":
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", train_rows)
        write_jsonl(folder / "test.jsonl", test_rows)
    elif layout == "parquet-shards":
        (folder / "data").mkdir(parents=True)
        (folder / "README.md").write_text("a dataset card")
        datasets.Dataset.from_list(train_rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
        datasets.Dataset.from_list(test_rows).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    elif layout == "split-folders":
        for name, rows in (("train", train_rows), ("test", test_rows)):
            (folder / name).mkdir(parents=True)
            write_jsonl(folder / name / "part-0.jsonl", rows[:2])
            write_jsonl(folder / name / "part-1.jsonl", rows[2:])
    else:  # save_to_disk
        datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows),
                              "test": datasets.Dataset.from_list(test_rows)}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("layout", ["jsonl", "parquet-shards", "split-folders", "save_to_disk"])
def test_directory_with_train_and_test_splits_trains_on_train(tiny_model_dir, tmp_path, caplog, layout):
    """--data DIR holding train and test splits -> trains on the train split only and logs the files it read"""
    folder = split_directory(tmp_path, layout)
    table = load_rows(folder)
    assert len(table) == 6 and not any(r["prompt"].startswith("held out") for r in table.rows)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignkit"):
        run = train("dpo", tiny_model_dir, folder, tmp_path / "run")
    assert run.code == 0, run.err
    assert "split 'train'" in caplog.text
    if layout == "jsonl":
        assert "reading train.jsonl" in caplog.text and "test.jsonl" not in caplog.text


def test_split_flag_chooses_another_split(tmp_path, tiny_model_dir, caplog):
    """--split test on a directory with train.jsonl and test.jsonl -> trains on test.jsonl"""
    folder = split_directory(tmp_path, "jsonl")
    table = load_rows(folder, split="test")
    assert len(table) == 3 and all(r["prompt"].startswith("held out") for r in table.rows)
    with caplog.at_level(logging.INFO, logger="alignkit"):
        run = train("dpo", tiny_model_dir, folder, tmp_path / "run", "--split", "test")
    assert run.code == 0, run.err
    assert "reading test.jsonl" in caplog.text


def test_unknown_split_lists_the_splits_found(tmp_path, tiny_model_dir):
    """--split validation when only train and test exist -> one-line error listing the splits found"""
    folder = split_directory(tmp_path, "jsonl")
    assert_one_line_error(train("dpo", tiny_model_dir, folder, tmp_path / "run", "--split", "validation"),
                          "train", "no split 'validation'", "test, train")


def test_directory_of_files_without_split_names_reads_all_and_logs_them(tmp_path, caplog):
    """--data DIR with a.jsonl and b.jsonl (no split names) -> all files are read, and logged"""
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", pairs(2))
    write_jsonl(folder / "b.jsonl", pairs(3))
    with caplog.at_level(logging.INFO, logger="alignkit"):
        table = load_rows(folder)
    assert len(table) == 5
    assert "a.jsonl, b.jsonl" in caplog.text


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


MIXED_STYLES = {
    "conversation-among-plain": ("dpo", pairs(3) + [{"prompt": [user("hi")], "chosen": [assistant("a")],
                                                     "rejected": [assistant("b")]}] + pairs(2)),
    "plain-among-conversations": ("dpo", [{"prompt": [user(f"q{i}")], "chosen": [assistant(f"a{i}")],
                                           "rejected": [assistant(f"b{i}")]} for i in range(3)]
                                  + [pairs(1)[0]]),
    "messages-among-completions": ("sft", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
                                   + [{"messages": [user("hi"), assistant("hello")]}]),
}


@pytest.mark.parametrize("case", sorted(MIXED_STYLES))
def test_one_conversational_row_among_plain_rows_is_an_error(tiny_model_dir, tmp_path, case):
    """One conversational (messages) row among plain-text rows, or the reverse -> one-line error naming that row"""
    algorithm, rows = MIXED_STYLES[case]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert_one_line_error(train(algorithm, tiny_model_dir, data, tmp_path / "run"), "train",
                          "rows.jsonl", "row 4", "use one style for every row")


@pytest.mark.parametrize("bad, problem", [(math.nan, "is NaN"), (math.inf, "is infinite"),
                                          ("0.5", "must be a number"), (None, "is missing")])
def test_margin_that_is_not_a_finite_number_names_the_row(tiny_model_dir, tmp_path, bad, problem):
    """A NaN, infinite, text or missing `margin` in row 3 -> one-line error naming the file, row 3 and 'margin'"""
    rows = [{**r, "margin": 0.5} for r in pairs(4)]
    rows[2]["margin"] = bad
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert_one_line_error(train("rm", tiny_model_dir, data, tmp_path / "run"), "train",
                          "pairs.jsonl", "row 3", "'margin'", problem)


def test_published_score_column_that_is_nan_names_the_row(tiny_model_dir, tmp_path):
    """A NaN `score_chosen` (UltraFeedback's score columns) in row 2 -> one-line error naming row 2 and the column"""
    rows = [{**r, "score_chosen": 8.0, "score_rejected": 4.0} for r in pairs(4)]
    rows[1]["score_chosen"] = math.nan
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert_one_line_error(train("dpo", tiny_model_dir, data, tmp_path / "run"), "train",
                          "pairs.jsonl", "row 2", "'score_chosen' is NaN")


def test_margins_list_with_nan_names_the_row(tiny_model_dir, tmp_path):
    """A MODPO `margins` list holding NaN in row 2 -> one-line error naming row 2 and the column"""
    rows = [{**r, "margins": [0.5]} for r in pairs(4)]
    rows[1]["margins"] = [math.nan]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = train("modpo", tiny_model_dir, data, tmp_path / "run", "--set", "weights=[1.0, 0.5]")
    assert_one_line_error(run, "train",
                          "pairs.jsonl", "row 2", "'margins[0]' is NaN")
