"""End-to-end runs of the offline trainer on a tiny model: learning happens, files follow the
contract, resumed runs match uninterrupted ones step for step, bad input fails clearly."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from run_helpers import (
    PAIRWISE_DETERMINISTIC,
    assert_resumed_matches,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import alignkit
from alignkit.data import DataError
from alignkit.testing import synthetic_pairs, synthetic_sft


def test_dpo_learns_the_preference_and_writes_the_contract_files(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(48, seed=1))
    result = alignkit.train(
        "dpo", model=str(tiny_model_dir), data=data, output_dir=tmp_path / "run",
        batch_size=8, max_steps=24, lr=3e-3, beta=0.5, progress=False, warmup_ratio=0.0,
    )
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 25))
    for key in ("loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "throughput/tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at step 1
    late = rows[-4:]
    assert sum(r["rewards/accuracies"] for r in late) / 4 > 0.9
    assert sum(r["rewards/margins"] for r in late) / 4 > 0.5
    assert (tmp_path / "run" / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert isinstance(model, torch.nn.Module)


def test_sft_lowers_held_out_nll(tiny_model_dir, tmp_path):
    rows = synthetic_sft(80, seed=0)
    result = alignkit.train(
        "sft", model=str(tiny_model_dir), data=rows[:64], eval_data=rows[64:], output_dir=tmp_path / "sft",
        batch_size=8, max_steps=40, lr=5e-3, eval_steps=5, progress=False,
    )
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "sft") if "eval/loss" in r]
    assert len(evals) == 8
    assert evals[-1] < 0.7 * evals[0]
    assert result.eval_metrics["eval/loss"] == pytest.approx(evals[-1])


def test_reward_model_reaches_90_percent_on_held_out_pairs(tiny_model_dir, tmp_path):
    pairs = synthetic_pairs(120, seed=2)
    result = alignkit.train(
        "rm", model=str(tiny_model_dir), data=pairs[:96], eval_data=pairs[96:], output_dir=tmp_path / "rm",
        batch_size=8, epochs=3, lr=2e-3, progress=False,
    )
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    reward_model = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert reward_model.config.num_labels == 1


def test_lora_dpo_saves_a_merged_checkpoint(tiny_model_dir, tmp_path):
    result = alignkit.train(
        "dpo", model=str(tiny_model_dir), data=synthetic_pairs(16), output_dir=tmp_path / "lora",
        batch_size=4, max_steps=4, lr=1e-2, lora_r=4, progress=False,
    )
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, result.model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, lora_r):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=3))
    common = dict(model=str(tiny_model_dir), data=data, batch_size=4, max_steps=8, lr=5e-3,
                  save_steps=3, lora_r=lora_r, lora_dropout=0.1 if lora_r else 0.0, progress=False)
    # cut at step 5: the step-6 checkpoint was never written; the run continues from step 3
    runs = run_interrupted_and_resumed(partial(alignkit.train, "dpo", **common), tmp_path, at=5)
    assert_resumed_matches(runs.full, runs.resumed, PAIRWISE_DETERMINISTIC, steps=8)


def test_non_finite_loss_skips_the_step_without_touching_weights(tiny_model_dir, tmp_path, monkeypatch):
    from alignkit.training.offline import tasks

    original = tasks.PairwiseTask.loss
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        calls["n"] += 1
        loss, metrics = original(self, model, batch)
        if calls["n"] == 2:
            loss = loss * float("nan")
            metrics["loss"] = loss.detach()
        return loss, metrics

    monkeypatch.setattr(tasks.PairwiseTask, "loss", sometimes_nan)
    result = alignkit.train(
        "dpo", model=str(tiny_model_dir), data=synthetic_pairs(12), output_dir=tmp_path / "nan",
        batch_size=4, max_steps=3, lr=1e-3, progress=False,
    )
    rows = read_metrics(tmp_path / "nan")
    assert rows[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_bad_rows_name_the_file_and_row(tiny_model_dir, tmp_path):
    rows = synthetic_pairs(5)
    rows[3]["chosen"] = ""
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl.*4"):
        alignkit.train("dpo", model=str(tiny_model_dir), data=data, output_dir=tmp_path / "x", progress=False)


def test_wrong_data_kind_and_unknown_hparam_are_errors(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="pairwise"):
        alignkit.train("dpo", model=str(tiny_model_dir), data=synthetic_sft(4), output_dir=tmp_path / "a",
                       progress=False)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        alignkit.train("dpo", model=str(tiny_model_dir), data=synthetic_pairs(4), output_dir=tmp_path / "b",
                       progress=False, betta=0.1)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_changes_memory_not_maths(tiny_model_dir, tmp_path, lora_r):
    common = dict(model=str(tiny_model_dir), data=synthetic_pairs(8), batch_size=4, max_steps=2, lr=1e-2,
                  lora_r=lora_r, progress=False)
    alignkit.train("dpo", output_dir=tmp_path / "plain", **common)
    alignkit.train("dpo", output_dir=tmp_path / "gc", gradient_checkpointing=True, **common)
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "gc"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
