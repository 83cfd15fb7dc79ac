"""Sampled KL estimators against exact KL, and Kirk et al. diversity on worked examples."""

import math

import numpy as np
import pytest
import torch

from alignkit.eval.diversity import diversity_metrics, lexical_diversity
from alignkit.eval.kl import response_logps, sequence_kl


def test_sequence_kl_worked_example_and_mask():
    """u = (log .5 - log .25, 0, junk masked): k1 = log 2; k3 = (1/2 - 1 + log 2) + 0."""
    logps = torch.tensor([[math.log(0.5), math.log(0.3), 5.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.3), -7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    out = sequence_kl(logps, ref, mask)
    assert out["k1"].item() == pytest.approx(math.log(2), abs=1e-12)
    assert out["k3"].item() == pytest.approx(0.5 - 1 + math.log(2), abs=1e-12)


def test_sampled_kl_of_categorical_sequences_matches_exact_kl():
    """Responses of T = 3 independent tokens from p; reference q. Exact sequence KL is
    3 KL(p || q); the mean of k1 and of k3 over 200k samples must be within 1.5% of it."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = 3 * float((p * (p / q).log()).sum())  # 3 x 0.2186
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000 * 3, replacement=True, generator=generator).view(-1, 3)
    out = sequence_kl(p.log()[tokens], q.log()[tokens], torch.ones_like(tokens, dtype=torch.bool))
    assert out["k1"].mean().item() == pytest.approx(exact, rel=0.015)
    assert out["k3"].mean().item() == pytest.approx(exact, rel=0.015)
    assert (out["k3"] >= 0).all()


def test_response_logps_of_a_model_against_itself_gives_zero_kl(tiny_model_dir):
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    logps = response_logps(model, ids, attention, response, batch_size=1)
    assert (logps[~response] == 0).all() and (logps[response] < 0).all()
    kl = sequence_kl(logps, logps.clone(), response)
    assert kl["k1"].abs().max().item() == 0.0


def test_sampler_logprobs_match_packed_forward_logps_of_the_same_rows(tiny_model_dir):
    """evaluate_model's KL takes the policy side from the sampler: its log-probs must be the
    teacher-forced ones at the sampling temperature, and the packed (shared prompts),
    grouped forward must give the padded forward's values."""
    from alignkit.lab.generation_eval import sample
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    prompts = [tokenizer("the cat sat")["input_ids"], tokenizer("a dog ran far away")["input_ids"]]
    drawn = sample(model, tokenizer, prompts, 3, max_new_tokens=6, temperature=0.7, seed=3)
    rows = (drawn.input_ids, drawn.attention_mask, drawn.response_mask)
    padded = response_logps(model, *rows, temperature=0.7, pack=False, batch_size=1)
    packed = response_logps(model, *rows, temperature=0.7, group_size=3)
    assert drawn.logprobs.shape == padded.shape
    assert (drawn.logprobs[~drawn.response_mask] == 0).all()
    assert drawn.response_mask.sum() > 6
    torch.testing.assert_close(drawn.logprobs, padded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="group_size"):
        response_logps(model, *rows, group_size=0)


def test_lexical_diversity_worked_example():
    """["a b a"]: distinct-1 = 2/3, distinct-2 = 2/2; EAD averages n = 1..5 (n >= 4: no n-grams)."""
    out = lexical_diversity(["a b a"], vocab_size=3)
    assert out["distinct_1"] == pytest.approx(2 / 3)
    assert out["distinct_2"] == 1.0
    ead_1 = 2 / (3 * (1 - (2 / 3) ** 3))  # 18/19
    ead_2 = 2 / (3 * (1 - (2 / 3) ** 2))
    ead_3 = 1 / (3 * (1 - 2 / 3))
    assert out["ead"] == pytest.approx((ead_1 + ead_2 + ead_3) / 5)


class OneHotEmbedder:
    """Text -> one-hot by its first word, so cosine is 1 for equal first words, else 0."""

    def encode(self, texts):
        words = sorted({t.split()[0] for t in texts})
        return torch.eye(len(words))[[words.index(t.split()[0]) for t in texts]]


def test_per_input_and_across_input_diversity_follow_kirk_et_al():
    """Prompt 1 samples identical, prompt 2 samples all different: per-input embedding
    diversity = mean(0, 1) = 0.5; across-input uses the first sample of each prompt."""
    outputs = [["same text", "same text", "same text"], ["x one", "y two", "z three"]]
    out = diversity_metrics(outputs, embedder=OneHotEmbedder())
    assert out["per_input"]["embedding"] == pytest.approx(0.5)
    assert out["per_input"]["embedding_std"] == pytest.approx(0.5)
    assert out["per_input"]["distinct_1"] == pytest.approx((2 / 6 + 1.0) / 2)
    assert out["across_input"]["embedding"] == pytest.approx(1.0)  # "same" vs "x"
    assert out["across_input"]["distinct_1"] == pytest.approx(1.0)  # same text, x one
    lonely = diversity_metrics([["only one"]], embedder=None)
    assert lonely == {"per_input": {}, "across_input": {}}
    assert np.isfinite(diversity_metrics(outputs, embedder=None)["per_input"]["ead"])
