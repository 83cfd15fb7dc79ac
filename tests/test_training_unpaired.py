"""Unpaired (`kto`) and pointwise (A-LoL family, `crlft`, `ift`) training end to end on a tiny
model: KL pairs rotate within the batch, the desirable completion's log-prob rises relative to the
undesirable one, the A-LoL value head fits a planted baseline and filters by advantage sign,
weighted NLL falls on held-out data, bad input fails naming the row."""

from __future__ import annotations

import pytest
import torch
from run_helpers import read_metrics

import alignkit
from alignkit.data import DataError, RowTable, SeqExample, collate_sequences, tokenize_sft
from alignkit.models import load_model, sequence_logps
from alignkit.objectives.alol import r_squared
from alignkit.testing import (
    planted_reward,
    synthetic_rewarded,
    synthetic_sft,
    synthetic_sourced,
    synthetic_unpaired,
)
from alignkit.training.offline.tasks import make_task
from alignkit.training.offline.unpaired import collate_unpaired
from alignkit.training.run.config import TrainConfig


@torch.no_grad()
def sentiment_gap(model, tokenizer, seed: int = 7) -> float:
    """Mean summed log-prob of held-out positive reviews minus negative ones."""
    rows = synthetic_unpaired(16, seed=seed)
    examples, _ = tokenize_sft(RowTable(rows), tokenizer, max_length=64)
    batch = collate_sequences(examples, tokenizer.pad_token_id)
    model.eval()
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    labels = torch.tensor([r["label"] for r in rows])
    return float(logps[labels].mean() - logps[~labels].mean())


def test_kl_pairs_rotate_completions_within_the_batch():
    examples = [SeqExample([1], [10, 11], 0, {"label": True}), SeqExample([2, 2], [20], 1, {"label": False}),
                SeqExample([3], [30], 2, {"label": True})]
    batch = collate_unpaired(examples, pad_id=0, max_length=8)
    assert batch["kl_input_ids"].tolist() == [[1, 30, 0, 0], [2, 2, 10, 11], [3, 20, 0, 0]]  # (x_i, y_{i-1})
    assert batch["kl_response_mask"][1].tolist() == [False, False, True, True]
    assert batch["label"].tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_kto_raises_desirable_over_undesirable(tiny_model_dir, tmp_path, lora_r):
    _, tokenizer = load_model(str(tiny_model_dir))
    before = sentiment_gap(load_model(str(tiny_model_dir))[0], tokenizer)
    result = alignkit.train(
        "kto", model=str(tiny_model_dir), data=synthetic_unpaired(48, seed=1), output_dir=tmp_path / "kto",
        batch_size=8, max_steps=24, lr=1e-2 if lora_r else 3e-3, lora_r=lora_r, beta=0.5,
        warmup_ratio=0.0, progress=False,
    )
    metrics = read_metrics(tmp_path / "kto")
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy == reference: 1 - sigma(0)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert key in metrics[-1], key
    late = metrics[-4:]
    assert sum(r["rewards/chosen"] - r["rewards/rejected"] for r in late) / 4 > 0.5
    assert sentiment_gap(result.model, tokenizer) > before + 2.0


def test_unpaired_row_without_label_names_the_row(tiny_model_dir, tmp_path):
    rows = synthetic_unpaired(6)
    del rows[4]["label"]
    with pytest.raises(DataError, match=r"row 5.*'label' is missing"):
        alignkit.train("kto", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "x", progress=False)


def alol_task(tiny_model_dir, tmp_path, rows, **hparams):
    config = TrainConfig(algorithm="alol", model=str(tiny_model_dir), batch_size=8, max_length=64,
                         progress=False, output=str(tmp_path))
    config.apply_overrides({"reward": planted_reward, "value_max_new_tokens": 8, **hparams})
    task = make_task(config)
    model, tokenizer = load_model(str(tiny_model_dir))
    table = RowTable(rows)
    examples, _ = task.tokenize(table, tokenizer)
    task.prepare(model, tokenizer, {"train": (table, examples), "eval": (None, [])}, tmp_path)
    return task, examples


def test_alol_value_head_fits_the_planted_baseline_and_filters_by_advantage(tiny_model_dir, tmp_path):
    rows = synthetic_rewarded(64, seed=3)
    task, kept = alol_task(tiny_model_dir, tmp_path, rows, value_samples=2)
    # reference samples carry almost no sentiment words: their reward is the prompt's level
    assert task.value_r2 > 0.5
    positive = sum(r["reward"] > planted_reward([r["prompt"]], [""])[0] for r in rows)
    assert task.filter_counts["train"] == (positive, 64) == (len(kept), 64)
    assert all(rows[ex.row]["reward"] - ex.extras["value"] > 0 for ex in kept)
    assert all("ref_token_logps" in ex.extras for ex in kept)
    assert all(len(ex.extras["ref_token_logps"]) == len(ex.completion_ids) for ex in kept)
    # and on prompts it was not fitted on, V predicts the planted baseline (the level digit)
    model, tokenizer = load_model(str(tiny_model_dir))
    fresh = synthetic_rewarded(40, seed=99)
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in fresh]
    weight, bias = task.value_head
    predicted = task.prompt_features(model, prompt_ids, tokenizer.pad_token_id) @ weight + bias
    baseline = torch.tensor(planted_reward([r["prompt"] for r in fresh], [""] * len(fresh)))
    assert float(r_squared(predicted, baseline)) > 0.5


def test_alol_needs_a_reward_function(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward"):
        alignkit.train("alol", model=str(tiny_model_dir), data=synthetic_rewarded(8), output_dir=tmp_path / "x",
                       progress=False)


@pytest.mark.parametrize("algorithm", ["alol", "alol_ref_free", "alol_seq", "alol_kl"])
def test_alol_family_raises_positive_over_negative_reviews(tiny_model_dir, tmp_path, algorithm):
    _, tokenizer = load_model(str(tiny_model_dir))
    before = sentiment_gap(load_model(str(tiny_model_dir))[0], tokenizer)
    result = alignkit.train(
        algorithm, model=str(tiny_model_dir), data=synthetic_rewarded(48, seed=4), output_dir=tmp_path / algorithm,
        batch_size=8, max_steps=16, lr=3e-3, warmup_ratio=0.0, progress=False, value_max_new_tokens=8,
        # api.train's own `reward` argument goes to online runners only, so set it on the config
        config=TrainConfig(reward="alignkit.testing:planted_reward"),
    )
    metrics = read_metrics(tmp_path / algorithm)
    assert metrics[0]["advantage/mean"] > 0
    assert sentiment_gap(result.model, tokenizer) > before + 2.0
    assert "alignkit.testing:planted_reward" in (tmp_path / algorithm / "config.yaml").read_text()


def test_crlft_lowers_held_out_weighted_nll(tiny_model_dir, tmp_path):
    rows = synthetic_sourced(80, seed=0)
    result = alignkit.train(
        "crlft", model=str(tiny_model_dir), data=rows[:64], eval_data=rows[64:], output_dir=tmp_path / "c",
        batch_size=8, max_steps=30, lr=5e-3, eval_steps=10, progress=False,
    )
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "c") if "eval/loss" in r]
    assert evals[-1] < 0.7 * evals[0]
    assert 0.1 <= result.metrics["weights/mean"] <= 1.0


def test_crlft_unknown_class_names_the_row(tiny_model_dir, tmp_path):
    rows = synthetic_sourced(5)
    rows[3]["source"] = "llama"
    with pytest.raises(DataError, match=r"row 4.*'llama'"):
        alignkit.train("crlft", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "x", progress=False)


def test_ift_lowers_held_out_nll(tiny_model_dir, tmp_path):
    rows = synthetic_sft(80, seed=0)
    alignkit.train(
        "ift", model=str(tiny_model_dir), data=rows[:64], eval_data=rows[64:], output_dir=tmp_path / "ift",
        batch_size=8, max_steps=30, lr=5e-3, eval_steps=10, progress=False,
    )
    metrics = read_metrics(tmp_path / "ift")
    evals = [r["eval/nll"] for r in metrics if "eval/nll" in r]
    assert evals[-1] < 0.7 * evals[0]
    assert {"loss", "nll", "nll/mixed"} <= set(metrics[0])


def test_alol_takes_a_python_reward_through_the_api(tiny_model_dir, tmp_path):
    import yaml

    from alignkit.testing import planted_reward, synthetic_rewarded

    result = alignkit.train(
        "alol", model=str(tiny_model_dir), data=synthetic_rewarded(16), output_dir=tmp_path / "alol",
        reward=planted_reward, batch_size=4, max_steps=2, progress=False,
    )
    assert result.final_dir.exists()
    saved = yaml.safe_load((tmp_path / "alol" / "config.yaml").read_text())
    assert "planted_reward" in saved["reward"]
