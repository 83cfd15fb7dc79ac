"""alignkit.models: LoRA adapters, the disabled-adapter reference, merged checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_models import grads_of, make_batch, reference_token_logps
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit.models import (
    adapter_disabled,
    apply_lora,
    count_parameters,
    is_peft,
    load_model,
    reward_scores,
    save_pretrained_merged,
    token_logps,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def perturb_adapters(model, seed: int = 0) -> None:
    """LoRA starts as an exact no-op (B = 0); give every lora_B (and saved head) random values
    so adapters change outputs and A receives gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.fixture
def lora_causal(tiny_model_dir):
    """(peft model with perturbed adapters, tokenizer, base log-probs computed before wrapping)."""
    model, tokenizer = load_model(str(tiny_model_dir))
    batch = make_batch(len(tokenizer), [10, 7, 5], [3, 4, 2])
    with torch.no_grad():
        base_logps = token_logps(model, *batch)
    peft_model = apply_lora(model, r=4)
    perturb_adapters(peft_model)
    return peft_model, tokenizer, batch, base_logps


def test_apply_lora_freezes_base_and_counts(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    _, total_before = count_parameters(model)
    assert count_parameters(model)[0] == total_before and not is_peft(model)
    peft_model = apply_lora(model, r=4)
    assert is_peft(peft_model)
    assert peft_model.peft_config["default"].lora_alpha == 8  # 2 r
    trainable, total = count_parameters(peft_model)
    # all-linear on a Llama block: q,k,v,o (H->H) and gate,up (H->I), down (I->H); each adds
    # r (in + out) parameters; the lm_head stays untouched.
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    per_layer = 4 * 4 * (hidden + hidden) + 3 * 4 * (hidden + inner)
    assert (
        trainable == model.config.num_hidden_layers * per_layer
        and total == total_before + trainable
    )
    assert not any("lm_head" in n and p.requires_grad for n, p in peft_model.named_parameters())


def test_apply_lora_rejects_mismatched_task(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="causal-LM"):
        apply_lora(model, r=2, task="reward")


def test_lora_token_logps_and_gradients_match_full_forward(lora_causal):
    model, _, batch, _ = lora_causal
    torch.testing.assert_close(
        token_logps(model, *batch, chunk_size=2), reference_token_logps(model, *batch), **TOL
    )
    weights = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(2))
    expected = grads_of(model, (reference_token_logps(model, *batch) * weights).sum())
    actual = grads_of(model, (token_logps(model, *batch, chunk_size=2) * weights).sum())
    n_layers = model.get_base_model().config.num_hidden_layers
    assert len(actual) == len(expected) == 2 * 7 * n_layers  # A and B of 7 modules per layer
    for got, want in zip(actual, expected, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL)


def test_adapter_disabled_gives_base_log_probs(lora_causal):
    model, _, batch, base_logps = lora_causal
    with torch.no_grad():
        policy_logps = token_logps(model, *batch)
        with adapter_disabled(model):
            reference_logps = token_logps(model, *batch)
        after = token_logps(model, *batch)
    torch.testing.assert_close(reference_logps, base_logps, **TOL)
    assert not torch.allclose(policy_logps, base_logps)
    torch.testing.assert_close(after, policy_logps)  # adapters back on after the block


def test_adapter_disabled_refuses_plain_models(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="is_peft"):
        with adapter_disabled(model):
            pass


def test_save_merged_lora_round_trip_leaves_live_model_alone(lora_causal, tmp_path):
    model, tokenizer, batch, _ = lora_causal
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        live_logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.txt").write_text("replaced")  # an existing directory is replaced
    assert save_pretrained_merged(model, tokenizer, target) == target
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").is_file() and not list(target.glob("*.bin"))
    assert not list(tmp_path.glob(".final.*"))  # temporary directories cleaned up

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert is_peft(model)

    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert not hasattr(loaded, "peft_config")
    with torch.no_grad():
        loaded_logits = loaded(input_ids=batch[0], attention_mask=batch[1]).logits
    torch.testing.assert_close(loaded_logits, live_logits, **TOL)
    assert AutoTokenizer.from_pretrained(target).pad_token == tokenizer.pad_token


def test_save_plain_model_and_adapter_only(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    save_pretrained_merged(model, tokenizer, tmp_path / "plain")
    reloaded, _ = load_model(str(tmp_path / "plain"))
    for (name, p), (_, q) in zip(
        model.named_parameters(), reloaded.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    peft_model = apply_lora(model, r=2)
    save_pretrained_merged(peft_model, tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_reward_lora_trains_head_and_saves_merged(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward")
    input_ids, attention_mask, _ = make_batch(len(tokenizer), [6, 4, 2], [1, 1, 1])
    with torch.no_grad():
        base_scores = reward_scores(model, input_ids, attention_mask)
    peft_model = apply_lora(model, r=2, task="reward")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in n and "modules_to_save" in n for n in trainable)
    with torch.no_grad():  # a fresh LoRA with a copied head computes the base model
        torch.testing.assert_close(
            reward_scores(peft_model, input_ids, attention_mask), base_scores, **TOL
        )
    perturb_adapters(peft_model)
    scores = reward_scores(peft_model, input_ids, attention_mask)
    scores.sum().backward()  # gradients reach the head copy and the adapters
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    with torch.no_grad(), adapter_disabled(peft_model):
        torch.testing.assert_close(
            reward_scores(peft_model, input_ids, attention_mask), base_scores, **TOL
        )

    save_pretrained_merged(peft_model, tokenizer, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(
            reward_scores(loaded, input_ids, attention_mask), scores.detach(), **TOL
        )
