"""SSF (`--adapter ssf`, alignkit.models.ssf): the fold W' = diag(γ) W, b' = γ ⊙ b + β, only γ and
β train, final/ is a plain transformers model computing what the trained one does, resume is
exact, SFT learns, DPO and GRPO run, bad options fail in one line."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from run_helpers import (
    PAIRWISE_DETERMINISTIC,
    assert_resumed_matches,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import alignkit
from alignkit.models import apply_ssf, count_parameters, has_ssf, load_model, save_pretrained_merged
from alignkit.models.ssf import ScaleShift, fold_scale_shift
from alignkit.testing import build_tiny_tokenizer, synthetic_pairs, synthetic_sft

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def test_fold_worked_example():
    """W = [[1, 2], [3, 4]], b = [1, -1], γ = [2, 0.5], β = [0.5, 1]:
    W' = [[2, 4], [1.5, 2]], b' = [2*1 + 0.5, 0.5*(-1) + 1] = [2.5, 0.5]; no bias: b' = β."""
    weight, bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, -1.0])
    scale, shift = torch.tensor([2.0, 0.5]), torch.tensor([0.5, 1.0])
    folded_w, folded_b = fold_scale_shift(weight, bias, scale, shift)
    torch.testing.assert_close(folded_w, torch.tensor([[2.0, 4.0], [1.5, 2.0]]))
    torch.testing.assert_close(folded_b, torch.tensor([2.5, 0.5]))
    torch.testing.assert_close(fold_scale_shift(weight, None, scale, shift)[1], shift)
    # Conv1D keeps W as (in, out): the scale multiplies its columns
    torch.testing.assert_close(fold_scale_shift(weight.T, bias, scale, shift, transposed=True)[0], folded_w.T)
    x = torch.tensor([0.3, -2.0])
    torch.testing.assert_close(folded_w @ x + folded_b, scale * (weight @ x + bias) + shift)


def perturb(model, seed: int = 0) -> None:
    """Trained-looking γ and β (a fresh SSF layer is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def test_apply_ssf_starts_as_identity_and_trains_only_scale_and_shift(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        base = model(IDS).logits
    _, total_before = count_parameters(model)
    apply_ssf(model)
    layers = [m for m in model.modules() if isinstance(m, ScaleShift)]
    config = model.config
    assert len(layers) == 7 * config.num_hidden_layers  # q, k, v, o, gate, up, down per block
    hidden, inner = config.hidden_size, config.intermediate_size
    per_block = 2 * (4 * hidden + 2 * inner + hidden)  # γ and β of each layer's outputs
    trainable, total = count_parameters(model)
    assert trainable == config.num_hidden_layers * per_block and total == total_before + trainable
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"ssf_scale", "ssf_shift"}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)


def test_final_is_a_plain_model_with_the_trained_outputs(tiny_model_dir, tmp_path):
    """A few SFT steps with --adapter ssf; final/ loads with from_pretrained (biases created, the
    config's attention_bias/mlp_bias on) and its logits equal the live SSF model's to 1e-5."""
    result = alignkit.train("sft", model=str(tiny_model_dir), data=synthetic_sft(16), output_dir=tmp_path / "run",
                            batch_size=4, max_steps=4, lr=5e-2, adapter="ssf", progress=False)
    assert has_ssf(result.model)
    folded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert folded.config.attention_bias and folded.config.mlp_bias
    assert not any("ssf" in name for name in folded.state_dict())
    with torch.no_grad():
        live, plain = result.model(IDS).logits, folded(IDS).logits
    assert (live - plain).abs().max() <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert (base(IDS).logits - plain).abs().max() > 1e-3  # training moved the outputs
    # only γ and β moved: the wrapped base weights are the original ones
    originals = dict(base.named_parameters())
    for name, param in result.model.named_parameters():
        if not name.endswith(("ssf_scale", "ssf_shift")):
            assert torch.equal(param, originals[name.replace(".base.", ".")]), name


def tiny_model(path, kind: str):
    """A random tiny Qwen2 (q/k/v biases, o_proj none and no switch for one) or GPT-2 (Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_fold_with_existing_biases_and_conv1d(kind, tmp_path):
    """Qwen2: q/k/v biases fold as γ b + β; o_proj and the MLP (no bias, no config switch for
    one) are left out of all-linear. GPT-2's Conv1D layers (weight (in, out)) fold too."""
    model, tokenizer = load_model(str(tiny_model(tmp_path / kind, kind)))
    apply_ssf(model)
    names = {n for n, m in model.named_modules() if isinstance(m, ScaleShift)}
    if kind == "qwen2":
        assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj"} and len(names) == 3 * 2
    else:
        assert len(names) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    perturb(model)
    target = save_pretrained_merged(model, tokenizer, tmp_path / "final")
    folded = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        assert (model(IDS).logits - folded(IDS).logits).abs().max() <= 1e-5


def test_unfoldable_or_unknown_targets_fail_in_one_line(tmp_path, tiny_model_dir):
    model, _ = load_model(str(tiny_model(tmp_path / "qwen2", "qwen2")))
    with pytest.raises(ValueError, match=r"--ssf-target-modules: Qwen2ForCausalLM cannot hold a bias on .*o_proj"):
        apply_ssf(model, target_modules=["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="no linear layer of Qwen2ForCausalLM is named 'qproj'"):
        apply_ssf(model, target_modules=["qproj"])
    common = dict(model=str(tiny_model_dir), data=synthetic_sft(4), progress=False)
    with pytest.raises(ValueError, match="--adapter ssf trains no LoRA adapter: drop --lora-r 4"):
        alignkit.train("sft", output_dir=tmp_path / "a", adapter="ssf", lora_r=4, **common)
    with pytest.raises(ValueError, match=r"--adapter lora needs --lora-r > 0"):
        alignkit.train("sft", output_dir=tmp_path / "b", adapter="lora", **common)
    with pytest.raises(ValueError, match="--ssf-target-modules applies to --adapter ssf"):
        alignkit.train("sft", output_dir=tmp_path / "c", ssf_target_modules="q_proj", **common)
    with pytest.raises(ValueError, match="--adapter must be one of auto, none, lora, ssf"):
        alignkit.train("sft", output_dir=tmp_path / "d", adapter="ia3", **common)


def test_sft_with_ssf_learns(tiny_model_dir, tmp_path):
    """γ and β only (1152 numbers here) cannot fit much on a random model whose LM head stays
    frozen, but the held-out NLL falls clearly below the base model's (step 1 = the base)."""
    rows = synthetic_sft(80, seed=0)
    alignkit.train("sft", model=str(tiny_model_dir), data=rows[:64], eval_data=rows[64:], output_dir=tmp_path / "s",
                   batch_size=8, max_steps=20, lr=1e-1, eval_steps=10, adapter="ssf", progress=False)
    metrics = read_metrics(tmp_path / "s")
    evals = [r["eval/loss"] for r in metrics if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < metrics[0]["loss"] - 0.15, (metrics[0]["loss"], evals)


def test_dpo_with_ssf_learns_the_preference(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32, seed=1))
    alignkit.train("dpo", model=str(tiny_model_dir), data=data, output_dir=tmp_path / "dpo", batch_size=8,
                   max_steps=16, lr=5e-2, beta=0.5, adapter="ssf", warmup_ratio=0.0, progress=False)
    rows = read_metrics(tmp_path / "dpo")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # γ = 1, β = 0: policy == reference
    assert sum(r["rewards/margins"] for r in rows[-4:]) / 4 > 0.5
    assert sum(r["loss"] for r in rows[-4:]) / 4 < 0.5


def test_ssf_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Checkpoints hold γ and β (the trainable weights) and their Adam state."""
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=3))
    common = dict(model=str(tiny_model_dir), data=data, batch_size=4, max_steps=6, lr=5e-2, save_steps=2,
                  adapter="ssf", progress=False)
    runs = run_interrupted_and_resumed(partial(alignkit.train, "dpo", **common), tmp_path, at=3)
    assert_resumed_matches(runs.full, runs.resumed, PAIRWISE_DETERMINISTIC, steps=6)
    for (name, p), (_, q) in zip(runs.full_result.model.named_parameters(),
                                 runs.resumed_result.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    from alignkit.lab.policy_loading import load_policy

    policy, _ = load_policy(tmp_path / "cut" / "checkpoints" / "step-000004")  # rebuilt with SSF
    assert has_ssf(policy)


def test_reward_model_with_ssf_keeps_its_head_trainable(tiny_model_dir, tmp_path):
    pairs = synthetic_pairs(32, seed=2)
    result = alignkit.train("rm", model=str(tiny_model_dir), data=pairs, output_dir=tmp_path / "rm", batch_size=8,
                            max_steps=4, lr=1e-2, adapter="ssf", progress=False)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert "score.weight" in trained
    folded = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    with torch.no_grad():
        live, plain = result.model(IDS).logits, folded(IDS).logits
    assert (live - plain).abs().max() <= 1e-5


def test_grpo_with_ssf_folds_the_rollout_weights(tiny_model_dir, tmp_path):
    """The online loop trains γ, β; `weights()` (what a vLLM engine is sent) are the folded
    plain model's tensors, the ones final/ holds."""
    from safetensors.torch import load_file

    def count_e(prompts, completions, **columns):
        return [float(text.count("e")) for text in completions]

    prompts = [{"prompt": p} for p in ("Write a short review.", "The movie", "Tell me", "What is two plus two?")]
    result = alignkit.train("grpo", model=str(tiny_model_dir), data=prompts, output_dir=tmp_path / "grpo",
                            reward=count_e, batch_size=2, max_steps=2, lr=5e-2, group_size=4, max_new_tokens=8,
                            adapter="ssf", progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "grpo")] == [1, 2]
    from alignkit.training.online.presets import OnlineSettings
    from alignkit.training.online.trainer import PolicyTrainer
    from alignkit.training.run.config import TrainConfig

    trainer = PolicyTrainer(result.model, OnlineSettings(), TrainConfig(lr=1e-3), total_steps=1)
    sent = dict(trainer.weights())
    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert set(saved) <= set(sent) and "model.layers.0.self_attn.q_proj.bias" in saved
    for name, tensor in saved.items():
        torch.testing.assert_close(sent[name], tensor, msg=name)
