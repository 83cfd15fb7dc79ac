"""Adapter-only weight sync (`--vllm-lora-sync adapter`) against the reference server over a
real loopback socket: the served adapter samples what the in-process LoRA policy samples, each
version replaces the last (also one a killed run left), a GRPO run equals the same run with
merged weights, a launched server gets runtime LoRA on the base weights (also on --resume),
and what a server's LoRA cannot apply is refused before anything trains."""

from __future__ import annotations

import copy
import stat
import sys

import pytest
import torch
from run_helpers import assert_resumed_matches, read_metrics, run_interrupted_and_resumed

import alignkit
from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.http_engine import EngineError, HTTPEngine
from alignkit.rollout.lora_sync import (
    adapter_deltas,
    adapter_key,
    adapter_tensors,
    max_lora_rank,
    read_adapter,
    servable_config,
    write_adapter,
)
from alignkit.rollout.reference_server import ReferenceServer

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
ROWS = [{"prompt": p} for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]
GREEDY = SamplingParams(max_new_tokens=7, greedy=True)


def count_e(prompts, completions, **columns):
    return [float(text.count("e")) for text in completions]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from alignkit.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def lora_policy(model, r=4, seed=0, **options):
    """A LoRA copy of `model` whose B matrices are not zero (so the adapter changes samples)."""
    from alignkit.models import apply_lora

    policy = apply_lora(copy.deepcopy(model), r=r, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return policy


def trained(policy):
    return [(name, p) for name, p in policy.named_parameters() if p.requires_grad]


def test_the_served_adapter_samples_the_lora_policy_and_each_version_replaces_the_last(base):
    model, tokenizer = base
    policy = lora_policy(model)
    local = HFEngine(policy, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)).generate(
        PROMPTS, 1, GREEDY)
    with ReferenceServer(copy.deepcopy(model), pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,),
                         max_lora_rank=8) as server:
        engine = HTTPEngine(server.url, pad_id=tokenizer.pad_token_id)
        before = engine.generate(PROMPTS, 1, GREEDY)
        engine.update_adapter(trained(policy), 3, servable_config(policy.peft_config["default"]))
        assert engine.weight_version() == "3" and engine.model == "policy-lora-v3"
        remote = engine.generate(PROMPTS, 1, GREEDY)
        assert torch.equal(remote.response_ids[remote.response_mask], local.response_ids[local.response_mask])
        assert not torch.equal(remote.response_ids, before.response_ids)
        torch.testing.assert_close(remote.response_logprobs, local.response_logprobs, atol=1e-5, rtol=0)
        # the adapter is r (d_in + d_out) numbers per layer, not the model
        sent = sum(t.numel() for t in adapter_tensors(trained(policy)).values())
        assert sent < sum(p.numel() for p in model.parameters()) / 4
        # a killed run left its adapter: the next run's first sync unloads it
        other = HTTPEngine(server.url, pad_id=tokenizer.pad_token_id)
        other.update_adapter(trained(lora_policy(model, seed=1)), 0, servable_config(policy.peft_config["default"]))
        assert list(server.adapters) == ["policy-lora-v0"] and engine.served_adapters() == ["policy-lora-v0"]
        with pytest.raises(EngineError, match="HTTP 404: .*does not exist"):  # v3 is gone
            engine.generate(PROMPTS, 1, GREEDY)
        engine.model = None  # the base model is still served as it was
        assert torch.equal(engine.generate(PROMPTS, 1, GREEDY).response_ids, before.response_ids)
        assert [d.name for d in other._weights_dir.iterdir()] == ["adapter-v0"]
        engine.close()
        other.close()


def test_the_adapter_file_is_peft_format_and_its_deltas_are_scale_b_a(base, tmp_path):
    model, _ = base
    policy = lora_policy(model, r=4, alpha=12)
    config = servable_config(policy.peft_config["default"])
    write_adapter(adapter_tensors(trained(policy)), config, tmp_path / "adapter")
    read_config, tensors = read_adapter(tmp_path / "adapter")
    assert read_config["r"] == 4 and read_config["lora_alpha"] == 12 and isinstance(read_config["target_modules"], list)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert key in tensors and not any(".default." in k for k in tensors)
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    expected = (12 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(adapter_deltas(read_config, tensors)["model.layers.0.self_attn.q_proj"], expected)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)  # what peft merges
    from peft import PeftModel  # peft itself loads the file

    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter"))
    torch.testing.assert_close(loaded.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default"),
                               expected)


def test_what_a_servers_lora_cannot_apply_is_refused(base, tmp_path):
    model, tokenizer = base
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ValueError, match="up to 512"):
        max_lora_rank(513)
    assert adapter_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    with pytest.raises(ValueError, match="modules_to_save, a trained embedding"):
        adapter_key("base_model.model.lm_head.modules_to_save.default.weight")
    from peft import LoraConfig

    with pytest.raises(ValueError, match="sets use_dora, which the rollout server's LoRA does not apply"):
        servable_config(LoraConfig(r=4, use_dora=True))
    with pytest.raises(ValueError, match="sets modules_to_save"):
        servable_config(LoraConfig(r=4, modules_to_save=["lm_head"]))
    policy = lora_policy(model, r=16)
    config = servable_config(policy.peft_config["default"])
    with ReferenceServer(copy.deepcopy(model), pad_id=tokenizer.pad_token_id, max_lora_rank=8) as server:
        with pytest.raises(EngineError, match="greater than max_lora_rank 8"):
            HTTPEngine(server.url).update_adapter(trained(policy), 1, config)
    with ReferenceServer(copy.deepcopy(model), pad_id=tokenizer.pad_token_id) as server:  # no --enable-lora
        with pytest.raises(EngineError, match="--enable-lora"):
            HTTPEngine(server.url).update_adapter(trained(policy), 1, config)


def test_grpo_with_adapter_sync_equals_merged_sync(tiny_model_dir, base, tmp_path):
    """The same LoRA GRPO run sent merged weights and sent its adapter: same samples and losses
    (the server folds s B A itself, as vLLM applies it), the server on the step's adapter. The
    server starts on other weights (as an earlier run leaves it): the first adapter sync sends
    the base too, or the adapter would land on those."""
    model, tokenizer = base
    stale = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in stale.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    runs = {}
    for sync in ("merged", "adapter"):
        with ReferenceServer(copy.deepcopy(stale), pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,),
                             max_lora_rank=8) as server:
            alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / sync, reward=count_e,
                           rollout="vllm", vllm_url=server.url, vllm_lora_sync=sync, lora_r=4, beta=0.05,
                           batch_size=4, max_steps=6, lr=3e-2, warmup_ratio=0.0, progress=False, max_new_tokens=8,
                           group_size=4)
            runs[sync] = read_metrics(tmp_path / sync)
            assert server.version == "6"
            assert list(server.adapters) == (["policy-lora-v6"] if sync == "adapter" else [])
    for merged, adapter in zip(runs["merged"], runs["adapter"], strict=True):
        for key in ("loss", "reward/mean", "response_length", "kl", "grad_norm"):
            assert adapter[key] == pytest.approx(merged[key], rel=1e-5, abs=1e-6), key
        assert adapter["rollout/logprob_diff_max"] < 1e-4


def launcher(tmp_path):
    """A stand-in for vLLM's Python: the reference server on the same command line (vLLM's
    flags it does not serve are ignored), so the run's flags and environment are the test."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\n[ "$2" = vllm.entrypoints.openai.api_server ] || exit 3\necho "argv: $*"\n'
                    f'shift 2\nexec {sys.executable} -m alignkit.rollout.reference_server "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def test_a_launched_server_gets_runtime_lora_on_the_base_and_a_resumed_run_repeats(tiny_model_dir, tmp_path):
    fake = launcher(tmp_path)

    def train(**overrides):
        return alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, reward=count_e, rollout="vllm",
                              vllm_python=str(fake), vllm_lora_sync="adapter", lora_r=4, batch_size=4, max_steps=4,
                              save_steps=2, lr=3e-2, warmup_ratio=0.0, progress=False, max_new_tokens=8,
                              group_size=4, **overrides)

    runs = run_interrupted_and_resumed(train, tmp_path, at=2)
    log = (tmp_path / "full" / "vllm-rank0" / "vllm-server.log").read_text()
    argv = next(line for line in log.splitlines() if line.startswith("argv: "))
    assert "--enable-lora --max-lora-rank 8 --max-loras 1" in argv
    # resumed: the server starts on the base again and the step-2 adapter is loaded onto it
    assert_resumed_matches(runs.full, read_metrics(tmp_path / "cut"), ["loss", "reward/mean", "response_length"],
                           steps=4, tolerance={"rel": 1e-5, "abs": 1e-6})
    assert all(m["rollout/weight_version"] == m["step"] for m in runs.full)


def test_a_launched_server_holds_the_base_even_when_the_adapter_has_trained(base, tmp_path):
    """The server starts on the base weights, never the merged ones: the adapter is applied on
    top of them at the first sync (merged there, it would count twice)."""
    from types import SimpleNamespace

    from alignkit.training.online.server_rollout import ServerRollout

    model, tokenizer = base
    policy = lora_policy(model)
    config = SimpleNamespace(vllm_python=str(launcher(tmp_path)), output=str(tmp_path / "run"), vllm_args="",
                             vllm_logprobs_mode="raw_logprobs", vllm_lora_sync="adapter")
    rollout = ServerRollout.launch(config, policy, tokenizer)
    try:
        assert rollout.merged_weights is False and rollout.adapter["r"] == 4
        local = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))
        served = rollout.engine.generate(PROMPTS, 1, GREEDY)
        assert torch.equal(served.response_ids, local.generate(PROMPTS, 1, GREEDY).response_ids)
        rollout.update_weights(trained(policy), 0)
        local = HFEngine(policy, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))
        served = rollout.engine.generate(PROMPTS, 1, GREEDY)
        assert torch.equal(served.response_ids, local.generate(PROMPTS, 1, GREEDY).response_ids)
    finally:
        rollout.close()


def test_adapter_sync_options_are_checked_before_anything_loads(tiny_model_dir, tmp_path):
    from alignkit.cli import main as cli_main

    with pytest.raises(ValueError, match="--vllm-lora-sync is ignored by grpo: it chooses how a LoRA policy"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "a", reward=count_e,
                       rollout="vllm", vllm_url="http://127.0.0.1:9", vllm_lora_sync="adapter")
    with pytest.raises(ValueError, match="--vllm-lora-sync must be one of merged, adapter"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "b", reward=count_e,
                       rollout="vllm", vllm_url="http://127.0.0.1:9", vllm_lora_sync="delta", lora_r=4)
    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", "x.jsonl", "--reward", "vader",
                     "--output", str(tmp_path / "c"), "--rollout", "vllm", "--lora-r", "4",
                     "--vllm-lora-sync", "adapter", "--placement", "split:1,1"])
    assert code == 2 and not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="is for --placement local or colocate"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "d", reward=count_e,
                       rollout="vllm", vllm_lora_sync="adapter", lora_r=4, placement="split:1,1")
