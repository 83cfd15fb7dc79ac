"""Reward-model ensembles: aggregation against an exploited member, training k members in
one run (separate seeds, or a frozen shared trunk), loading and evaluating the ensemble."""

from __future__ import annotations

import json

import pytest
import torch
from reward_helpers import QUIET, eval_rm, train_tiny
from run_helpers import read_metrics, write_jsonl
from transformers import AutoModelForSequenceClassification

from alignkit.rewards import EnsembleScorer, load_reward
from alignkit.rewards.multi_objective import spearman
from alignkit.testing import synthetic_pairs


def _members(true_reward, generator, exploit_below=None, factor=5.0):
    members = [
        true_reward + 0.3 * torch.randn(len(true_reward), generator=generator) for _ in range(5)
    ]
    if exploit_below is not None:  # member 4 negated (x factor) where the true reward is low
        members[4] = torch.where(true_reward < exploit_below, -factor * true_reward, members[4])
    return members


def _table(columns):
    return lambda index: (
        lambda prompts, completions: columns[index][torch.tensor([int(c) for c in completions])]
    )


def test_wco_and_uwo_resist_an_exploited_member_that_fools_the_mean():
    """5 members ~ true reward + noise, normalised on a clean reference set; on the scored set
    member 4 is negated (x5) on the samples whose true reward is < -0.5 (the samples a policy
    would exploit). Spearman with the true reward (seeded; measured 0.66 / 0.98 / 0.99):
    mean is fooled, WCO and UWO are not."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.stack(_members(torch.randn(500, generator=generator), generator), -1)
    true_reward = torch.randn(400, generator=generator)
    columns = _members(true_reward, generator, exploit_below=-0.5)
    members = [_table(columns)(i) for i in range(5)]
    means, stds = reference.mean(0).tolist(), reference.std(0).tolist()
    ids = [str(i) for i in range(400)]
    correlation = {}
    for aggregation in ("mean", "wco", "uwo"):
        ensemble = EnsembleScorer(members, aggregation=aggregation, means=means, stds=stds)
        correlation[aggregation] = spearman(ensemble(ids, ids).numpy(), true_reward.numpy())
    assert correlation["mean"] < 0.75
    assert correlation["wco"] > 0.95 and correlation["uwo"] > 0.95
    assert min(correlation["wco"], correlation["uwo"]) > correlation["mean"] + 0.2


def test_a_fully_negated_member_defeats_wco_but_not_the_mean():
    """The other side, stated honestly: a member that is negated EVERYWHERE is not an
    exploit but a wrong model; the min then follows -|t| (Spearman ~0.16) while the mean of 4
    right + 1 wrong member still ranks well (~0.97)."""
    generator = torch.Generator().manual_seed(0)
    true_reward = torch.randn(400, generator=generator)
    columns = _members(true_reward, generator)
    columns[4] = -true_reward
    ids = [str(i) for i in range(400)]
    members = [_table(columns)(i) for i in range(5)]
    stacked = torch.stack(columns, -1)
    kwargs = {"means": stacked.mean(0).tolist(), "stds": stacked.std(0).tolist()}
    mean = spearman(
        EnsembleScorer(members, aggregation="mean", **kwargs)(ids, ids).numpy(), true_reward.numpy()
    )
    wco = spearman(
        EnsembleScorer(members, aggregation="wco", **kwargs)(ids, ids).numpy(), true_reward.numpy()
    )
    assert mean > 0.9 and wco < 0.4


def test_member_normalisation_is_applied_before_the_min():
    """Raw members (10 + t, t): min is always member 2; z-scored they weigh equally."""
    t = torch.tensor([0.0, 1.0, 2.0])
    members = [lambda p, c: 10 + t, lambda p, c: t.flip(0)]
    raw = EnsembleScorer(members, aggregation="wco", normalize=False)(["x"] * 3, ["y"] * 3)
    torch.testing.assert_close(raw, t.flip(0))
    normalised = EnsembleScorer(members, aggregation="wco", means=[11.0, 1.0], stds=[1.0, 1.0])
    torch.testing.assert_close(normalised(["x"] * 3, ["y"] * 3), torch.tensor([-1.0, 0.0, -1.0]))


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_rm_ensemble_trains_members_saves_and_loads(tiny_model_dir, tmp_path, shared_trunk):
    """k members in one run; each member_{i}/ loads with AutoModelForSequenceClassification,
    members differ, ensemble.json carries the normalisation; held-out accuracy >= 0.9 for
    separate seeds (measured 1.0) and >= 0.75 for 3 linear heads on a frozen random trunk
    (measured 1.0 on this rule)."""
    pairs = synthetic_pairs(120, seed=2)
    k = 3 if shared_trunk else 2
    settings = {"lr": 2e-3, "epochs": 3} if not shared_trunk else {"lr": 5e-2, "epochs": 10}
    result = train_tiny(
        "rm_ensemble",
        pairs,
        tmp_path / "ens",
        model_dir=tiny_model_dir,
        split=96,
        options=QUIET,
        members=k,
        shared_trunk=shared_trunk,
        aggregation="uwo",
        **settings,
    )
    final = tmp_path / "ens" / "final"
    manifest = json.loads((final / "ensemble.json").read_text())
    assert manifest["members"] == [f"member_{i}" for i in range(k)]
    assert len(manifest["normalization"]["mean"]) == k and manifest["aggregation"] == "uwo"
    heads = [
        AutoModelForSequenceClassification.from_pretrained(final / f"member_{i}").score.weight
        for i in range(k)
    ]
    assert not torch.allclose(heads[0], heads[1])
    rows = read_metrics(tmp_path / "ens")
    assert "loss" in rows[0] and "member_1/loss" in rows[0]
    floor = 0.75 if shared_trunk else 0.9
    assert result.eval_metrics["eval/rewards/accuracies"] >= floor
    ensemble = load_reward(f"rm:{final}", device="cpu")
    assert isinstance(ensemble, EnsembleScorer) and ensemble.aggregation == "uwo"
    prompts = [p["prompt"] for p in pairs[96:]]
    z = ensemble.member_scores(prompts, [p["chosen"] for p in pairs[96:]])
    assert z.shape == (24, k)


def test_eval_rm_on_an_ensemble_directory(tiny_model_dir, tmp_path):
    pairs = synthetic_pairs(48, seed=3)
    train_tiny(
        "rm_ensemble",
        pairs,
        tmp_path / "ens",
        model_dir=tiny_model_dir,
        options=QUIET,
        members=2,
        shared_trunk=True,
        lr=5e-2,
        epochs=5,
    )
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs[:16])
    results = eval_rm(tmp_path / "ens" / "final", data, tmp_path / "out.json", 200)
    assert results["kind"] == "ensemble" and 0.0 <= results["accuracy"] <= 1.0
