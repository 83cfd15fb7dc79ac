"""ArmoRM stages on synthetic features (ridge heads with alpha selection, verbosity
de-correlation) and the `rm_multi` trainer end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from run_helpers import write_jsonl
from transformers import AutoModelForSequenceClassification

import alignkit
from alignkit.rewards import MultiObjectiveScorer, load_reward
from alignkit.rewards.multi_objective import (
    fit_attribute_heads,
    penalize,
    ridge_fit,
    select_ridge_alpha,
    spearman,
    verbosity_penalties,
)
from alignkit.testing import synthetic_pairs, synthetic_ratings


def test_ridge_worked_example_has_no_intercept():
    """X = [[1], [2]], y = [1, 2], alpha = 1: w = 5 / 6"""
    assert ridge_fit(np.array([[1.0], [2.0]]), np.array([1.0, 2.0]), 1.0)[0] == pytest.approx(5 / 6)
    # no intercept: a constant offset in y is not absorbed
    x = np.random.default_rng(0).normal(size=(50, 2))
    assert np.allclose(ridge_fit(x, x @ [1.0, -2.0], 1e-8), [1.0, -2.0], atol=1e-6)


def test_ridge_heads_recover_planted_attribute_weights_and_skip_nan_labels():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 16))
    planted = rng.normal(size=(3, 16))
    labels = features @ planted.T + 0.05 * rng.normal(size=(600, 3))
    labels[rng.random(labels.shape) < 0.2] = np.nan  # unrated
    weights, alphas, errors = fit_attribute_heads(features, labels)
    assert weights.shape == (3, 16)
    np.testing.assert_allclose(weights, planted, atol=0.02)
    assert all(a <= 1.0 for a in alphas) and all(e < 0.01 for e in errors)


def test_alpha_selection_prefers_strong_ridge_when_features_are_noise():
    """Targets unrelated to 40 features from 60 rows: least squares overfits, a large alpha
    (shrink to ~0) wins on validation; a clean linear target picks a small alpha."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 40))
    _, noisy_alpha, _ = select_ridge_alpha(x, rng.normal(size=60))
    _, clean_alpha, _ = select_ridge_alpha(x, x @ rng.normal(size=40))
    assert noisy_alpha >= 100 and clean_alpha <= 0.1


def test_spearman_worked_example():
    """(1, 2, 3) vs (1, 3, 2): ranks (0, 1, 2) vs (0, 2, 1) -> 1 - 6 * 2 / (3 * 8) = 0.5"""
    assert spearman(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(0.5)
    assert spearman(np.array([1.0, 1, 2]), np.array([1.0, 1, 2])) == pytest.approx(1.0)


def test_verbosity_decorrelation_brings_spearman_below_threshold():
    rng = np.random.default_rng(2)
    verbosity = rng.normal(size=500)
    helpful = 0.6 * verbosity + 0.8 * rng.normal(size=500)  # length-biased attribute
    honest = rng.normal(size=500)  # already unbiased
    rewards = np.stack([helpful, honest, verbosity], axis=1)
    assert spearman(helpful, verbosity) > 0.4
    penalties = verbosity_penalties(rewards, verbosity_index=2, threshold=0.03)
    assert penalties[2] == 1.0 and penalties[1] == 0.0 and 0.0 < penalties[0] <= 0.95
    adjusted = penalize(torch.tensor(rewards), torch.tensor(penalties), 2).numpy()
    assert spearman(adjusted[:, 0], verbosity) <= 0.03
    assert np.allclose(adjusted[:, 2], 0.0)
    # smallest grid value: one step less is still above the threshold
    assert spearman(helpful - (penalties[0] - 0.05) * verbosity, verbosity) > 0.03


def test_rm_multi_end_to_end(tiny_model_dir, tmp_path):
    """Ridge heads on a frozen random tiny backbone + gate trained on pairs. The stored score
    head gives the raw attribute vector; the gated reward is beta * sum g * PENALISED r.
    Held-out pair accuracy of the gated reward >= 0.75 (measured 1.0)."""
    ratings = write_jsonl(tmp_path / "ratings.jsonl", synthetic_ratings(200, seed=0))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(96, seed=1))
    alignkit.train(
        "rm_multi",
        model=str(tiny_model_dir),
        data=ratings,
        output_dir=tmp_path / "armo",
        pairs=pairs,
        gate_width=32,
        gate_hidden_layers=1,
        gate_dropout=0.0,
        batch_size=32,
        max_steps=150,
        progress=False,
    )
    final = tmp_path / "armo" / "final"
    manifest = json.loads((final / "multi_objective.json").read_text())
    assert (
        manifest["attributes"] == ["positivity", "verbosity"] and manifest["verbosity_index"] == 1
    )
    backbone = AutoModelForSequenceClassification.from_pretrained(final)
    assert backbone.config.num_labels == 2
    scorer = load_reward(str(final), device="cpu")
    assert isinstance(scorer, MultiObjectiveScorer)
    test = synthetic_pairs(32, seed=11)
    prompts = [r["prompt"] for r in test]
    chosen, rejected = (
        scorer.scores(prompts, [r["chosen"] for r in test]),
        scorer(prompts, [r["rejected"] for r in test]),
    )
    assert chosen.attributes.shape == (32, 2) and chosen.gates.shape == (32, 2)
    expected = scorer.gate.beta * (
        chosen.gates * penalize(chosen.attributes, scorer.penalties, 1)
    ).sum(-1)
    torch.testing.assert_close(chosen.reward, expected.detach())
    assert torch.allclose(chosen.penalized[:, 1], torch.zeros(32))
    assert (chosen.reward > rejected).float().mean() >= 0.75
