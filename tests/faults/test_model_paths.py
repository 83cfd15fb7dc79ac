"""Model paths: a --model (--ref-model, --reward-model, eval-rm --model) that is missing, a
directory without tokenizer files or weights, a truncated safetensors file, a hub id while
HF_HUB_OFFLINE is set. Each fails as one line before any weights load, and a path is never
looked up on the hub. (The policy: alignkit/models/sources.py, loading.check_model_source.)"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from faults.helpers import assert_one_line_error, run_cli


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every network connection attempted (each one refused)."""
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def copy_model(source: Path, target: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target)
    for name in drop:
        (target / name).unlink()
    return target


def truncated_copy(source: Path, target: Path) -> Path:
    copy_model(source, target)
    weights = target / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return target


def train_dpo(model, data, tmp_path, *extra) -> list[str]:
    return ["train", "dpo", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"),
            "--no-progress", *extra]


@pytest.mark.parametrize("model", ["./no-such-model", "runs/no-such-run/final", "runs/dpo", "~/no-such-model-dir",
                                   "/no/such/model", "no-such-model.gguf"])
def test_missing_model_path_is_not_looked_up_on_the_hub(data, tmp_path, monkeypatch, connections,
                                                        no_model_loads, model):
    """--model ./no-such-model (a path: a separator, a leading . ~ /, or its first part exists) -> one-line error naming it, no hub lookup"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/dpo" exists partially: a path, not the hub id runs/dpo
    run = run_cli(*train_dpo(model, data, tmp_path))
    assert_one_line_error(run, "train", f"--model {model}", "no such model directory")
    assert connections == []


def test_hub_id_while_offline_is_set_in_the_environment(data, tmp_path, monkeypatch, connections, no_model_loads):
    """--model org/name with HF_HUB_OFFLINE=1 set in the environment (after the hub library read it) -> one-line error, no network attempt"""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # imported before it was set
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    run = run_cli(*train_dpo("no-such-org/no-such-model", data, tmp_path))
    assert_one_line_error(run, "train", "--model no-such-org/no-such-model", "HF_HUB_OFFLINE", "hub cache")
    assert connections == []


def test_model_directory_without_tokenizer_files(tiny_model_dir, data, tmp_path, no_model_loads):
    """--model DIR without tokenizer files -> one-line error naming DIR and the tokenizer"""
    model = copy_model(tiny_model_dir, tmp_path / "model", drop=("tokenizer.json", "tokenizer_config.json"))
    run = run_cli(*train_dpo(model, data, tmp_path))
    assert_one_line_error(run, "train", f"--model {model}", "no tokenizer files")


@pytest.mark.parametrize("pickled", [False, True])
def test_model_directory_without_safetensors_weights(tiny_model_dir, data, tmp_path, no_model_loads, pickled):
    """--model DIR without weights (none, or only a pickled pytorch_model.bin) -> one-line error naming DIR and the weights"""
    model = copy_model(tiny_model_dir, tmp_path / "model", drop=("model.safetensors",))
    if pickled:
        (model / "pytorch_model.bin").write_bytes(b"pickle")
    run = run_cli(*train_dpo(model, data, tmp_path))
    line = assert_one_line_error(run, "train", f"--model {model}", "no *.safetensors weights")
    assert ("pytorch_model.bin" in line) == pickled


def test_truncated_safetensors_file(tiny_model_dir, data, tmp_path, no_model_loads):
    """--model DIR whose model.safetensors is truncated (a partial copy or download) -> one-line error naming the file"""
    model = truncated_copy(tiny_model_dir, tmp_path / "model")
    run = run_cli(*train_dpo(model, data, tmp_path))
    assert_one_line_error(run, "train", f"--model {model}", "model.safetensors", "truncated")


@pytest.mark.parametrize(("algorithm", "flag", "breakage"), [
    ("dpo", "--ref-model", "truncated"),
    ("dpo", "--ref-model", "missing"),
    ("grpo", "--reward-model", "no tokenizer"),
    ("grpo", "--reward-model", "missing"),
])
def test_broken_reference_or_reward_model_path(tiny_model_dir, data, tmp_path, no_model_loads, connections,
                                               algorithm, flag, breakage):
    """--ref-model / --reward-model naming a truncated, incomplete or missing model -> one-line error naming the flag, before the policy loads"""
    target = tmp_path / "other"
    if breakage == "truncated":
        truncated_copy(tiny_model_dir, target)
    elif breakage == "no tokenizer":
        copy_model(tiny_model_dir, target, drop=("tokenizer.json", "tokenizer_config.json"))
    args = ["train", algorithm, "--model", str(tiny_model_dir), "--data", str(data), "--output",
            str(tmp_path / "run"), flag, str(target)]
    run = run_cli(*args)
    assert_one_line_error(run, "train", f"{flag} {target}")
    assert connections == []


def test_eval_rm_missing_model_path(data, tmp_path, connections, no_model_loads):
    """alignkit eval-rm --model ./no-such-rm -> one-line error naming it, no hub lookup"""
    run = run_cli("eval-rm", "--model", "./no-such-rm", "--data", data)
    assert_one_line_error(run, "eval-rm", "--model ./no-such-rm", "no such model directory")
    assert connections == []


def test_eval_rm_truncated_model(tiny_model_dir, data, tmp_path, no_model_loads):
    """alignkit eval-rm --model DIR with a truncated safetensors file -> one-line error before loading"""
    model = truncated_copy(tiny_model_dir, tmp_path / "rm")
    run = run_cli("eval-rm", "--model", model, "--data", data)
    assert_one_line_error(run, "eval-rm", f"--model {model}", "truncated")
