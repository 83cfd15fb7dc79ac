"""Loading every supported source, with origins that point at the editor's line/row."""

from __future__ import annotations

import json

import datasets
import pytest

from alignkit.data import DataError, RowTable, load_rows

PAIRS = [
    {"prompt": "Say hi", "chosen": "hi", "rejected": "go away"},
    {"prompt": "Two plus two?", "chosen": "4", "rejected": "5"},
    {"prompt": "Review", "chosen": "great", "rejected": "awful", "margin": 1.5},
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_origins_count_blank_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [json.dumps(PAIRS[0]), "", json.dumps(PAIRS[1]), "   ", json.dumps(PAIRS[2])],
    )
    table = load_rows(path)
    assert len(table) == 3
    assert table.rows == PAIRS
    assert [row for _, row in table.origins] == [1, 3, 5]
    assert table.origin(2) == (str(path), 5)
    assert table.columns == ["prompt", "chosen", "rejected", "margin"]


def test_jsonl_bad_line_after_blank_names_line(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl", [json.dumps(PAIRS[0]), "", json.dumps(PAIRS[1]), '{"prompt": "x",']
    )
    with pytest.raises(DataError) as info:
        load_rows(path)
    err = info.value
    assert (err.file, err.row) == (str(path), 4)
    assert "data.jsonl, row 4: invalid JSON" in str(err)


def test_jsonl_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(PAIRS[0]), "[1, 2]"])
    with pytest.raises(DataError, match=r"data\.jsonl, row 2: expected a JSON object, got list"):
        load_rows(path)


def test_json_array_and_wrapped_object(tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps(PAIRS, indent=2))
    table = load_rows(array)
    assert table.rows == PAIRS
    assert table.origins == [(str(array), 1), (str(array), 2), (str(array), 3)]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": PAIRS}))
    assert load_rows(wrapped).rows == PAIRS


def test_json_array_with_non_object_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([PAIRS[0], PAIRS[1], "oops"]))
    with pytest.raises(DataError, match=r"data\.json, row 3: expected an object"):
        load_rows(path)


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    messages = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ] * 2
    datasets.Dataset.from_list(messages).to_parquet(str(path))
    table = load_rows(path)
    assert table.rows == messages
    assert table.origins == [(str(path), 1), (str(path), 2)]


def test_csv_lines_count_the_header_and_types_are_converted(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "prompt,completion,label,score\n"
        "Say hi,hi,true,0.5\n"
        '"multi\nline",ok,false,2\n'
        "\n"
        "Review,great,true,1\n"
    )
    table = load_rows(path)
    assert table.rows[0] == {"prompt": "Say hi", "completion": "hi", "label": True, "score": 0.5}
    assert table.rows[1]["prompt"] == "multi\nline"
    assert table.rows[2]["score"] == 1.0
    # Data row 1 is line 2; the quoted record spans lines 3-4; a blank line 5 is skipped.
    assert [row for _, row in table.origins] == [2, 3, 6]
    assert str(table.error(2, "bad")) == f"{path}, line 6: bad"


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"data\.csv, line 3: expected 2 fields, found 3"):
        load_rows(path)


def test_directory_of_two_files_keeps_each_file_name(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [json.dumps(PAIRS[2])])
    (folder / "a.json").write_text(json.dumps(PAIRS[:2]))
    (folder / "README.md").write_text("not data")
    table = load_rows(folder)
    assert table.rows == PAIRS
    assert table.origins == [
        (str(folder / "a.json"), 1),
        (str(folder / "a.json"), 2),
        (str(folder / "b.jsonl"), 1),
    ]


def test_list_of_dicts_and_datasets_objects():
    table = load_rows(PAIRS)
    assert table.rows == PAIRS and table.origins == [("<list>", 1), ("<list>", 2), ("<list>", 3)]
    with pytest.raises(DataError, match=r"<list>, row 2: expected an object"):
        load_rows([PAIRS[0], "x"])
    dataset = datasets.Dataset.from_list(PAIRS[:2])
    assert load_rows(dataset).rows == PAIRS[:2]
    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([1])})
    assert load_rows(splits, split="test").rows == [PAIRS[1]]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_rows(splits, split="validation")


def test_missing_paths_and_unknown_extensions(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows("data/missing.parquet")
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows("./somewhere")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_rows(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_rows(empty)


def test_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ["", ""])
    with pytest.raises(DataError, match="no rows"):
        load_rows(path)


def test_hub_id_offline_gives_data_error(monkeypatch):
    def fake_load_dataset(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match="org/some-dataset: .*hub dataset failed"):
        load_rows("org/some-dataset")


def test_hub_id_uses_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    table = load_rows("org/prefs", split="test")
    assert calls == [("org/prefs", "test")]
    assert table.origins[1] == ("org/prefs", 2)


def test_row_table_select_split_and_error():
    table = RowTable(
        [{"prompt": str(i)} for i in range(10)], [("f.jsonl", i + 1) for i in range(10)]
    )
    picked = table.select([3, 1])
    assert picked.rows == [{"prompt": "3"}, {"prompt": "1"}]
    assert picked.origins == [("f.jsonl", 4), ("f.jsonl", 2)]
    train, held = table.split(0.3, seed=1)
    assert len(train) == 7 and len(held) == 3
    assert sorted(train.origins + held.origins) == sorted(table.origins)
    assert table.split(0.3, seed=1)[1].rows == held.rows
    assert len(table.split(2, seed=0)[1]) == 2
    with pytest.raises(ValueError):
        table.split(10, seed=0)
    err = picked.error(0, "column 'chosen' is empty")
    assert (err.file, err.row, err.problem) == ("f.jsonl", 4, "column 'chosen' is empty")
    assert str(err) == "f.jsonl, row 4: column 'chosen' is empty"
    assert str(DataError("f.jsonl", None, "no rows")) == "f.jsonl: no rows"


def test_json_file_holding_json_lines_and_trailing_slash_path(tmp_path):
    path = tmp_path / "mislabelled.json"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n")
    table = load_rows(path)
    assert table.rows == PAIRS[:2] and [row for _, row in table.origins] == [1, 3]
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows("my_data/")


def test_detect_kind_accepts_a_datasets_dataset():
    from alignkit.data import detect_kind

    assert detect_kind(datasets.Dataset.from_list(PAIRS[:2])) == "pairwise"
