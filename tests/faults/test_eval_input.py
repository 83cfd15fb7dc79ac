"""Fault cases of evaluation: eval-rm on a model that is not a reward model, where `alignkit
eval` and `alignkit overopt` write by default, and eval's progress bars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults.helpers import assert_one_line_error, pairs, run_cli, write_jsonl

PROMPTS = [{"prompt": "Say something"}, {"prompt": "Tell me a story"}]
EVAL = ["--reward", "length:3", "--samples", "2", "--max-new-tokens", "4", "--no-embeddings"]


def test_eval_rm_on_a_causal_lm_is_refused(tiny_model_dir, tmp_path):
    """alignkit eval-rm --model CAUSAL_LM -> one-line error: not a reward model (no accuracy of a random head)"""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    run = run_cli("eval-rm", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "rm.json")
    assert_one_line_error(run, "eval-rm", str(tiny_model_dir), "not a reward model", "score.weight")
    assert not (tmp_path / "rm.json").exists()


@pytest.mark.parametrize("verb", ["eval", "overopt"])
def test_eval_and_overopt_write_under_runs_by_default(tiny_model_dir, tmp_path, monkeypatch, verb):
    """alignkit eval / alignkit overopt without --output in the source tree -> results go to runs/alignkit-eval/ and runs/alignkit-overopt/ (git-ignored), not ./alignkit-eval/"""
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    if verb == "eval":
        run = run_cli("eval", "--model", tiny_model_dir, "--prompts", data, *EVAL)
        written = work / "runs" / "alignkit-eval" / "eval.json"
    else:
        run = run_cli("overopt", "--model", tiny_model_dir, "--prompts", data, "--proxy", "length:3",
                      "--gold", "length:5", "--num-prompts", "2", "--n-max", "3", "--max-new-tokens", "4")
        written = work / "runs" / "alignkit-overopt" / "overopt.json"
    assert run.code == 0, run.err
    assert json.loads(written.read_text())
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    gitignore = Path(__file__).resolve().parents[2] / ".gitignore"
    assert "runs/" in gitignore.read_text().split()


def test_eval_shows_progress_on_a_terminal(tiny_model_dir, tmp_path, monkeypatch):
    """alignkit eval on a terminal -> progress bars for sampling and scoring on stderr; none with --no-progress or when stderr is not a terminal"""
    import alignkit.lab.eval_command as eval_command

    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    piped = run_cli("eval", "--model", tiny_model_dir, "--prompts", data, *EVAL, "--output", tmp_path / "a")
    monkeypatch.setattr(eval_command, "stderr_is_tty", lambda: True)
    shown = run_cli("eval", "--model", tiny_model_dir, "--prompts", data, *EVAL, "--output", tmp_path / "b")
    hidden = run_cli("eval", "--model", tiny_model_dir, "--prompts", data, *EVAL, "--output", tmp_path / "c",
                     "--no-progress")
    assert piped.code == shown.code == hidden.code == 0, shown.err
    assert "sampling policy" in shown.err and "scoring policy" in shown.err
    assert "sampling policy" not in piped.err and "sampling policy" not in hidden.err
    results = [json.loads((tmp_path / d / "eval.json").read_text())["completions"] for d in "abc"]
    assert results[0] == results[1] == results[2]  # the bars change nothing


SAMPLE = {"prompt": "Write a short review.", "completion": " It was good."}


@pytest.mark.parametrize(
    "name, content, extra, needles",
    [
        ("missing.jsonl", [{**SAMPLE, "score": 1.0}, dict(SAMPLE)], [],
         ["missing.jsonl, row 2", "column 'score' is missing"]),
        ("none.jsonl", [dict(SAMPLE)], [],
         ["none.jsonl, row 1", "column 'score' (the true score) is missing", "--score-column"]),
        ("text.jsonl", [{**SAMPLE, "passed": 0.5}, {**SAMPLE, "passed": "yes"}], ["--score-column", "passed"],
         ["text.jsonl, row 2", "column 'passed' must be a number, got str 'yes'"]),
        ("cells.csv", "prompt,completion,pass_rate\nWrite,good,0.5\nWrite,bad,n/a\n", ["--score-column", "pass_rate"],
         ["cells.csv, line 3", "column 'pass_rate' (the true score) must be a number, got 'n/a'"]),
        ("pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "score": 1.0}], [],
         ["pairs.jsonl, row 1", "column 'completion' is missing"]),
    ],
)
def test_eval_rm_r2_bad_true_scores_named_before_loading(tiny_model_dir, tmp_path, no_model_loads, name,
                                                         content, extra, needles):
    """alignkit eval-rm --r2 on samples whose true score is missing, text, or a CSV cell that is not a number (or on pairs) -> one-line error naming the file and row, before the model loads"""
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)
    run = run_cli("eval-rm", "--model", tiny_model_dir, "--data", path, "--r2", *extra)
    assert_one_line_error(run, "eval-rm", *needles)


@pytest.mark.parametrize(
    "extra, needle",
    [(["--score-column", "pass_rate"], "add --r2"), (["--r2", "--consistency", "DATA"], "without --r2")],
)
def test_eval_rm_r2_flag_combinations_refused(tiny_model_dir, tmp_path, no_model_loads, extra, needle):
    """alignkit eval-rm --score-column without --r2, or --r2 with --consistency -> a usage error naming the flags, before the model loads"""
    data = write_jsonl(tmp_path / "samples.jsonl", [{**SAMPLE, "score": 1.0}])
    run = run_cli("eval-rm", "--model", tiny_model_dir, "--data", data,
                  *[str(data) if arg == "DATA" else arg for arg in extra])
    assert run.code == 2 and needle in run.err, run.err
