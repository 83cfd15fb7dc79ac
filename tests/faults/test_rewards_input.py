"""Fault cases of rewards: reward models that are not reward models, reward functions that
return the wrong thing or hang, TRL reward functions, the rewards package's imports and the
sequence-mean aggregation."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from faults.helpers import assert_one_line_error, run_cli, write_jsonl

PROMPTS = [{"prompt": f"Question {i}: say something"} for i in range(4)]
STEP = ["--batch-size", "2", "--max-steps", "1", "--set", "group_size=2", "--set", "max_new_tokens=4",
        "--no-progress"]


def grpo(model_dir, tmp_path: Path, *extra: str, algorithm: str = "grpo", rows=None):
    data = write_jsonl(tmp_path / "prompts.jsonl", rows or PROMPTS)
    return run_cli("train", algorithm, "--model", model_dir, "--data", data, "--output", tmp_path / "run",
                   *STEP, *extra)


def reward_file(tmp_path: Path, source: str, name: str = "my_rewards.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.parametrize("flag", ["--reward-model", "critic_init"])
def test_causal_lm_as_a_reward_model_is_refused(tiny_model_dir, tmp_path, flag):
    """--reward-model CAUSAL_LM or --set critic_init=CAUSAL_LM -> one-line error: not a reward model (its score head would be random)"""
    if flag == "--reward-model":
        run = grpo(tiny_model_dir, tmp_path, "--reward-model", tiny_model_dir)
    else:
        run = grpo(tiny_model_dir, tmp_path, "--reward", "length:3", "--set", f"critic_init={tiny_model_dir}",
                   algorithm="ppo")
    line = assert_one_line_error(run, "train", flag, str(tiny_model_dir), "not a reward model", "score.weight")
    assert "LlamaForCausalLM" in line


BAD_OUTPUTS = {
    "none": ("return None", ("returned None",)),
    "string": ("return 'good'", ("returned the str 'good'",)),
    "too_few": ("return [1.0] * (len(completions) - 1)", ("3 values for a batch of 4 completions",)),
    "numeric_strings": ("return ['0.5'] * len(completions)", ("item 0 is the str '0.5'",)),
    # lists per sample are per-token (dense) rewards: one per response token, else the row is named
    "ragged": ("return [[1.0]] + [[1.0, 2.0]] * (len(completions) - 1)",
               ("item 0 has 1 per-token rewards but the sample has", "response tokens")),
    "nan": ("return [float('nan')] * len(completions)",
            ("row 0 (prompt 'Question ", "returned a non-finite score (nan)")),
    "none_item": ("return [1.0, None] + [1.0] * (len(completions) - 2)", ("row 1 (prompt 'Question ",
                                                                          "returned None")),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_reward_function_returning_the_wrong_thing_says_what_it_returned(tiny_model_dir, tmp_path, case):
    """--reward f.py:fn returning None, a string, 3 values for 4 completions, NaN, ragged lists -> one-line error naming fn, what it returned and the step"""
    body, expected = BAD_OUTPUTS[case]
    path = reward_file(tmp_path, f"def fn(prompts, completions):\n    {body}\n")
    run = grpo(tiny_model_dir, tmp_path, "--reward", f"{path}:fn")
    assert_one_line_error(run, "train", f"reward {path}:fn", *expected, "step 1, 4 completions, first prompt")


@pytest.mark.parametrize("workers", [0, 2])
def test_hanging_reward_function_ends_the_run(tiny_model_dir, tmp_path, workers):
    """--reward f.py:fn that hangs, --reward-timeout 0.5 (also with --reward-workers 2) -> one-line error naming fn, the timeout and the step"""
    path = reward_file(tmp_path, """
        import threading
        RELEASE = threading.Event()

        def hang(prompts, completions):
            RELEASE.wait(60)
            return [0.0] * len(completions)
        """)
    try:
        run = grpo(tiny_model_dir, tmp_path, "--reward", f"{path}:hang", "--reward-timeout", "0.5",
                   "--reward-workers", str(workers))
    finally:  # let the abandoned daemon thread finish
        for module in list(sys.modules.values()):
            if getattr(module, "__file__", None) == str(path):
                module.RELEASE.set()
    assert_one_line_error(run, "train", f"reward {path}:hang", "did not return within 0.5 s", "--reward-timeout",
                          "step 1")


def test_reward_timeout_zero_calls_the_reward_in_the_training_thread(tiny_model_dir, tmp_path):
    """--reward-timeout 0 -> no time limit, and the reward runs in the training thread (for code that needs the main thread, e.g. signal-based timeouts)"""
    path = reward_file(tmp_path, """
        import signal
        import threading

        THREADS = []

        def needs_main_thread(prompts, completions):
            signal.signal(signal.SIGALRM, signal.getsignal(signal.SIGALRM))  # raises outside the main thread
            THREADS.append(threading.current_thread() is threading.main_thread())
            return [float(len(c)) for c in completions]
        """)
    run = grpo(tiny_model_dir, tmp_path, "--reward", f"{path}:needs_main_thread", "--reward-timeout", "0")
    assert run.code == 0, run.err
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(path))
    assert module.THREADS == [True]


def test_reward_workers_score_in_threads_with_the_same_results(tiny_model_dir, tmp_path):
    """--reward-workers 3 with a slow reward -> the same rewards, in the same row order, as scoring in the training thread"""
    from alignkit.rewards.runner import RewardRunner

    def slow_length(prompts, completions, answer):
        time.sleep(0.02 * (5 - int(prompts[0][-1])))  # later chunks finish first
        return [len(c) + 0.5 * int(a) for c, a in zip(completions, answer, strict=True)]

    prompts = [f"prompt {i}" for i in range(5) for _ in range(3)]
    completions = [f"completion {'x' * i}" for i in range(15)]
    columns = {"answer": [str(i % 4) for i in range(15)]}
    sequential = RewardRunner(slow_length, workers=0)(prompts, completions, columns)
    threaded = RewardRunner(slow_length, workers=3)(prompts, completions, columns)
    torch.testing.assert_close(threaded[0], sequential[0], rtol=0, atol=0)
    assert threaded[1] == sequential[1] == 0

    path = reward_file(tmp_path, """
        def length(prompts, completions):
            return [float(len(c)) for c in completions]
        """)
    metrics = []
    for workers in ("0", "3"):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        run = grpo(tiny_model_dir, out, "--reward", f"{path}:length", "--reward-workers", workers,
                   "--max-steps", "2", rows=PROMPTS)
        assert run.code == 0, run.err
        metrics.append([json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()])
    keys = ("reward/mean", "reward/std", "response_length", "loss")
    assert [[row.get(k) for k in keys] for row in metrics[0]] == [[row.get(k) for k in keys] for row in metrics[1]]


TRL_REWARDS = """
    import json

    SEEN = []

    def reward_len(completions, **kwargs):
        SEEN.append({"completions": completions, "prompts": kwargs["prompts"], "answer": kwargs["answer"],
                     "completion_ids": kwargs["completion_ids"],
                     "global_step": kwargs["trainer_state"].global_step})
        return [-abs(20 - len(c[0]["content"])) for c in completions]

    def reward_plain(prompts, completions, answer, **kwargs):
        SEEN.append({"completions": completions, "prompts": prompts, "answer": answer})
        return [float(len(c)) for c in completions]
    """


@pytest.mark.parametrize("conversational", [True, False])
def test_trl_reward_function_runs_unchanged(tiny_model_dir, tmp_path, conversational):
    """a TRL reward function `def reward_len(completions, **kwargs)` on conversational prompts -> it gets prompts and completions as message lists, dataset columns, completion_ids and trainer_state, as in TRL; plain-text prompts stay strings"""
    path = reward_file(tmp_path, TRL_REWARDS, name="trl_rewards.py")
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": f"Question {i}"}], "answer": str(i)} for i in range(4)]
        name = "reward_len"
    else:
        rows = [{"prompt": f"Question {i}", "answer": str(i)} for i in range(4)]
        name = "reward_plain"
    run = grpo(tiny_model_dir, tmp_path, "--reward", f"{path}:{name}", rows=rows)
    assert run.code == 0, run.err
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(path))
    seen = module.SEEN[0]
    assert len(seen["completions"]) == len(seen["prompts"]) == len(seen["answer"]) == 4
    if conversational:
        assert all(p == rows[int(a)]["prompt"] for p, a in zip(seen["prompts"], seen["answer"], strict=True))
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in seen["completions"])
        assert all(isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)
                   for ids in seen["completion_ids"])
        assert seen["global_step"] == 0
    else:
        assert seen["prompts"] == [f"Question {a}" for a in seen["answer"]]
        assert all(isinstance(c, str) for c in seen["completions"])


def test_rewards_package_has_no_import_cycle():
    """importing any module of alignkit.rewards first -> no import cycle inside the package (checked statically, lazy imports included)"""
    from test_layers import PACKAGE, imported_modules

    folder = PACKAGE / "rewards"
    graph = {}
    for path in sorted(folder.glob("*.py")):
        name = "alignkit.rewards" if path.stem == "__init__" else f"alignkit.rewards.{path.stem}"
        targets = {m for _, m in imported_modules(path.read_text(), path)}
        graph[name] = {t for t in targets if t == "alignkit.rewards" or t.startswith("alignkit.rewards.")} - {name}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [start]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_seq_mean_token_sum_skips_empty_rows_like_seq_mean_token_mean():
    """seq_mean_token_sum without num_seqs on a batch with an empty row -> averaged over the non-empty rows, like seq_mean_token_mean"""
    from alignkit.objectives.policy import seq_mean_token_mean, seq_mean_token_sum

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert seq_mean_token_sum(per_token, mask).item() == pytest.approx((3.0 + 24.0) / 2)
    assert seq_mean_token_mean(per_token, mask).item() == pytest.approx((1.5 + 8.0) / 2)
    assert seq_mean_token_sum(per_token, mask, num_seqs=3).item() == pytest.approx(27.0 / 3)
