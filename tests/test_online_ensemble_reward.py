"""`--set ensemble_reduce=` in the online loop: an rm_ensemble directory as `--reward rm:DIR`
scored with the reduction asked for (not the one saved), and the mismatches refused."""

from __future__ import annotations

import pytest
import torch
from reward_helpers import QUIET, train_tiny
from run_helpers import read_metrics
from test_online import ROWS, one_thread  # noqa: F401  (one_thread: autouse fixture)

import alignkit
from alignkit.rewards import EnsembleScorer
from alignkit.testing import synthetic_pairs
from alignkit.training.online.build import load_reward_spec
from alignkit.training.online.presets import OnlineSettings


@pytest.fixture(scope="module")
def ensemble_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    train_tiny("rm_ensemble", synthetic_pairs(32, seed=3), out / "ens", model_dir=tiny_model_dir, options=QUIET,
               members=2, shared_trunk=True, lr=5e-2, epochs=2)
    return out / "ens" / "final"


def test_the_reduction_asked_for_is_the_one_scored(ensemble_dir):
    prompts, completions = ["The movie", "Tell me"], [" was great", " nothing"]
    members = EnsembleScorer(ensemble_dir).member_scores(prompts, completions)  # (B, k), normalised
    for reduce, expected in (("wco", members.min(-1).values), ("mean", members.mean(-1))):
        scorer = load_reward_spec(f"rm:{ensemble_dir}", OnlineSettings(ensemble_reduce=reduce))
        assert scorer.aggregation == reduce
        torch.testing.assert_close(scorer(prompts, completions).float(), expected.float(), rtol=1e-5, atol=1e-5)
    uwo = load_reward_spec(f"rm:{ensemble_dir}", OnlineSettings(ensemble_reduce="uwo", uwo_lambda=0.1))
    assert uwo.aggregation == "uwo" and uwo.uwo_lambda == 0.1


def test_a_run_scores_with_the_reduction(ensemble_dir, tiny_model_dir, tmp_path):
    alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "run", reward=f"rm:{ensemble_dir}",
                   ensemble_reduce="wco", batch_size=2, max_steps=2, group_size=2, max_new_tokens=4, progress=False,
                   allow_degenerate=True)
    assert all(torch.isfinite(torch.tensor(r["reward/mean"])) for r in read_metrics(tmp_path / "run"))


def test_mismatches_are_refused(ensemble_dir, tiny_model_dir):
    with pytest.raises(ValueError, match="ensemble_reduce=brme needs an rm_bayes model; --reward rm:.* is ensemble"):
        load_reward_spec(f"rm:{ensemble_dir}", OnlineSettings(ensemble_reduce="brme"))
    with pytest.raises(ValueError, match="ensemble_reduce=wco needs an rm_ensemble model"):
        load_reward_spec(f"rm:{tiny_model_dir}", OnlineSettings(ensemble_reduce="wco"))
    with pytest.raises(ValueError, match="ensemble_reduce must be"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, reward="length:4", ensemble_reduce="max",
                       max_steps=1, progress=False)


def test_reward_model_of_an_ensemble_scores_as_the_ensemble(ensemble_dir, tiny_model_dir, tmp_path):
    """--reward-model DIR of an rm_ensemble directory is the ensemble (as rm:DIR), not its first
    member read as a plain classifier: the two runs log the same rewards."""
    common = dict(model=str(tiny_model_dir), data=ROWS, batch_size=2, max_steps=2, group_size=2, max_new_tokens=4,
                  progress=False, allow_degenerate=True)
    alignkit.train("grpo", output_dir=tmp_path / "dir", reward_model=str(ensemble_dir), ensemble_reduce="wco", **common)
    alignkit.train("grpo", output_dir=tmp_path / "rm", reward=f"rm:{ensemble_dir}", ensemble_reduce="wco", **common)
    assert [r["reward/mean"] for r in read_metrics(tmp_path / "dir")] == [
        r["reward/mean"] for r in read_metrics(tmp_path / "rm")]
