"""DAPO dynamic sampling on a tiny model: a step refills its batch with further prompt groups
until --batch-size groups have reward variance (and trains on exactly those), the
max_generation_rounds bound is kept (an error by default, as verl; or training on what it has,
skipping the update when nothing is left), and interrupted runs resume exactly."""

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
from transformers import AutoModelForCausalLM

import alignkit
from alignkit.rollout import Rollout
from alignkit.training.online import loop, trainer
from alignkit.training.online.roles import HFRollout
from alignkit.training.online.sampling import merge_rows, signal_groups

PROMPTS = ["Write a short review.", "The movie", "Tell me", "What is two plus two?"]
ROWS = [{"prompt": p} for p in PROMPTS * 4]
FLAT = {"The movie", "Tell me"}


def half_flat(prompts, completions, **columns):
    """Two of the four prompts always score 0 (no signal); the others count the letter e."""
    return [0.0 if p in FLAT else float(c.count("e")) for p, c in zip(prompts, completions, strict=True)]


def flat(prompts, completions, **columns):
    return [1.0] * len(completions)


def run(model_dir, output_dir, reward=half_flat, steps=4, **overrides):
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    settings.update(overrides)
    return alignkit.train("dapo", model=str(model_dir), data=ROWS, output_dir=output_dir, reward=reward, **settings)


@pytest.fixture
def spy(monkeypatch):
    """Counts engine calls and records the rewards/groups each step's advantages and updates see."""
    seen = {"generate": 0, "advantages": [], "trained_rows": []}
    generate, advantages, update = HFRollout.generate, loop.compute_advantages, trainer.policy_gradient_update

    def counting_generate(self, *args, **kwargs):
        seen["generate"] += 1
        if seen["generate"] > 100:
            raise RuntimeError("runaway generation: the rounds are not bounded")
        return generate(self, *args, **kwargs)

    def recording_advantages(s, rewards, group_index, *args):
        seen["advantages"].append((rewards.clone(), group_index.clone()))
        return advantages(s, rewards, group_index, *args)

    def recording_update(policy, batch, rows, *args, **kwargs):
        seen["trained_rows"].append(len(rows))
        return update(policy, batch, rows, *args, **kwargs)

    monkeypatch.setattr(HFRollout, "generate", counting_generate)
    monkeypatch.setattr(loop, "compute_advantages", recording_advantages)
    monkeypatch.setattr(trainer, "policy_gradient_update", recording_update)
    return seen


def test_dynamic_sampling_refills_the_batch_with_groups_that_have_reward_variance(tiny_model_dir, tmp_path,
                                                                                   spy):
    run(tiny_model_dir, tmp_path / "dapo", steps=4)
    rows = read_metrics(tmp_path / "dapo")
    rounds = [r["dynamic_sampling/generation_rounds"] for r in rows]
    assert max(rounds) > 1, rounds  # half of the prompts carry no signal: refills happen
    assert spy["generate"] == sum(rounds)
    assert [r["dynamic_sampling/kept_groups"] for r in rows] == [4.0] * 4
    for r in rows:
        # groups with signal among all generated; enough of them to fill the batch
        assert r["dynamic_sampling/kept_fraction"] * 4 * r["dynamic_sampling/generation_rounds"] >= 4
        assert r["dynamic_sampling/skipped_update"] == 0.0
    assert any(r["dynamic_sampling/kept_fraction"] < 1 for r in rows)
    # the update sees exactly B = 4 groups x G = 4 samples, every group with reward variance
    assert spy["trained_rows"] == [16] * 4
    assert len(spy["advantages"]) == 4
    for rewards, group_index in spy["advantages"]:
        assert len(rewards) == 16 and sorted(set(group_index.tolist())) == [0, 1, 2, 3]
        for g in range(4):
            group = rewards[group_index == g]
            assert len(group) == 4 and group.max() > group.min(), rewards


def test_generation_rounds_bound_raises_by_default_as_verl(tiny_model_dir, tmp_path, spy):
    with pytest.raises(ValueError, match="max_generation_rounds"):
        run(tiny_model_dir, tmp_path / "raise", reward=flat, steps=2, max_generation_rounds=3)
    assert spy["generate"] == 3 and spy["trained_rows"] == []


def test_exhausted_rounds_with_no_group_skip_the_update(tiny_model_dir, tmp_path, spy):
    result = run(tiny_model_dir, tmp_path / "empty", reward=flat, steps=2, max_generation_rounds=3,
                 rounds_exhausted="train", allow_degenerate=True)  # no step can learn: refused without it
    rows = read_metrics(tmp_path / "empty")
    assert [r["step"] for r in rows] == [1, 2] and spy["generate"] == 6 and spy["trained_rows"] == []
    for r in rows:
        assert r["dynamic_sampling/generation_rounds"] == 3.0 and r["dynamic_sampling/kept_groups"] == 0.0
        assert r["dynamic_sampling/skipped_update"] == 1.0 and r["dynamic_sampling/kept_fraction"] == 0.0
        assert r["loss"] == 0.0 and r["reward/mean"] == 1.0 and "grad_norm" not in r
        assert all(torch.isfinite(torch.tensor(float(v))) for k, v in r.items() if k != "step"), r
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert_same_parameters(initial, result.model)  # no update happened


def test_exhausted_rounds_train_on_the_groups_kept(tiny_model_dir, tmp_path, spy):
    run(tiny_model_dir, tmp_path / "partial", steps=4, max_generation_rounds=1, rounds_exhausted="train")
    rows = read_metrics(tmp_path / "partial")
    assert [r["dynamic_sampling/generation_rounds"] for r in rows] == [1.0] * 4 and spy["generate"] == 4
    kept = [int(r["dynamic_sampling/kept_groups"]) for r in rows]
    assert min(kept) < 4, kept
    trained = iter(spy["trained_rows"])
    assert [next(trained) if k else 0 for k in kept] == [4 * k for k in kept]


def test_dapo_resumed_run_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """Refills move the data cursor past B prompts per step: the checkpoint must carry it."""
    extra = dict(steps=6, save_steps=3, lr=5e-3, scheduler="cosine")
    runs = run_interrupted_and_resumed(partial(run, tiny_model_dir, **extra), tmp_path, at=5)
    assert sum(r["dynamic_sampling/generation_rounds"] for r in runs.full[:3]) > 3  # cursor != 3 x B
    keys = ("loss", "reward/mean", "response_length", "grad_norm", "dynamic_sampling/generation_rounds",
            "dynamic_sampling/kept_fraction", "advantages/std")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_signal_groups_and_merge_rows():
    # exact equality, not std > 0: three equal 0.1s are flat even though their float mean is not 0.1
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    assert signal_groups(rewards, groups).tolist() == [1, 3]  # 3 is a singleton: kept, as verl

    def rollout(width, n_groups):
        rows = 2 * n_groups
        return Rollout([[g + 1] for g in range(n_groups) for _ in range(2)],
                       torch.arange(rows * width).view(rows, width), torch.ones(rows, width),
                       torch.ones(rows, width, dtype=torch.bool), ["stop"] * rows,
                       torch.arange(n_groups).repeat_interleave(2))

    merged = merge_rows([(rollout(3, 2), torch.tensor([2, 3])), (rollout(5, 3), torch.tensor([0, 1, 4, 5]))],
                        pad_id=-1)
    assert merged.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert merged.prompt_ids == [[2], [2], [1], [1], [3], [3]]
    assert merged.response_ids.shape == (6, 5) and merged.response_ids[0].tolist() == [6, 7, 8, -1, -1]
    assert merged.response_mask.sum(-1).tolist() == [3, 3, 5, 5, 5, 5]
    assert merged.response_logprobs[0, 3:].tolist() == [0.0, 0.0]


def test_dynamic_sampling_options_are_validated(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="max_generation_rounds"):
        run(tiny_model_dir, tmp_path / "a", steps=1, max_generation_rounds=-1)
    with pytest.raises(ValueError, match="rounds_exhausted"):
        run(tiny_model_dir, tmp_path / "b", steps=1, rounds_exhausted="ignore")
