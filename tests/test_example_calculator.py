"""examples/calculator_tools: the reward on worked examples, the data files (disjoint splits,
right answers, the warm-start dialogues' system prompt is the episode runner's), and run.py's
--dry-run on the tiny model end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from alignkit.agents.episodes import EpisodeRunner, PromptEnvironment
from alignkit.agents.example_tools import calculator
from alignkit.testing import build_tiny_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "calculator_tools"


def example_module(name: str):
    spec = importlib.util.spec_from_file_location(f"calculator_tools_{name}_under_test", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / name).read_text().splitlines()]


CALL = {"role": "assistant", "content": "<tool_call>...</tool_call>",
        "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}}]}


def test_correct_reads_every_number_and_needs_a_final_answer():
    """"964 * 494 = 476,216." holds 476216 -> 1; "47621" -> 0; an episode cut while still
    calling (its last turn a call whose text holds the number) -> 0."""
    reward = example_module("reward")
    assert reward.numbers_in("964 * 494 = 476,216.") == [964.0, 494.0, 476216.0]
    answered = [{"role": "tool", "content": "476216"}, {"role": "assistant", "content": "done"}]
    scores = reward.correct([], ["964 * 494 = 476,216.", "The answer is 47621.", '{"expression": "476216"}'],
                            ["476216"] * 3, [answered, answered, [CALL]])
    assert scores == [1.0, 0.0, 0.0]
    assert reward.correct([], ["It is -12.5"], ["-12.5"]) == [1.0]  # no conversation column: text only
    with pytest.raises(ValueError, match="answer column"):
        reward.correct([], ["1"], ["one"])


def test_call_bonus_counts_a_result_not_an_error():
    """0.1 for a tool result on top of correctness: right + result = 1.1, wrong + result = 0.1,
    wrong + only an error reply = 0."""
    reward = example_module("reward")
    result, error = {"role": "tool", "content": "5"}, {"role": "tool", "content": "Error: bad"}
    final = {"role": "assistant", "content": "5"}
    scores = reward.correct_with_call_bonus([], ["5", "6", "6"], ["5", "5", "5"],
                                            [[result, final], [result, final], [error, final]])
    assert scores == pytest.approx([1.1, 0.1, 0.0])


def test_data_files_are_disjoint_right_and_match_the_runner():
    train, heldout, warm = read("train.jsonl"), read("heldout.jsonl"), read("warmstart.jsonl")
    warm_questions = {row["messages"][1]["content"] for row in warm}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert not warm_questions & ({r["prompt"] for r in train} | {r["prompt"] for r in heldout})
    for row in train + heldout:
        expression = row["prompt"].removeprefix("What is ").removesuffix("?")
        assert calculator(expression) == row["answer"], row
    runner = EpisodeRunner(build_tiny_tokenizer(), tools=[calculator])
    system = runner.first_messages(PromptEnvironment(), {"prompt": "q"}, "test")[0]
    assert all(row["messages"][0] == system for row in warm)
    dialogue = warm[0]["messages"]
    assert dialogue[3]["content"] == calculator(json.loads(dialogue[2]["content"].split("\n")[1])["arguments"]
                                                ["expression"])
    runner.close()


def test_make_prompts_rewrites_the_same_files(tmp_path):
    example_module("make_prompts").main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "heldout.jsonl", "warmstart.jsonl"):
        assert (tmp_path / name).read_text() == (EXAMPLE / name).read_text(), name


def test_dry_run_measures_trains_and_writes_results(tmp_path):
    results_path = tmp_path / "results.json"
    run = example_module("run")
    results = run.main(["--dry-run", "--paths", "warm", "--results", str(results_path)])
    assert json.loads(results_path.read_text())["measured"].keys() == {"base", "warm", "warm+grpo"}
    for phase in results["measured"].values():
        for rate in ("called", "valid", "correct"):
            low, high = phase[rate]["wilson95"]
            assert phase[rate]["n"] == 4 and 0.0 <= low <= phase[rate]["rate"] <= high <= 1.0
    assert results["training"]["warm+grpo"]["steps"] == 1
    assert len(results["accuracy_change"]["warm+grpo - warm"]) == 3
