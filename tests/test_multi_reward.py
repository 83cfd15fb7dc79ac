"""Several rewards in one online run: names, weights, the sum and GDPO's normalize-then-sum
(against TRL 1.16's formula), per-reward metrics, the CLI's repeated --reward, and the errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from run_helpers import read_metrics, write_jsonl
from test_online import PROMPTS, ROWS, count_e, one_thread  # noqa: F401  (one_thread: autouse fixture)
from torch.testing import assert_close

import alignkit
from alignkit.advantages import ADVANTAGES
from alignkit.cli import main as cli_main
from alignkit.training.online.multi_reward import (
    MultiReward,
    normalize_then_sum,
    parse_weights,
    reward_names,
)


def run(algorithm, model_dir, output_dir, steps=30, reward=None, **overrides):
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    settings.update(overrides)
    return alignkit.train(algorithm, model=str(model_dir), data=ROWS, output_dir=output_dir,
                          reward=reward if reward is not None else count_e, **settings)


def short(prompts, completions, **columns):
    """-1 per character over 12: a second objective that pulls against count_e's length."""
    return [-max(0.0, len(text) - 12.0) for text in completions]


def test_names_and_weights():
    assert reward_names(["rewards.py:brevity", "mymod.scores:brevity", "length:20", "vader", count_e]) == [
        "brevity", "brevity_2", "length", "vader", "count_e"]
    assert parse_weights(None, 2) == [1.0, 1.0] and parse_weights("1,0.5", 2) == [1.0, 0.5]
    with pytest.raises(ValueError, match="--reward-weights 1: 1 weight.s. for 2 reward"):
        parse_weights("1", 2)
    with pytest.raises(ValueError, match="comma-separated numbers"):
        parse_weights("1,x", 2)


def trl_normalize_then_sum(rewards_per_func, weights, num_generations):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, multi_objective_aggregation=
    "normalize_then_sum" (its nan handling aside): per-function group z-scores with eps 1e-4,
    weighted sum, then (r - mean) / (std + 1e-4) over the batch."""
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    reward_k = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    rewards = (reward_k.view(-1, rewards_per_func.shape[1]) * weights.unsqueeze(0)).sum(1)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def test_gdpo_with_batch_norm_equals_trl_normalize_then_sum():
    torch.manual_seed(0)
    per_func = torch.stack([torch.randint(0, 2, (12,)).float(), 100 * torch.randn(12)], dim=1)  # (N, K)
    weights = torch.tensor([1.0, 0.5])
    combined = normalize_then_sum(per_func.T, weights, group_size=4)
    mask = torch.ones(12, 3, dtype=torch.bool)
    advantages = ADVANTAGES["batch_norm"](combined, torch.arange(3).repeat_interleave(4), mask)
    assert_close(advantages[:, 0], trl_normalize_then_sum(per_func, weights, 4), rtol=1e-5, atol=1e-5)
    assert_close(advantages[:, 0], advantages[:, 2])  # one advantage per sample, on every token


def test_gdpo_keeps_a_small_scale_reward_visible():
    """A 0/1 reward beside a reward 1000x larger: summed, the 0/1 one hardly moves the total;
    normalised first, it carries as much weight as the other."""
    small = torch.tensor([0.0, 1.0, 0.0, 1.0])
    large = torch.tensor([1000.0, 1000.5, 999.0, 1001.0])
    z = normalize_then_sum(torch.stack([small, large]), torch.tensor([1.0, 0.0]), group_size=4)
    assert_close(z, (small - 0.5) / (small.std() + 1e-4))


class _Fixed:
    def __init__(self, values):
        self.values = torch.tensor(values)

    def score(self, batch, prompts, completions, columns):
        return self.values, 1


def test_multi_reward_sums_with_weights_and_drains_each_reward():
    role = MultiReward([_Fixed([1.0, 2.0]), _Fixed([10.0, 20.0])], ["a", "b"], [1.0, 0.5], "sum", group_size=2)
    combined, penalised = role.score(None, [], [], {})
    assert combined.tolist() == [6.0, 12.0] and penalised == 2
    role.score(None, [], [], {})
    drained = role.drain()
    assert drained["a"].tolist() == [1.0, 2.0, 1.0, 2.0] and role.drain() == {}


def test_two_rewards_log_each_and_train_on_the_weighted_sum(tiny_model_dir, tmp_path):
    run("grpo", tiny_model_dir, tmp_path / "two", steps=3, reward=[f"{__file__}:count_e", f"{__file__}:short"],
        reward_weights="1,0.5")
    for r in read_metrics(tmp_path / "two"):
        assert r["reward/mean"] == pytest.approx(r["reward/count_e"] + 0.5 * r["reward/short"], abs=1e-5)


def test_gdpo_learns_both_rewards(tiny_model_dir, tmp_path):
    run("grpo", tiny_model_dir, tmp_path / "gdpo", steps=30, reward=[f"{__file__}:count_e", f"{__file__}:short"],
        reward_aggregation="normalize_then_sum", advantage="batch_norm")
    rows = read_metrics(tmp_path / "gdpo")
    first = sum(r["reward/count_e"] for r in rows[:5]) / 5
    last = sum(r["reward/count_e"] for r in rows[-5:]) / 5
    assert last > first + 1.0, [round(r["reward/count_e"], 2) for r in rows]


def test_cli_repeats_reward(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "cli"
    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(out),
                     "--reward", f"{__file__}:count_e", "--reward", "length:4", "--reward-weights", "1,2",
                     "--batch-size", "2", "--max-steps", "1", "--set", "group_size=2", "--set", "max_new_tokens=4",
                     "--no-progress"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward"] == [f"{__file__}:count_e", "length:4"] and saved["reward_weights"] == "1,2"
    row = read_metrics(out)[0]
    assert "reward/count_e" in row and "reward/length" in row


@pytest.mark.parametrize(("settings", "message"), [
    ({"reward_weights": "1,2"}, "--reward-weights weighs several --reward"),
    ({"reward": ["length:4", "length:8"], "reward_weights": "1"}, "1 weight.s. for 2 reward"),
    ({"reward": ["length:4", "length:8"], "reward_aggregation": "normalize_then_sum"}, "advantage=batch_norm"),
])
def test_bad_multi_reward_settings(settings, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run("grpo", tiny_model_dir, tmp_path / "bad", steps=1, **settings)
