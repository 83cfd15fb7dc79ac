"""End-to-end runs of the online loop on a tiny model with a rule reward it can learn: every
preset raises the reward by a stated margin, KL to the reference stays bounded by beta, resumed
runs match uninterrupted ones, LoRA/CLI/API paths work, on-policy steps skip the old-log-prob
forward."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)
from transformers import AutoModelForCausalLM

import alignkit
from alignkit.cli import main as cli_main
from alignkit.training import ALGORITHMS
from alignkit.training.online.presets import PRESETS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is fastest, and on a shared 2-core box extra threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = ["Write a short review.", "The movie", "Tell me", "What is two plus two?"]
ROWS = [{"prompt": p} for p in PROMPTS * 4]


def count_e(prompts, completions, **columns):
    """+1 for every letter e in the completion: a random tiny model emits some, so it can learn."""
    return [float(text.count("e")) for text in completions]


def run(algorithm, model_dir, output_dir, steps=30, **overrides):
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    settings.update(overrides)
    return alignkit.train(algorithm, model=str(model_dir), data=ROWS, output_dir=output_dir, reward=count_e,
                          **settings)


# preset -> (extra settings, minimum rise of the mean reward, last 5 steps vs first 5, in e's
# per 8-token completion; the untrained model scores ~0.3).
LEARNING = {
    "ppo": ({}, 3.0),
    "grpo": ({}, 3.0),
    "dr_grpo": ({}, 2.0),
    "dapo": ({}, 1.5),
    "rloo": ({}, 1.5),
    "remax": ({"lr": 3e-2}, 3.0),
    "reinforce_pp": ({}, 3.0),
    "online_dpo": ({}, 1.5),
}


@pytest.mark.parametrize("algorithm", sorted(LEARNING))
def test_every_preset_learns_the_rule_reward(algorithm, tiny_model_dir, tmp_path):
    extra, margin = LEARNING[algorithm]
    result = run(algorithm, tiny_model_dir, tmp_path / algorithm, **extra)
    rows = read_metrics(tmp_path / algorithm)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "reward/mean", "reward/std", "entropy", "response_length", "throughput/tokens_per_s",
                "time/generation_s", "time/training_s", "time/sync_s", "lr", "grad_norm"):
        assert key in rows[0], key
    if algorithm != "online_dpo":
        assert "clip_ratio" in rows[0] and "advantages/mean" in rows[0]
    if algorithm == "ppo":
        assert "value_loss" in rows[0] and "explained_variance" in rows[0]
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + margin, (first, last)
    beta = PRESETS[algorithm]["beta"]
    assert ("kl" in rows[0]) == (beta > 0)  # beta = 0 loads no reference model
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (result.final_dir / "config.json").exists()


def test_kl_penalty_keeps_the_policy_closer_to_the_reference(tiny_model_dir, tmp_path):
    """Same run, beta 0.04 (GRPO's) vs 1.0: the KL at the end is at least 3x smaller with the
    strong penalty, and stays below 3 nats per completion."""
    kl = {}
    for beta in (0.04, 1.0):
        run("grpo", tiny_model_dir, tmp_path / f"b{beta}", steps=25, beta=beta)
        kl[beta] = sum(r["kl"] for r in read_metrics(tmp_path / f"b{beta}")[-5:]) / 5
    assert kl[1.0] < kl[0.04] / 3, kl
    assert kl[1.0] < 3.0, kl


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_resumed_run_matches_the_uninterrupted_run(algorithm, tiny_model_dir, tmp_path):
    """PPO with a critic, 2 epochs x 2 minibatches, running reward normalisation and an adaptive
    KL controller (all restored from the checkpoint); GRPO on-policy."""
    extra = dict(steps=6, save_steps=3, lr=5e-3, scheduler="cosine")
    if algorithm == "ppo":
        extra.update(epochs_per_batch=2, minibatches=2, reward_norm=True, kl_target=1.0)
    runs = run_interrupted_and_resumed(partial(run, algorithm, tiny_model_dir, **extra), tmp_path, at=5)
    assert runs.resumed_result.output_dir == tmp_path / "cut"
    keys = ("loss", "reward/mean", "kl", "beta", "response_length", "grad_norm")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6),
                           skip_missing=True)  # a key the full run does not log is not compared
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_lora_policy_uses_the_adapter_off_reference_and_saves_merged(tiny_model_dir, tmp_path):
    result = run("grpo", tiny_model_dir, tmp_path / "lora", steps=3, lora_r=4, beta=0.1)
    rows = read_metrics(tmp_path / "lora")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # adapter B = 0: policy == base at step 1
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, result.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_on_policy_steps_reuse_the_engine_logprobs(tiny_model_dir, tmp_path, monkeypatch):
    """epochs_per_batch = 1, one minibatch, temperature 1, beta = 0: one policy forward per step
    (the training one); with 2 epochs the old log-probs cost one more (no-grad) forward."""
    from alignkit.training.online.trainer import PolicyTrainer

    calls = []
    original = PolicyTrainer.forward

    def counting(self, batch, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, batch, **kwargs)

    monkeypatch.setattr(PolicyTrainer, "forward", counting)
    run("dr_grpo", tiny_model_dir, tmp_path / "on", steps=2)
    assert calls == [True, True]
    calls.clear()
    run("dr_grpo", tiny_model_dir, tmp_path / "off", steps=2, epochs_per_batch=2)
    assert calls == [False, True, True] * 2


def test_no_grad_forwards_take_more_rows_than_a_training_micro_batch(tiny_model_dir, tmp_path, monkeypatch):
    """Reference log-probs and old log-probs (no gradients) run 8 x micro_batch_size rows per
    forward by default, logprob_micro_batch_size when set; the trained weights do not change."""
    from alignkit.training.online import roles, trainer

    sizes = []
    original = roles.in_chunks

    def recording(fn, batch, size):
        sizes.append(size)
        return original(fn, batch, size)

    monkeypatch.setattr(roles, "in_chunks", recording)
    monkeypatch.setattr(trainer, "in_chunks", recording)
    common = dict(steps=2, batch_size=4, group_size=4, micro_batch_size=2, epochs_per_batch=2, beta=0.1,
                  lora_r=4)
    default = run("grpo", tiny_model_dir, tmp_path / "default", **common)
    assert sizes and set(sizes) == {16}
    sizes.clear()
    small = run("grpo", tiny_model_dir, tmp_path / "small", logprob_micro_batch_size=3, **common)
    assert sizes and set(sizes) == {3}
    assert_same_parameters(default.model, small.model)
    with pytest.raises(ValueError, match="logprob_micro_batch_size"):
        run("grpo", tiny_model_dir, tmp_path / "bad", logprob_micro_batch_size=-1, steps=1)


def test_cli_trains_an_online_preset_with_a_reward_file(tiny_model_dir, tmp_path):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def reward(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    code = cli_main(["train", "rloo", "--model", str(tiny_model_dir), "--data", data, "--output",
                     str(tmp_path / "cli"), "--max-steps", "2", "--batch-size", "2", "--reward",
                     f"{reward_file}:reward", "--set", "group_size=2", "--set", "max_new_tokens=4",
                     "--set", "beta=0.0", "--no-progress"])
    assert code == 0
    rows = read_metrics(tmp_path / "cli")
    assert [r["step"] for r in rows] == [1, 2] and "kl" not in rows[0]
    config = (tmp_path / "cli" / "config.yaml").read_text()
    assert "group_size: 2" in config and "reward:" in config


def test_online_presets_are_registered_with_the_online_runner():
    for name in PRESETS:
        assert ALGORITHMS[name].runner == "online" and ALGORITHMS[name].kind == "online"


def test_unknown_hyper_parameter_and_missing_reward_fail_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        run("grpo", tiny_model_dir, tmp_path / "a", steps=1, group_szie=4)
    with pytest.raises(ValueError, match="needs a reward"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "b", max_steps=1)


def test_reward_model_critic_from_it_and_shared_critic_options(tiny_model_dir, tmp_path):
    """--reward-model DIR scores token ids directly (same vocabulary); critic_init=DIR starts the
    critic from that reward model; a shared value head with a critic warm-up step and the
    missing-EOS penalty run too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_dir = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_dir)
    settings = dict(batch_size=2, max_steps=2, lr=1e-3, progress=False, max_new_tokens=4, group_size=2)
    alignkit.train("ppo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "a",
                   reward_model=str(reward_dir), critic_init=str(reward_dir), **settings)
    rows = read_metrics(tmp_path / "a")
    assert "value_loss" in rows[-1] and rows[0]["reward/std"] > 0  # a random head still ranks samples
    run("ppo", tiny_model_dir, tmp_path / "b", steps=2, critic="shared", critic_warmup_steps=1,
        missing_eos_penalty=1.0, group_size=2)
    rows = read_metrics(tmp_path / "b")
    assert rows[0]["reward/shaped_mean"] <= rows[0]["reward/mean"]
    assert "explained_variance" in rows[0]


def test_policy_trainer_weights_are_hf_names_with_lora_merged(tiny_model_dir):
    """`weights()` yields the plain model's parameter names; a fresh adapter (B = 0) merges to
    the base weights. The colocated engine takes no weight source, only a version."""
    from alignkit.models import apply_lora, load_model
    from alignkit.training.online.presets import OnlineSettings
    from alignkit.training.online.roles import HFRollout
    from alignkit.training.online.trainer import PolicyTrainer
    from alignkit.training.run.config import TrainConfig

    model, tokenizer = load_model(str(tiny_model_dir))
    plain = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = PolicyTrainer(model, OnlineSettings(), TrainConfig(lr=1e-3), total_steps=1)
    assert list(dict(trainer.weights())) == list(plain)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    merged = dict(PolicyTrainer(lora, OnlineSettings(), TrainConfig(lr=1e-3), total_steps=1).weights())
    assert sorted(merged) == sorted(plain)
    for name, tensor in plain.items():
        torch.testing.assert_close(merged[name], tensor)
    rollout = HFRollout(lora, tokenizer)
    rollout.update_weights(None, 3)
    assert rollout.shares_policy and rollout.version == 3
    with pytest.raises(ValueError, match="source=None"):
        rollout.update_weights(iter(merged.items()), 4)
