"""`rm_seq2seq` (seq2seq reward modelling, Zhou et al. 2024): the token-reward rule and the
sequence-MLE loss by hand; each pair becomes a correction and an identity row; a tiny model
learns the planted sentiment rule (held-out chosen above rejected, far above the untrained
model); the per-token rewards line up with the policy's sampled tokens (same and different
vocabularies); PPO and REINFORCE++ run on them as dense rewards; bad input fails in one line."""

from __future__ import annotations

import json

import pytest
import torch
from reward_helpers import eval_rm, train_tiny
from run_helpers import read_metrics, write_jsonl
from test_online import one_thread  # noqa: F401  (one_thread: the module's autouse fixture)
from test_online_dense import NO_REWARD, run
from torch.testing import assert_close
from transformers import AutoTokenizer

from alignkit.data import DataError, RowTable
from alignkit.models import load_model
from alignkit.objectives.seq2seq_rm import divergence_token_rewards, sequence_mle
from alignkit.rewards import Seq2SeqRewardScorer, load_reward, reward_model_kind
from alignkit.rewards.seq2seq import DEFAULT_TEMPLATE, render_source
from alignkit.testing import build_tiny_tokenizer, synthetic_pairs
from alignkit.training.offline.tasks import make_task
from alignkit.training.run.config import TrainConfig


def test_divergence_token_rewards_worked_example():
    """Response tokens [5, 7, 9, pad]; the RM's greedy tokens [5, 8, 9, 3]: token 1 matches (+1),
    token 2 diverges (-0.5), token 3 matches again (+1), the padding scores 0."""
    rewards = divergence_token_rewards(torch.tensor([[5, 8, 9, 3]]), torch.tensor([[5, 7, 9, 0]]),
                                       torch.tensor([[True, True, True, False]]), match_reward=1.0,
                                       mismatch_reward=-0.5)
    assert_close(rewards, torch.tensor([[1.0, -0.5, 1.0, 0.0]]))


def test_sequence_mle_worked_example():
    """Correction row log-probs [-1, -2] (2 targets), identity row [-0.5, pad]: token mean
    (1 + 2 + 0.5) / 3 = 7/6."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert_close(sequence_mle(logps, mask), torch.tensor(7 / 6))


def test_each_pair_gives_a_correction_and_an_identity_row(tiny_model_dir):
    """Row 1 -> src(prompt, rejected) -> chosen and src(prompt, chosen) -> chosen; without the
    identity mapping only the first."""
    _, tokenizer = load_model(str(tiny_model_dir), kind="causal_lm")
    pair = synthetic_pairs(1)[0]
    for identity, expected in ((True, 2), (False, 1)):
        task = make_task(TrainConfig(algorithm="rm_seq2seq", hparams={"identity_mapping": identity}))
        examples, _ = task.tokenize(RowTable([pair]), tokenizer)
        assert len(examples) == expected
        sources = [render_source(DEFAULT_TEMPLATE, pair["prompt"], pair[key]) for key in ("rejected", "chosen")]
        for example, source in zip(examples, sources, strict=False):
            assert tokenizer.decode(example.prompt_ids, skip_special_tokens=True) == source
            assert tokenizer.decode(example.completion_ids, skip_special_tokens=True) == pair["chosen"]
        assert [ex.extras["is_correction"] for ex in examples] == [1.0, 0.0][:expected]


def ranking_accuracy(scorer, rows) -> float:
    """Share of pairs whose chosen response's summed token reward beats the rejected one's (ties 1/2)."""
    prompts = [r["prompt"] for r in rows]
    chosen = scorer(prompts, [r["chosen"] for r in rows])
    rejected = scorer(prompts, [r["rejected"] for r in rows])
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


@pytest.fixture(scope="module")
def seq2seq_rm(tiny_model_dir, tmp_path_factory):
    """rm_seq2seq on 128 planted pairs (chosen: positive words, rejected: negative), 3 epochs."""
    torch.set_num_threads(1)
    return train_tiny("rm_seq2seq", synthetic_pairs(128, seed=0), tmp_path_factory.mktemp("s2s"),
                      model_dir=tiny_model_dir, epochs=3, lr=5e-3)


def test_rm_seq2seq_learns_the_planted_rule(seq2seq_rm, tiny_model_dir):
    """Held-out pairs (another seed): the trained RM ranks chosen above rejected in >= 90% of
    them; the untrained LM with the same scoring does not (<= 75%)."""
    held_out = synthetic_pairs(48, seed=11)
    final = seq2seq_rm.final_dir
    assert reward_model_kind(final) == "seq2seq_rm"
    manifest = json.loads((final / "seq2seq_rm.json").read_text())
    assert manifest["template"] == DEFAULT_TEMPLATE and manifest["match_reward"] == 1.0
    trained = ranking_accuracy(load_reward(f"rm:{final}"), held_out)
    model, tokenizer = load_model(str(tiny_model_dir), kind="causal_lm")
    untrained = ranking_accuracy(Seq2SeqRewardScorer(model, tokenizer), held_out)
    assert trained >= 0.9, (trained, untrained)
    assert untrained <= 0.75, (trained, untrained)
    metrics = read_metrics(final.parent)
    assert metrics[-1]["nll/correction"] < metrics[0]["nll/correction"]
    assert metrics[-1]["nll/identity"] < metrics[0]["nll/identity"]


def test_eval_rm_scores_a_seq2seq_model_by_its_summed_token_rewards(seq2seq_rm, tmp_path):
    """`alignkit eval-rm --model DIR` on held-out pairs: the kind is named, accuracy (strict) >= 0.9."""
    data = write_jsonl(tmp_path / "held.jsonl", synthetic_pairs(24, seed=12))
    results = eval_rm(seq2seq_rm.final_dir, data, tmp_path / "s2s.json", 100)
    assert results["kind"] == "seq2seq_rm" and results["accuracy"] >= 0.9


def test_token_rewards_line_up_with_the_policy_tokens(seq2seq_rm, tiny_model_dir):
    """Same vocabulary: one reward per sampled token (stop token included), equal to the RM's
    own scoring of the same ids. Another vocabulary: one reward per policy token, same total
    (every RM token's reward lands on the policy token holding its last character)."""
    final = seq2seq_rm.final_dir
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, text = "Write a short review. The film", " was awful and great."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    same = Seq2SeqRewardScorer(final, device="cpu", policy_tokenizer=tokenizer)
    (dense,) = same([prompt], [text], completion_ids=[ids])
    assert len(dense) == len(ids) and set(dense) <= {1.0, -1.0}
    assert_close(torch.tensor(dense), same.token_rewards([prompt], [text])[0])

    other = build_tiny_tokenizer(vocab_size=290)
    other_ids = other(text, add_special_tokens=False)["input_ids"] + [other.eos_token_id]
    assert other_ids != ids
    mapped = Seq2SeqRewardScorer(final, device="cpu", policy_tokenizer=other)
    (row,) = mapped([prompt], [text], completion_ids=[other_ids])
    assert len(row) == len(other_ids)
    assert sum(row) == pytest.approx(sum(dense))


def test_tokens_past_max_length_get_zero_and_are_counted(seq2seq_rm, caplog):
    """max_length 6 with a 9-token response: the source is cut to 1 token, the first 5 response
    tokens are scored (+-1), the last 4 get 0, and the log says how many were cut."""
    scorer = Seq2SeqRewardScorer(seq2seq_rm.final_dir, device="cpu", max_length=6)
    ids = list(range(10, 19))
    with caplog.at_level("WARNING", logger="alignkit"):
        (row,) = scorer(["Write a short review."], ["anything"], completion_ids=[ids])
    assert len(row) == 9 and set(row[:5]) <= {1.0, -1.0} and row[5:] == [0.0] * 4
    assert "4 response token(s) past max_length=6 got reward 0" in caplog.text


def test_ppo_and_reinforce_pp_run_on_seq2seq_token_rewards(seq2seq_rm, tiny_model_dir, tmp_path):
    """ppo with --reward-model DIR and reinforce_pp with --reward rm:DIR, 2 steps each: finite
    losses and rewards that differ between samples. The policy starts from the RM's own LM (it
    writes reviews; the random tiny model's text mismatches on every token, so every sample of
    a given length would score the same)."""
    final = seq2seq_rm.final_dir
    run("ppo", final, tmp_path / "ppo", steps=2, reward=NO_REWARD, reward_model=str(final),
        max_new_tokens=12, group_size=2)
    run("reinforce_pp", final, tmp_path / "rpp", steps=2, reward=f"rm:{final}", max_new_tokens=12,
        group_size=2)
    for name in ("ppo", "rpp"):
        rows = read_metrics(tmp_path / name)
        assert len(rows) == 2
        assert all(torch.isfinite(torch.tensor([r["reward/mean"], r["loss"]])).all() for r in rows)
        assert all(r["reward/std"] > 0 for r in rows), name


@pytest.mark.parametrize(("rows", "hparams", "error", "message"), [
    ([{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "p", "chosen": " a", "rejected": ""}], {}, DataError,
     r"row 2: column 'rejected' is empty"),
    ([{"prompt": "p", "chosen": " a", "rejected": " b"}], {"template": "{prompt} only"}, ValueError,
     r"rm_seq2seq: template .* must contain \{prompt\} and \{response\}"),
    ([{"prompt": "p", "chosen": " a", "rejected": " b"}], {"template": "{prompt}{response}{other}"}, ValueError,
     r"rm_seq2seq: template .* can only use"),
    ([{"prompt": "p", "chosen": " a", "rejected": " b"}], {"match_reward": -1.0}, ValueError,
     r"match_reward \(-1.0\) must exceed mismatch_reward"),
])
def test_bad_input_fails_in_one_line(rows, hparams, error, message, tiny_model_dir, tmp_path):
    with pytest.raises(error, match=message) as caught:
        train_tiny("rm_seq2seq", rows, tmp_path / "x", model_dir=tiny_model_dir, max_steps=1, **hparams)
    assert "\n" not in str(caught.value)


def test_scorer_refuses_a_directory_without_its_manifest(tiny_model_dir):
    with pytest.raises(ValueError, match=r"no seq2seq_rm.json; pass a final/ written by `alignkit train rm_seq2seq`"):
        Seq2SeqRewardScorer(tiny_model_dir)
