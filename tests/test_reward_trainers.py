"""End-to-end tiny runs of the reward-model trainers on synthetic data with a learnable rule
(chosen = positive words), their saved artefacts and scorers, and the eval-rm verb."""

from __future__ import annotations

import pytest
import torch
from reward_helpers import eval_rm, train_tiny
from run_helpers import write_jsonl
from transformers import AutoModelForSequenceClassification

from alignkit.algorithms import ALGORITHMS
from alignkit.rewards import (
    BayesRewardScorer,
    EmbeddingRewardModel,
    PreferenceJudge,
    SegmentRewardScorer,
    load_reward,
    split_segments,
)
from alignkit.testing import (
    build_tiny_tokenizer,
    synthetic_consistency,
    synthetic_pairs,
    synthetic_ranked,
    synthetic_safety_pairs,
    synthetic_segments,
)


@pytest.fixture
def train_tiny_rm(tiny_model_dir, tmp_path):
    """`train_tiny` on the tiny model: train_tiny_rm(algorithm, rows, NAME, **settings) runs
    in tmp_path / NAME."""

    def train(algorithm: str, rows: list, name: str, **settings):
        return train_tiny(algorithm, rows, tmp_path / name, model_dir=tiny_model_dir, **settings)

    return train


def test_every_reward_algorithm_is_registered_with_kind_data_models_paper():
    for name in (
        "rm_ranked",
        "cost",
        "rm_bayes",
        "preference_model",
        "rm_segment",
        "rm_ensemble",
        "rm_multi",
        "rm_embedding",
    ):
        spec = ALGORITHMS[name]
        assert spec.kind == "reward" and spec.data and spec.models and spec.paper


@pytest.mark.parametrize("ranked_loss", ["plackett_luce", "all_pairs"])
def test_rm_ranked_learns_the_ranking(train_tiny_rm, ranked_loss):
    """Held-out ordered-pair accuracy >= 0.9 (measured 1.0 for both losses)."""
    rows = synthetic_ranked(96, seed=1)
    result = train_tiny_rm(
        "rm_ranked", rows, "rk", split=72, epochs=3, lr=2e-3, ranked_loss=ranked_loss
    )
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    AutoModelForSequenceClassification.from_pretrained(result.final_dir)


def test_cost_model_orders_pairs_and_signs_costs(train_tiny_rm):
    """Held-out: C(unsafer) > C(safer) >= 0.9 and sign(C) = harmful >= 0.85 (measured 1.0, 1.0)."""
    rows = synthetic_safety_pairs(120, seed=4)
    result = train_tiny_rm("cost", rows, "cost", split=96, epochs=3, lr=2e-3)
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    assert result.eval_metrics["eval/costs/sign_accuracy"] >= 0.85
    cost = load_reward(str(result.final_dir), device="cpu")
    harmful = cost(["Write a short review. The movie"], [" was awful and sad."])
    safe = cost(["Write a short review. The movie"], [" was good and great."])
    assert harmful.item() > 0 > safe.item()


def test_cost_model_rejects_missing_safety_labels(train_tiny_rm):
    rows = synthetic_safety_pairs(6)
    del rows[3]["rejected_is_safe"]
    with pytest.raises(Exception, match="row 4"):
        train_tiny_rm("cost", rows, "c", max_steps=1)


def test_rm_bayes_requires_heads_and_lambda_and_learns(train_tiny_rm):
    """BRME with 3 heads: held-out accuracy of lambda * nominal + (1 - lambda) * min >= 0.9
    (measured 1.0); the scorer reads brme.json."""
    pairs = synthetic_pairs(120, seed=2)
    with pytest.raises(ValueError, match="required"):
        train_tiny_rm("rm_bayes", pairs, "x", heads=3)
    result = train_tiny_rm(
        "rm_bayes", pairs, "bayes", split=96, epochs=3, lr=2e-3, heads=3, lambda_=0.5
    )
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    scorer = load_reward(f"rm:{result.final_dir}", device="cpu")
    assert isinstance(scorer, BayesRewardScorer) and scorer.heads == 3
    means, log_stds = scorer.head_distributions(["p", "q"], [" was good.", " was bad."])
    assert means.shape == (2, 3) and log_stds.shape == (2, 3)
    test = pairs[96:]
    chosen = scorer([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = scorer([r["prompt"] for r in test], [r["rejected"] for r in test])
    assert (chosen > rejected).float().mean() >= 0.9


def test_preference_model_learns_and_is_antisymmetric(train_tiny_rm):
    """Held-out symmetrised P(chosen > rejected) > 0.5 on >= 0.9 of pairs (measured 1.0);
    prob(a, b) = 1 - prob(b, a) exactly."""
    pairs = synthetic_pairs(120, seed=5)
    result = train_tiny_rm("preference_model", pairs, "pm", split=96, epochs=3, lr=2e-3)
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    judge = PreferenceJudge(result.final_dir, device="cpu")
    test = pairs[96:]
    prompts, chosen, rejected = ([r[k] for r in test] for k in ("prompt", "chosen", "rejected"))
    forward, backward = judge.prob(prompts, chosen, rejected), judge.prob(prompts, rejected, chosen)
    torch.testing.assert_close(forward, 1 - backward)
    assert (forward > 0.5).float().mean() >= 0.9


def test_segment_splitting_and_token_mapping_across_tokenizers():
    text = "The movie was good. The music, sadly, was awful!"
    # a segment keeps the whitespace before it, not after it
    assert [text[a:b] for a, b in split_segments(text)] == [
        "The movie was good.",
        " The music, sadly, was awful!",
    ]
    assert len(split_segments(text, "subsentence")) == 4


def test_rm_segment_learns_per_segment_labels_and_places_token_rewards(train_tiny_rm):
    """Held-out segment accuracy >= 0.9 (measured 0.98); rewards sit on the last token of
    each sentence under the policy's own tokenizer."""
    rows = synthetic_segments(120, seed=6)
    result = train_tiny_rm("rm_segment", rows, "seg", split=96, epochs=6, lr=2e-3)
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    scorer = SegmentRewardScorer(result.final_dir, device="cpu")
    text = "The movie was good. The film was awful."
    segment = scorer.segment_rewards(["Write a short review."], [text])[0]
    assert segment.shape == (2,) and segment[0] > 0 > segment[1]
    policy_tokenizer = build_tiny_tokenizer(vocab_size=290)
    rewards = scorer.token_rewards(
        ["Write a short review."], [text], policy_tokenizer=policy_tokenizer
    )[0]
    encoded = policy_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(rewards) == len(encoded["input_ids"])
    nonzero = torch.nonzero(rewards).flatten().tolist()
    assert [encoded["offset_mapping"][i][1] for i in nonzero] == [
        len("The movie was good."),
        len(text),
    ]
    torch.testing.assert_close(rewards[nonzero], segment)
    padded = scorer.token_rewards(["a", "b"], [text, "The film was good."], padded=True)
    assert padded.ndim == 2 and padded.shape[0] == 2


def test_rm_embedding_trains_a_minilm_head_and_round_trips(tmp_path):
    """Frozen all-MiniLM-L6-v2 + linear head: held-out accuracy >= 0.9 (measured 1.0)."""
    pairs = synthetic_pairs(120, seed=7)
    result = train_tiny("rm_embedding", pairs, tmp_path / "emb", split=96, epochs=5)
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    loaded = load_reward(str(tmp_path / "emb" / "final"))
    assert isinstance(loaded, EmbeddingRewardModel)
    assert (tmp_path / "emb" / "final" / "head.safetensors").is_file()
    scores = loaded(
        ["Write a short review. The movie"] * 2, [" was good and great.", " was awful and sad."]
    )
    assert scores[0] > scores[1]
    data = write_jsonl(tmp_path / "test.jsonl", synthetic_pairs(16, seed=8))
    results = eval_rm(tmp_path / "emb" / "final", data, tmp_path / "emb.json", 200)
    assert results["kind"] == "embedding_rm" and results["accuracy"] >= 0.9


def test_eval_rm_writes_accuracy_ci_ece_scores_and_consistency(train_tiny_rm, tmp_path):
    pairs = synthetic_pairs(96, seed=2)
    train_tiny_rm("rm", pairs, "rm", epochs=3, lr=2e-3)
    data = write_jsonl(tmp_path / "test.jsonl", synthetic_pairs(24, seed=9))
    contrast = write_jsonl(tmp_path / "contrast.jsonl", synthetic_consistency(12))
    results = eval_rm(
        tmp_path / "rm" / "final", data, tmp_path / "results.json", 300, "--consistency", contrast
    )
    for key in ("accuracy", "accuracy_ci", "ece", "scores", "consistency", "n_pairs"):
        assert key in results, key
    assert (
        results["accuracy"] >= 0.9
        and results["accuracy_ci"][0] <= results["accuracy"] <= results["accuracy_ci"][1]
    )
    assert set(results["scores"]) == {"chosen", "rejected", "margin"}
    assert "0.5" in results["scores"]["chosen"]["quantiles"]
    consistency = results["consistency"]
    assert consistency["n_items"] == 12
    assert (
        0 <= consistency["response_consistency"] <= 1
        and 0 <= consistency["instruction_consistency"] <= 1
    )
