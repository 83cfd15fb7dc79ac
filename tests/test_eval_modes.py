"""`alignkit modes` (Echo Chamber's mode share): worked examples of the labelling and the shares,
the class-file errors, and a GRPO run on the tiny model whose rewarded mode (many e's) takes
over its checkpoints' outputs."""

from __future__ import annotations

import json

import pytest
from test_online import PROMPTS, one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)

from alignkit.cli import main as cli_main
from alignkit.eval.modes import (
    OTHER,
    dominant_mode,
    mode_shares,
    read_class_table,
    regex_classifier,
)
from alignkit.lab.modes_lab import ModesOptions, load_mode_classes, run_modes


def test_first_matching_class_wins_and_the_rest_is_other():
    classify = regex_classifier([("code", r"^\s*print\("), ("words", r"[A-Za-z]{3}")])
    labels = classify(["q"] * 4, ["print(3)", "the answer is 3", "42", "  print(x) and text"])
    assert labels == ["code", "words", OTHER, "code"]


def test_shares_worked_example():
    """labels a, a, b, c with classes (a, b, other): 2/4, 1/4, 0/4, and the unlisted c 1/4."""
    shares = mode_shares(["a", "a", "b", "c"], ["a", "b", OTHER])
    assert shares == {"a": 0.5, "b": 0.25, OTHER: 0.0, "c": 0.25}
    assert sum(shares.values()) == 1.0
    points = [{"shares": {"a": 0.2, "b": 0.8}}, {"shares": {"a": 0.9, "b": 0.1}}]
    assert dominant_mode(points) == {"class": "a", "first_share": 0.2, "last_share": 0.9}


@pytest.mark.parametrize("text, message", [
    ("- 3\n", "expected a mapping name: regex"),
    ("{}\n", "no classes"),
    ("a: '('\n", "class 'a': bad regex"),
    ("other: x\n", "'other' is the class of outputs no pattern matches"),
    ("- {name: a, pattern: x}\n- {name: a, pattern: y}\n", "a class name repeats"),
    ("a: 3\n", "entry 1 needs a name and a regex string"),
])
def test_bad_class_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "modes.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_class_table(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_class_spec_forms(tmp_path):
    (tmp_path / "classify.py").write_text(
        "def by_length(prompts, completions):\n    return ['long' if len(c) > 3 else 'short' for c in completions]\n"
        "by_length.classes = ['short', 'long']\n")
    names, classify = load_mode_classes(f"{tmp_path / 'classify.py'}:by_length")
    assert names == ["short", "long"] and classify(["p", "p"], ["ab", "abcd"]) == ["short", "long"]
    with pytest.raises(ValueError, match="no such file"):
        load_mode_classes(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="give a .yaml/.json class file or a classifier"):
        load_mode_classes("regexes")


def test_cli_errors_name_the_flag(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("e: e\n")
    assert cli_main(["modes", "--classes", str(tmp_path / "m.yaml")]) == 2
    assert "give --run DIR and/or --checkpoints" in capsys.readouterr().err
    assert cli_main(["modes", "--classes", str(tmp_path / "m.yaml"), "--run", str(tmp_path)]) == 2
    assert "not a training run (no config.yaml)" in capsys.readouterr().err


def test_grpo_amplifies_the_rewarded_mode(tiny_model_dir, tmp_path):
    """GRPO on the e-count reward for 30 steps, checkpoints every 10. Classes: `many_e` (3+ e's),
    `some_e` (1-2), other. The initial model writes ~0.3 e's per completion, so its outputs are
    mostly `other`; the trained policy's are mostly `many_e`: the dominant class at the end is
    many_e and its share rose from the initial model's. Measured shares (many_e, some_e, other) at
    steps 0, 10, 20, 30: (0, .34, .66), (0, .44, .56), (.31, .44, .25), (.75, .03, .22)."""
    run("grpo", tiny_model_dir, tmp_path / "run", steps=30, save_steps=10)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "modes.yaml").write_text("many_e: '(e[^e]*){3}'\nsome_e: e\n")
    result = run_modes(ModesOptions(classes=str(tmp_path / "modes.yaml"), run=str(tmp_path / "run"),
                                    prompts=str(prompts), n=8, max_new_tokens=8, output=str(tmp_path / "out"),
                                    no_progress=True))
    points = result["points"]
    assert [p["step"] for p in points] == [0, 10, 20, 30]
    assert result["classes"] == ["many_e", "some_e", OTHER]
    for p in points:
        assert p["samples"] == len(PROMPTS) * 8 and sum(p["counts"].values()) == p["samples"]
        assert sum(p["shares"].values()) == pytest.approx(1.0)
    dominant = result["dominant"]
    assert dominant["class"] == "many_e" and dominant["last_share"] > dominant["first_share"] + 0.5, points
    assert (tmp_path / "out" / "modes.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "modes.json").read_text())["dominant"] == dominant
