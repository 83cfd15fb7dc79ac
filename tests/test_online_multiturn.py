"""The online loop on multi-turn rollouts (--env, --tools): advantages over the policy's tokens
only, worked by hand; GRPO and PPO end to end on a tiny model against a scripted environment;
resume equivalence; learning a planted multi-turn rule."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import dist_helpers
import pytest
import torch
import yaml
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
)

import alignkit
from alignkit.advantages import gae
from alignkit.training.online.turns import (
    compact_index,
    gather_tokens,
    has_holes,
    over_policy_tokens,
    scatter_tokens,
)


def test_compaction_round_trips_and_keeps_order():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    x = torch.arange(12.0).view(2, 6)
    idx, mask_c = compact_index(mask)
    assert idx[mask_c].tolist() == [0, 1, 4, 0, 2, 3]
    assert gather_tokens(x, idx)[mask_c].tolist() == [0.0, 1.0, 4.0, 6.0, 8.0, 9.0]
    back = scatter_tokens(gather_tokens(x, idx), idx, mask_c, 6)
    assert torch.equal(back, torch.where(mask, x, 0.0))
    assert has_holes(mask) and not has_holes(torch.tensor([[1, 1, 0]], dtype=torch.bool))
    three = torch.arange(24.0).view(2, 6, 2)  # safe_ppo's (N, L, 2) values
    assert torch.equal(scatter_tokens(gather_tokens(three, idx), idx, mask_c, 6), torch.where(mask[..., None], three, 0.0))


def test_gae_over_policy_tokens_bootstraps_across_the_environments_turn():
    """Policy tokens at 0, 1 (turn 1) and 4 (turn 2); the environment spoke at 2, 3. Rewards
    r = (0, 0.5 | 1.0) at the turns' ends, V = (0.1, 0.2 | 0.3), gamma = 1, lambda = 1:
    A_4 = 1.0 - 0.3 = 0.7; A_1 = 0.5 + 0.3 - 0.2 + 0.7 ... = r_1 + r_4 - V_1 = 1.3;
    A_0 = 1.5 - 0.1 = 1.4. Plain GAE over the holes would cut the episode at token 1."""
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3]])

    def estimate(mask, rewards, values):
        return gae(rewards, values, mask, gamma=1.0, lam=1.0)

    advantages, returns = over_policy_tokens(estimate, mask, {"rewards": rewards, "values": values})
    assert advantages[0].tolist() == pytest.approx([1.4, 1.3, 0.0, 0.0, 0.7])
    assert returns[0].tolist() == pytest.approx([1.5, 1.5, 0.0, 0.0, 1.0])
    cut, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert cut[0, 1].item() == pytest.approx(0.3)  # what the holes would have given: 0.5 - 0.2


@pytest.fixture()
def env_spec():
    """`dist_helpers.TwoTurns` as a file spec (the form users write): the user asks, then says
    "again"; the return is the e's of the policy's second turn minus those of its first."""
    return f"{Path(dist_helpers.__file__)}:TwoTurns"


def run(algorithm, model_dir, output_dir, env_spec, steps=4, **overrides):
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4, max_turns=2, max_episode_tokens=64)
    settings.update(overrides)
    rows = [{"prompt": p} for p in ("Write a review.", "Say something.", "Describe the film.", "Answer briefly.")]
    return alignkit.train(algorithm, model=str(model_dir), data=rows, output_dir=output_dir, env=env_spec,
                          **settings)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_multi_turn_presets_run_and_log_the_episode_metrics(algorithm, tiny_model_dir, tmp_path, env_spec):
    run(algorithm, tiny_model_dir, tmp_path / algorithm, env_spec, steps=2)
    rows = read_metrics(tmp_path / algorithm)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("turns/mean", "episode/length", "episode/return", "tools/calls_per_episode", "env/first_e",
                "reward/mean", "loss"):
        assert key in rows[0], key
    assert 1.0 <= rows[0]["turns/mean"] <= 2.0
    assert rows[0]["episode/length"] > rows[0]["episode/policy_tokens"]  # the environment's tokens are there
    config = yaml.safe_load((tmp_path / algorithm / "config.yaml").read_text())
    assert config["env"] == env_spec and config["hparams"]["max_turns"] == 2


def test_multi_turn_grpo_resumes_exactly(tiny_model_dir, tmp_path, env_spec):
    train = partial(run, "grpo", tiny_model_dir, env_spec=env_spec, steps=6, save_steps=3, lr=5e-3)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "grad_norm", "turns/mean", "episode/length", "episode/return", "env/first_e")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_ppo_learns_a_rule_only_visible_across_turns(tiny_model_dir, tmp_path, env_spec):
    """The return is (e's in the second turn) - (e's in the first): the policy must write e's only
    after the user's "again". PPO with GAE over the policy's tokens, 40 steps. Measured block
    means (steps 1-10 .. 31-40) of the return: 0.05, 0.56, 3.11, 6.27, with first-turn e's
    0.36 -> 0.59 and second-turn e's 0.41 -> 6.86 (seed 2; seeds 1 and 42 learn too, seed 3
    not within 40 steps: single seeds of the tiny model are bimodal)."""
    run("ppo", tiny_model_dir, tmp_path / "rule", env_spec, steps=40, seed=2)
    rows = read_metrics(tmp_path / "rule")
    last = rows[-10:]
    second = sum(r["env/second_e"] for r in last) / 10
    first = sum(r["env/first_e"] for r in last) / 10
    assert sum(r["reward/mean"] for r in last) / 10 > 3.0
    assert second > first + 3.0, (first, second)
    assert sum(r["reward/mean"] for r in rows[:10]) / 10 < 1.0


def test_rebel_loss_worked_example():
    """l = (0.5, 0.1), R = (1, 0), eta 0.3: ((0.5 - 0.1) - 0.3 x 1)^2 = 0.01; equal rewards regress
    the log-ratio difference to 0."""
    from alignkit.objectives.rebel import rebel_loss

    assert rebel_loss(torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([1.0]), torch.tensor([0.0]),
                      0.3).item() == pytest.approx(0.01)
    assert rebel_loss(torch.tensor([0.2]), torch.tensor([0.2]), torch.tensor([3.0]), torch.tensor([3.0]),
                      1.0).item() == 0.0


def test_refuel_trains_on_two_futures_of_each_reset_turn(tiny_model_dir, tmp_path):
    """A simulated user (the policy prompted as the user), 3 turns, reward = e's of the whole
    dialogue's policy turns: two branches per prompt, their shared roll-in untrained."""
    run("refuel", tiny_model_dir, tmp_path / "refuel", None, steps=3, user_model="policy", max_turns=3,
        max_episode_tokens=256,
        reward=lambda prompts, completions, conversation, **_: [
            float(sum(m["content"].count("e") for m in c if m["role"] == "assistant")) for c in conversation],
        group_size=2, lr=1e-3)
    rows = read_metrics(tmp_path / "refuel")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["pairs"] == 4.0 and 1.0 <= row["refuel/reset_turn"] <= 3.0
        assert 0.0 <= row["refuel/sign_align"] <= 1.0 and row["env/user_tokens"] > 0
        assert row["turns/mean"] == 3.0  # the simulated user never ends the dialogue: max_turns does
    assert any(r["refuel/prefix_tokens"] > 0 for r in rows)


def test_refuel_without_the_other_side_of_the_dialogue_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--user-model"):
        run("refuel", tiny_model_dir, tmp_path / "no-user", None, steps=1, group_size=2,
            reward=lambda p, c, **_: [0.0] * len(c))


def test_validation_plays_held_out_conversations(tiny_model_dir, tmp_path, env_spec):
    """--eval-data on a multi-turn run: the held-out prompts are played as conversations and
    scored like training's (the environment's return + the reward of the final answer)."""
    held_out = [{"prompt": "Tell a story."}, {"prompt": "Name a movie."}]
    run("grpo", tiny_model_dir, tmp_path / "val", env_spec, steps=2, eval_data=held_out, eval_steps=1,
        eval_samples=2)
    rows = read_metrics(tmp_path / "val")
    assert "eval_start/reward" in rows[0] and "eval/reward" in rows[-1]
    assert rows[-1]["eval/length"] > 8  # two turns and the user's "again": longer than one 8-token turn


@pytest.mark.parametrize(("algorithm", "extra", "match"), [("drpo", {}, "dataset resets"), ("remax", {}, "greedy"),
                                                           ("nash_md", {}, "opponent"), ("dpa", {}, "direction")])
def test_single_turn_samplers_are_refused_with_an_environment(algorithm, extra, match, tiny_model_dir, tmp_path,
                                                              env_spec):
    with pytest.raises(ValueError, match=match):
        run(algorithm, tiny_model_dir, tmp_path / algorithm, env_spec, steps=1, group_size=2, **extra)
