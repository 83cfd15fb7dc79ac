"""Game-theoretic presets. Nash-MD: the mixture sampler (alpha 0 and 1 sample exactly the policy
and the reference), the Bradley-Terry judge and the per-token REINFORCE advantage by worked
examples; it learns the rule reward, resumes exactly and takes a trained preference model as
judge. INPO: its regression by a worked example and end to end (pi_t = the policy that sampled
the step's pairs)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from reward_helpers import train_tiny
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
)
from test_online import ROWS, one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)

import alignkit
from alignkit.advantages import sequence_reward
from alignkit.objectives.nash import inpo_h, inpo_loss
from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.mixture import MixtureEngine, mix_logits
from alignkit.testing import build_tiny_model, synthetic_pairs
from alignkit.training.online.nash import bradley_terry

NASH = {"lr": 5e-2, "beta": 0.02, "group_size": 4}


def test_mixture_engine_samples_the_policy_at_0_and_the_reference_at_1(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "ref", seed=1))
    with torch.no_grad():
        reference.get_output_embeddings().weight.mul_(20.0)  # peaked: unlike the policy's samples
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("A")["input_ids"]]
    sampling, ids = SamplingParams(max_new_tokens=6, seed=3), dict(pad_id=tokenizer.pad_token_id,
                                                                   eos_ids=(tokenizer.eos_token_id,))
    for alpha, model in ((0.0, policy), (1.0, reference)):
        alone = HFEngine(model, **ids).generate(prompts, 3, sampling)
        mixed = MixtureEngine(policy, reference, alpha, **ids).generate(prompts, 3, sampling)
        assert torch.equal(alone.response_ids, mixed.response_ids)
        torch.testing.assert_close(alone.response_logprobs, mixed.response_logprobs)
    half = MixtureEngine(policy, reference, 0.5, **ids).generate(prompts, 3, sampling)
    assert not torch.equal(half.response_ids, HFEngine(policy, **ids).generate(prompts, 3, sampling).response_ids)
    # softmax(0.5 z_ref + 0.5 z) is the normalised geometric mean of the two distributions
    z, z_ref = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    geometric = (z.softmax(-1) * z_ref.softmax(-1)).sqrt()
    torch.testing.assert_close(mix_logits(z, z_ref, 0.5).softmax(-1), geometric / geometric.sum())


def test_bradley_terry_and_the_nash_advantage():
    assert bradley_terry(torch.tensor([2.0]), torch.tensor([2.0])).item() == 0.5
    assert bradley_terry(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.7310586)
    # p = 0.8: R = p - 0.5 = 0.3 on every token, minus beta x u_t per token (0.1, -0.2)
    advantages = sequence_reward(torch.tensor([0.3]), torch.tensor([0]), torch.tensor([[True, True, False]]),
                                 kl_penalty=torch.tensor([[0.1, -0.2, 9.0]]))
    assert advantages[0].tolist() == pytest.approx([0.2, 0.5, 0.0])


def test_nash_md_learns_the_rule_reward(tiny_model_dir, tmp_path):
    """Judge sigmoid(count_e(y) - count_e(y')), opponent the 0.5 mixture with the reference.
    Measured over 30 steps: the policy samples' mean count_e 0.42 (first 5) -> 6.9 (last 5); the
    win rate against the opponent stays near 1/2 as the mixture follows the policy (self-play)."""
    run("nash_md", tiny_model_dir, tmp_path / "nash", **NASH)
    rows = read_metrics(tmp_path / "nash")
    first = sum(r["nash/policy_reward"] for r in rows[:5]) / 5
    last = sum(r["nash/policy_reward"] for r in rows[-5:]) / 5
    assert last > first + 4.0, [round(r["nash/policy_reward"], 2) for r in rows]
    assert all(0.0 <= r["reward/mean"] <= 1.0 and "nash/opponent_reward" in r for r in rows)


def test_nash_md_resumes_exactly(tiny_model_dir, tmp_path):
    train = partial(run, "nash_md", tiny_model_dir, steps=6, save_steps=3, **NASH)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "nash/policy_reward", "nash/opponent_reward", "kl", "grad_norm")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_nash_md_with_a_preference_model_judge(tiny_model_dir, tmp_path):
    judge = train_tiny("preference_model", synthetic_pairs(32, seed=5), tmp_path / "pm", model_dir=tiny_model_dir,
                       max_steps=3, lr=2e-3).final_dir
    run("nash_md", tiny_model_dir, tmp_path / "run", steps=2, preference_model=str(judge), **NASH)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(0.0 < r["reward/mean"] < 1.0 for r in rows)
    assert "nash/policy_reward" not in rows[0]  # the preference model judges; no reward scores
    with pytest.raises(ValueError, match="is a pairwise preference model: it judges pairs"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "as-reward", max_steps=1,
                       reward_model=str(judge), progress=False)


def test_nash_md_refuses_placements_it_cannot_sample_in(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--strategy fsdp2 is not supported"):
        from alignkit.training.online.build import check_opponent_placement
        from alignkit.training.run.config import TrainConfig

        check_opponent_placement(TrainConfig(), sharded=True)
    with pytest.raises(ValueError, match="--preference-model judges nash_md"):
        run("grpo", tiny_model_dir, tmp_path / "bad", steps=1, preference_model=str(tmp_path))


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
