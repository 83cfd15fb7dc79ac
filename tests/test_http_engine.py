"""`HTTPEngine` (the vLLM client) against the in-repo reference server over a real loopback
socket: greedy tokens equal in-process sampling, log-probs equal the teacher-forced ones,
seeds keyed on the global prompt index, weight reloads take effect and versions are checked,
and every request the client cannot serve under the `Rollout` contract is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from run_helpers import teacher_forced_logps

from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.http_engine import EngineError, HTTPEngine, fold32, request_body
from alignkit.rollout.reference_server import ReferenceServer


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """(model, tokenizer, running server over a copy of the model)."""
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    server = ReferenceServer(copy.deepcopy(model), pad_id=tokenizer.pad_token_id,
                             eos_ids=(tokenizer.eos_token_id,)).start()
    yield model, tokenizer, server
    server.close()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


def test_greedy_tokens_and_logprobs_equal_in_process_sampling(served):
    model, tokenizer, server = served
    engine = HTTPEngine(server.url)
    local = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))
    sampling = SamplingParams(max_new_tokens=7, greedy=True)
    remote, here = engine.generate(PROMPTS, 2, sampling), local.generate(PROMPTS, 2, sampling)
    assert remote.prompt_ids == here.prompt_ids and remote.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(remote.response_mask, here.response_mask)
    assert torch.equal(remote.response_ids[remote.response_mask], here.response_ids[here.response_mask])
    assert remote.finish_reason == here.finish_reason
    torch.testing.assert_close(remote.response_logprobs, here.response_logprobs, atol=1e-5, rtol=0)


def test_sampled_logprobs_are_the_policys_and_seeds_follow_the_global_prompt_index(served):
    model, tokenizer, server = served
    engine = HTTPEngine(server.url)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1234)
    whole = engine.generate(PROMPTS, 3, sampling)
    diff = (whole.response_logprobs[whole.response_mask] - teacher_forced_logps(model, whole, tokenizer.pad_token_id)).abs()
    assert diff.max().item() < 1e-5
    # a rank that samples prompts 1.. sends the seeds one process sends for them
    tail = engine.generate(PROMPTS[1:], 3, SamplingParams(max_new_tokens=6, seed=1234, first_sample=3))
    assert torch.equal(tail.response_ids, whole.response_ids[3:, : tail.response_ids.shape[1]])
    other = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=6, seed=99))
    assert not torch.equal(other.response_ids[:, :4], whole.response_ids[:, :4])


def test_weight_reload_takes_effect_and_the_version_is_checked(served, monkeypatch):
    model, tokenizer, server = served
    engine = HTTPEngine(server.url)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    sampling = SamplingParams(max_new_tokens=6, greedy=True)
    before = engine.generate(PROMPTS, 1, sampling)
    resets = server.cache_resets
    engine.update_weights(changed.named_parameters(), 3)
    assert engine.weight_version() == "3" and engine.version == 3
    assert server.cache_resets == resets + 1  # KV blocks of the old weights are dropped
    after = engine.generate(PROMPTS, 1, sampling)
    local = HFEngine(changed, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)).generate(
        PROMPTS, 1, sampling)
    assert torch.equal(after.response_ids[after.response_mask], local.response_ids[local.response_mask])
    assert not torch.equal(after.response_ids, before.response_ids)
    torch.testing.assert_close(after.response_logprobs, local.response_logprobs, atol=1e-5, rtol=0)
    engine.update_weights(model.named_parameters(), 4)  # back to the module's own weights
    monkeypatch.setattr(server, "_set_version", lambda body: {"success": True})  # a server that forgets
    with pytest.raises(EngineError, match="weight version '4' after loading step 5"):
        engine.update_weights(model.named_parameters(), 5)
    engine.close()


def test_requests_that_would_break_the_logprob_contract_are_refused():
    tempered = SamplingParams(max_new_tokens=4, temperature=0.7)
    with pytest.raises(ValueError, match="raw_logprobs server scores the untempered model"):
        request_body([1, 2], 2, tempered, 7, None, "raw_logprobs")
    assert request_body([1, 2], 2, tempered, 7, None, "processed_logprobs")["temperature"] == 0.7
    with pytest.raises(ValueError, match="filtered distribution"):
        request_body([1, 2], 2, SamplingParams(top_p=0.9), 7, None, "processed_logprobs")
    body = request_body([1, 2], 2, SamplingParams(greedy=True, top_k=0, stop_token_ids=(3,)), 7, "m", "raw_logprobs")
    assert body["temperature"] == 0.0 and body["top_k"] == -1 and body["stop_token_ids"] == [3]
    assert body["logprobs"] == 0 and body["return_token_ids"] is True and body["model"] == "m"
    with pytest.raises(ValueError, match="logprobs_mode"):
        HTTPEngine("http://127.0.0.1:1", logprobs_mode="processed_logits")


def test_seeds_fit_32_bits_and_differ_by_prompt():
    seeds = [fold32(2**62 - 1, index) for index in range(1000)]
    assert all(0 <= seed < 2**31 for seed in seeds) and len(set(seeds)) == 1000
    assert fold32(5, 3) == fold32(5, 3) != fold32(6, 3)


def test_a_server_that_is_gone_or_refuses_gives_a_named_error(served):
    _, _, server = served
    with pytest.raises(EngineError, match="HTTP 400: .*fields not served here"):
        HTTPEngine(server.url)._call("POST", "/v1/completions", {"prompt": [1], "presence_penalty": 1.0})
    gone = ReferenceServer(torch.nn.Linear(1, 1), pad_id=0)
    url = gone.url
    gone.close()
    with pytest.raises(EngineError, match="did not answer"):
        HTTPEngine(url, timeout=5).generate([[1, 2]], 1, SamplingParams(max_new_tokens=2))


def test_grpo_with_a_server_rollout_learns_and_keeps_the_server_on_the_policys_weights(tiny_model_dir, tmp_path):
    """--rollout vllm against the reference server: every step's weights reach the server (its
    version is the step), engine and trainer log-probs agree, and the rule reward is learnt."""
    import json

    import alignkit
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    rows = [{"prompt": p} for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]

    def count_e(prompts, completions, **columns):
        return [float(text.count("e")) for text in completions]

    with ReferenceServer(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)) as server:
        result = alignkit.train("grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "run",
                                reward=count_e, rollout="vllm", vllm_url=server.url, batch_size=4, max_steps=30,
                                lr=1e-2, warmup_ratio=0.0, scheduler="constant", progress=False,
                                max_new_tokens=8, group_size=4)
        assert server.version == "30"
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["rollout/logprob_diff_max"] for m in metrics) < 1e-4
    rewards = [m["reward/mean"] for m in metrics]
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 > 1.5
    # the served weights are the trained policy's
    served = dict(model.named_parameters())
    for name, parameter in result.model.named_parameters():
        torch.testing.assert_close(served[name], parameter, msg=name)


def test_rollout_options_are_checked_before_anything_loads(tiny_model_dir, tmp_path):
    import alignkit
    from alignkit.cli import main as cli_main

    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", "x.jsonl", "--reward", "vader",
                     "--output", str(tmp_path / "a"), "--rollout", "vllm", "--vllm-python", str(tmp_path / "none")])
    assert code == 2 and not (tmp_path / "a").exists()
    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", "x.jsonl", "--reward", "vader",
                     "--output", str(tmp_path / "c"), "--rollout", "vllm", "--vllm-url", "http://127.0.0.1:9",
                     "--vllm-args", "--dtype bfloat16"])
    assert code == 2 and not (tmp_path / "c").exists()  # ignored: alignkit starts no server
    with pytest.raises(ValueError, match="--rollout must be one of hf, vllm"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=[{"prompt": "a"}], output_dir=tmp_path / "b",
                       reward="vader", rollout="sglang")


def test_a_launched_server_is_started_on_the_policys_weights_synced_and_stopped(tiny_model_dir, tmp_path):
    """--rollout vllm without --vllm-url: alignkit saves the policy, starts the server from
    --vllm-python with vLLM's command line (here a stand-in that runs the reference server on
    the same arguments), trains through it and stops it (its process group) at the end."""
    import json
    import stat
    import sys

    import alignkit

    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\n[ "$2" = vllm.entrypoints.openai.api_server ] || exit 3\necho "argv: $*"\n'
                    f'exec {sys.executable} -m alignkit.rollout.reference_server --model "$4" --port "$8"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rows = [{"prompt": p} for p in ["Write a short review.", "The movie"] * 2]
    result = alignkit.train("grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "run",
                            reward=lambda prompts, completions, **c: [float(t.count("e")) for t in completions],
                            rollout="vllm", vllm_python=str(fake), batch_size=2, max_steps=3, lr=1e-2,
                            progress=False, max_new_tokens=6, group_size=2, lora_r=4,
                            vllm_args="--gpu-memory-utilization 0.3 --dtype 'bfloat16'")
    argv = next(line for line in (result.output_dir / "vllm-rank0" / "vllm-server.log").read_text().splitlines()
                if line.startswith("argv: "))
    assert argv.endswith("--served-model-name policy --gpu-memory-utilization 0.3 --dtype bfloat16")
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["rollout/logprob_diff_max"] < 1e-4 for m in metrics)
    logged = (result.output_dir / "vllm-rank0" / "vllm-server.log").read_text().split()
    url = next(word for word in logged if word.startswith("http://127.0.0.1:"))
    with pytest.raises(EngineError, match="did not answer"):  # stopped with the run
        HTTPEngine(url, timeout=5).weight_version()
    with pytest.raises(EngineError, match="no such interpreter"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "again",
                       reward="vader", rollout="vllm", vllm_python=str(tmp_path / "nonexistent"), max_steps=1,
                       progress=False)


def test_truncated_importance_weights_worked_example():
    """pi_old / pi_rollout = (.5/.25, .2/.4) = (2, 0.5), cap 1.5 -> w = (1.5, 0.5); padding 0."""
    import math

    from alignkit.objectives.policy import truncated_importance_weights

    old = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.4), -3.0]])
    mask = torch.tensor([[True, True, False]])
    weights, metrics = truncated_importance_weights(old, rollout, mask, 1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert metrics["rollout/tis_ratio_mean"] == pytest.approx(1.25)
    assert metrics["rollout/tis_truncated_fraction"] == pytest.approx(0.5)


def test_tis_weights_the_policy_loss_by_the_engine_trainer_ratio(tiny_model_dir, tmp_path, monkeypatch):
    """An engine that reports every token twice as likely as the trainer finds it: with
    tis_cap the step's policy loss is half the uncorrected one (w = 0.5 on every token)."""
    import json
    import math

    import alignkit
    from alignkit.models import load_model
    from alignkit.training.online import server_rollout

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    original = server_rollout.ServerRollout.generate

    def overconfident(self, prompt_ids, n, sampling):
        rollout = original(self, prompt_ids, n, sampling)
        rollout.response_logprobs = torch.where(rollout.response_mask, rollout.response_logprobs + math.log(2), 0.0)
        return rollout

    monkeypatch.setattr(server_rollout.ServerRollout, "generate", overconfident)
    rows = [{"prompt": p} for p in ["Write a short review.", "The movie"] * 2]
    losses = {}
    with ReferenceServer(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)) as server:
        for cap in (0.0, 2.0):
            result = alignkit.train(
                "grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / f"cap{cap}",
                reward=lambda prompts, completions, **c: [float(t.count("e")) for t in completions],
                rollout="vllm", vllm_url=server.url, batch_size=2, max_steps=1, progress=False, max_new_tokens=6,
                group_size=4, beta=0.0, tis_cap=cap, allow_degenerate=True)
            losses[cap] = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert losses[2.0]["rollout/tis_ratio_mean"] == pytest.approx(0.5, abs=1e-4)
    assert losses[2.0]["rollout/logprob_diff_mean"] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[0.0]["policy_loss"] != 0
    assert losses[2.0]["policy_loss"] == pytest.approx(0.5 * losses[0.0]["policy_loss"], rel=1e-3, abs=1e-7)
