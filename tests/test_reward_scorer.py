"""RewardModelScorer: padding-side invariance, re-tokenisation across tokenizers,
normalisation, loading by spec, and composition with score_safely."""

from __future__ import annotations

import pytest
import torch

from alignkit.models import load_model, save_pretrained_merged
from alignkit.rewards import RewardError, RewardModelScorer, load_reward, score_safely
from alignkit.testing import build_tiny_tokenizer

PROMPTS = ["Write a short review. The movie", "Hi", "What is two plus two?", "The film"]
COMPLETIONS = [
    " was good and great.",
    " no",
    " The answer is 4. The quick brown fox.",
    " was awful.",
]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """An (untrained) reward model saved as a sequence classifier."""
    torch.manual_seed(0)
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward", device="cpu")
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a non-trivial head so scores differ across texts
    return save_pretrained_merged(model, tokenizer, tmp_path_factory.mktemp("rm") / "rm")


def test_left_and_right_padding_and_batch_size_give_equal_scores(rm_dir):
    right = RewardModelScorer(rm_dir, batch_size=4, padding_side="right", device="cpu")
    left = RewardModelScorer(rm_dir, batch_size=4, padding_side="left", device="cpu")
    one_by_one = RewardModelScorer(rm_dir, batch_size=1, device="cpu")
    scores = right(PROMPTS, COMPLETIONS)
    assert scores.shape == (4,) and scores.std() > 0
    torch.testing.assert_close(left(PROMPTS, COMPLETIONS), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_by_one(PROMPTS, COMPLETIONS), scores, atol=1e-5, rtol=1e-5)


def test_policy_token_ids_are_decoded_and_retokenised_with_the_reward_tokenizer(rm_dir):
    policy_tokenizer = build_tiny_tokenizer(vocab_size=290)  # different merges, different ids
    scorer = RewardModelScorer(rm_dir, policy_tokenizer=policy_tokenizer, device="cpu")
    policy_ids = [policy_tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    reward_ids = [scorer.tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    assert policy_ids != reward_ids  # the two tokenizers really disagree
    from_ids = scorer(PROMPTS, policy_ids)
    torch.testing.assert_close(from_ids, scorer(PROMPTS, COMPLETIONS))
    without = RewardModelScorer(rm_dir, device="cpu")
    with pytest.raises(ValueError, match="policy_tokenizer"):
        without(PROMPTS, policy_ids)


def test_conversational_inputs_use_the_reward_models_chat_template(rm_dir):
    scorer = RewardModelScorer(rm_dir, device="cpu")
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    replies = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    chat = scorer(messages, replies)
    templated = RewardModelScorer(rm_dir, chat_template=True, device="cpu")(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(chat, templated)
    assert not torch.allclose(chat, scorer(PROMPTS, COMPLETIONS))


def test_running_and_reference_normalisation(rm_dir):
    running = RewardModelScorer(rm_dir, normalize="running", device="cpu")
    first = running(PROMPTS, COMPLETIONS)  # stats = this batch only
    assert first.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert first.std().item() == pytest.approx(1.0, abs=1e-5)
    running(PROMPTS[:2], COMPLETIONS[:2])
    assert running.normalizer.count == 6
    raw = RewardModelScorer(rm_dir, device="cpu").raw_scores(PROMPTS, COMPLETIONS)
    reference = RewardModelScorer(
        rm_dir, normalize="reference", reference=(PROMPTS, COMPLETIONS), device="cpu"
    )
    torch.testing.assert_close(
        reference(PROMPTS, COMPLETIONS), (raw - raw.mean()) / raw.std(), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="reference"):
        RewardModelScorer(rm_dir, normalize="reference", device="cpu")


def test_load_reward_accepts_a_reward_model_directory(rm_dir):
    expected = RewardModelScorer(rm_dir, device="cpu")(PROMPTS, COMPLETIONS)
    for spec in (f"rm:{rm_dir}", str(rm_dir)):
        fn = load_reward(spec, device="cpu")
        torch.testing.assert_close(fn(PROMPTS, COMPLETIONS), expected)


def test_scorer_composes_with_score_safely(rm_dir):
    scorer = RewardModelScorer(rm_dir, device="cpu")
    expected = scorer(PROMPTS, COMPLETIONS)
    scores, penalised = score_safely(scorer, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(scores, expected)
    assert penalised == 0
    broken = COMPLETIONS[:2] + [None] + COMPLETIONS[3:]  # row 2 cannot be scored
    scores, penalised = score_safely(scorer, PROMPTS, broken, on_error="penalty", penalty=-5.0)
    assert penalised == 1 and scores[2].item() == -5.0
    torch.testing.assert_close(scores[[0, 1, 3]], expected[[0, 1, 3]], atol=1e-5, rtol=1e-5)
    with pytest.raises(RewardError, match="row 2"):
        score_safely(scorer, PROMPTS, broken)
