"""On-policy distillation (`distill`): the student samples, the --teacher stands where the
reference does. reverse_kl: beta x (log pi_T - log pi) per token as the reward, discount 0
(`return_to_go`); jsd: GKD's generalised JSD to the teacher's whole distribution, matched to
TRL's generalized_jsd_loss. Both lower the student's reverse KL to a teacher fine-tuned to
write e-rich text; bad teachers and flags are refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import read_metrics
from test_online import PROMPTS, ROWS, one_thread  # noqa: F401  (one_thread: the module's autouse fixture)

import alignkit
from alignkit.advantages import return_to_go
from alignkit.testing import build_tiny_model
from alignkit.training.online.steps import generalized_jsd

SETTINGS = dict(batch_size=4, max_steps=30, lr=1e-2, warmup_ratio=0.0, scheduler="constant", progress=False,
                max_new_tokens=8)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, tmp_path_factory):
    """The tiny model after 30 SFT steps on one e-rich completion."""
    rows = [{"prompt": p, "completion": " the tree see here, sweet green bee."} for p in PROMPTS * 4]
    out = tmp_path_factory.mktemp("teacher")
    return alignkit.train("sft", model=str(tiny_model_dir), data=rows, output_dir=out, max_steps=30, lr=1e-2,
                          batch_size=4, warmup_ratio=0.0, progress=False).final_dir


def test_return_to_go_worked_example():
    """rewards R = 1 on a 3-token sample, KL penalty (0.1, 0.2, 0.3): r = (-0.1, -0.2, 0.7);
    gamma 0: A = r; gamma 1: A = (0.4, 0.5, 0.7)."""
    mask, kl = torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0.1, 0.2, 0.3]])
    zero = return_to_go(torch.tensor([1.0]), torch.tensor([0]), mask, kl_penalty=kl, gamma=0.0)
    one = return_to_go(torch.tensor([1.0]), torch.tensor([0]), mask, kl_penalty=kl, gamma=1.0)
    assert zero[0].tolist() == pytest.approx([-0.1, -0.2, 0.7])
    assert one[0].tolist() == pytest.approx([0.4, 0.5, 0.7])


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl(beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11) * 2, torch.randn(2, 5, 11) * 2
    ours = generalized_jsd(student.log_softmax(-1), teacher.log_softmax(-1), beta).sum()
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, reduction="sum")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    # a worked example: identical distributions diverge by 0; beta = 1 is KL(student || teacher)
    same = student.log_softmax(-1)
    assert generalized_jsd(same, same, beta).abs().max().item() < 1e-6
    s, t = torch.tensor([0.9, 0.1]).log(), torch.tensor([0.5, 0.5]).log()
    if beta == 1.0:  # 0.9 ln(0.9 / 0.5) + 0.1 ln(0.1 / 0.5) = 0.3681
        assert generalized_jsd(s, t, 1.0).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))


def _mean(rows, key, part) -> float:
    chosen = rows[:5] if part == "first" else rows[-5:]
    return sum(r[key] for r in chosen) / len(chosen)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_distill_lowers_the_reverse_kl_to_the_teacher(loss, tiny_model_dir, teacher, tmp_path):
    """Measured (summed over 8 tokens, mean of the first vs last 5 steps): reverse_kl 12.2 -> 3.1,
    jsd 11.0 -> 2.3. No --reward: the task reward is 0 and the run is not degenerate."""
    alignkit.train("distill", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / loss,
                   teacher=str(teacher), distill_loss=loss, **SETTINGS)
    rows = read_metrics(tmp_path / loss)
    assert len(rows) == 30 and all(r["reward/mean"] == 0.0 for r in rows)
    first, last = _mean(rows, "distill/reverse_kl", "first"), _mean(rows, "distill/reverse_kl", "last")
    assert last < first - 5.0, (first, last)
    assert ("jsd" in rows[0]) == (loss == "jsd")


def test_distill_adds_a_task_reward(tiny_model_dir, teacher, tmp_path):
    alignkit.train("distill", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "r", teacher=str(teacher),
                   reward="dist_helpers:count_e", **{**SETTINGS, "max_steps": 2})
    assert any(r["reward/mean"] > 0 for r in read_metrics(tmp_path / "r"))


@pytest.mark.parametrize(("algorithm", "settings", "message"), [
    ("distill", {}, "needs --teacher DIR"),
    ("grpo", {"teacher": "<teacher>", "reward": "dist_helpers:count_e"}, "--teacher is the teacher"),
    ("distill", {"teacher": "<teacher>", "jsd_beta": 1.5}, "jsd_beta must be in"),
    ("distill", {"teacher": "<teacher>", "kl_in": "loss"}, "kl_in=reward"),
    ("distill", {"teacher": "<other vocabulary>"}, "vocabulary has 352 tokens"),
])
def test_bad_distill_settings_are_refused(algorithm, settings, message, tiny_model_dir, teacher, tmp_path):
    other = build_tiny_model(tmp_path / "other", vocab_size=352)
    paths = {"<teacher>": str(teacher), "<other vocabulary>": str(other)}
    settings = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ValueError, match=message):
        alignkit.train(algorithm, model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "bad",
                       **{**SETTINGS, "max_steps": 1}, **settings)
