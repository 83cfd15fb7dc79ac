"""rm_vpl (Variational Preference Learning): the KL term and the label information by hand,
two users with conflicting preferences separated by their context (and not without it), the
saved model as `rm:DIR,user_context=FILE`, active query selection, one-line errors, and a
resumed run equal to an uninterrupted one (the context and z draws are checkpointed)."""

from __future__ import annotations

import math

import pytest
import torch
from persona_data import user_pairs
from reward_helpers import train_tiny
from run_helpers import assert_resumed_matches, run_interrupted_and_resumed, write_jsonl

from alignkit.algorithms import ALGORITHMS
from alignkit.objectives.reward_losses import gaussian_kl_standard_normal
from alignkit.rewards import VariationalRewardScorer, load_reward
from alignkit.rewards.vpl import VariationalPreferenceModel, label_information

SETTINGS = {"epochs": 10, "lr": 3e-3, "context_size": 4}


@pytest.fixture(scope="module")
def vpl_run(tiny_model_dir, tmp_path_factory):
    rows = user_pairs(128, seed=0) + user_pairs(64, seed=1)
    return train_tiny("rm_vpl", rows, tmp_path_factory.mktemp("vpl") / "run", model_dir=tiny_model_dir, split=128,
                      **SETTINGS)


def test_gaussian_kl_worked_example():
    """mu = (1, 0), log s^2 = (0, log 2): 0.5 ((1 + 1 - 1 - 0) + (0 + 2 - 1 - log 2)) = 0.6534."""
    kl = gaussian_kl_standard_normal(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]]))
    assert kl.item() == pytest.approx(0.5 * (1 + 1 - math.log(2.0)), abs=1e-6)
    assert gaussian_kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


class _SignReward:
    """r(e, z) = e_0 * z_0: the preferred response flips with the sign of z_0."""

    def reward(self, embeddings, z):
        return embeddings[:, 0] * z[:, 0]


def test_label_information_by_hand():
    """z_0 = +1 or -1 (half each). Pair 1: r_a - r_b = 2 z_0 -> p = sigma(+-2) = 0.8808 / 0.1192,
    I = H(0.5) - H(0.8808) = 0.6931 - 0.3653 = 0.3278 nats; pair 2: the responses are equal,
    p = 0.5 for every z, I = 0."""
    z = torch.tensor([[1.0], [-1.0]])
    chosen, rejected = torch.tensor([[1.0], [0.5]]), torch.tensor([[-1.0], [0.5]])
    information = label_information(_SignReward(), chosen, rejected, z)
    p = torch.sigmoid(torch.tensor(2.0)).item()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert information[0].item() == pytest.approx(math.log(2) - entropy, abs=1e-5)
    assert information[0].item() == pytest.approx(0.3278, abs=1e-4)
    assert information[1].item() == pytest.approx(0.0, abs=1e-6)


def test_posterior_ignores_padded_context_pairs():
    torch.manual_seed(0)
    model = VariationalPreferenceModel(6, latent_dim=4, hidden_dim=8)
    chosen, rejected = torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    padded_c = torch.cat([chosen, torch.randn(1, 2, 6)], dim=1)
    padded_r = torch.cat([rejected, torch.randn(1, 2, 6)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    torch.testing.assert_close(model.posterior(padded_c, padded_r, mask), model.posterior(chosen, rejected))


def test_rm_vpl_separates_two_users_with_conflicting_preferences(vpl_run):
    """Held-out pairs of user A (prefers positive reviews) and B (negative): with a context of
    4 of the user's pairs, accuracy >= 0.85 for EACH user (measured 1.0 / 1.0); without
    context (z = 0) no single reward can serve both, overall accuracy within 0.2 of chance
    (measured 0.42)."""
    spec = ALGORITHMS["rm_vpl"]
    assert spec.kind == "reward" and "user" in spec.data
    m = vpl_run.eval_metrics
    assert m["eval/users/A/accuracies"] >= 0.85 and m["eval/users/B/accuracies"] >= 0.85
    assert abs(m["eval/rewards/accuracies_no_context"] - 0.5) <= 0.2
    assert vpl_run.metrics["loss/kl"] > 0
    assert (vpl_run.final_dir / "vpl_rm.json").is_file() and (vpl_run.final_dir / "vpl.safetensors").is_file()


def test_saved_vpl_scores_for_the_user_in_the_context_file(vpl_run, tmp_path):
    """--reward rm:DIR,user_context=FILE: user A's pairs make positive reviews score higher,
    user B's the negative ones, on unseen pairs (>= 0.9 of them each; measured 1.0)."""
    held_out = user_pairs(40, seed=5)
    a_rows = [r for r in held_out if r["user"] == "A"]
    context_a = write_jsonl(tmp_path / "a.jsonl", a_rows[:4])
    context_b = write_jsonl(tmp_path / "b.jsonl", [r for r in held_out if r["user"] == "B"][:4])
    prompts = [r["prompt"] for r in a_rows[4:]]
    positive, negative = [r["chosen"] for r in a_rows[4:]], [r["rejected"] for r in a_rows[4:]]
    for context, sign in ((context_a, 1), (context_b, -1)):
        reward = load_reward(f"rm:{vpl_run.final_dir},user_context={context}")
        assert isinstance(reward, VariationalRewardScorer)
        margin = reward(prompts, positive) - reward(prompts, negative)
        assert (sign * margin > 0).float().mean() >= 0.9
    with pytest.raises(ValueError, match="user_context=FILE"):
        load_reward(f"rm:{vpl_run.final_dir}")(prompts, positive)
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match=r"bad.jsonl.*row 1.*'rejected'"):
        load_reward(f"rm:{vpl_run.final_dir},user_context={tmp_path / 'bad.jsonl'}")


def test_active_query_selection_picks_informative_queries(vpl_run, tiny_model_dir, tmp_path):
    """Active selection ranks a conflicting pair (users disagree on it) above a pair whose two
    responses are the same text (I(y; z) = 0), and the held-out protocol with
    query_selection=active still separates the users (>= 0.85 each)."""
    scorer = VariationalRewardScorer(vpl_run.final_dir)
    prompts = ["Write a short review. The film"] * 2
    first, second = [" was good and great.", " was bad and sad."], [" was awful and sad.", " was bad and sad."]
    assert scorer.select_queries(prompts, first, second, k=2) == [0, 1]
    rows = user_pairs(128, seed=0) + user_pairs(64, seed=1)
    active = train_tiny("rm_vpl", rows, tmp_path / "active", model_dir=tiny_model_dir, split=128,
                        query_selection="active", **SETTINGS)
    assert active.eval_metrics["eval/users/A/accuracies"] >= 0.85
    assert active.eval_metrics["eval/users/B/accuracies"] >= 0.85


def test_a_resumed_rm_vpl_run_draws_the_contexts_of_the_uninterrupted_one(tiny_model_dir, tmp_path):
    runs = run_interrupted_and_resumed(
        lambda **kw: train_tiny("rm_vpl", user_pairs(24), model_dir=tiny_model_dir, max_steps=6,
                                save_steps=1, context_size=4, lr=3e-3, **kw), tmp_path, at=3)
    assert_resumed_matches(runs.full, runs.resumed, ("loss", "loss/kl", "rewards/margins"), steps=6)


def test_rm_vpl_errors_are_one_line(tiny_model_dir, tmp_path):
    rows = user_pairs(20)
    del rows[5]["user"]
    with pytest.raises(ValueError, match=r"row 6.*'user' column"):
        train_tiny("rm_vpl", rows, tmp_path / "no_user", model_dir=tiny_model_dir, max_steps=1, context_size=4)
    rows = user_pairs(20) + [{**user_pairs(1)[0], "user": "C"}] * 3
    with pytest.raises(ValueError, match=r"user 'C' has 3 training pairs.*context_size \+ 1 = 5"):
        train_tiny("rm_vpl", rows, tmp_path / "few", model_dir=tiny_model_dir, max_steps=1, context_size=4)
    with pytest.raises(ValueError, match="query_selection must be one of"):
        train_tiny("rm_vpl", user_pairs(20), tmp_path / "qs", model_dir=tiny_model_dir, query_selection="greedy")
    with pytest.raises(ValueError, match="kl_weight >= 0"):
        train_tiny("rm_vpl", user_pairs(20), tmp_path / "kl", model_dir=tiny_model_dir, kl_weight=-1)


def test_user_context_reaches_online_training_and_eval_rm(vpl_run, tiny_model_dir, tmp_path):
    """GRPO with --reward-model DIR of an rm_vpl model and --set user_context=FILE scores every
    sample; without the context the run stops with the one-line error; eval-rm --user-context
    evaluates user B's held-out pairs (accuracy >= 0.9)."""
    from reward_helpers import eval_rm
    from run_helpers import read_metrics
    from test_online import ROWS

    import alignkit

    held_out = [r for r in user_pairs(40, seed=6) if r["user"] == "B"]
    context = write_jsonl(tmp_path / "b.jsonl", held_out[:4])
    common = dict(model=str(tiny_model_dir), data=ROWS, batch_size=2, max_steps=2, group_size=2, max_new_tokens=4,
                  progress=False, allow_degenerate=True)
    alignkit.train("grpo", output_dir=tmp_path / "run", reward_model=str(vpl_run.final_dir), user_context=context,
                   **common)
    assert all(math.isfinite(r["reward/mean"]) for r in read_metrics(tmp_path / "run"))
    with pytest.raises(ValueError, match="user_context=FILE"):
        alignkit.train("grpo", output_dir=tmp_path / "no_context", reward=f"rm:{vpl_run.final_dir}", **common)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", held_out[4:])
    results = eval_rm(vpl_run.final_dir, pairs, tmp_path / "eval.json", 50, "--user-context", context)
    assert results["kind"] == "vpl_rm" and results["accuracy"] >= 0.9
