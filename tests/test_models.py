"""alignkit.models: loading, chunked log-probs against the full forward, reward heads."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import log_softmax

from alignkit.models import (
    ensure_pad_token,
    last_token_index,
    load_model,
    position_ids_from_mask,
    resolve_dtype,
    resolve_model_path,
    reward_scores,
    sequence_logps,
    token_logps,
    token_logps_and_entropy,
)
from alignkit.models.logprobs import decoder_and_head

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def causal(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    return model, tokenizer


def make_batch(vocab_size: int, lengths, prompt_lengths, *, left: bool = False, seed: int = 0):
    """Random ids (B, T) with padding (id 3) and a response mask after each prompt."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.full((len(lengths), length), 3, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), length, dtype=torch.long)
    response_mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for row, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        start = length - n if left else 0
        input_ids[row, start : start + n] = torch.randint(4, vocab_size, (n,), generator=generator)
        attention_mask[row, start : start + n] = 1
        response_mask[row, start + p : start + n] = True
    return input_ids, attention_mask, response_mask


def reference_token_logps(model, input_ids, attention_mask, response_mask, temperature=1.0):
    """Full (B, T, V) log_softmax, gathered and shifted: the thing token_logps must equal."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits.float()
    logps = log_softmax(logits[:, :-1] / temperature, -1)
    logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = (response_mask.bool() & attention_mask.bool())[:, 1:]
    return torch.cat([torch.zeros_like(logps[:, :1]), logps * mask], dim=1)


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


# ---------------------------------------------------------------- loading


def test_load_causal_lm(causal, tiny_model_dir):
    model, tokenizer = causal
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == 3
    assert tokenizer.eos_token == "<|im_end|>"
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_load_reward_model_from_causal_checkpoint(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward", num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.score.out_features == 2
    assert model.config.pad_token_id == tokenizer.pad_token_id
    input_ids, attention_mask, _ = make_batch(len(tokenizer), [6, 4], [1, 1])
    assert reward_scores(model, input_ids, attention_mask).shape == (2, 2)


def test_load_errors_name_the_model(tmp_path):
    with pytest.raises(OSError, match="no-such-org/no-such-model.*local directory"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="kind"):
        load_model(str(tmp_path), kind="critic")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(tmp_path))


def test_hub_ids_pass_through_resolve():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_dtype_defaults():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("float7", "cpu")


def test_ensure_pad_token_borrows_an_unused_special_token():
    from alignkit.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    # <pad> exists in the vocabulary and is neither eos nor bos
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id


# ---------------------------------------------------------------- log-probs


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_token_logps_match_full_forward(causal, left):
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [10, 7, 5], [3, 4, 2], left=left)
    expected = reference_token_logps(model, *batch)
    actual = token_logps(model, *batch, chunk_size=4)
    torch.testing.assert_close(actual, expected, **TOL)
    response = batch[2] & batch[1].bool()
    assert (actual[~response] == 0).all() and (actual[response] < 0).all()


def test_token_logps_gradients_match_full_forward(causal):
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [10, 7, 5], [3, 4, 2])
    weights = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(1))
    expected = grads_of(model, (reference_token_logps(model, *batch) * weights).sum())
    actual = grads_of(model, (token_logps(model, *batch, chunk_size=3) * weights).sum())
    assert len(actual) == len(expected) > 0
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_tempered_logps_and_entropy_gradients_match_full_forward(causal):
    """Gradients through both outputs of the fused head (log-probs and entropies, tau = 0.7)
    equal those of the full (B, T, V) forward."""
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [9, 6, 4], [2, 3, 1], seed=2)
    g = torch.Generator().manual_seed(3)
    w_logp, w_ent = torch.randn(batch[0].shape, generator=g), torch.randn(batch[0].shape, generator=g)
    mask = (batch[2] & batch[1].bool())[:, 1:]

    def full():
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1].float() / 0.7
        logp = log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1) * mask
        picked = logp.gather(-1, batch[0][:, 1:, None]).squeeze(-1) * mask
        return (picked * w_logp[:, 1:]).sum() + (entropy * w_ent[:, 1:]).sum()

    logps, entropy = token_logps_and_entropy(model, *batch, chunk_size=2, temperature=0.7)
    actual = grads_of(model, (logps * w_logp).sum() + (entropy * w_ent).sum())
    for got, want in zip(actual, grads_of(model, full()), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_chunk_size_does_not_change_values(causal):
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [9, 9, 6, 3], [1, 5, 2, 1])
    one = token_logps(model, *batch, chunk_size=1)
    huge = token_logps(model, *batch, chunk_size=10**6)
    with torch.no_grad():
        no_grad = token_logps(model, *batch, chunk_size=5)
    torch.testing.assert_close(one, huge, **TOL)
    torch.testing.assert_close(no_grad, huge, **TOL)


@pytest.mark.parametrize("head_path", ["fused", "checkpointed"])
def test_no_full_logits_tensor_is_made_or_saved(causal, monkeypatch, head_path):
    """The head only ever sees <= chunk_size response rows, forward and backward, and nothing
    of width V is saved for backward (each chunk's logits are recomputed instead): through the
    fused `_LinearLogps` (a plain nn.Linear head, the default) and through the checkpointed
    chunks (any other head)."""
    from alignkit.models import logprobs

    model, tokenizer = causal
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    batch = make_batch(len(tokenizer), [10, 7, 5], [3, 4, 2])
    n_response = int((batch[2] & batch[1].bool())[:, 1:].sum())
    head_inputs: list[tuple[int, ...]] = []
    if head_path == "fused":
        original = logprobs._logits_into

        def recording(buffers, rows, weight, bias, temperature):
            head_inputs.append(tuple(rows.shape))
            return original(buffers, rows, weight, bias, temperature)

        monkeypatch.setattr(logprobs, "_logits_into", recording)
    else:
        monkeypatch.setattr(logprobs, "linear_head_logps", logprobs._chunked)
    hook = model.lm_head.register_forward_hook(lambda m, a, o: head_inputs.append(tuple(a[0].shape)))
    saved_widths: list[int] = []

    def pack(tensor):
        saved_widths.append(tensor.shape[-1] if tensor.dim() else 0)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = token_logps(model, *batch, chunk_size=4)
        forward_rows = [shape[0] for shape in head_inputs]
        logps.sum().backward()  # recomputation in backward works
    finally:
        hook.remove()
    assert all(len(shape) == 2 and shape[0] <= 4 and shape[1] == hidden for shape in head_inputs)
    assert sum(forward_rows) == n_response
    assert sum(shape[0] for shape in head_inputs) == 2 * n_response  # each chunk once more in backward
    assert vocab not in saved_widths and saved_widths
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_temperature_and_entropy(causal):
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [8, 6], [2, 3])
    logps, entropy = token_logps_and_entropy(model, *batch, chunk_size=3, temperature=0.7)
    torch.testing.assert_close(logps, reference_token_logps(model, *batch, temperature=0.7), **TOL)
    with torch.no_grad():
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1] / 0.7
    full = log_softmax(logits, -1)
    expected = -(full.exp() * full).sum(-1) * batch[2][:, 1:]
    torch.testing.assert_close(entropy[:, 1:], expected, **TOL)
    assert (entropy[:, 0] == 0).all()


def test_sequence_logps_sums_and_counts(causal):
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [10, 7, 5], [3, 4, 2])
    total, count = sequence_logps(model, *batch)
    torch.testing.assert_close(total, reference_token_logps(model, *batch).sum(-1), **TOL)
    assert count.tolist() == [7.0, 3.0, 3.0] and count.dtype == torch.float32


def test_empty_response_gives_zeros(causal):
    model, tokenizer = causal
    input_ids, attention_mask, response_mask = make_batch(len(tokenizer), [5, 4], [5, 4])
    logps = token_logps(model, input_ids, attention_mask, response_mask)
    assert logps.shape == (2, 5) and (logps == 0).all()


def test_full_logits_fallback_for_soft_capped_models(causal, monkeypatch):
    model, tokenizer = causal
    batch = make_batch(len(tokenizer), [6, 4], [2, 1])
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert decoder_and_head(model) is None
    # Llama ignores the attribute, so the fallback must give the plain result.
    torch.testing.assert_close(token_logps(model, *batch), reference_token_logps(model, *batch))


# ---------------------------------------------------------------- reward heads


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_reward_scores_with_pad_equal_to_eos(tiny_model_dir):
    """Sequences end with eos and are padded with eos: HF's pad-id search would score the
    first pad/eos-free position; we score the last real token, for either padding side."""
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward")
    eos = tokenizer.eos_token_id
    tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = eos
    rows = [[10, 20, 30, 40, eos], [50, 60, eos], [70, 80, 90, eos]]
    single = torch.stack(
        [
            reward_scores(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0]
            for r in rows
        ]
    )
    for left in (False, True):
        input_ids = torch.full((3, 5), eos)
        attention_mask = torch.zeros(3, 5, dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(5 - len(r), 5) if left else slice(0, len(r))
            input_ids[i, span], attention_mask[i, span] = torch.tensor(r), 1
        scores = reward_scores(model, input_ids, attention_mask)
        assert scores.shape == (3,)
        torch.testing.assert_close(scores, single, **TOL)


def test_reward_scores_match_hf_when_pad_is_distinct(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward")
    input_ids, attention_mask, _ = make_batch(len(tokenizer), [6, 4, 2], [1, 1, 1])
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(reward_scores(model, input_ids, attention_mask), expected, **TOL)


def test_reward_scores_needs_a_score_head(causal):
    model, tokenizer = causal
    with pytest.raises(ValueError, match="kind='reward'"):
        reward_scores(model, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
