"""Whole-process resources: torch's thread count on shared cores (`--threads`, auto) and the
demo's memory. (The policy: alignkit/training/run/threads.py, alignkit/demo.py.)"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from alignkit.training.run import threads
from faults.helpers import run_cli, write_jsonl


@pytest.fixture
def fresh_thread_choice(monkeypatch):
    """A process that has not chosen its thread count yet; torch's count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_auto_choice", None)
    monkeypatch.setattr(threads, "_logged", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cores", "load", "local_ranks", "requested", "expected"),
    [
        (2, 0.1, 1, 0, 2),  # idle: one thread per core
        (2, 0.7, 1, 0, 1),  # a second process on one core: fewer threads, not a stalled barrier
        (2, 3.1, 1, 0, 1),  # overloaded: never below 1
        (16, 2.0, 4, 0, 3),  # torchrun, 4 local ranks: (16 - 2) / 4 each
        (16, 0.0, 2, 0, 8),  # torchrun, idle: cores // local ranks
        (2, 0.0, 2, 0, 1),
        (2, 3.1, 1, 4, 4),  # an explicit N is used as is
    ],
)
def test_auto_threads_leave_out_busy_cores(cores, load, local_ranks, requested, expected):
    """--threads 0 on 2 cores another process keeps busy -> 1 torch thread (free cores, split over torchrun's local ranks)"""
    assert threads.choose_threads(cores, load, local_ranks, requested) == expected


def test_auto_thread_choice_is_logged_once(fresh_thread_choice, monkeypatch, caplog):
    """--threads 0 -> the choice is logged once with its reasons ('torch threads: 1 (2 cores, load 3.1)')"""
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "current_load", lambda: 3.1)
    with caplog.at_level(logging.INFO, logger="alignkit"):
        assert threads.configure_threads(0) == 1
        monkeypatch.setattr(threads, "current_load", lambda: 0.0)  # our own threads now load the cores
        assert threads.configure_threads(0) == 1  # the process keeps its first choice
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch threads")]
    assert lines == ["torch threads: 1 (2 cores, load 3.1)"]
    assert torch.get_num_threads() == 1


def test_threads_flag_reaches_torch_in_a_run(fresh_thread_choice, tiny_model_dir, tmp_path):
    """alignkit train grpo --threads 1 on a process with 2 torch threads -> torch runs the whole run on 1"""
    seen = tmp_path / "threads.txt"
    reward = tmp_path / "reward.py"
    reward.write_text(
        "import torch\n\n\n"
        "def length(prompts, completions, **columns):\n"
        f"    with open({str(seen)!r}, 'a') as handle:\n"
        "        handle.write(f'{torch.get_num_threads()}\\n')\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write a short review {i}."} for i in range(4)])
    torch.set_num_threads(2)
    run = run_cli("train", "grpo", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "run",
                  "--reward", f"{reward}:length", "--batch-size", "2", "--max-steps", "2", "--no-progress",
                  "--threads", "1", "--set", "group_size=2", "--set", "max_new_tokens=4")
    assert run.code == 0, run.err
    assert seen.read_text().split() == ["1", "1"]  # read inside the run, at each step's scoring
    assert torch.get_num_threads() == 1


def test_demo_trains_in_micro_batches(monkeypatch, tiny_model_dir, tmp_path):
    """alignkit demo on SmolLM2-135M peaked at 7.5 GB -> GRPO and DPO backpropagate through at most 8 sequences at a time"""
    import alignkit.api
    from alignkit.demo import DemoOptions, train_dpo, train_grpo
    from alignkit.rewards import VaderSentiment

    calls = {}

    class Recorded(Exception):
        pass

    def record(algorithm, **kwargs):
        calls[algorithm] = kwargs
        raise Recorded

    monkeypatch.setattr(alignkit.api, "train", record)
    options = DemoOptions(model=str(tiny_model_dir), max_new_tokens=4, dpo_samples_per_prompt=2, progress=False)
    prompts = ["Review the film.", "Review the music."]
    for train in (train_grpo, train_dpo):
        with pytest.raises(Recorded):
            train(options, prompts, VaderSentiment(), tmp_path)
    grpo, dpo = calls["grpo"], calls["dpo"]
    samples_per_step = grpo["batch_size"] * grpo["group_size"]
    assert 0 < (grpo.get("micro_batch_size") or samples_per_step) <= 8 < samples_per_step
    assert 2 * dpo["batch_size"] <= 8  # chosen + rejected per pair
    assert dpo["batch_size"] * dpo.get("grad_accum", 1) == options.dpo_batch_size  # the same step


def test_demo_records_its_peak_memory(tiny_model_dir, tmp_path):
    """alignkit demo -> results.json records the peak RSS (peak_rss_mb) and the peak by the end of each stage"""
    from alignkit.demo import DemoOptions, run_demo

    out = tmp_path / "demo"
    options = DemoOptions(output=str(out), model=str(tiny_model_dir), methods=("grpo",), train_prompts=4,
                          eval_prompts=2, eval_samples=2, max_new_tokens=4, grpo_steps=1, grpo_prompts_per_step=2,
                          grpo_group_size=2, progress=False, threads=1)
    run_demo(options)
    saved = json.loads((out / "results.json").read_text())
    stages = saved["stage_peak_rss_mb"]
    assert set(stages) == {"load", "eval_base", "train_grpo", "eval_grpo"}
    assert 50 < stages["load"] <= stages["train_grpo"] <= saved["peak_rss_mb"]
    assert saved["torch_threads"] == 1
