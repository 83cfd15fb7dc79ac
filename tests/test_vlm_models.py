"""Tiny random VLMs (Qwen2-VL, LLaVA) built locally, loaded through the real loading code; LoRA
on the language model with the vision tower frozen; `final/` with the processor."""

from __future__ import annotations

import pytest
import torch

from alignkit.models import apply_lora, load_model, load_vlm, save_pretrained_merged
from alignkit.models.vlm import is_vlm_dir, module_role, set_vlm_trainable
from alignkit.testing_vlm import build_tiny_vlm, draw_shape_image

ARCHS = ("qwen2_vl", "llava")
IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "llava": "<image>"}


@pytest.fixture(scope="module", params=ARCHS)
def vlm_dir(request, tmp_path_factory):
    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)


def _conversation(answer: str = "red") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _batch(processor, n_images: int = 1):
    text = processor.apply_chat_template(_conversation(), tokenize=False)
    images = [draw_shape_image("square", colour) for colour in ("red", "blue")[:n_images]]
    return processor(text=[text] * n_images, images=[[image] for image in images], return_tensors="pt", padding=True)


def test_build_and_load_back(vlm_dir):
    arch, path = vlm_dir
    from transformers import AutoModelForImageTextToText

    assert is_vlm_dir(path)
    model, processor = load_vlm(str(path), device="cpu")
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(model.config)])
    assert sum(p.numel() for p in model.parameters()) < 200_000
    batch = _batch(processor, n_images=2)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[arch])
    # one {"type": "image"} part -> 4 (Qwen2-VL) or 16 (LLaVA) image tokens, see alignkit.testing_vlm
    per_image = 4 if arch == "qwen2_vl" else 16
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [per_image, per_image]
    if arch == "qwen2_vl":
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
    # the image changes the text predictions: the two rows differ only in their image
    assert not torch.allclose(logits[0], logits[1])


def test_plain_string_contents_render_like_the_text_template(vlm_dir):
    from alignkit.testing import build_tiny_tokenizer

    _, path = vlm_dir
    _, processor = load_vlm(str(path), device="cpu")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    expected = build_tiny_tokenizer().apply_chat_template(messages, tokenize=False)
    assert processor.apply_chat_template(messages, tokenize=False) == expected


def test_load_model_detects_a_vlm_and_returns_its_tokenizer(vlm_dir):
    _, path = vlm_dir
    model, tokenizer = load_model(str(path), device="cpu")
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert tokenizer.pad_token_id == model.config.get_text_config().pad_token_id
    ids = tokenizer("good movie", return_tensors="pt")
    assert model(**ids).logits.shape[1] == ids["input_ids"].shape[1]  # text-only input works


def test_load_vlm_refuses_a_text_model(tiny_model_dir):
    with pytest.raises(ValueError, match="no vision_config"):
        load_vlm(str(tiny_model_dir), device="cpu")


def test_module_roles_cover_both_architectures(vlm_dir):
    arch, path = vlm_dir
    model, _ = load_vlm(str(path), device="cpu")
    roles = {module_role(name) for name, _ in model.named_parameters()}
    assert roles == {"language", "projector", "vision"}
    set_vlm_trainable(model, ("language",))
    trainable = {module_role(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language"}


def test_lora_adapts_the_language_model_and_freezes_the_tower(vlm_dir):
    _, path = vlm_dir
    model, processor = load_vlm(str(path), device="cpu")
    lora = apply_lora(model, r=4)
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n for n in adapted)
    assert {module_role(n) for n in adapted} == {"language"}
    with_projector = apply_lora(load_vlm(str(path), device="cpu")[0], r=4, train_vlm_parts=("projector",))
    full = {module_role(n) for n, p in with_projector.named_parameters() if p.requires_grad and "lora_" not in n}
    assert full == {"projector"}
    with pytest.raises(ValueError, match="train_vlm_parts"):
        apply_lora(load_vlm(str(path), device="cpu")[0], r=4, train_vlm_parts=("decoder",))
    # gradients reach the adapters through an image batch
    batch = _batch(processor)
    lora(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)


def test_final_dir_holds_the_processor_and_loads_back(vlm_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    arch, path = vlm_dir
    model, processor = load_vlm(str(path), device="cpu")
    lora = apply_lora(model, r=4)
    with torch.no_grad():  # move the adapters off zero so the merge is visible
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    batch = _batch(processor)
    with torch.no_grad():
        expected = lora(**batch).logits
    final = save_pretrained_merged(lora, processor, tmp_path / "final")
    reloaded = AutoModelForImageTextToText.from_pretrained(final)
    _, reloaded_processor = load_vlm(str(final), device="cpu")
    assert type(reloaded_processor).__name__ == type(processor).__name__
    again = _batch(reloaded_processor)
    torch.testing.assert_close(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again).logits, expected, rtol=1e-4, atol=1e-5)
    if arch == "llava":  # the stock processor class, no fallback involved
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(final)).__name__ == "LlavaProcessor"
