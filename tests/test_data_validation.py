"""Format detection and row validation: every error names the file, the row and the problem."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.data import (
    DataError,
    RowTable,
    detect_kind,
    is_conversational,
    load_rows,
    split_implicit_prompt,
    validate_rows,
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"prompt": "p"}, "prompt"),
        ({"prompt": [user("p")]}, "prompt"),
        ({"prompt": "p", "completion": "c"}, "sft"),
        ({"prompt": [user("p")], "completion": [assistant("c")]}, "sft"),
        ({"messages": [user("p"), assistant("c")]}, "sft"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairwise"),
        (
            {"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "pairwise",
        ),
        (
            {"chosen": [user("p"), assistant("a")], "rejected": [user("p"), assistant("b")]},
            "pairwise",
        ),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, 0.0]}, "ranked"),
        ({"prompt": "p", "completion": "c", "label": True}, "unpaired"),
        ({"prompt": "p", "completion": "c", "helpfulness": 3, "safety": 0.5}, "ratings"),
        ({"prompt": "p", "completion": "c", "id": 17}, "sft"),
        ({"prompt": "p", "completion": "c", "source": "web"}, "sft"),
    ],
)
def test_detect_kind_from_rows_and_tables(row, kind):
    assert detect_kind(row) == kind
    assert detect_kind(RowTable([row, row])) == kind
    validate_rows(RowTable([row]), kind)  # every example row is valid for its own kind


def test_detect_kind_from_column_names():
    assert detect_kind(["prompt", "chosen", "rejected"]) == "pairwise"
    assert detect_kind({"prompt", "completion"}) == "sft"
    assert detect_kind(["messages"]) == "sft"


def test_detect_kind_failure_lists_the_formats():
    table = RowTable([{"question": "q", "answer": "a"}], [("qa.jsonl", 1)])
    with pytest.raises(DataError) as info:
        detect_kind(table)
    assert info.value.file == "qa.jsonl" and info.value.row is None
    message = str(info.value)
    assert "['answer', 'question']" in message
    for expected in (
        "{prompt, chosen, rejected}",
        "{messages}",
        "{prompt, completions, scores}",
        "{prompt, completion, label}",
    ):
        assert expected in message


def test_is_conversational():
    assert is_conversational([user("a"), assistant("b")])
    assert not is_conversational("text")
    assert not is_conversational([])
    assert not is_conversational([{"role": "user"}])
    assert is_conversational({"prompt": [user("a")], "completion": "x"})
    assert not is_conversational({"prompt": "a", "completion": "x"})


def test_implicit_prompt_split_takes_shared_leading_messages():
    row = {
        "chosen": [user("hi"), assistant("hello"), user("review?"), assistant("great")],
        "rejected": [
            user("hi"),
            assistant("hello"),
            user("review?"),
            assistant("awful"),
            user("why"),
            assistant("because"),
        ],
        "margin": 2.0,
    }
    split = split_implicit_prompt(row)
    assert split["prompt"] == [user("hi"), assistant("hello"), user("review?")]
    assert split["chosen"] == [assistant("great")]
    assert split["rejected"] == [assistant("awful"), user("why"), assistant("because")]
    assert split["margin"] == 2.0
    assert "prompt" not in row  # the input row is not modified
    explicit = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert split_implicit_prompt(explicit) == explicit


GOOD_PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("kind", "bad_row", "problem"),
    [
        ("pairwise", {"prompt": "p", "rejected": "b"}, "column 'chosen' is missing"),
        (
            "pairwise",
            {"prompt": "p", "chosen": "a", "rejected": None},
            "column 'rejected' is missing",
        ),
        ("pairwise", {"prompt": "p", "chosen": "  ", "rejected": "b"}, "column 'chosen' is empty"),
        ("pairwise", {"prompt": "p", "chosen": "a", "rejected": ""}, "column 'rejected' is empty"),
        (
            "pairwise",
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            "columns 'chosen' and 'rejected' are identical",
        ),
        (
            "pairwise",
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            "column 'prompt' must be a string or a list of {'role', 'content'} messages, got int",
        ),
        (
            "pairwise",
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            "column 'prompt', message 1 is missing 'content'",
        ),
        (
            "pairwise",
            {"prompt": [user("p")], "chosen": [{"content": "a"}], "rejected": "b"},
            "column 'chosen', message 1 is missing 'role'",
        ),
        ("pairwise", {"chosen": "a", "rejected": "b"}, "column 'prompt' is missing"),
        (
            "pairwise",
            {"chosen": [user("p"), assistant("a")], "rejected": [user("p")]},
            "column 'rejected' has no messages after the prompt it shares",
        ),
        ("sft", {"prompt": "p", "completion": ""}, "column 'completion' is empty"),
        ("sft", {"prompt": "p"}, "column 'completion' is missing"),
        (
            "sft",
            {"messages": [assistant("a"), user("b")]},
            "the last message in 'messages' must come from the assistant",
        ),
        ("sft", {"messages": "hello"}, "column 'messages' must be a list"),
        ("prompt", {"prompt": ""}, "column 'prompt' is empty"),
        (
            "ranked",
            {"prompt": "p", "completions": ["a"], "scores": [1.0]},
            "column 'completions' needs at least 2 responses, got 1",
        ),
        (
            "ranked",
            {"prompt": "p", "completions": ["a", "b"], "scores": [1.0]},
            "column 'scores' has 1 values but 'completions' has 2",
        ),
        (
            "ranked",
            {"prompt": "p", "completions": ["a", "b"], "scores": [1.0, "x"]},
            "column 'scores[1]' must be a number, got str 'x'",
        ),
        (
            "ranked",
            {"prompt": "p", "completions": ["a", "b"], "scores": [1.0, math.nan]},
            "column 'scores[1]' is NaN",
        ),
        (
            "ranked",
            {"prompt": "p", "completions": ["a", ""], "scores": [1.0, 0.0]},
            "column 'completions[1]' is empty",
        ),
        (
            "ranked",
            {"prompt": "p", "completions": ["a", "b"], "scores": 1.0},
            "column 'scores' must be a list of numbers, got float",
        ),
        (
            "unpaired",
            {"prompt": "p", "completion": "c", "label": 2},
            "column 'label' must be true/false or 0/1, got 2",
        ),
        (
            "unpaired",
            {"prompt": "p", "completion": "c", "label": "yes"},
            "column 'label' must be true/false or 0/1",
        ),
        (
            "ratings",
            {"prompt": "p", "completion": "c", "helpfulness": math.nan},
            "column 'helpfulness' is NaN",
        ),
        ("ratings", {"prompt": "p", "completion": "c"}, "column 'helpfulness' is missing"),
    ],
)
def test_validation_errors_name_file_row_and_problem(tmp_path, kind, bad_row, problem):
    good = {
        "pairwise": GOOD_PAIR,
        "sft": {"prompt": "p", "completion": "c"},
        "prompt": {"prompt": "p"},
        "ranked": {"prompt": "p", "completions": ["a", "b"], "scores": [1, 0]},
        "unpaired": {"prompt": "p", "completion": "c", "label": 0},
        "ratings": {"prompt": "p", "completion": "c", "helpfulness": 4},
    }[kind]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(good), "", json.dumps(good), json.dumps(bad_row), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n")  # json writes NaN as NaN
    table = load_rows(path)
    with pytest.raises(DataError) as info:
        validate_rows(table, kind)
    err = info.value
    assert (err.file, err.row) == (str(path), 4)
    assert problem in err.problem
    assert str(err).startswith(f"{path}, row 4: ")


def test_identical_pairs_can_be_allowed():
    table = RowTable([{"prompt": "p", "chosen": "same", "rejected": "same"}])
    validate_rows(table, "pairwise", allow_identical_pairs=True)
    with pytest.raises(DataError, match="identical"):
        validate_rows(table, "pairwise")


def test_csv_validation_error_reports_the_line(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,,b\n")
    with pytest.raises(DataError) as info:
        validate_rows(load_rows(path), "pairwise")
    assert str(info.value) == f"{path}, line 3: column 'chosen' is empty"


def test_unknown_kind_and_ratings_without_numbers():
    with pytest.raises(ValueError, match="unknown dataset kind"):
        validate_rows(RowTable([{"prompt": "p"}]), "preference")
    with pytest.raises(DataError, match="numeric attribute column"):
        validate_rows(RowTable([{"prompt": "p", "completion": "c"}]), "ratings")
