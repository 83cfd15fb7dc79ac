"""Validation while training an online preset (--eval-data, --eval-steps, --gold-reward,
--eval-samples, --eval-k, --eval-pass-threshold): eval/* rows at step 0, every N steps and the
last step, with sane values; training numbers identical with and without validation (also
resumed, and with rewards that draw from the global random generators); one-line flag errors."""

from __future__ import annotations

import random
from functools import partial

import pytest
import torch
from faults.helpers import assert_one_line_error, run_cli
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)

import alignkit
from alignkit.eval.report import validation_points
from alignkit.training.online.sampling import step_seed
from alignkit.training.online.validation import eval_seed, parse_eval_k


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = ["Write a short review.", "The movie", "Tell me", "What is two plus two?"]
ROWS = [{"prompt": p} for p in PROMPTS * 4]
HELD_OUT = [{"prompt": p} for p in ("Say something nice", "A story about", "The film was")]
TRAINING_KEYS = ("loss", "reward/mean", "reward/std", "kl", "beta", "response_length", "grad_norm", "lr",
                 "entropy", "clip_ratio", "value_loss")


def count_e(prompts, completions, **columns):
    """+1 per letter e: a random tiny model emits some, so it learns to emit more."""
    return [float(text.count("e")) for text in completions]


def has_e(prompts, completions, **columns):
    """The gold reward of these tests: 1 when the completion has an e at all, else 0."""
    return [float("e" in text) for text in completions]


def noisy_count_e(prompts, completions, **columns):
    """count_e plus tie-breaking noise from the global torch, Python and numpy generators: the
    training stream depends on them, so a validation that moved them would change training."""
    import numpy as np

    noise = torch.rand(len(completions)) + random.random() + float(np.random.rand())
    return [c + 1e-3 * float(n) for c, n in zip(count_e(prompts, completions), noise, strict=True)]


def run(algorithm, model_dir, output_dir, steps=6, **overrides):
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    settings.update(overrides)
    reward = settings.pop("reward", count_e)
    return alignkit.train(algorithm, model=str(model_dir), data=ROWS, output_dir=output_dir, reward=reward,
                          **settings)


def training_rows(rows):
    return [r for r in rows if "loss" in r]


def eval_rows(rows):
    """The validations of a run, each as {step, eval/*}: the first row's eval_start/* at step 0."""
    return [point for point in validation_points(rows) if "eval/reward" in point]


def test_grpo_logs_eval_rows_at_step_0_every_n_steps_and_the_last(tiny_model_dir, tmp_path):
    """20 steps, --eval-steps 10: eval/* at steps 0, 10, 20, joined to the training rows at 10
    and 20. Step 0 is the initial policy (KL 0 to the reference); pass@1 equals the mean 0/1 gold
    reward (threshold 1); pass@k rises with k; the held-out reward rises with training."""
    result = run("grpo", tiny_model_dir, tmp_path / "run", steps=20, eval_data=HELD_OUT, eval_steps=10,
                 gold_reward=has_e, eval_samples=4, eval_k=[1, 2, 4])
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 21)) and all("loss" in r for r in rows)  # DESIGN
    assert "eval_start/reward" in rows[0] and "eval/reward" not in rows[0]  # step 0: in the first row
    evaluated = eval_rows(rows)
    assert [r["step"] for r in evaluated] == [0, 10, 20]
    for row in evaluated:
        for key in ("eval/reward", "eval/gold", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/kl",
                    "eval/length"):
            assert key in row, (row["step"], key)
        assert 0 < row["eval/length"] <= 8
        assert 0.0 <= row["eval/pass@1"] <= row["eval/pass@2"] <= row["eval/pass@4"] <= 1.0
        assert row["eval/pass@1"] == pytest.approx(row["eval/gold"], abs=1e-6)
        assert row["eval/kl"] > -1e-4
    assert evaluated[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference before step 1
    assert evaluated[-1]["eval/kl"] > 1e-3
    assert evaluated[-1]["eval/reward"] > evaluated[0]["eval/reward"] + 1.0, evaluated
    assert result.eval_metrics["eval/reward"] == evaluated[-1]["eval/reward"]
    assert result.metrics["eval/reward"] == evaluated[-1]["eval/reward"]  # the last row holds both


def test_cli_validation_rows_between_logging_steps(tiny_model_dir, tmp_path):
    """The CLI flags reach the run: --eval-steps 3 with --logging-steps 2 over 4 steps logs rows
    2 (training, with the step-0 validation as eval_start/*), 3 (training + eval: a validation
    logs its step) and 4 (training + eval); a gold reward file scored at
    threshold 0.5; no reference (beta 0): no eval/kl."""
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n\n"
                       "def has_e(prompts, completions, **kw):\n    return [float('e' in c) for c in completions]\n")
    run = run_cli("train", "rloo", "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "cli"),
                  "--max-steps", "4", "--batch-size", "2", "--reward", f"{rewards}:length", "--eval-data", held_out,
                  "--eval-steps", "3", "--gold-reward", f"{rewards}:has_e", "--eval-samples", "2", "--eval-k", "1,2",
                  "--eval-pass-threshold", "0.5", "--logging-steps", "2", "--set", "group_size=2",
                  "--set", "max_new_tokens=4", "--set", "beta=0.0", "--no-progress")
    assert run.code == 0, run.err
    rows = read_metrics(tmp_path / "cli")
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert [("loss" in r, "eval/reward" in r) for r in rows] == [(True, False), (True, True), (True, True)]
    assert {"eval_start/reward", "eval_start/gold", "eval_start/pass@2", "time/eval_start_s"} <= set(rows[0])
    assert {"eval/reward", "eval/gold", "eval/pass@1", "eval/pass@2", "eval/length", "time/eval_s"} <= set(rows[1])
    config = (tmp_path / "cli" / "config.yaml").read_text()
    assert "eval_samples: 2" in config and "eval_k: 1,2" in config and "has_e" in config


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_validation_leaves_the_training_numbers_unchanged(algorithm, tiny_model_dir, tmp_path):
    """The same run with and without --eval-data (eval every step, a gold reward, several
    samples), the training reward drawing tie-breaking noise from the global generators: every
    training metric and the final weights are bit-identical. PPO: running reward normalisation,
    adaptive KL, a critic, 2 epochs x 2 minibatches (all driver state the validation must not move)."""
    extra = dict(reward=noisy_count_e)
    if algorithm == "ppo":
        extra.update(epochs_per_batch=2, minibatches=2, reward_norm=True, kl_target=1.0)
    plain = run(algorithm, tiny_model_dir, tmp_path / "plain", steps=4, **extra)
    validated = run(algorithm, tiny_model_dir, tmp_path / "validated", steps=4, eval_data=HELD_OUT, eval_steps=1,
                    gold_reward=noisy_count_e, eval_samples=2, eval_k="1,2", **extra)
    rows = read_metrics(tmp_path / "validated")
    assert [r["step"] for r in eval_rows(rows)] == [0, 1, 2, 3, 4]
    assert_resumed_matches(read_metrics(tmp_path / "plain"), training_rows(rows), TRAINING_KEYS, steps=4,
                           skip_missing=True)  # exactly
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, dict(validated.model.named_parameters())[name]), name


def test_resumed_validated_run_matches_the_uninterrupted_and_the_unvalidated_run(tiny_model_dir, tmp_path):
    """Validated every 2 steps, cut at step 5 (checkpoint at 3), resumed: training and eval rows
    match the uninterrupted validated run, whose training rows match a run without validation."""
    extra = dict(steps=6, save_steps=3, lr=5e-3, scheduler="cosine", beta=0.05)
    validated = partial(run, "grpo", tiny_model_dir, eval_data=HELD_OUT, eval_steps=2, eval_samples=2, eval_k="2",
                        **extra)
    runs = run_interrupted_and_resumed(validated, tmp_path, at=5)
    plain = read_metrics(run("grpo", tiny_model_dir, tmp_path / "plain", **extra).output_dir)
    tolerance = dict(rel=1e-5, abs=1e-6)
    assert [r["step"] for r in eval_rows(runs.resumed)] == [0, 2, 4, 6]
    assert_resumed_matches(training_rows(runs.full), training_rows(runs.resumed), TRAINING_KEYS, steps=6,
                           tolerance=tolerance, skip_missing=True)
    assert_resumed_matches(plain, training_rows(runs.resumed), TRAINING_KEYS, steps=6, tolerance=tolerance,
                           skip_missing=True)
    for full, resumed in zip(eval_rows(runs.full), eval_rows(runs.resumed), strict=True):
        for key in ("eval/reward", "eval/pass@2", "eval/kl", "eval/length"):
            assert resumed[key] == pytest.approx(full[key], **tolerance), (full["step"], key)
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_eval_seed_is_a_function_of_seed_and_step_apart_from_the_training_seeds():
    assert eval_seed(42, 3) == eval_seed(42, 3) != eval_seed(42, 4) != eval_seed(43, 3)
    training = {step_seed(42, step, round_) for step in range(200) for round_ in range(10)}
    assert not training & {eval_seed(42, step) for step in range(200)}


def test_parse_eval_k():
    assert parse_eval_k("4,1, 2,1") == [1, 2, 4]
    with pytest.raises(ValueError, match="--eval-k 1,x: expected comma-separated whole numbers"):
        parse_eval_k("1,x")
    with pytest.raises(ValueError, match="--eval-k 0: each k must be >= 1"):
        parse_eval_k("0")


@pytest.fixture
def no_model_loads(monkeypatch):
    """A flag mistake must be reported before any model or tokenizer loads."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the mistake was reported")

    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


@pytest.mark.parametrize(("extra", "needles"), [
    (("--eval-steps", "5"), ("--eval-steps 5 needs --eval-data",)),
    (("--eval-data", "HELD_OUT"), ("--eval-data needs --eval-steps",)),
    (("--eval-data", "HELD_OUT", "--eval-steps", "2", "--eval-k", "1,4", "--eval-samples", "2"),
     ("--eval-k 1,4", "pass@4 needs --eval-samples >= 4")),
    (("--eval-data", "HELD_OUT", "--eval-steps", "2", "--eval-k", "one"), ("--eval-k one",)),
    (("--gold-reward", "vader"), ("--gold-reward applies to validation", "--eval-data")),
    (("--eval-samples", "4"), ("--eval-samples applies to validation",)),
    (("--eval-holdout", "0.25"), ("--eval-holdout is ignored by grpo", "--eval-data")),
    (("--eval-data", "HELD_OUT", "--eval-steps", "2", "--eval-samples", "0"), ("--eval-samples", ">= 1")),
])
def test_validation_flag_mistakes_are_one_line(tiny_model_dir, tmp_path, no_model_loads, extra, needles):
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    extra = tuple(held_out if x == "HELD_OUT" else x for x in extra)
    run = run_cli("train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "r"),
                  "--reward", "vader", "--no-progress", *extra)
    assert_one_line_error(run, "train", *needles)


def test_offline_algorithms_refuse_the_online_validation_flags(tiny_model_dir, tmp_path, no_model_loads):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    run = run_cli("train", "dpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "r"),
                  "--gold-reward", "vader", "--no-progress")
    assert_one_line_error(run, "train", "--gold-reward is ignored by dpo")


def test_train_help_documents_the_validation_flags(capsys):
    from alignkit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "grpo", "--help"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    for flag in ("--eval-data", "--eval-steps", "--gold-reward", "--eval-samples", "--eval-k",
                 "--eval-pass-threshold"):
        assert flag in out, flag
