"""Listwise training (`pro`, `listwise_dpo`) end to end on a tiny model: ragged collation,
the top-ranked completion's log-prob rises relative to the bottom one, bad input fails clearly."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import read_metrics

import alignkit
from alignkit.data import DataError, RankedExample
from alignkit.testing import synthetic_pairs, synthetic_ranked
from alignkit.training.offline.listwise import collate_ranked, to_grid


def test_collate_ranked_flattens_ragged_lists():
    examples = [
        RankedExample([1, 2], [[3], [4, 5], [6]], [0.0, 2.0, 1.0], row=0, extras={"ref_logps": torch.tensor([-1.0, -2.0, -3.0])}),
        RankedExample([7], [[8, 9, 10], [11]], [1.0, 0.0], row=1, extras={"ref_logps": torch.tensor([-4.0, -5.0])}),
    ]
    batch = collate_ranked(examples, pad_id=0)
    assert batch["input_ids"].shape == (5, 4)  # 3 + 2 rows, longest prompt+response = 1 + 3
    assert batch["input_ids"][3].tolist() == [7, 8, 9, 10]
    assert batch["candidate_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["scores"].tolist() == [[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]]
    grid = to_grid(torch.arange(5.0), batch["candidate_mask"])
    assert grid.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]]


@pytest.mark.parametrize("algorithm", ["pro", "listwise_dpo"])
def test_listwise_raises_the_top_ranked_completion(tiny_model_dir, tmp_path, algorithm):
    rows = synthetic_ranked(48, seed=1)
    extra = {"beta": 0.5} if algorithm == "listwise_dpo" else {}
    alignkit.train(
        algorithm, model=str(tiny_model_dir), data=rows[:40], eval_data=rows[40:], output_dir=tmp_path / "run",
        batch_size=8, max_steps=20, lr=3e-3, warmup_ratio=0.0, progress=False, **extra,
    )
    metrics = read_metrics(tmp_path / "run")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in metrics[0], key
    if algorithm == "listwise_dpo":
        # policy == reference at step 1: each utility is 0, -log P = sum_k log(#remaining)
        first_batch_bound = (math.log(3) + math.log(2), math.log(2))
        assert min(first_batch_bound) - 1e-3 <= metrics[0]["loss"] <= max(first_batch_bound) + 1e-3
    first_gap = metrics[0]["logps/chosen"] - metrics[0]["logps/rejected"]
    late_gap = sum(r["logps/chosen"] - r["logps/rejected"] for r in metrics[-4:]) / 4
    assert late_gap > first_gap + 1.0
    assert metrics[-1]["eval/rewards/accuracies"] >= 0.9


def test_listwise_rejects_pairwise_data(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="ranked"):
        alignkit.train("pro", model=str(tiny_model_dir), data=synthetic_pairs(4), output_dir=tmp_path / "x",
                       progress=False)


def test_ranked_row_with_one_completion_names_the_row(tiny_model_dir, tmp_path):
    rows = synthetic_ranked(4)
    rows[2]["completions"], rows[2]["scores"] = rows[2]["completions"][:1], rows[2]["scores"][:1]
    with pytest.raises(DataError, match=r"row 3.*at least 2"):
        alignkit.train("listwise_dpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "y",
                       progress=False)
