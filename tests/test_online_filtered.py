"""Filtered and SFT-objective presets on the one loop: raft (best-of-K, NLL), superhf (best-of-K,
NLL + full-vocabulary KL prior), expert_iteration (every correct sample, NLL) and pf_ppo (PPO on
best + random of N); the filters' maths by worked examples; resume equivalence for raft."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
)
from test_online import ROWS, one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)

import alignkit
from alignkit.objectives.filters import (
    at_least,
    best_of_n,
    best_random,
    best_worst,
    filter_rows,
    top_fraction,
)
from alignkit.training.online.steps import kl_prior

REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.2, 0.8, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_best_of_n_keeps_each_groups_argmax_first_on_ties():
    assert best_of_n(REWARDS, GROUPS).tolist() == [1, 6]
    assert best_of_n(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([0, 0, 0])).tolist() == [0]


def test_best_worst_and_best_random_keep_two_per_group():
    assert best_worst(REWARDS, GROUPS).tolist() == [0, 1, 6, 7]
    kept = best_random(REWARDS, GROUPS, torch.Generator().manual_seed(0)).tolist()
    assert len(kept) == 4 and 1 in kept and 6 in kept
    assert set(kept) - {1, 6} <= {0, 2, 3, 4, 5, 7}
    assert sum(k < 4 for k in kept) == 2  # one other from each group
    # equal rewards still give two samples (the first as best, the first of the others as worst)
    assert best_worst(torch.zeros(4), torch.zeros(4, dtype=torch.long)).tolist() == [0, 1]
    # a group of one keeps its one sample
    assert best_worst(torch.tensor([1.0]), torch.tensor([0])).tolist() == [0]


def test_top_fraction_keeps_the_batch_best():
    assert top_fraction(REWARDS, 0.25).tolist() == [1, 6]  # 8 x 0.25 = 2 best overall
    assert top_fraction(REWARDS, 0.01).tolist() == [1]  # at least one


def test_at_least_keeps_every_sample_reaching_the_threshold():
    assert at_least(REWARDS, 0.5).tolist() == [1, 2, 6]
    assert at_least(REWARDS, 2.0).tolist() == []  # Expert Iteration with no correct sample
    assert filter_rows("at_least", REWARDS, GROUPS, fraction=1.0, seed=0, min_reward=0.3).tolist() == [1, 2, 3, 4, 6]


def test_filters_are_a_function_of_the_seed():
    first = filter_rows("best_random", REWARDS, GROUPS, fraction=1.0, seed=3)
    assert torch.equal(first, filter_rows("best_random", REWARDS, GROUPS, fraction=1.0, seed=3))
    seeds = {tuple(filter_rows("best_random", REWARDS, GROUPS, fraction=1.0, seed=k).tolist()) for k in range(20)}
    assert len(seeds) > 1


def test_kl_prior_worked_example():
    """pi_ref = (0.5, 0.5), pi_theta = (0.9, 0.1): KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108."""
    ref, pol = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.9, 0.1]).log()
    assert kl_prior(ref, pol).item() == pytest.approx(0.5 * (torch.tensor(0.5 / 0.9).log() + torch.tensor(5.0).log()).item())
    assert kl_prior(ref, ref).item() == 0.0


def _rise(rows) -> float:
    return sum(r["reward/mean"] for r in rows[-5:]) / 5 - sum(r["reward/mean"] for r in rows[:5]) / 5


def _block_means(rows, size=10) -> list[float]:
    return [sum(r["reward/mean"] for r in rows[i:i + size]) / size for i in range(0, len(rows), size)]


def test_raft_improves_the_mean_reward_each_iteration(tiny_model_dir, tmp_path):
    """Best of 8 per prompt, SFT on the kept 4. Measured block means (steps 1-10, 11-20, 21-30):
    0.30, 0.63, 2.10; the kept samples average 5.0 e's at the end."""
    run("raft", tiny_model_dir, tmp_path / "raft")
    rows = read_metrics(tmp_path / "raft")
    assert all(r["filter/kept_samples"] == 4 for r in rows)  # 4 prompts x best of 8
    assert all(r["filter/kept_reward_mean"] >= r["reward/mean"] - 1e-6 for r in rows)
    assert "kl" not in rows[0] and rows[0]["kl_prior"] == 0.0  # no reference loaded
    first, second, third = _block_means(rows)
    assert first < second < third and third > first + 1.0, (first, second, third)


def test_superhf_learns_and_its_kl_prior_holds_it_back(tiny_model_dir, tmp_path):
    """Best of 4, NLL + 0.1 x KL(ref || policy). Measured rise (last 5 steps vs first 5): 1.8
    with the prior, 6.8 without; the prior's KL is ~1.2 per token at the end."""
    rises = {}
    for beta in (0.1, 0.0):
        run("superhf", tiny_model_dir, tmp_path / f"b{beta}", group_size=4, beta=beta)
        rows = read_metrics(tmp_path / f"b{beta}")
        rises[beta] = _rise(rows)
        if beta > 0:
            assert rows[0]["kl_prior"] == pytest.approx(0.0, abs=1e-4)  # the first update starts at the reference
            assert rows[-1]["kl_prior"] > 0.1 and "kl" in rows[-1]
    assert rises[0.1] > 1.0 and rises[0.0] > rises[0.1] + 2.0, rises


def two_e(prompts, completions, **columns):
    """A 0/1 "correct" reward: at least two e's (the untrained model writes ~0.3 per completion)."""
    return [float(text.count("e") >= 2) for text in completions]


def run_with(model_dir, reward, output_dir, **overrides):
    settings = dict(batch_size=4, max_steps=30, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8)
    settings.update(overrides)
    return alignkit.train("expert_iteration", model=str(model_dir), data=ROWS, output_dir=output_dir,
                          reward=reward, **settings)


def test_expert_iteration_trains_on_the_correct_samples_only(tiny_model_dir, tmp_path):
    """Best-of-nothing: every sample with reward 1 is kept, the rest dropped. The share of correct
    samples (reward/mean) rises; kept samples are all correct. Measured block means of the correct
    share (steps 1-10, 11-20, 21-30): 0.094, 0.731, 0.994."""
    run_with(tiny_model_dir, two_e, tmp_path / "ei")
    rows = read_metrics(tmp_path / "ei")
    for row in rows:
        kept = row["filter/kept_samples"]
        assert kept == round(row["reward/mean"] * 32)  # 4 prompts x the preset's 8 samples, 0/1 rewards
        assert row["filter/kept_reward_mean"] == (1.0 if kept else 0.0)
    first, _, third = _block_means(rows)
    assert third > first + 0.3, _block_means(rows)


def test_a_step_where_the_filter_keeps_nothing_trains_nothing(tiny_model_dir, tmp_path):
    never = lambda prompts, completions, **columns: [0.0] * len(completions)  # noqa: E731
    result = run_with(tiny_model_dir, never, tmp_path / "none", max_steps=2, allow_degenerate=True)
    rows = read_metrics(tmp_path / "none")
    assert [r["filter/kept_samples"] for r in rows] == [0.0, 0.0] and all(r["loss"] == 0.0 for r in rows)
    initial = alignkit.models.load_model(str(tiny_model_dir))[0]
    assert_same_parameters(initial, result.model)


@pytest.mark.parametrize("sample_filter", ["best_random", "best_worst"])
def test_pf_ppo_learns_the_rule_reward(sample_filter, tiny_model_dir, tmp_path):
    """PPO on 2 of each prompt's 4 samples. Measured rises: best_random 5.9, best_worst 7.5."""
    run("pf_ppo", tiny_model_dir, tmp_path / sample_filter, sample_filter=sample_filter)
    rows = read_metrics(tmp_path / sample_filter)
    assert all(r["filter/kept_samples"] == 8 for r in rows)  # 4 prompts x 2
    assert _rise(rows) > 3.0, [round(r["reward/mean"], 2) for r in rows]


@pytest.mark.parametrize(("preset", "extra"), [("raft", {}), ("superhf", {"group_size": 4}), ("pf_ppo", {})])
def test_filtered_presets_resume_exactly(preset, extra, tiny_model_dir, tmp_path):
    """Cut at step 5 and resumed from the step-3 checkpoint: the same samples kept (pf_ppo's
    random pick is seeded by the step), the same losses and weights."""
    train = partial(run, preset, tiny_model_dir, steps=6, save_steps=3, lr=5e-3, **extra)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "filter/kept_reward_mean", "grad_norm", "kl", "kl_prior", "nll")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6),
                           skip_missing=True)
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def noisy_low_e(prompts, completions, **columns):
    """PF-PPO's premise on the planted reward: trustworthy at the top (3 or more e's score their
    count), noisy below it (count + N(0, 3), the noise a function of the text)."""
    import hashlib
    import random

    scores = []
    for text in completions:
        count = text.count("e")
        noise = random.Random(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).gauss(0.0, 3.0)
        scores.append(float(count) if count >= 3 else count + noise)
    return scores


def held_out_e(model, tokenizer) -> float:
    """Mean letters e of 16 samples on each of 4 prompts the run never trained on."""
    from alignkit.rollout import HFEngine, SamplingParams

    prompts = [tokenizer(p)["input_ids"] for p in ("A story:", "Say something", "Once", "My favourite")]
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))
    rollout = engine.generate(prompts, 16, SamplingParams(max_new_tokens=8, seed=123))
    texts = tokenizer.batch_decode([rollout.response_ids[i, :n].tolist() for i, n in enumerate(rollout.lengths.tolist())],
                                   skip_special_tokens=True)
    return sum(t.count("e") for t in texts) / len(texts)


def test_pf_ppo_beats_ppo_on_a_reward_noisy_below_the_top(tiny_model_dir, tmp_path):
    """8 prompts x 4 samples, 25 steps, seeds 0-3, held-out true e's (max 8). Measured per seed:
    PPO 3.98, 2.52, 2.09, 0.78 (mean 2.34); pf_ppo best_worst 1.02, 4.67, 3.48, 6.72 (mean 3.97;
    best_random: mean 3.46). A tiny model either finds the e's or not within 25 steps, so single
    seeds are noisy: the claim is on the mean."""
    means = {}
    for preset, extra in (("ppo", {}), ("pf_ppo", {"sample_filter": "best_worst"})):
        scores = []
        for seed in range(4):
            result = alignkit.train(preset, model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / f"{preset}{seed}",
                                    reward=noisy_low_e, seed=seed, batch_size=8, max_steps=25, lr=1e-2,
                                    warmup_ratio=0.0, scheduler="constant", progress=False, max_new_tokens=8,
                                    group_size=4, **extra)
            scores.append(held_out_e(result.model, result.tokenizer))
        means[preset] = sum(scores) / len(scores)
    assert means["pf_ppo"] > means["ppo"] + 0.5, means
