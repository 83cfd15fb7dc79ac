"""CGPO's mixture of judges (alignkit/objectives/cgpo.py, rewards/constraints.py,
training/online/cgpo.py): worked examples of the constrained calibrated reward and CRPG's KL
factor, judge specs and their one-line errors, the reward role's drained metrics, and the
cgpo_crpg preset on the tiny model: per-judge violation rates logged every step, and a planted
rule's violation rate falls."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from judge_helpers import pointwise_response, scripted_judge
from run_helpers import read_metrics
from torch.testing import assert_close

import alignkit
from alignkit.objectives.cgpo import constrained_calibrated_reward, violation_rates
from alignkit.rewards.constraints import MixtureOfJudges, load_constraint_judge, split_judge_specs
from alignkit.training.online.cgpo import ConstrainedReward, kl_regularised

ROWS = [{"prompt": p, "chosen": "a fine answer"}
        for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]


def test_constrained_calibrated_reward_worked_example():
    """R = (2, 0, 1), baseline (0, 0, 1), psi = ((1, 1), (1, 0), (1, 1)):
    r~ = (sigma(2 - 0), 0 [judge 2 rejects], sigma(1 - 1)) = (0.8808, 0, 0.5).
    Violation rates: judge 1 rejects 0 of 3, judge 2 rejects 1 of 3."""
    rewards, baseline = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])
    satisfied = torch.tensor([[True, True], [True, False], [True, True]])
    assert_close(constrained_calibrated_reward(rewards, satisfied, baseline),
                 torch.tensor([1 / (1 + math.exp(-2)), 0.0, 0.5]))
    assert_close(constrained_calibrated_reward(rewards, satisfied), torch.sigmoid(rewards) * torch.tensor([1, 0, 1]))
    assert_close(violation_rates(satisfied), torch.tensor([0.0, 1 / 3]))
    assert_close(constrained_calibrated_reward(rewards, torch.ones(3, 0, dtype=torch.bool)), torch.sigmoid(rewards))
    with pytest.raises(ValueError, match=r"rewards \(N,\) and satisfied \(N, K\)"):
        constrained_calibrated_reward(rewards, satisfied[:2])


def test_kl_factor_worked_example():
    """r~ = 0.8 with KL = 2 nats and threshold 8: 0.8 x (1 - 2/8) = 0.6; r~ = 0.5 with KL = 9 >= 8: 0.
    The masked third token (log-ratio 5) does not count."""
    old = torch.tensor([[1.0, 1.0, 5.0], [4.0, 5.0, 0.0]])
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert_close(kl_regularised(torch.tensor([0.8, 0.5]), old, ref, mask, 8.0), torch.tensor([0.6, 0.0]))


def test_judge_specs_split_name_and_judge():
    """Bars split judges, an escaped bar stays in the regex; repeated heads are numbered."""
    assert split_judge_specs(r"regex:^(a\|b)$|json_valid| max_words:3") == ["regex:^(a|b)$", "json_valid", "max_words:3"]
    mixture = MixtureOfJudges.from_spec(r"regex:^(a\|b)|regex:z|json_valid|max_words:2|max_chars:5")
    assert mixture.names == ["regex", "regex_2", "json_valid", "max_words", "max_chars"]
    satisfied = mixture.satisfied(["p"] * 3, ["a z", "b c d", '{"k": 1}'], {})
    assert satisfied.tolist() == [[True, True, False, True, True],
                                  [True, False, False, False, True],
                                  [False, False, True, True, False]]


def test_model_verdicts_replace_only_model_backed_judges():
    """`model_verdicts` (the online loop's per-rank split under torchrun) gives the columns of the
    model-backed judges; the rule judges still label every row themselves."""
    from alignkit.rewards.constraints import ConstraintJudge

    model_judge = ConstraintJudge("judge", lambda prompts, completions, **c: [0.0] * len(completions),
                                  model_backed=True)
    mixture = MixtureOfJudges([load_constraint_judge("regex:a"), model_judge])
    completions = ["a", "b", "ab"]
    assert mixture.satisfied(["p"] * 3, completions, {}).tolist() == [[True, False], [False, False], [True, False]]
    split = mixture.satisfied(["p"] * 3, completions, {}, model_verdicts=lambda judge: torch.tensor([True, True, False]))
    assert split.tolist() == [[True, True], [False, True], [True, False]]
    assert load_constraint_judge("max_words:3").model_backed is False


@pytest.mark.parametrize("spec, message", [
    ("regex:", "write the pattern after the colon"),
    ("regex:(", "invalid pattern"),
    ("json_valid:1", "json_valid takes no argument"),
    ("max_words:ten", "max_words takes a whole number"),
    ("max_chars:-1", "must be >= 0"),
    ("nonsense", "unknown judge 'nonsense'"),
    ("judge:m,threshold=high", "threshold must be a number"),
])
def test_bad_judge_specs_fail_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        load_constraint_judge(spec)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="an empty judge between bars"):
        split_judge_specs("json_valid||regex:a")


def test_llm_judge_as_a_constraint_with_its_threshold(tiny_model_dir, tokenizer):
    """judge:MODEL,threshold=T: satisfied when P(Yes) >= T. The scripted judge says P(Yes) = 0.75
    for "ok" and 0.25 otherwise: threshold 0.5 keeps "ok" only, 0.8 keeps nothing."""
    judge = scripted_judge(tokenizer, lambda text: math.log(3) * (1 if pointwise_response(text) == "ok" else -1))
    loaded = load_constraint_judge(f"judge:{tiny_model_dir},threshold=0.8")
    assert loaded.name == "judge" and loaded.threshold == 0.8 and loaded.model_backed  # split over torchrun ranks
    loaded.score = judge
    assert loaded.satisfied(["p", "p"], ["ok", "no"], {}).tolist() == [False, False]
    loaded.threshold = 0.5
    assert loaded.satisfied(["p", "p"], ["ok", "no"], {}).tolist() == [True, False]
    with pytest.raises(ValueError, match="a constraint judge is pointwise"):
        load_constraint_judge(f"judge:{tiny_model_dir},mode=pairwise")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class _Role:
    """A reward role over a text function (as FunctionReward: `.fn`, `.score`)."""

    def __init__(self, fn):
        self.fn, self.name = fn, "length"

    def score(self, batch, prompts, completions, columns):
        return torch.tensor(self.fn(prompts, completions), dtype=torch.float32), 0


def test_constrained_reward_role_scores_calibrates_and_drains():
    """R = number of words; judge: contains "x". Completions "x y" (R 2), "y" (R 1), baseline
    "a b" (R 2): r~ = (sigma(2 - 2), 0) = (0.5, 0). Drained: violation (0, 1), feasible (1, 0),
    raw reward (2, 1)."""
    role = _Role(lambda prompts, completions, **c: [float(len(t.split())) for t in completions])
    constrained = ConstrainedReward(role, MixtureOfJudges.from_spec("regex:x"), calibration_column="chosen")
    batch = SimpleNamespace()
    shaped, penalised = constrained.score(batch, ["p", "p"], ["x y", "y"], {"chosen": ["a b", "a b"]})
    assert_close(shaped, torch.tensor([0.5, 0.0]))
    drained = constrained.drain()
    assert_close(drained["judges/regex/violation_rate"], torch.tensor([0.0, 1.0]))
    assert_close(drained["judges/feasible_rate"], torch.tensor([1.0, 0.0]))
    assert_close(drained["judges/reward"], torch.tensor([2.0, 1.0]))
    assert constrained.drain() == {}
    with pytest.raises(ValueError, match="every prompt row needs that column"):
        constrained.score(batch, ["p"], ["x"], {})
    with pytest.raises(ValueError, match="scores token ids only"):
        ConstrainedReward(SimpleNamespace(score=role.score), MixtureOfJudges([]), calibration_column="chosen")


def _settings(**overrides):
    return dict(batch_size=4, max_new_tokens=8, progress=False, warmup_ratio=0.0, scheduler="constant", **overrides)


def test_cgpo_settings_errors_are_one_line(tiny_model_dir, tmp_path):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match="CGPO constrains the reward with judges"):
        alignkit.train("cgpo_crpg", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "a", reward=constant,
                       max_steps=1, **_settings())
    with pytest.raises(ValueError, match="belong to CGPO: train cgpo_crpg"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "b", reward=constant,
                       max_steps=1, judges="json_valid", **_settings())
    with pytest.raises(ValueError, match="CRRAFT weighs each NLL by r~"):
        alignkit.train("cgpo_crraft", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "d", reward=constant,
                       max_steps=1, judges="json_valid", missing_eos_penalty=1.0, **_settings())
    with pytest.raises(ValueError, match="cgpo_kl_threshold must be > 0"):
        alignkit.train("cgpo_crpg", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "c", reward=constant,
                       max_steps=1, judges="json_valid", cgpo_kl_threshold=0.0, **_settings())


def test_cgpo_crpg_logs_violation_rates_and_the_planted_rule_is_learned(tiny_model_dir, tmp_path):
    """Reward 1 for every sample; constraints: the completion contains the letter "e" (planted:
    the untrained tiny model's 8-token samples mostly lack one) and has at most 50 characters.
    CRPG's r~ = psi sigma(1) is 0.73 on feasible samples and 0 otherwise, so the policy learns
    the rule: judges/regex/violation_rate is logged every step and falls by more than 0.3
    (first 5 steps vs last 5). The KL factor (threshold 50 nats) loads the reference."""
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    alignkit.train("cgpo_crpg", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "crpg", reward=constant,
                   max_steps=30, lr=1e-2, judges="regex:e|max_chars:50", calibration_column="chosen",
                   cgpo_kl_threshold=50.0, **_settings())
    rows = read_metrics(tmp_path / "crpg")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("judges/regex/violation_rate", "judges/max_chars/violation_rate", "judges/feasible_rate",
                "judges/reward", "kl", "reward/mean"):
        assert all(key in r for r in rows), key
    first = sum(r["judges/regex/violation_rate"] for r in rows[:5]) / 5
    last = sum(r["judges/regex/violation_rate"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    # calibrated against the baseline "a fine answer" (reward 1 too): r~ = sigma(0) = 0.5 when feasible
    assert all(r["reward/mean"] <= 0.5 + 1e-6 for r in rows)
    assert all(r["reward/mean"] == pytest.approx(0.5 * r["judges/feasible_rate"], abs=1e-6) for r in rows)


def test_cgpo_crraft_learns_the_rule_and_infeasible_groups_add_nothing(tiny_model_dir, tmp_path):
    """cgpo_crraft: the best feasible sample of each prompt, its NLL weighted by r~. With the
    planted rule (contains "e") the violation rate falls by more than 0.3; with a constraint no
    sample can meet (the completion is exactly "ZZZZ") every r~ is 0, so every step's loss and
    gradient norm are exactly 0 and the weights do not move."""
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    alignkit.train("cgpo_crraft", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "crraft",
                   reward=constant, max_steps=30, lr=1e-2, judges="regex:e", **_settings())
    rows = read_metrics(tmp_path / "crraft")
    assert all("judges/regex/violation_rate" in r for r in rows)
    first = sum(r["judges/regex/violation_rate"] for r in rows[:5]) / 5
    last = sum(r["judges/regex/violation_rate"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)

    alignkit.train("cgpo_crraft", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "none",
                   reward=constant, max_steps=2, lr=1e-2, judges="regex:^ZZZZ$", allow_degenerate=True, **_settings())
    rows = read_metrics(tmp_path / "none")
    assert all(r["judges/feasible_rate"] == 0.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)


def test_cli_takes_judges_through_set(tiny_model_dir, tmp_path):
    """`alignkit train cgpo_crpg --set judges=...` from the command line: a regex with a
    backslash and an escaped bar reaches the judges intact; two steps log both judges."""
    from run_helpers import write_jsonl

    from alignkit.cli import main

    reward_file = tmp_path / "reward.py"
    reward_file.write_text("def reward(prompts, completions, **kw):\n    return [1.0 for c in completions]\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    code = main(["train", "cgpo_crpg", "--model", str(tiny_model_dir), "--data", data, "--output",
                 str(tmp_path / "cli"), "--reward", f"{reward_file}:reward", "--max-steps", "2", "--batch-size", "2",
                 "--set", r"judges=regex:\w(e\|a)|max_words:4", "--set", "max_new_tokens=6", "--no-progress"])
    assert code == 0
    rows = read_metrics(tmp_path / "cli")
    assert [r["step"] for r in rows] == [1, 2]
    assert {"judges/regex/violation_rate", "judges/max_words/violation_rate"} <= set(rows[0])
    assert r"regex:\w(e\|a)|max_words:4" in (tmp_path / "cli" / "config.yaml").read_text()
