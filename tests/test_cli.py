"""The command line: verbs, flags, --set, recipes and the README's generated table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import read_metrics, write_jsonl

from alignkit.algorithms import ALGORITHMS, readme_with_table
from alignkit.cli import main
from alignkit.testing import synthetic_pairs
from alignkit.training.run.config import parse_set_values

ROOT = Path(__file__).resolve().parents[1]


def test_readme_algorithm_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert readme == readme_with_table(readme), "run: python -m alignkit.algorithms README.md"
    for name in ALGORITHMS:
        assert f"| `{name}` |" in readme


def test_algorithms_verb_lists_every_algorithm(capsys):
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in ("sft", "rm", "dpo"):
        assert name in out


def test_train_verb_writes_metrics_config_and_final(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8))
    out = tmp_path / "run"
    code = main(["train", "dpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--set", "beta=0.25", "--no-progress"])
    assert code == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["hparams"] == {"beta": 0.25} and config["max_steps"] == 2
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all("loss" in r for r in rows)
    assert (out / "final" / "model.safetensors").exists()


def test_bad_input_is_one_clear_error_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": 3}])
    args = ["train", "dpo", "--model", str(tiny_model_dir), "--output", str(tmp_path / "r"), "--no-progress"]
    assert main([*args, "--data", data]) == 2
    err = capsys.readouterr().err
    assert "alignkit train: error:" in err and "pairs.jsonl" in err and "Traceback" not in err
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_pairs(4))
    assert main([*args, "--data", good, "--set", "betta=0.2"]) == 2
    assert "unknown hyper-parameter(s) ['betta']" in capsys.readouterr().err


def test_recipe_with_set_override(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "dpo", "model": str(tiny_model_dir), "data": data, "output": str(tmp_path / "r"),
        "max_steps": 1, "batch_size": 4, "progress": False, "hparams": {"beta": 0.1},
    }))
    assert main(["train", "--config", str(recipe), "--set", "beta=0.3", "--set", "lr=0.001"]) == 0
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["hparams"]["beta"] == 0.3 and config["lr"] == 0.001


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "dpo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--batch-size" in result.stdout and "--lora-r" in result.stdout


def test_shipped_recipes_parse_and_name_registered_algorithms():
    from alignkit.training.run.config import TrainConfig

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        config = TrainConfig.from_yaml(path)
        assert config.algorithm in ALGORITHMS, path


def test_train_help_names_each_algorithms_hyper_parameters():
    from alignkit.cli import hparams_help

    assert "beta=0.1" in hparams_help("dpo", ALGORITHMS) and "ref_sync" in hparams_help("dpo", ALGORITHMS)
    assert "gamma=0.5" in hparams_help("simpo", ALGORITHMS)
    assert "group_size=" in hparams_help("grpo", ALGORITHMS)
    assert "heads" in hparams_help("rm_bayes", ALGORITHMS)  # required ones are named
    for name in ALGORITHMS:
        assert hparams_help(name, ALGORITHMS), name


def test_readme_algorithm_table_rows_have_five_cells():
    """A `|` inside a cell (data formats `a|b`) is escaped, so no row splits into extra columns."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- algorithms:start -->")[1].split("<!-- algorithms:end -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == len(ALGORITHMS) + 1
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 7, row


def test_a_repeated_set_key_is_refused():
    assert parse_set_values(["beta=0.1", "group_size=4"]) == {"beta": 0.1, "group_size": 4}
    with pytest.raises(ValueError, match="--set beta given more than once"):
        parse_set_values(["beta=0.1", "group_size=4", "beta=0.2"])


def test_a_set_value_yaml_would_cut_at_a_comment_is_refused():
    """YAML reads ` #...` as a comment: `judges=regex:a #b` would silently judge `regex:a`."""
    with pytest.raises(ValueError, match=r"--set judges=regex:a #b: '#b' would be read as a YAML comment"):
        parse_set_values(["judges=regex:a #b"])
    with pytest.raises(ValueError, match="YAML comment"):
        parse_set_values(["weights=[1, 2] # two"])
    assert parse_set_values(["judges='regex:a #b'", "x=a#b", 'y="c # d"']) == {
        "judges": "regex:a #b", "x": "a#b", "y": "c # d"}


def test_train_grpo_help_lists_the_multi_turn_flags():
    result = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "grpo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--env", "--tools", "--user-model"):
        assert flag in result.stdout, flag


MULTI_TURN_ENV = '''
class TwoTurns:
    """The user asks, then says "again"; the reward is the e's of the policy's second turn."""

    def reset(self, row):
        self.turn = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        self.turn += 1
        if self.turn == 1:
            return {"role": "user", "content": "again"}, 0.0, False, {}
        return None, float(messages[-1]["content"].count("e")), True, {"turn": self.turn}
'''


def test_cli_multi_turn_run_with_an_env_file_and_a_bad_env_spec(tiny_model_dir, tmp_path):
    """`--env file.py:Factory` without --reward (the environment's rewards are the signal) trains
    a step end to end; a spec naming nothing is one error line and exit code 2."""
    env = tmp_path / "two_turns.py"
    env.write_text(MULTI_TURN_ENV)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say hi.", "Tell me a story.")])
    args = [sys.executable, "-m", "alignkit.cli", "train", "grpo", "--model", str(tiny_model_dir), "--data", data,
            "--max-steps", "1", "--batch-size", "2", "--no-progress", "--allow-degenerate",
            "--set", "max_new_tokens=8", "--set", "group_size=2", "--set", "max_turns=2"]
    done = subprocess.run([*args, "--output", str(tmp_path / "run"), "--env", f"{env}:TwoTurns"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = read_metrics(tmp_path / "run")
    assert row["turns/mean"] == 2.0 and row["env/turn"] == 2.0 and row["episode/finish_done"] == 1.0
    assert row["reward/mean"] == row["episode/return"]  # the environment's reward, no --reward
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["env"] == f"{env}:TwoTurns"
    bad = subprocess.run([*args, "--output", str(tmp_path / "bad"), "--env", f"{env}:NoSuchFactory"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("alignkit train: error:")]
    assert errors == [f"alignkit train: error: --env '{env}:NoSuchFactory': '{env}' has no attribute 'NoSuchFactory'"]
    assert "Traceback" not in bad.stderr
