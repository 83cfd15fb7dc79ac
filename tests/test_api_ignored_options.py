"""`alignkit.train(...)` refuses an option the algorithm ignores, as `alignkit train` does: before,
the Python entry point ran without it (`vllm_url=` on sft, `eval_steps=` without eval data)."""

from __future__ import annotations

import pytest

import alignkit

ROWS = [{"prompt": "Say", "completion": " something nice"}] * 4


def train(tiny_model_dir, tmp_path, **options):
    return alignkit.train("sft", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "run", max_steps=1,
                          batch_size=2, progress=False, **options)


def test_an_ignored_option_is_an_error_naming_it(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--vllm-url is ignored by sft: offline algorithms sample nothing"):
        train(tiny_model_dir, tmp_path, vllm_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="--eval-steps is ignored by sft: there is no evaluation data"):
        train(tiny_model_dir, tmp_path, eval_steps=1)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_in_memory_eval_data_counts_and_default_values_are_not_given(tiny_model_dir, tmp_path):
    result = train(tiny_model_dir, tmp_path, eval_data=ROWS, eval_steps=1, lora_r=0)  # lora_r=0 is the default
    assert "eval/loss" in result.metrics
