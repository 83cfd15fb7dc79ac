"""Runs that cannot learn say so: every step skipped, every pair identical after truncation,
rewards without variance, a group baseline without a group; and truncation is counted in
metrics.jsonl. (The policy: alignkit/training/run/degenerate.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import alignkit
from faults.helpers import assert_one_line_error, run_cli, write_jsonl

LONG_PROMPT = "Question {i}: " + "please answer the question briefly " * 4


@pytest.fixture(autouse=True)
def warnings_captured(caplog):
    caplog.set_level(logging.WARNING, logger="alignkit")
    return caplog


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a NaN final norm: every loss and gradient is NaN."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    out = tmp_path_factory.mktemp("nan-model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def sft_rows(n: int = 4) -> list[dict]:
    return [{"prompt": f"Say {i}.", "completion": f" number {i} is fine"} for i in range(n)]


def truncated_pairs(n: int) -> list[dict]:
    """Pairs that differ only after their shared first tokens; with a long prompt and
    --max-length 16 each response keeps one token ("The"), so chosen == rejected."""
    return [{"prompt": LONG_PROMPT.format(i=i), "chosen": "The answer is yes", "rejected": "The answer is no"}
            for i in range(n)]


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def train_args(algorithm, model, data, out, *extra) -> list:
    return ["train", algorithm, "--model", model, "--data", data, "--output", out, "--no-progress", *extra]


def test_every_step_skipped_is_an_error(nan_model_dir, tmp_path, warnings_captured):
    """Every step skipped (NaN loss: weights with NaN) -> a warning at the first, then a one-line error naming --allow-degenerate; no final/"""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    run = run_cli(*train_args("sft", nan_model_dir, data, tmp_path / "run", "--max-steps", "3", "--batch-size", "2"))
    assert_one_line_error(run, "train", "cannot learn", "steps 1-3", "not finite", "--allow-degenerate")
    assert "step 1: the loss or gradient was not finite" in warnings(warnings_captured)
    assert [r["skipped_steps"] for r in metrics_rows(tmp_path / "run")] == [1, 2, 3]
    assert not (tmp_path / "run" / "final").exists()


def test_allow_degenerate_turns_the_error_into_a_warning(nan_model_dir, tmp_path, warnings_captured):
    """Every step skipped with --allow-degenerate -> a warning, the run finishes and writes final/"""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    run = run_cli(*train_args("sft", nan_model_dir, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "2",
                              "--allow-degenerate"))
    assert run.code == 0, run.err
    assert "cannot learn" in warnings(warnings_captured) and "--allow-degenerate: continuing" in warnings(
        warnings_captured)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_a_long_run_that_cannot_learn_stops_after_ten_steps(nan_model_dir, tmp_path):
    """--max-steps 50 and every step skipped -> the error comes after step 10, not step 50"""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    run = run_cli(*train_args("sft", nan_model_dir, data, tmp_path / "run", "--max-steps", "50", "--batch-size", "2"))
    assert_one_line_error(run, "train", "steps 1-10")
    assert [r["step"] for r in metrics_rows(tmp_path / "run")] == list(range(1, 11))


def test_all_pairs_identical_after_truncation_is_an_error_before_training(tiny_model_dir, tmp_path):
    """A prompt near --max-length cuts every response to one token, so chosen == rejected -> one-line error before training"""
    data = write_jsonl(tmp_path / "pairs.jsonl", truncated_pairs(4))
    run = run_cli(*train_args("dpo", tiny_model_dir, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "2",
                              "--max-length", "16", "--max-prompt-length", "64"))
    assert_one_line_error(run, "train", "all 4 of 4 training pairs are identical after truncation", "--max-length",
                          "--allow-degenerate")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not metrics_rows(tmp_path / "run")


def test_some_pairs_identical_after_truncation_warn_with_the_count(tiny_model_dir, tmp_path, warnings_captured):
    """Some pairs identical after truncation -> a warning with the count (and data/identical_pairs); the run goes on"""
    rows = truncated_pairs(4) + [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = run_cli(*train_args("dpo", tiny_model_dir, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "4",
                              "--max-length", "16", "--max-prompt-length", "64"))
    assert run.code == 0, run.err
    text = warnings(warnings_captured)
    assert "4 of 8 training pairs are identical after truncation" in text
    # length bucketing puts the four long pairs in one batch: that step teaches nothing
    assert "every pair of the batch was identical after truncation" in text
    first = metrics_rows(tmp_path / "run")[0]
    assert first["data/identical_pairs"] == 4 and first["data/truncated_prompts"] == 4


def test_truncation_counts_reach_metrics_jsonl(tiny_model_dir, tmp_path, warnings_captured):
    """Responses cut by --max-length -> counted in the log and as data/truncated_* in the first metrics.jsonl row"""
    warnings_captured.set_level(logging.INFO, logger="alignkit")
    rows = [{"prompt": f"Say {i}.", "completion": " the quick brown fox jumps over the lazy dog" * (i % 2 + 1)}
            for i in range(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    run = run_cli(*train_args("sft", tiny_model_dir, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "2",
                              "--max-length", "12"))
    assert run.code == 0, run.err
    first, second = metrics_rows(tmp_path / "run")
    assert first["data/examples"] == 4 and first["data/truncated_responses"] == 4
    assert first["data/truncated_prompts"] == 0 and "data/identical_pairs" not in first
    assert not any(key.startswith("data/") for key in second)  # run totals: once, not every step
    assert any("4 responses truncated" in r.getMessage() for r in warnings_captured.records)


def test_online_prompt_truncation_reaches_metrics_jsonl(tiny_model_dir, tmp_path):
    """Online prompts longer than --max-prompt-length -> data/truncated_prompts in the first metrics.jsonl row"""
    prompts = [{"prompt": LONG_PROMPT.format(i=i)} for i in range(3)] + [{"prompt": "Hi"}]
    result = alignkit.train("rloo", model=str(tiny_model_dir), data=prompts, output_dir=tmp_path / "run",
                            reward=lambda prompts, completions, **kw: [float(i) for i in range(len(completions))],
                            max_steps=1, batch_size=2, max_prompt_length=8, group_size=2, max_new_tokens=2,
                            beta=0.0, progress=False)
    first = metrics_rows(tmp_path / "run")[0]
    assert first["data/examples"] == 4 and first["data/truncated_prompts"] == 3
    assert result.metrics["data/truncated_prompts"] == 3


def test_group_baseline_with_group_size_one_is_an_error(tiny_model_dir, tmp_path):
    """grpo with --set group_size=1 (every group-normalised advantage is 0) -> one-line error before anything loads"""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}] * 2)
    run = run_cli(*train_args("grpo", tiny_model_dir, data, tmp_path / "run", "--max-steps", "1", "--reward",
                              "length", "--set", "group_size=1"))
    assert_one_line_error(run, "train", "group_size=1", "'grpo'", "advantage is 0", "--allow-degenerate")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_group_size_one_with_allow_degenerate_trains_with_a_warning(tiny_model_dir, tmp_path, warnings_captured):
    """grpo with group_size=1 and --allow-degenerate -> warnings (up front, and no reward variance in any group); the run finishes"""
    alignkit.train("grpo", model=str(tiny_model_dir), data=[{"prompt": "Hi"}] * 2, output_dir=tmp_path / "run",
                   reward=lambda prompts, completions, **kw: [float(len(c)) for c in completions], max_steps=1,
                   batch_size=2, group_size=1, max_new_tokens=2, allow_degenerate=True, progress=False)
    text = warnings(warnings_captured)
    assert "group_size=1" in text and "did not vary within any prompt group" in text
    assert (tmp_path / "run" / "final").exists()


def test_constant_reward_is_an_error(tiny_model_dir, tmp_path, warnings_captured):
    """A reward function that returns a constant (zero reward variance on every step) -> one-line error after the run's steps"""
    reward = tmp_path / "flat.py"
    reward.write_text("def reward(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "Tell me"}])
    run = run_cli(*train_args("grpo", tiny_model_dir, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "2",
                              "--reward", f"{reward}:reward", "--set", "group_size=2", "--set",
                              "max_new_tokens=2"))
    assert_one_line_error(run, "train", "cannot learn", "steps 1-2", "did not vary", "--reward")
    assert "step 1: the rewards did not vary" in warnings(warnings_captured)
    assert [r["step"] for r in metrics_rows(tmp_path / "run")] == [1, 2]


def test_reward_flat_on_some_steps_only_warns(tiny_model_dir, tmp_path, warnings_captured):
    """Rewards without variance on the first step only -> one warning; the run finishes"""
    calls = []

    def flat_at_first(prompts, completions, **kw):
        calls.append(1)
        return [1.0] * len(completions) if len(calls) == 1 else [float(i) for i in range(len(completions))]

    alignkit.train("rloo", model=str(tiny_model_dir), data=[{"prompt": "Hi"}] * 2, output_dir=tmp_path / "run",
                   reward=flat_at_first, max_steps=3, batch_size=2, group_size=2, max_new_tokens=2, beta=0.0,
                   progress=False)
    text = warnings(warnings_captured)
    assert text.count("the rewards did not vary") == 1 and "cannot learn" not in text
    assert (tmp_path / "run" / "final").exists()


def test_every_online_update_skipped_is_an_error(tiny_model_dir, tmp_path, monkeypatch):
    """Online RL with a NaN loss on every step (every optimizer update skipped) -> one-line error"""
    from alignkit.training.online import steps

    original = steps._micro_batch_loss

    def nan_loss(*args, **kwargs):
        loss, sums = original(*args, **kwargs)
        return loss * float("nan"), sums

    monkeypatch.setattr(steps, "_micro_batch_loss", nan_loss)
    reward = tmp_path / "count.py"
    reward.write_text("def reward(prompts, completions, **kw):\n    return [float(i) for i in range(len(completions))]\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "Tell me"}])
    run = run_cli(*train_args("rloo", tiny_model_dir, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "2",
                              "--reward", f"{reward}:reward", "--set", "group_size=2", "--set", "max_new_tokens=2"))
    assert_one_line_error(run, "train", "cannot learn", "steps 1-2", "not finite")
    assert [r["updates_skipped"] for r in metrics_rows(tmp_path / "run")] == [1.0, 1.0]
