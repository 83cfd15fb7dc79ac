"""One-step-off asynchronous rollout through a server engine (the reference server on
loopback): staleness never exceeds 1 and is 0 after checkpoint steps, the rule reward is
learnt, a run resumed from a checkpoint repeats the uninterrupted one, and the settings that
cannot work are refused."""

from __future__ import annotations

import pytest
from run_helpers import assert_resumed_matches, read_metrics, run_interrupted_and_resumed

import alignkit
from alignkit.rollout.reference_server import ReferenceServer

ROWS = [{"prompt": p} for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]


def count_e(prompts, completions, **columns):
    return [float(text.count("e")) for text in completions]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    with ReferenceServer(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)) as running:
        yield running


def train(tiny_model_dir, server, output_dir, **overrides):
    settings = dict(reward=count_e, rollout="vllm", vllm_url=server.url, batch_size=4, max_steps=30, lr=1e-2,
                    warmup_ratio=0.0, scheduler="constant", progress=False, max_new_tokens=8, group_size=4,
                    async_rollout=True)
    settings.update(overrides)
    return alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=output_dir, **settings)


def test_async_rollout_learns_with_staleness_one(tiny_model_dir, server, tmp_path):
    result = train(tiny_model_dir, server, tmp_path / "run", save_steps=10)
    metrics = read_metrics(result.output_dir)
    staleness = [m["rollout/staleness"] for m in metrics]
    # step 1 samples the initial weights; after checkpoint steps 10 and 20 the next step waits
    assert staleness == [0.0 if step in (1, 11, 21) else 1.0 for step in range(1, 31)]
    assert all(m["async/overlap_s"] >= 0 for m in metrics if "async/overlap_s" in m)
    assert server.version == "30"
    rewards = [m["reward/mean"] for m in metrics]
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 > 1.5


def test_async_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_one(tiny_model_dir, server, tmp_path):
    runs = run_interrupted_and_resumed(
        lambda **kw: train(tiny_model_dir, server, max_steps=8, save_steps=4, **kw), tmp_path, at=4)
    assert_resumed_matches(runs.full, read_metrics(tmp_path / "cut"),
                           ["reward/mean", "loss", "rollout/staleness", "response_length"], steps=8,
                           tolerance={"rel": 1e-5, "abs": 1e-6})


def test_async_rollout_needs_its_own_engine_and_temperature_one(tiny_model_dir, server, tmp_path):
    with pytest.raises(ValueError, match="own copy of the weights"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "a", reward=count_e,
                       max_steps=1, progress=False, async_rollout=True)
    with pytest.raises(ValueError, match="temperature 1"):
        train(tiny_model_dir, server, tmp_path / "b", temperature=0.7, max_steps=1)
    with pytest.raises(ValueError, match="set one of them"):
        train(tiny_model_dir, server, tmp_path / "c", tis_cap=2.0, max_steps=1)
