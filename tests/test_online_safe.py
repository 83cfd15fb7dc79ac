"""safe_ppo (Safe RLHF's PPO-Lagrangian): the multiplier's step, the cost window, the mixed
advantage and the cost's KL sign by worked examples; on a tiny model it raises the reward while
holding the mean cost near its limit, where PPO on the same reward overshoots; exact resume
(lambda and the cost window restored); bad flags refused in one line."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from reward_helpers import train_tiny
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)
from test_online import one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)

from alignkit.cli import main as cli_main
from alignkit.testing import synthetic_safety_pairs
from alignkit.training.online.safe import (
    CostWindow,
    lagrange_step,
    lagrangian_advantages,
    mix_advantages,
)

COST = "dist_helpers:e_excess"  # max(0, count_e - 3)


def test_lagrange_step_worked_example():
    """log lambda = 0 (lambda 1), cost 2 over a limit of 0.5, lr 0.1: 0 + 0.1 x 1.5 x 1 = 0.15."""
    assert lagrange_step(0.0, 2.0, 0.5, 0.1) == pytest.approx(0.15)
    assert lagrange_step(0.0, 0.0, 0.5, 0.1) == pytest.approx(-0.05)  # under the limit: lambda shrinks
    assert lagrange_step(math.log(2.0), 10.0, 0.0, 1.0, lambda_max=3.0) == pytest.approx(math.log(3.0))


def test_cost_window_keeps_the_last_episodes():
    window = CostWindow(3)
    assert window.add([1.0, 2.0]) == pytest.approx(1.5)
    assert window.add([3.0, 4.0]) == pytest.approx(3.0)  # 2, 3, 4
    restored = CostWindow(3)
    restored.load_state(window.state())
    assert restored.add([5.0]) == pytest.approx(4.0)


def test_mixed_advantage_and_the_cost_kl_sign():
    assert mix_advantages(torch.tensor([2.0]), torch.tensor([1.0]), 1.0).item() == pytest.approx(0.5)
    assert mix_advantages(torch.tensor([2.0]), torch.tensor([1.0]), 0.0).item() == pytest.approx(2.0)
    # one sample, two tokens, zero values, gamma = lam = 1: A_t is the sum of the signals from t on
    mask = torch.ones(1, 2, dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2]])  # beta x KL_t
    advantages, returns = lagrangian_advantages(torch.tensor([1.0]), torch.tensor([3.0]), mask, kl,
                                                torch.zeros(1, 2, 2), 1.0, 1.0, 1.0)
    # reward: -0.1 - 0.2 + 1 = 0.7, -0.2 + 1 = 0.8; cost: +0.1 + 0.2 + 3 = 3.3, 0.2 + 3 = 3.2
    assert returns[0, :, 0].tolist() == pytest.approx([0.7, 0.8])
    assert returns[0, :, 1].tolist() == pytest.approx([3.3, 3.2])
    assert advantages[0].tolist() == pytest.approx([(0.7 - 3.3) / 2, (0.8 - 3.2) / 2])


def _mean(rows, key, last=10) -> float:
    return sum(r[key] for r in rows[-last:]) / last


def test_safe_ppo_holds_the_cost_where_ppo_overshoots(tiny_model_dir, tmp_path):
    """Reward count_e, cost max(0, count_e - 3), limit 0.5. Measured over the last 10 of 40
    steps: safe_ppo reward 3.2, cost 0.6, lambda back up from 0.51 to 0.69; PPO reward 7.9, so
    its mean cost is at least 7.9 - 3 = 4.9 (the mean of max(0, e - 3) >= mean e - 3)."""
    run("safe_ppo", tiny_model_dir, tmp_path / "safe", steps=40, cost=COST, cost_limit=0.5, lambda_lr=0.1)
    safe = read_metrics(tmp_path / "safe")
    assert all(key in safe[0] for key in ("cost/mean", "cost/window_mean", "lambda", "value_loss"))
    assert _mean(safe, "reward/mean") > _mean(safe[:10], "reward/mean") + 1.5
    assert _mean(safe, "cost/mean") < 1.2
    lowest = min(r["lambda"] for r in safe)
    assert lowest < 0.8 and safe[-1]["lambda"] > lowest + 0.05  # shrinks under the limit, grows above it
    run("ppo", tiny_model_dir, tmp_path / "ppo", steps=40)
    ppo = read_metrics(tmp_path / "ppo")
    assert _mean(ppo, "reward/mean") - 3.0 > 2.0 > _mean(safe, "cost/mean")


def test_safe_ppo_resumes_exactly(tiny_model_dir, tmp_path):
    train = partial(run, "safe_ppo", tiny_model_dir, steps=6, save_steps=3, lr=5e-3, cost=COST,
                    cost_limit=0.0, lambda_lr=0.5, cost_window=8)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "cost/mean", "cost/window_mean", "lambda", "value_loss", "grad_norm")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_safe_ppo_from_the_cli_with_a_cost_model(tiny_model_dir, tmp_path):
    """`alignkit train cost`, then safe_ppo with --cost-model DIR scoring the samples and the
    same model initialising the cost critic (--set cost_critic_init)."""
    cost_dir = train_tiny("cost", synthetic_safety_pairs(48, seed=4), tmp_path / "cost", model_dir=tiny_model_dir,
                          max_steps=4, lr=2e-3).final_dir
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("The movie", "Tell me") * 2])
    code = cli_main(["train", "safe_ppo", "--model", str(tiny_model_dir), "--data", prompts, "--output",
                     str(tmp_path / "run"), "--reward", "dist_helpers:count_e", "--cost-model", str(cost_dir),
                     "--batch-size", "2", "--max-steps", "2", "--no-progress", "--set", "max_new_tokens=6",
                     "--set", f"cost_critic_init={cost_dir}"])
    assert code == 0
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["cost/mean"]) and r["cost/mean"] != 0.0 for r in rows)


@pytest.mark.parametrize(("algorithm", "settings", "message"), [
    ("safe_ppo", {}, "exactly one of --cost"),
    ("ppo", {"cost": COST}, "--cost is the cost of safe_ppo"),
    ("safe_ppo", {"cost": COST, "critic": "shared"}, "critic=separate"),
    ("safe_ppo", {"cost": COST, "sample_filter": "best_of_n"}, "sample_filter"),
    ("safe_ppo", {"cost": COST, "lambda_init": 0.0}, "lambda_init"),
])
def test_bad_safe_ppo_settings_are_refused(algorithm, settings, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(algorithm, tiny_model_dir, tmp_path / "bad", steps=1, **settings)
