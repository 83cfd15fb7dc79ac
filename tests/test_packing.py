"""Padding-free batches (alignkit.models.packing): same log-probs and gradients as padding."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from alignkit.models import packing
from alignkit.models.logprobs import position_ids_from_mask, token_logps
from alignkit.models.packing import padding_free, plan_packing

CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny(kind: str, attn: str = "sdpa"):
    config = CONFIGS[kind](vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def pair_batch(seed: int = 0):
    """DPO layout: rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected, right padded."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (5, 9, 3)]
    chosen = [torch.randint(3, 97, (n,), generator=g) for n in (4, 7, 6)]
    rejected = [torch.randint(3, 97, (n,), generator=g) for n in (8, 2, 5)]
    rows = [(p, c) for p, c in zip(prompts, chosen, strict=True)] + [(p, r) for p, r in zip(prompts, rejected, strict=True)]
    width = max(len(p) + len(c) for p, c in rows) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, c) in enumerate(rows):
        ids[b, : len(p) + len(c)] = torch.cat([p, c])
        attention[b, : len(p) + len(c)] = 1
        response[b, len(p) : len(p) + len(c)] = True
    return ids, attention, response


def group_batch(seed: int = 0, groups: int = 3, group_size: int = 4):
    """GRPO layout: left-padded prompts, G samples each, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (6, 11, 4)[:groups]]
    width_p = max(len(p) for p in prompts)
    completions = [torch.randint(3, 97, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
                   for _ in range(groups * group_size)]
    width = width_p + max(len(c) for c in completions)
    ids = torch.zeros(groups * group_size, width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for b, c in enumerate(completions):
        p = prompts[b // group_size]
        ids[b, width_p - len(p) : width_p] = p
        ids[b, width_p : width_p + len(c)] = c
        attention[b, width_p - len(p) : width_p + len(c)] = 1
        response[b, width_p : width_p + len(c)] = True
    return ids, attention, response


def test_plan_puts_every_token_at_its_position_and_shares_prompts():
    for ids, attention, response in (pair_batch(), group_batch()):
        predict = (response & attention.bool())[:, 1:]
        plan = plan_packing(ids, attention, predict)
        assert plan is not None
        real = attention.bool()
        assert bool((plan.row[real] >= 0).all()) and bool((plan.row[~real] == -1).all())
        assert torch.equal(plan.input_ids[plan.row[real], plan.col[real]], ids[real])
        assert torch.equal(plan.position_ids[plan.row[real], plan.col[real]], position_ids_from_mask(attention)[real])
        # the packed batch holds each prompt once: fewer tokens than the rows' real tokens
        assert plan.input_ids.numel() < int(attention.sum())


def test_plan_mask_keeps_rows_apart():
    ids, attention, response = pair_batch()
    plan = plan_packing(ids, attention, (response & attention.bool())[:, 1:])
    real = attention.bool()
    # a chosen response token may not see any rejected token of the same pair and vice versa
    b_chosen, b_rejected = 0, 3
    t_c = int(response[b_chosen].nonzero()[-1])
    r, q = plan.row[b_chosen, t_c], plan.col[b_chosen, t_c]
    seen = plan.allowed[r, q]
    rejected_cols = plan.col[b_rejected][response[b_rejected] & real[b_rejected]]
    prompt_cols = plan.col[b_chosen][real[b_chosen] & ~response[b_chosen]]
    assert not bool(seen[rejected_cols].any())
    assert bool(seen[prompt_cols].all())


def test_plan_refuses_rows_with_holes():
    ids, attention, response = pair_batch()
    attention[0, 1] = 0
    assert plan_packing(ids, attention, (response & attention.bool())[:, 1:]) is None


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["pairs", "groups"])
def test_packed_logps_and_gradients_match_padded(kind, layout):
    model = tiny(kind)
    ids, attention, response = pair_batch(1) if layout == "pairs" else group_batch(2)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))

    def run(enabled: bool):
        model.zero_grad()
        with padding_free(enabled):
            logps = token_logps(model, ids, attention, response)
        (logps * weights).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert plan_packing(ids, attention, (response & attention.bool())[:, 1:]) is not None  # it packs
    padded, padded_grads = run(False)
    packing._verified.clear()
    packed, packed_grads = run(True)
    assert packing._verified.get(model.get_decoder()) is True  # the probe agreed
    assert torch.allclose(packed, padded, atol=2e-5, rtol=1e-5), (packed - padded).abs().max()
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        assert torch.allclose(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4), name


def test_eager_attention_packs_too():
    model = tiny("llama", attn="eager")
    ids, attention, response = group_batch(4)
    padded = token_logps(model, ids, attention, response)
    packing._verified.clear()
    with padding_free():
        packed = token_logps(model, ids, attention, response)
    assert packing._verified.get(model.get_decoder()) is True
    assert torch.allclose(packed, padded, atol=2e-5)


def test_a_wrong_packed_forward_is_caught_and_padding_is_used(monkeypatch, caplog):
    """Packing is checked on a probe batch before a model's first packed batch: a layout the
    model cannot take (here: a mask that lets rows see each other) turns packing off instead of
    training on it."""
    model = tiny("llama")
    ids, attention, response = pair_batch(5)
    padded = token_logps(model, ids, attention, response)
    real_plan = packing.plan_packing

    def leaky(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan.allowed = torch.ones_like(plan.allowed).tril()
        return plan

    monkeypatch.setattr(packing, "plan_packing", leaky)
    packing._verified.clear()
    with padding_free(), caplog.at_level(logging.WARNING, logger="alignkit"):
        first = token_logps(model, ids, attention, response)
        second = token_logps(model, ids, attention, response)
    assert packing._verified.get(model.get_decoder()) is False
    assert "padding-free batches turned off" in caplog.text
    assert torch.equal(first, padded) and torch.equal(second, padded)


def test_unsupported_architecture_keeps_the_padded_forward(monkeypatch):
    model = tiny("llama")
    monkeypatch.setattr(packing, "PACKABLE_MODEL_TYPES", frozenset())
    calls = []
    monkeypatch.setattr(packing, "plan_packing", lambda *a, **k: calls.append(1))
    ids, attention, response = pair_batch()
    with padding_free():
        token_logps(model, ids, attention, response)
    assert calls == []


def test_the_check_runs_without_dropout():
    """A model training with dropout is compared in eval mode: dropout's noise does not turn
    packing off, and the module is back in train mode afterwards."""
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids, attention, response = pair_batch(6)
    packing._verified.clear()
    with padding_free():
        token_logps(model, ids, attention, response)
    assert packing._verified.get(model.get_decoder()) is True
    assert model.training and model.get_decoder().training
