"""Image rows through the processor, the memory-lean LM head with pixel inputs, and SFT on a
tiny VLM lowering held-out NLL on a planted task (the answer is the colour of the square)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignkit.data.image_tokenize import collate_image_sequences, tokenize_sft_images
from alignkit.data.table import RowTable
from alignkit.models import load_vlm, token_logps
from alignkit.models.vlm import module_role, set_vlm_trainable
from alignkit.testing_vlm import COLOURS, build_tiny_vlm, draw_shape_image, write_image_rows

ARCHS = ("qwen2_vl", "llava")


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path


def colour_rows(n: int, seed: int = 0) -> list[dict]:
    """'What colour is the square?' over a square of a random colour at a random place."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(sorted(COLOURS))
        x, y = rng.randrange(0, 24), rng.randrange(0, 24)
        question = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
        rows.append({
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": [{"type": "text", "text": colour}]}],
            "images": [draw_shape_image("square", colour, (x, y, x + 30, y + 30))],
        })
    return rows


def _batch(processor, rows):
    examples, _ = tokenize_sft_images(RowTable(rows), processor, max_length=64)
    return examples, collate_image_sequences(examples, processor.tokenizer.pad_token_id)


def test_image_tokens_are_prompt_tokens_and_pixels_batch_in_row_order(vlm):
    arch, path = vlm
    _, processor = load_vlm(str(path), device="cpu")
    examples, batch = _batch(processor, colour_rows(3))
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>" if arch == "qwen2_vl" else "<image>")
    is_image = batch["input_ids"] == image_id
    assert is_image.sum(dim=1).tolist() == [4 if arch == "qwen2_vl" else 16] * 3
    assert not (is_image & batch["response_mask"]).any()  # masked out of every loss
    pixels = batch["pixel_inputs"]
    if arch == "qwen2_vl":
        assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
        assert pixels["pixel_values"].shape == (3 * 16, 1176)
        torch.testing.assert_close(pixels["mm_token_type_ids"].bool(), is_image)
    else:
        assert pixels["pixel_values"].shape == (3, 3, 56, 56)
    # the completion is the colour then the end of turn
    text = processor.tokenizer.decode(examples[0].completion_ids)
    assert text.endswith("<|im_end|>") and text.removesuffix("<|im_end|>") in COLOURS


def test_lean_head_with_pixels_matches_full_logits(vlm):
    """token_logps through vlm_predictor_states equals log_softmax(model(**batch).logits)
    gathered at the response tokens, and 0 at prompt (image) positions."""
    _, path = vlm
    model, processor = load_vlm(str(path), device="cpu")
    _, batch = _batch(processor, colour_rows(3, seed=1))
    ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        lean = token_logps(model, ids, mask, response, pixel_inputs=batch["pixel_inputs"], chunk_size=2)
        logits = model(input_ids=ids, attention_mask=mask, **batch["pixel_inputs"]).logits
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    scored = (response & mask.bool())[:, 1:]
    expected = torch.cat([torch.zeros(len(ids), 1), torch.where(scored, full, 0.0)], dim=1)
    torch.testing.assert_close(lean, expected, rtol=1e-5, atol=1e-5)
    # without the pixels the same ids give different log-probs: the image is read
    swapped = dict(batch["pixel_inputs"], pixel_values=batch["pixel_inputs"]["pixel_values"].flip(0))
    with torch.no_grad():
        other = token_logps(model, ids, mask, response, pixel_inputs=swapped)
    assert not torch.allclose(other, lean)


def _nll(model, batch) -> float:
    with torch.no_grad():
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                            pixel_inputs=batch["pixel_inputs"])
    return float(-logps.sum() / batch["response_mask"].sum())


def test_sft_lowers_held_out_nll_on_the_colour_task(vlm):
    """The language model and projector trained in full, the vision tower frozen, 40 steps of
    8 rows: held-out NLL per response token (the colour spelled in letters, then <|im_end|>)
    must fall below a quarter of the untrained model's (~log V = 5.8 nats). (LoRA with the
    output layer frozen barely moves a random tiny model: its head's logits stay near 0.)"""
    torch.manual_seed(0)
    _, path = vlm
    model, processor = load_vlm(str(path), device="cpu")
    set_vlm_trainable(model, ("language", "projector"))
    _, held_out = _batch(processor, colour_rows(16, seed=99))
    train_rows = colour_rows(320, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = _nll(model, held_out)
    for step in range(40):
        _, batch = _batch(processor, train_rows[step * 8 : step * 8 + 8])
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                            pixel_inputs=batch["pixel_inputs"])
        loss = -logps.sum() / batch["response_mask"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _nll(model, held_out)
    print(f"held-out NLL per token {before:.3f} -> {after:.3f}")
    assert after < 0.25 * before




def test_train_sft_on_an_image_dataset_end_to_end(vlm, tmp_path):
    """`alignkit.train("sft")` (what `alignkit train sft` runs) on JSONL rows with image files:
    held-out loss falls, and final/ loads back with its processor."""
    from transformers import AutoModelForImageTextToText

    import alignkit

    arch, path = vlm
    data = write_image_rows(tmp_path, colour_rows(160, seed=0), "train")
    eval_data = write_image_rows(tmp_path, colour_rows(16, seed=99), "eval")
    result = alignkit.train(
        "sft", model=str(path), data=data, eval_data=eval_data, output_dir=tmp_path / "run",
        max_steps=40, batch_size=8, lr=1e-2, eval_steps=40, device="cpu", dtype="float32",
    )
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    print(arch, "train loss", first["loss"], "-> eval loss", result.eval_metrics["eval/loss"])
    assert result.eval_metrics["eval/loss"] < 0.5 * first["loss"]
    final = result.final_dir
    assert (final / "processor_config.json").is_file()
    model, processor = load_vlm(str(final), device="cpu")
    # --vlm-train auto without LoRA: language model and projector train, the tower stays frozen
    start, _ = load_vlm(str(path), device="cpu")
    before, after = dict(start.named_parameters()), dict(model.named_parameters())
    changed = {module_role(n) for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed == {"language", "projector"}
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(model.config)])
    _, batch = _batch(processor, colour_rows(4, seed=5))
    assert _nll(model, batch) < 0.5 * first["loss"]


def test_images_with_a_text_model_are_a_clear_error(tiny_model_dir, tmp_path):
    import alignkit

    data = write_image_rows(tmp_path, colour_rows(4), "train")
    with pytest.raises(ValueError, match="the data has images but --model .* is not a vision-language model"):
        alignkit.train("sft", model=str(tiny_model_dir), data=data, output_dir=tmp_path / "run", max_steps=1,
                       device="cpu")


@pytest.mark.parametrize("arch, lr", [("qwen2_vl", 3e-3), ("llava", 5e-3)])
def test_sft_learns_to_read_the_colour_from_the_image(tmp_path, arch, lr):
    """Every part trained, 150 steps of 8 rows. The first answer token names the colour (one
    of 4: 'r', 'g', 'b', 'y'), so a model that ignores the image cannot beat log 4 = 1.386
    nats on it. Measured, right images vs held-out images shuffled across rows (a model that
    reads the image is then confidently wrong): Qwen2-VL 0.05 vs 3.54, LLaVA 0.03 vs 4.16. Qwen2-VL
    at lr 1e-2 was on an edge: 0.73 vs 3.08 on 2026-12-04, 0.99 vs 2.01 and 1.03 vs 1.62 on two
    rebuilt environments of 2026-12-07 (float-level changes over 150 steps); at 3e-3 it is not."""
    torch.manual_seed(0)
    path = build_tiny_vlm(tmp_path / arch, arch)
    model, processor = load_vlm(str(path), device="cpu")
    set_vlm_trainable(model, ("language", "projector", "vision"))
    _, held_out = _batch(processor, colour_rows(64, seed=99))
    rows = colour_rows(8 * 150, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(150):
        _, batch = _batch(processor, rows[step * 8 : step * 8 + 8])
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                            pixel_inputs=batch["pixel_inputs"])
        loss = -logps.sum() / batch["response_mask"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def first_token_nll(pixel_inputs) -> float:
        with torch.no_grad():
            logps = token_logps(model, held_out["input_ids"], held_out["attention_mask"],
                                held_out["response_mask"], pixel_inputs=pixel_inputs)
        first = held_out["prompt_lengths"]  # position of the first answer token
        return float(-logps[torch.arange(len(first)), first].mean())

    right = first_token_nll(held_out["pixel_inputs"])
    # Qwen2-VL: (64 images * 16 patches, 1176), LLaVA: (64, 3, 56, 56); shift by one image
    pixels = held_out["pixel_inputs"]["pixel_values"]
    shift = 16 if arch == "qwen2_vl" else 1
    shuffled = first_token_nll({**held_out["pixel_inputs"], "pixel_values": pixels.roll(shift, 0)})
    print(f"first answer token NLL: right images {right:.3f}, shuffled {shuffled:.3f}, log 4 = 1.386")
    assert right < 1.0 < 1.386 + 1.0 < shuffled, (right, shuffled)


def test_vlm_train_option(tiny_model_dir, tmp_path, vlm):
    import alignkit
    from alignkit.models.vlm import vlm_train_parts

    assert vlm_train_parts("none", lora=False) == ()
    with pytest.raises(ValueError, match="--vlm-train 'decoder'"):
        vlm_train_parts("decoder", lora=False)
    rows = [{"prompt": "good movie", "completion": "yes"}] * 4
    with pytest.raises(ValueError, match="--vlm-train 'vision' applies to vision-language models only"):
        alignkit.train("sft", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "text", max_steps=1,
                       device="cpu", vlm_train="vision")
    # LoRA on the VLM with the tower named: the tower and the adapters change, the projector not
    _, path = vlm
    data = write_image_rows(tmp_path, colour_rows(8, seed=0), "train")
    result = alignkit.train("sft", model=str(path), data=data, output_dir=tmp_path / "lora", max_steps=2,
                            batch_size=4, lr=1e-2, lora_r=4, vlm_train="vision", device="cpu", dtype="float32")
    trained, _ = load_vlm(str(result.final_dir), device="cpu")
    start, _ = load_vlm(str(path), device="cpu")
    before = dict(start.named_parameters())
    changed = {module_role(n) for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"language", "vision"}
