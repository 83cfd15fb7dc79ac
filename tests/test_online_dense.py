"""Dense rewards in the online loop on the tiny model: a scalar given as dense-at-last-token is
the same run bit for bit (also through dynamic sampling's and a filter's row selection); a
per-token bonus for each 'e' teaches PPO faster than the same total as one number; estimators
that need one number per sample take the sum; an rm_segment model feeds its per-segment
rewards in through --reward-model and --reward rm:DIR; several rewards with one dense; the
settings that need one reward per sample refuse dense ones in one line."""

from __future__ import annotations

import pytest
import torch
from reward_helpers import train_tiny
from run_helpers import read_metrics
from test_online import ROWS, count_e, one_thread  # noqa: F401  (one_thread: the module's autouse fixture)
from transformers import AutoTokenizer

import alignkit
from alignkit.rewards import SegmentRewardScorer
from alignkit.testing import synthetic_segments

UNTIMED = ("time/", "throughput/")  # wall-clock metrics differ between any two runs
NO_REWARD = object()  # run(..., reward=NO_REWARD): no --reward (a --reward-model instead)


def run(algorithm, model_dir, output_dir, steps=30, reward=count_e, **overrides):
    """test_online's tiny run (4 prompts x 4 samples, 8 new tokens), any reward."""
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    settings.update(overrides)
    if reward is not NO_REWARD:
        settings["reward"] = reward
    return alignkit.train(algorithm, model=str(model_dir), data=ROWS, output_dir=output_dir, **settings)


def count_e_on_last_token(prompts, completions, completion_ids, **columns):
    """`count_e` as per-segment rewards: one segment, the whole completion, on its last token."""
    return [[(len(ids) - 1, float(text.count("e")))] for text, ids in zip(completions, completion_ids, strict=True)]


def e_tokens(tokenizer, ids: list[int]) -> list[float]:
    """Letters e in each sampled token (its own decoded text; the EOS decodes to nothing)."""
    return [float(tokenizer.decode([token], skip_special_tokens=True).count("e")) for token in ids]


def e_rewards(model_dir):
    """(per-token e bonus, the same total as one number per sample) for the tiny model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def e_per_token(prompts, completions, completion_ids, **columns):
        return [e_tokens(tokenizer, ids) for ids in completion_ids]

    def e_total(prompts, completions, completion_ids, **columns):
        return [sum(e_tokens(tokenizer, ids)) for ids in completion_ids]

    return e_per_token, e_total


def assert_same_run(first, second, first_dir, second_dir) -> None:
    """Every logged metric but timings equal, and the final weights equal, bit for bit."""
    rows, other = read_metrics(first_dir), read_metrics(second_dir)
    assert len(rows) == len(other)
    for a, b in zip(rows, other, strict=True):
        keys = {k for k in a if not k.startswith(UNTIMED)}
        assert keys == {k for k in b if not k.startswith(UNTIMED)}
        for key in keys:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for (name, p), (_, q) in zip(first.model.named_parameters(), second.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(("algorithm", "extra"), [
    ("ppo", {}),
    ("reinforce_pp", {"missing_eos_penalty": 0.5}),
    ("pf_ppo", {}),  # best + random of 4 per prompt: the dense rows selected with theirs
    ("ppo", {"dynamic_sampling": True, "rounds_exhausted": "train"}),  # rounds merged (merge_rows)
])
def test_scalar_as_dense_at_last_token_is_exactly_the_scalar_run(algorithm, extra, tiny_model_dir, tmp_path):
    """The regression guard: count_e as one number, and as one segment ending on the last
    token, give identical metrics and weights over 4 steps (dynamic sampling merges the kept
    groups of more than one generation round on some step, asserted)."""
    scalar = run(algorithm, tiny_model_dir, tmp_path / "scalar", steps=4, **extra)
    dense = run(algorithm, tiny_model_dir, tmp_path / "dense", steps=4, reward=count_e_on_last_token, **extra)
    assert_same_run(scalar, dense, tmp_path / "scalar", tmp_path / "dense")
    if extra.get("dynamic_sampling"):
        assert max(r["dynamic_sampling/generation_rounds"] for r in read_metrics(tmp_path / "dense")) > 1


def test_per_token_e_bonus_teaches_ppo_faster_than_the_same_total_as_one_number(tiny_model_dir, tmp_path):
    """PPO, 30 steps: a reward of +1 per 'e' in each sampled token, given per token (dense) or as
    its sum per sample (scalar). Both learn (mean reward, first 5 steps -> last 5, seed 42:
    dense 0.39 -> 7.76, scalar 0.30 -> 7.83); the dense one first reaches a mean of 3 e's at
    step 10, the scalar one at 13. Over seeds 0-7 and 42 dense was first every time (dense 12,
    12, 15, 11, 11, 11, 13, 12, 10; scalar 14, 16, 16, 14, 15, 15, 15, 14, 13); the mean reward
    over the 30 steps (4.90 vs 4.33 here) was higher for dense on 8 of the 9 seeds only, so the
    first step reaching 3 is what is compared."""
    e_per_token, e_total = e_rewards(tiny_model_dir)
    reached = {}
    for name, reward in (("dense", e_per_token), ("scalar", e_total)):
        run("ppo", tiny_model_dir, tmp_path / name, steps=30, reward=reward)
        rewards = [r["reward/mean"] for r in read_metrics(tmp_path / name)]
        assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 5.0, (name, rewards)
        reached[name] = next(step for step, mean in enumerate(rewards, 1) if mean >= 3.0)
    assert reached["dense"] < reached["scalar"], reached


def test_estimators_of_one_number_per_sample_take_each_samples_sum(tiny_model_dir, tmp_path):
    """grpo (and rloo, remax, online_dpo, the filters, dynamic sampling) sees the per-sample sum
    of dense rewards: the per-token e bonus and its sum give the same grpo run."""
    e_per_token, e_total = e_rewards(tiny_model_dir)
    dense = run("grpo", tiny_model_dir, tmp_path / "dense", steps=3, reward=e_per_token)
    scalar = run("grpo", tiny_model_dir, tmp_path / "scalar", steps=3, reward=e_total)
    assert_same_run(dense, scalar, tmp_path / "dense", tmp_path / "scalar")


def test_rm_segment_model_feeds_per_segment_rewards_to_ppo(tiny_model_dir, tmp_path):
    """A tiny rm_segment model (2 epochs on 48 rows): its scores sit on the sampled tokens that
    end each sentence (checked on a known text); ppo with --reward-model DIR and reinforce_pp
    with --reward rm:DIR run with finite rewards that vary between samples."""
    result = train_tiny("rm_segment", synthetic_segments(48, seed=6), tmp_path / "seg", model_dir=tiny_model_dir,
                        epochs=2, lr=2e-3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer = SegmentRewardScorer(result.final_dir, device="cpu", policy_tokenizer=tokenizer)
    text = "The movie was good. The film was awful."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    (pairs,) = scorer(["Write a short review."], [text], completion_ids=[ids])
    segment = scorer.segment_rewards(["Write a short review."], [text])[0]
    assert [index for index, _ in pairs] == [
        next(t for t in range(len(ids)) if tokenizer.decode(ids[: t + 1]) == "The movie was good."), len(ids) - 2]
    torch.testing.assert_close(torch.tensor([value for _, value in pairs]), segment)

    run("ppo", tiny_model_dir, tmp_path / "ppo", steps=3, reward=NO_REWARD, reward_model=str(result.final_dir),
        max_new_tokens=16, group_size=2)
    run("reinforce_pp", tiny_model_dir, tmp_path / "rpp", steps=2, reward=f"rm:{result.final_dir}",
        max_new_tokens=16, group_size=2)
    for name in ("ppo", "rpp"):
        rows = read_metrics(tmp_path / name)
        assert all(torch.isfinite(torch.tensor([r["reward/mean"], r["loss"]])).all() for r in rows)
        assert all(r["reward/std"] > 0 for r in rows), name


def test_several_rewards_with_one_dense(tiny_model_dir, tmp_path):
    """The per-token e bonus beside a scalar reward: each one logged, the run trains on both
    (reward/mean = e bonus + 0.5 x short)."""
    e_per_token, _ = e_rewards(tiny_model_dir)

    def short(prompts, completions, **columns):
        return [-len(text) / 10 for text in completions]

    run("ppo", tiny_model_dir, tmp_path / "two", steps=3, reward=[e_per_token, short], reward_weights="1,0.5")
    for r in read_metrics(tmp_path / "two"):
        assert r["reward/mean"] == pytest.approx(r["reward/e_per_token"] + 0.5 * r["reward/short"], abs=1e-5)


@pytest.mark.parametrize(("extra", "message"), [
    ({"reward_norm": True}, r"reward .*e_per_token gives per-token rewards of shape \(16, \d+\), but reward_norm"),
    ({"reward_clip": 5.0}, r"e_per_token gives per-token rewards .* but reward_clip"),
])
def test_settings_of_one_reward_per_sample_refuse_dense_rewards(extra, message, tiny_model_dir, tmp_path):
    e_per_token, _ = e_rewards(tiny_model_dir)
    with pytest.raises(ValueError, match=message) as error:
        run("ppo", tiny_model_dir, tmp_path / "bad", steps=1, reward=e_per_token, **extra)
    assert "\n" not in str(error.value)


def test_safe_ppo_refuses_a_dense_cost(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"cost .*count_e_on_last_token gives per-token costs of shape \(4, \d+\); "
                                         "safe_ppo constrains one cost per sample"):
        run("safe_ppo", tiny_model_dir, tmp_path / "safe", steps=1, group_size=1,
            cost=f"{__file__}:count_e_on_last_token")


def test_a_wrong_length_per_token_reward_fails_naming_the_reward_and_row(tiny_model_dir, tmp_path):
    def one_short(prompts, completions, completion_ids, **columns):
        return [[0.0] * (len(ids) - 1) for ids in completion_ids]

    with pytest.raises(ValueError, match=r"reward .*one_short returned a list of 16 values whose item 0 has \d+ "
                                         r"per-token rewards but the sample has \d+ response tokens") as error:
        run("ppo", tiny_model_dir, tmp_path / "bad", steps=1, reward=one_short)
    assert "step 1" in str(error.value) and "\n" not in str(error.value)
