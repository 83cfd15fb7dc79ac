"""`--nonfinite stop`, offline and online: the first step whose gradient is not finite stops
the run before its update, with one line at the CLI (exit 1, no traceback)."""

from __future__ import annotations

import pytest
import torch
from run_helpers import write_jsonl
from test_online import PROMPTS

from alignkit.cli import main
from alignkit.testing import synthetic_pairs
from alignkit.training.run.degenerate import NonFiniteStop


@pytest.fixture
def infinite_gradients(monkeypatch):
    """Every gradient norm reads inf from step 2 on (as a NaN loss would make it)."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *args, **kwargs):
        calls.append(1)
        norm = real(params, max_norm, *args, **kwargs)
        return norm if len(calls) < 2 else norm * float("inf")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return calls


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_nonfinite_stop_is_one_line(algorithm, infinite_gradients, tiny_model_dir, tmp_path, capsys):
    if algorithm == "grpo":
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p} for p in PROMPTS])
        extra = ["--reward", "length:4", "--set", "group_size=2", "--set", "max_new_tokens=4"]
    else:
        data = write_jsonl(tmp_path / "d.jsonl", synthetic_pairs(8, seed=0))
        extra = []
    code = main(["train", algorithm, "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "o"),
                 "--batch-size", "2", "--max-steps", "4", "--nonfinite", "stop", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith("alignkit train: error: step 2: non-finite") and "--nonfinite stop" in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o" / "final").exists()


def test_the_error_is_a_one_line_runtime_error():
    error = NonFiniteStop(3, "gradient")
    assert isinstance(error, RuntimeError) and error.one_line and str(error).startswith("step 3: non-finite gradient")
