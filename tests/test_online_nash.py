"""Game-theoretic presets: INPO's regression by a worked example and end to end (pi_t = the
policy that sampled the step's pairs)."""

from __future__ import annotations

import pytest
import torch
from run_helpers import read_metrics
from test_online import one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)

from alignkit.objectives.nash import inpo_h, inpo_loss


def test_inpo_loss_worked_example():
    """eta 0.1, tau 0.03 (ratio 0.3): Delta_theta = -1 - (-3) = 2, Delta_ref = 1, Delta_t = 0.5;
    h = 2 - 0.3 x 1 - 0.7 x 0.5 = 1.35; target 1 / 0.2 = 5; loss (1.35 - 5)^2 = 13.3225."""
    args = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -3.0, -1.5, -2.0)]
    assert inpo_h(*args, eta=0.1, tau=0.03).item() == pytest.approx(1.35)
    assert inpo_loss(*args, eta=0.1, tau=0.03).item() == pytest.approx(13.3225)
    # tau = 0 (the paper's "w/o KL" ablation): the reference drops out
    assert inpo_h(*args, eta=0.1, tau=0.0).item() == pytest.approx(2 - 0.5)


def test_inpo_learns_the_rule_reward(tiny_model_dir, tmp_path):
    """Best vs worst of 4 samples per prompt, eta 0.1 (target 5), tau eta / 3. Measured rise of
    the mean reward (last 5 steps vs first 5): 4.1 (online_dpo on the same runs: 3.3)."""
    run("inpo", tiny_model_dir, tmp_path / "inpo", inpo_eta=0.1)
    rows = read_metrics(tmp_path / "inpo")
    rise = sum(r["reward/mean"] for r in rows[-5:]) / 5 - sum(r["reward/mean"] for r in rows[:5]) / 5
    assert rise > 2.5, [round(r["reward/mean"], 2) for r in rows]
    assert all("inpo/h" in r and r["pairs"] >= 1 for r in rows)
    assert rows[-1]["inpo/h"] > rows[0]["inpo/h"]  # h climbs towards the target 1 / (2 eta)


@pytest.mark.parametrize(("settings", "message"), [
    ({"inpo_eta": 0.0}, "inpo needs eta > 0"),
    ({"inpo_eta": 0.1, "inpo_tau": 0.2}, "0 <= tau < eta"),
])
def test_bad_inpo_settings_are_refused(settings, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run("inpo", tiny_model_dir, tmp_path / "bad", steps=1, **settings)
