"""The degenerate-run policy (alignkit/training/run/degenerate.py) on its own: patience, a
condition that stops holding, --allow-degenerate, agreement across two gloo ranks; and the
online pieces (group baselines against the ADVANTAGES registry, reward variance)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignkit.advantages import ADVANTAGE_KINDS, ADVANTAGES
from alignkit.training.online.steps import GROUP_BASELINES, reward_varies
from alignkit.training.run import distributed
from alignkit.training.run.degenerate import SKIPPED, DegenerateRunError, DegenerateWatch


def observe_steps(watch: DegenerateWatch, flags: list[bool]) -> int | None:
    """Feed one flag per step; the step at which the watch raised, or None."""
    for step, flag in enumerate(flags, start=1):
        try:
            watch.observe(step, {"skipped": flag})
        except DegenerateRunError:
            return step
    return None


def test_patience_is_ten_steps_or_the_whole_run():
    assert observe_steps(DegenerateWatch([SKIPPED], steps=50, allow=False), [True] * 50) == 10
    assert observe_steps(DegenerateWatch([SKIPPED], steps=3, allow=False), [True] * 3) == 3
    assert observe_steps(DegenerateWatch([SKIPPED], steps=1, allow=False), [True]) == 1


def test_a_condition_that_stops_holding_never_raises(caplog):
    caplog.set_level(logging.WARNING, logger="alignkit")
    assert observe_steps(DegenerateWatch([SKIPPED], steps=30, allow=False), [True] * 5 + [False] + [True] * 24) is None
    assert observe_steps(DegenerateWatch([SKIPPED], steps=30, allow=False), [False] + [True] * 29) is None
    warned = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("step 1:") and warned[1].startswith("step 2:")


def test_allow_degenerate_warns_once_instead(caplog):
    caplog.set_level(logging.WARNING, logger="alignkit")
    assert observe_steps(DegenerateWatch([SKIPPED], steps=30, allow=True), [True] * 30) is None
    assert sum("--allow-degenerate: continuing" in r.getMessage() for r in caplog.records) == 1


def test_the_error_is_a_value_error_the_cli_reports():
    assert issubclass(DegenerateRunError, ValueError)


def _agreement_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    distributed._current = distributed.Ranks(rank=rank, world=world)
    try:
        # rank 0's steps are all degenerate, rank 1's only from step 3: no rank may stop alone
        mixed = [True] * 12 if rank == 0 else [False, False] + [True] * 10
        both = [True] * 12
        results[rank] = (observe_steps(DegenerateWatch([SKIPPED], steps=12, allow=False), mixed),
                         observe_steps(DegenerateWatch([SKIPPED], steps=12, allow=False), both))
    finally:
        dist.destroy_process_group()


def test_two_ranks_decide_alike(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_agreement_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    assert dict(results) == {0: (None, 10), 1: (None, 10)}


def _outcome_estimators() -> list[str]:
    return sorted(n for n, kind in ADVANTAGE_KINDS.items() if kind == "outcome" and n != "remax")


@pytest.mark.parametrize("name", _outcome_estimators())
def test_group_baselines_are_exactly_the_estimators_blind_with_one_sample_per_group(name):
    rewards = torch.tensor([0.3, -1.2, 2.5, 0.7])
    singletons, mask = torch.arange(4), torch.ones(4, 3, dtype=torch.bool)
    if name == "rloo":  # refuses singleton groups outright (presets reject group_size=1 for it)
        assert name in GROUP_BASELINES
        return
    advantages = ADVANTAGES[name](rewards, singletons, mask)
    assert bool((advantages == 0).all()) == (name in GROUP_BASELINES), (name, advantages)


def test_reward_variance_within_groups_or_across_the_step():
    groups = torch.tensor([0, 0, 1, 1])
    per_prompt = torch.tensor([1.0, 1.0, 2.0, 2.0])  # varies across prompts only
    assert not reward_varies(per_prompt, groups, grouped=True)
    assert reward_varies(per_prompt, groups, grouped=False)
    assert reward_varies(torch.tensor([1.0, 1.0, 2.0, 3.0]), groups, grouped=True)
    flat = torch.full((4,), 0.1)
    assert not reward_varies(flat, groups, grouped=False)
    assert reward_varies(flat, groups, grouped=False, baseline=torch.zeros(4))  # ReMax: greedy scored apart
    assert not reward_varies(torch.zeros(0), torch.zeros(0, dtype=torch.long), grouped=True)
