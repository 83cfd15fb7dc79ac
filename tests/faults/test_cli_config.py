"""The command line and the configuration: --set and recipe values (YAML 1.2 numbers, types,
ranges), choice options, options an algorithm ignores, help, tyro's parse errors, the
arguments of eval-rm and algorithms, --eval-holdout. Every check runs before a model loads.
(The policy: alignkit/training/run/values.py, ranges.py, validate.py; alignkit/cli_train.py,
alignkit/cli_args.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.training.run.result import TrainResult
from faults.helpers import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def captured(monkeypatch) -> list:
    """Replace both training loops by a recorder of the config they would get."""
    import alignkit.training.offline.loop as offline
    import alignkit.training.online.loop as online

    configs = []

    def record(config, **kwargs):
        configs.append(config)
        return TrainResult(Path(config.output), Path(config.output) / "final", 0, {}, {})

    monkeypatch.setattr(offline, "run_offline", record)
    monkeypatch.setattr(online, "run_online", record)
    return configs


def train(model, data, tmp_path, *extra) -> list[str]:
    return ["train", *extra[:1], "--model", str(model), "--data", str(data), "--output",
            str(tmp_path / "run"), "--no-progress", *extra[1:]]


def test_readme_recipe_example_with_an_exponent_learning_rate(tiny_model_dir, data, tmp_path):
    """--config recipe.yaml --set lr=1e-4 (the README's example) -> lr is the float 0.0001; the run trains"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": "dpo", "model": str(tiny_model_dir), "data": str(data),
                                      "output": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4,
                                      "progress": False}))
    run = run_cli("train", "--config", recipe, "--set", "lr=1e-4")
    assert run.code == 0, run.err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 0.0001 and isinstance(saved["lr"], float)


def test_set_hyper_parameter_with_an_exponent(tiny_model_dir, data, tmp_path, captured):
    """--set beta=1e-1 -> beta is the float 0.1 (YAML 1.2 numbers, not PyYAML's YAML 1.1 string)"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--set", "beta=1e-1", "--set", "lr=2E-5"))
    assert run.code == 0, run.err
    config = captured[0]
    assert config.hparams["beta"] == 0.1 and isinstance(config.hparams["beta"], float)
    assert config.lr == 2e-5


def test_recipe_numbers_with_exponents(tiny_model_dir, data, tmp_path, captured):
    """a recipe with lr: 1e-4 and beta: 1e-1 -> both are floats"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithm: dpo\nmodel: {tiny_model_dir}\ndata: {data}\noutput: {tmp_path / 'run'}\n"
                      "lr: 1e-4\nhparams:\n  beta: 1e-1\n")
    run = run_cli("train", "--config", recipe)
    assert run.code == 0, run.err
    assert captured[0].lr == 0.0001 and captured[0].hparams["beta"] == 0.1


def test_set_wrong_type_for_a_config_field(tiny_model_dir, data, tmp_path, captured):
    """--set batch_size=eight -> one-line error naming batch_size and 'an integer'"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--set", "batch_size=eight"))
    assert_one_line_error(run, "train", "batch_size", "an integer", "'eight'")
    assert not captured


@pytest.mark.parametrize(("algorithm", "setting", "needles"), [
    ("dpo", "beta=high", ("beta", "a number", "'high'")),
    ("grpo", "group_size=two", ("group_size", "an integer", "'two'")),
])
def test_set_wrong_type_for_a_hyper_parameter(tiny_model_dir, data, tmp_path, captured, algorithm, setting,
                                              needles):
    """--set beta=high (or group_size=two) -> one-line error naming the key and its type; an int where a float is expected is fine"""
    extra = ("--reward", "vader") if algorithm == "grpo" else ()
    run = run_cli(*train(tiny_model_dir, data, tmp_path, algorithm, "--set", setting, *extra))
    assert_one_line_error(run, "train", algorithm, *needles)
    assert not captured
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--set", "beta=1"))
    assert run.code == 0, run.err


def test_recipe_wrong_type_for_a_field(tiny_model_dir, data, tmp_path, captured):
    """a recipe with batch_size: eight -> one-line error naming the recipe and batch_size"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithm: dpo\nmodel: {tiny_model_dir}\ndata: {data}\nbatch_size: eight\n")
    assert_one_line_error(run_cli("train", "--config", recipe), "train", str(recipe), "batch_size", "an integer")
    assert not captured


def test_recipe_hparams_not_a_mapping(tiny_model_dir, data, tmp_path):
    """a recipe with hparams: 5 -> one-line error naming the recipe and hparams"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithm: dpo\nmodel: {tiny_model_dir}\ndata: {data}\nhparams: 5\n")
    assert_one_line_error(run_cli("train", "--config", recipe), "train", str(recipe), "hparams")


def test_recipe_yaml_syntax_error(tiny_model_dir, data, tmp_path):
    """--config with a YAML syntax error -> one-line error naming the file and the line"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithm: dpo\nmodel: {tiny_model_dir}\nhparams: {{beta: 0.1\ndata: {data}\n")
    line = assert_one_line_error(run_cli("train", "--config", recipe), "train", str(recipe), "line ")
    assert "YAML" in line


def test_set_value_with_broken_yaml(tiny_model_dir, data, tmp_path):
    """--set "loss_weights={dpo: 1" (broken YAML) -> one-line error naming the key"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--set", "loss_weights={dpo: 1"))
    assert_one_line_error(run, "train", "loss_weights", "YAML")


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--batch-size", "0", ">= 1"),
    ("--grad-accum", "0", ">= 1"),
    ("--logging-steps", "0", ">= 1"),
    ("--lora-r", "-4", ">= 0"),
    ("--warmup-ratio", "5", "in [0, 1]"),
    ("--max-steps", "0", "-1"),
    ("--lr", "-0.1", "> 0"),
])
def test_config_value_out_of_range(tiny_model_dir, data, tmp_path, no_model_loads, flag, value, needle):
    """--batch-size 0, --grad-accum 0, --logging-steps 0, --lora-r -4, --warmup-ratio 5, --max-steps 0, --lr -0.1 -> one-line error naming the flag and its range, before anything loads"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", flag, value))
    assert_one_line_error(run, "train", flag, needle, value)


@pytest.mark.parametrize(("algorithm", "setting", "needle"), [
    ("dpo", "beta=-1", "beta must be > 0"),
    ("ipo", "beta=0", "beta must be > 0"),
    ("simpo", "beta=-2", "beta must be > 0"),
    ("cdpo", "label_smoothing=0.5", "label_smoothing must be in [0, 0.5)"),
    ("rdpo", "label_smoothing=0.7", "label_smoothing must be in [0, 0.5)"),
    ("cpl", "lambda_=2", "lambda_ must be in (0, 1]"),
    ("kto", "beta=0", "beta must be > 0"),
    ("grpo", "temperature=0", "temperature must be > 0"),
    ("online_dpo", "beta=0", "beta must be > 0"),
])
def test_hyper_parameter_out_of_its_papers_range(tiny_model_dir, data, tmp_path, no_model_loads, algorithm,
                                                 setting, needle):
    """--set beta=-1 for dpo (beta > 0 for the DPO family, label_smoothing in [0, 0.5), cpl's lambda in (0, 1], ...) -> one-line error before anything loads"""
    extra = ("--reward", "vader") if algorithm in ("grpo", "online_dpo") else ()
    run = run_cli(*train(tiny_model_dir, data, tmp_path, algorithm, "--set", setting, *extra))
    assert_one_line_error(run, "train", algorithm, needle)


@pytest.mark.parametrize(("algorithm", "overrides", "needle"), [
    ("dpo", {"beta": -1.0}, "beta must be > 0"),
    ("dpo", {"batch_size": 0}, ">= 1"),
    ("dpo", {"nonfinite": "ignore"}, "skip, stop"),
    ("grpo", {"logprob_micro_batch_size": -1}, "logprob_micro_batch_size"),
])
def test_python_api_checks_values_as_the_cli_does(tiny_model_dir, data, tmp_path, no_model_loads, algorithm,
                                                   overrides, needle):
    """alignkit.train(..., beta=-1 / batch_size=0 / nonfinite='ignore' / logprob_micro_batch_size=-1) -> ValueError naming the value's range or choices, before anything loads"""
    import alignkit

    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        alignkit.train(algorithm, model=str(tiny_model_dir), data=str(data), output_dir=tmp_path / "run",
                       reward="vader", progress=False, **overrides)


@pytest.mark.parametrize(("flag", "allowed"), [
    ("--nonfinite", "skip, stop"),
    ("--scheduler", "cosine, linear, constant"),
    ("--strategy", "ddp, fsdp2"),
    ("--dtype", "float32, bfloat16"),
    ("--device", "cpu, cuda"),
    ("--data-format", "auto, hh"),
    ("--rollout", "hf, vllm"),
])
def test_unknown_choice_lists_the_allowed_values(tiny_model_dir, data, tmp_path, no_model_loads, flag, allowed):
    """--nonfinite ignore, --scheduler foo, --strategy x, --dtype x, --device x, --data-format x -> one-line error listing the allowed values"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", flag, "bogus"))
    assert_one_line_error(run, "train", flag, allowed, "'bogus'")


def test_device_cuda_without_cuda(tiny_model_dir, data, tmp_path, no_model_loads, monkeypatch):
    """--device cuda on a machine without CUDA -> one-line error before anything loads"""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--device", "cuda"))
    assert_one_line_error(run, "train", "--device cuda", "CUDA is not available")


def test_tensorboard_without_the_package(tiny_model_dir, data, tmp_path, no_model_loads, monkeypatch):
    """--tensorboard without the tensorboard package -> one-line error before anything loads"""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--tensorboard"))
    assert_one_line_error(run, "train", "--tensorboard", "pip install tensorboard")


@pytest.mark.parametrize(("algorithm", "extra", "flag"), [
    ("dpo", ("--reward", "vader"), "--reward"),
    ("dpo", ("--reward-model", "MODEL"), "--reward-model"),
    ("sft", ("--ref-model", "MODEL"), "--ref-model"),
    ("simpo", ("--ref-model", "MODEL"), "--ref-model"),
    ("orpo", ("--ref-model", "MODEL"), "--ref-model"),
    ("dpo", ("--lora-alpha", "16"), "--lora-alpha"),
    ("dpo", ("--lora-target-modules", "q_proj"), "--lora-target-modules"),
    ("dpo", ("--eval-steps", "5"), "--eval-steps"),
    ("grpo", ("--reward", "vader", "--grad-accum", "4"), "--grad-accum"),
    ("grpo", ("--reward", "vader", "--max-length", "128"), "--max-length"),
    ("dr_grpo", ("--reward", "vader", "--ref-model", "MODEL"), "--ref-model"),
    ("rm_embedding", ("--lora-r", "8"), "--lora-r"),
    ("dpo", ("--rollout", "vllm"), "--rollout"),
    ("grpo", ("--reward", "vader", "--vllm-url", "http://127.0.0.1:8000"), "--vllm-url"),
])
def test_option_the_algorithm_ignores(tiny_model_dir, data, tmp_path, no_model_loads, algorithm, extra, flag):
    """an option the algorithm ignores (--reward for dpo, --ref-model for sft/simpo/orpo, LoRA options with --lora-r 0, --grad-accum for grpo, ...) -> one-line error naming it"""
    extra = tuple(str(tiny_model_dir) if x == "MODEL" else x for x in extra)
    run = run_cli(*train(tiny_model_dir, data, tmp_path, algorithm, *extra))
    assert_one_line_error(run, "train", flag, f"ignored by {algorithm}")


def test_reward_and_reward_model_together(tiny_model_dir, data, tmp_path, no_model_loads):
    """--reward together with --reward-model -> one-line error: give one of them"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "grpo", "--reward", "vader", "--reward-model",
                         str(tiny_model_dir)))
    assert_one_line_error(run, "train", "--reward", "--reward-model", "one of them")


def test_online_algorithm_without_a_reward(tiny_model_dir, data, tmp_path, no_model_loads):
    """grpo without --reward or --reward-model -> one-line error before the policy loads"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "grpo"))
    assert_one_line_error(run, "train", "grpo needs a reward", "--reward")


def test_help_of_an_unknown_algorithm():
    """alignkit train nosuch --help -> one-line error naming the algorithm, not dpo's help"""
    run = run_cli("train", "nosuch", "--help")
    assert_one_line_error(run, "train", "'nosuch'", "alignkit algorithms")
    assert "--batch-size" not in run.out


def test_train_help_without_an_algorithm():
    """alignkit train --help (no algorithm) -> usage and every algorithm by kind, exit 0, not dpo's help"""
    from alignkit.algorithms import ALGORITHMS

    run = run_cli("train", "--help")
    assert run.code == 0, run.err
    assert "Train dpo" not in run.out and "alignkit train ALGO --help" in run.out
    assert all(name in run.out for name in ALGORITHMS)


def test_help_into_a_closed_pipe(tmp_path):
    """alignkit train dpo --help | head -1 (or a reader that is gone) -> the output is cut quietly, no BrokenPipeError"""
    python = sys.executable
    shell = subprocess.run(f"{python} -m alignkit.cli train dpo --help | head -1", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shell.stdout.startswith("usage: alignkit train") and shell.stdout.count("\n") == 1
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr
    reader_gone = subprocess.Popen([python, "-m", "alignkit.cli", "train", "dpo", "--help"], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()  # the pipe is closed before alignkit writes its first byte
    _, err = reader_gone.communicate(timeout=120)
    assert not any(word in err.decode() for word in ("Traceback", "BrokenPipe", "Exception ignored")), err.decode()
    assert reader_gone.returncode == 141


@pytest.mark.parametrize(("extra", "needles"), [
    (("--bach-size", "4"), ("--bach-size", "(did you mean --batch-size?)")),
    (("--batch-size", "four"), ("--batch-size", "'four'")),
    (("--progress", "maybe"), ("maybe",)),
])
def test_parse_error_of_a_flag_is_one_line(tiny_model_dir, data, tmp_path, extra, needles):
    """--bach-size 4 (a mistyped flag), --batch-size four -> one line naming the flag (tyro's box flattened), exit 2"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", *extra))
    line = assert_one_line_error(run, "train", *needles)
    assert "│" not in run.err and "╭" not in run.err and len(line) < 200


def test_option_without_its_value(tiny_model_dir, data, tmp_path):
    """alignkit train dpo --config (no value) -> one-line error, exit 2"""
    assert_one_line_error(run_cli("train", "dpo", "--config"), "train", "--config needs a value")
    assert_one_line_error(run_cli("train", "dpo", "--set", "--lr", "0.1"), "train", "--set needs a value")


def test_train_without_an_algorithm(data):
    """alignkit train --data pairs.jsonl (no algorithm, no recipe) -> one-line error, exit 2"""
    assert_one_line_error(run_cli("train", "--data", data), "train", "name an algorithm")


def test_train_without_data(tiny_model_dir, tmp_path, no_model_loads):
    """alignkit train dpo without --data -> one-line error, exit 2"""
    run = run_cli("train", "dpo", "--model", tiny_model_dir, "--output", tmp_path / "run")
    assert_one_line_error(run, "train", "--data is required")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, no_model_loads):
    """alignkit train --resume DIR where DIR holds no config.yaml (no algorithm given) -> one-line error, not a fresh dpo run"""
    (tmp_path / "not-a-run").mkdir()
    run = run_cli("train", "--resume", tmp_path / "not-a-run")
    assert_one_line_error(run, "train", f"--resume {tmp_path / 'not-a-run'}", "no config.yaml")


def test_recipe_with_an_unknown_algorithm(tiny_model_dir, data, tmp_path):
    """a recipe with algorithm: nosuch -> one-line error naming the recipe and the algorithm, exit 2"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithm: nosuch\nmodel: {tiny_model_dir}\ndata: {data}\n")
    assert_one_line_error(run_cli("train", "--config", recipe), "train", str(recipe), "'nosuch'")


def test_eval_holdout_count(tiny_model_dir, data, tmp_path, caplog):
    """--eval-holdout 4 -> 4 of the 8 rows are held out (a count when >= 1), 4 train"""
    caplog.set_level(logging.INFO, logger="alignkit")
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--eval-holdout", "4", "--max-steps", "1",
                         "--batch-size", "4"))
    assert run.code == 0, run.err
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "training data: 4 examples" in logged and "evaluation data: 4 examples" in logged
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["eval_holdout"] == 4


def test_eval_holdout_leaving_no_training_rows(tiny_model_dir, data, tmp_path, no_model_loads):
    """--eval-holdout 8 of 8 rows -> one-line error naming --eval-holdout, before the model loads"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--eval-holdout", "8"))
    assert_one_line_error(run, "train", "--eval-holdout 8", "8 of 8 rows")


@pytest.mark.parametrize("value", ["1.5", "-0.2"])
def test_eval_holdout_neither_fraction_nor_count(tiny_model_dir, data, tmp_path, no_model_loads, value):
    """--eval-holdout 1.5 or -0.2 (not a fraction in (0, 1), not a whole count) -> one-line error"""
    run = run_cli(*train(tiny_model_dir, data, tmp_path, "dpo", "--eval-holdout", value))
    assert_one_line_error(run, "train", "--eval-holdout", "a fraction in (0, 1) or a whole number", value)


def test_algorithms_verb_with_a_mistyped_option():
    """alignkit algorithms --markdwn -> one-line error naming it, not the plain table"""
    run = run_cli("algorithms", "--markdwn")
    assert_one_line_error(run, "algorithms", "--markdwn", "--markdown")
    assert "grpo" not in run.out


@pytest.mark.parametrize(("extra", "needle"), [
    (("--batch-size", "0"), "--batch-size: must be >= 1"),
    (("--n-bootstrap", "0"), "--n-bootstrap: must be >= 1"),
    (("--seed", "-1"), "--seed: must be >= 0"),
    (("--data", "nosuch.jsonl"), "--data nosuch.jsonl: no such file"),
    (("--output", "FILE/results.json"), "--output"),
])
def test_eval_rm_arguments_checked_before_loading(tiny_model_dir, data, tmp_path, no_model_loads, extra, needle):
    """alignkit eval-rm --batch-size 0, --n-bootstrap 0, --seed -1, a missing --data file, an --output that cannot be written -> one-line error before the model loads"""
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, not a directory")
    extra = tuple(str(tmp_path / x) if x.startswith("FILE") else x for x in extra)
    args = ["eval-rm", "--model", str(tiny_model_dir), "--data", str(data), *extra]
    assert_one_line_error(run_cli(*args), "eval-rm", needle)
