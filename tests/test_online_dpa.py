"""dpa (directional preference alignment): directions, the system prompt and R_v = v . r by
worked examples; each prompt is sampled under its direction's system prompt; it learns R_v on
a tiny model with a two-attribute rule reward, resumes exactly, and takes an rm_multi model."""

from __future__ import annotations

import math
from functools import partial

import pytest
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)
from test_online import ROWS, one_thread  # noqa: F401  (one_thread: the module's autouse fixture)

import alignkit
from alignkit.testing import synthetic_pairs, synthetic_ratings
from alignkit.training.online.dpa import (
    DirectionalPrompts,
    DirectionalReward,
    conditioned_row,
    direction,
    draw_angle,
    system_prompt,
)

DPA = {"dpa_attributes": "e,o"}


def run(algorithm, model_dir, output_dir, steps=30, reward="dist_helpers:e_and_o", **overrides):
    """test_online's `run` with a two-attribute reward (e's, o's) instead of count_e."""
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    return alignkit.train(algorithm, model=str(model_dir), data=ROWS, output_dir=output_dir, reward=reward,
                          **{**settings, **overrides})


def test_direction_and_system_prompt_worked_example():
    assert direction(0.0) == pytest.approx((1.0, 0.0))
    assert direction(-15.0) == pytest.approx((math.cos(math.radians(15)), -math.sin(math.radians(15))))
    # the model card's example: theta = -15 degrees -> helpfulness*97 + verbosity*-26
    assert system_prompt(-15.0, ("helpfulness", "verbosity")).endswith(
        "maximize weighted rating = helpfulness*97 + verbosity*-26")
    assert draw_angle(1, 2, 0, 3, 45.0) == draw_angle(1, 2, 0, 3, 45.0)
    assert all(-45.0 <= draw_angle(0, s, 0, p, 45.0) <= 45.0 for s in range(5) for p in range(5))


def test_directional_reward_projects_the_attributes():
    """v = (0.6, 0.8), r = (2, 1): R_v = 1.2 + 0.8 = 2.0."""
    reward = DirectionalReward(lambda prompts, completions, **_: [[2.0, 1.0], [0.0, 3.0]])
    scores = reward(["p", "q"], ["a", "b"], dpa_direction=[[0.6, 0.8], [1.0, 0.0]])
    assert scores.tolist() == pytest.approx([2.0, 0.0])
    with pytest.raises(ValueError, match="two attribute scores per sample"):
        DirectionalReward(lambda p, c, **_: [1.0, 2.0])(["p", "q"], ["a", "b"], dpa_direction=[[1, 0], [1, 0]])


def test_prompts_carry_their_direction(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "Tell me"}, {"prompt": [{"role": "user", "content": "Hi"}]}]
    assert conditioned_row(rows[1], "SYS")["prompt"][0] == {"role": "system", "content": "SYS"}
    prompts = DirectionalPrompts(rows, tokenizer, attributes=("e", "o"), max_angle=45.0, max_prompt_length=None,
                                 chat=False, seed=0)
    ids, directions = prompts.prompts([0], [7], step=1, round_=0)
    theta = draw_angle(0, 1, 0, 7, 45.0)
    assert tokenizer.decode(ids[0]).startswith(system_prompt(theta, ("e", "o"))[:40])
    assert directions[0].tolist() == pytest.approx(direction(theta))


def test_dpa_learns_the_directional_reward(tiny_model_dir, tmp_path):
    """Best of 4 per prompt under R_v, v over (e's, o's) with |theta| <= 45 degrees. Measured:
    mean R_v 0.27 over the first 5 steps, 3.0 over the last 5. (A 2-layer model with 32 hidden
    units does not learn to read the weights in 30-40 steps: it writes e's at any direction.)"""
    run("dpa", tiny_model_dir, tmp_path / "dpa", **DPA)
    rows = read_metrics(tmp_path / "dpa")
    first, last = (sum(r["reward/mean"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last > first + 1.5, [round(r["reward/mean"], 2) for r in rows]
    assert all(r["filter/kept_samples"] == 4 for r in rows)


def test_dpa_resumes_exactly(tiny_model_dir, tmp_path):
    train = partial(run, "dpa", tiny_model_dir, steps=6, save_steps=3, lr=5e-3, **DPA)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "filter/kept_reward_mean", "nll", "grad_norm")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_dpa_with_an_rm_multi_model(tiny_model_dir, tmp_path):
    ratings = write_jsonl(tmp_path / "ratings.jsonl", synthetic_ratings(64, seed=0))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32, seed=1))
    alignkit.train("rm_multi", model=str(tiny_model_dir), data=ratings, output_dir=tmp_path / "armo", pairs=pairs,
                   gate_width=8, gate_hidden_layers=1, gate_dropout=0.0, batch_size=32, max_steps=5, progress=False)
    armo = f"rm:{tmp_path / 'armo' / 'final'}"
    run("dpa", tiny_model_dir, tmp_path / "run", steps=2, reward=armo, dpa_attributes="positivity,verbosity")
    assert all(math.isfinite(r["reward/mean"]) for r in read_metrics(tmp_path / "run"))
    with pytest.raises(ValueError, match="has no attribute 'helpfulness'"):
        run("dpa", tiny_model_dir, tmp_path / "bad", steps=1, reward=armo)


def test_bad_dpa_settings_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="two dpa_attributes"):
        run("dpa", tiny_model_dir, tmp_path / "bad", steps=1, dpa_attributes="e")
    with pytest.raises(ValueError, match="two attribute scores per sample"):
        run("dpa", tiny_model_dir, tmp_path / "bad2", steps=1, reward="dist_helpers:count_e", dpa_attributes="e,o")


