"""Preference training on tiny VLMs (both architectures): DPO on image pairs (reference log-probs
read the same pixels and their cache keys on the images), resume equivalence, and bad images in
pairwise data. The planted rule: the chosen answer names the colour of the square in the image,
the rejected one another colour, so no colour prior beats chance (1/2) on held-out pairs."""

from __future__ import annotations

import json
import random
from functools import partial

import pytest
import torch
from run_helpers import PAIRWISE_DETERMINISTIC, assert_resumed_matches, run_interrupted_and_resumed

import alignkit
from alignkit.data.image_tokenize import collate_image_pairs, tokenize_pairwise_images
from alignkit.data.table import RowTable
from alignkit.models import load_vlm, reward_scores
from alignkit.testing_vlm import COLOURS, build_tiny_vlm, draw_shape_image, write_image_rows

ARCHS = ("qwen2_vl", "llava")
QUESTION = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, tmp_path_factory):
    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)


def colour_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairwise rows: chosen = the square's colour, rejected = another colour (uniform)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(sorted(COLOURS))
        wrong = rng.choice(sorted(set(COLOURS) - {colour}))
        x, y = rng.randrange(0, 24), rng.randrange(0, 24)
        rows.append({
            "prompt": [{"role": "user", "content": QUESTION}],
            "chosen": [{"role": "assistant", "content": colour}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "images": [draw_shape_image("square", colour, (x, y, x + 30, y + 30))],
        })
    return rows




def test_pairs_share_the_prompt_pixels_and_image_tokens_are_never_scored(vlm):
    arch, path = vlm
    _, processor = load_vlm(str(path), device="cpu")
    examples, _ = tokenize_pairwise_images(RowTable(colour_pairs(3)), processor, max_length=64)
    batch = collate_image_pairs(examples, processor.tokenizer.pad_token_id)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>" if arch == "qwen2_vl" else "<image>")
    is_image = batch["input_ids"] == image_id
    assert is_image.sum(dim=1).tolist() == [4 if arch == "qwen2_vl" else 16] * 6  # 2B rows
    assert not (is_image & batch["response_mask"]).any()
    pixels = batch["pixel_inputs"]["pixel_values"]
    per_pair = pixels.shape[0] // 6
    # rows 0..B-1 chosen, B..2B-1 rejected: pair b's pixels at b and at B + b
    torch.testing.assert_close(pixels[: 3 * per_pair], pixels[3 * per_pair :])
    assert not torch.equal(pixels[:per_pair], pixels[per_pair : 2 * per_pair])


def _train_dpo(path, data, eval_data, output_dir, **overrides):
    options = dict(max_steps=80, batch_size=8, lr=1e-3, beta=0.1, device="cpu",
                   dtype="float32", progress=False)
    if eval_data is not None:  # evaluated once, at the end
        options["eval_steps"] = 80
    return alignkit.train("dpo", model=str(path), data=data, eval_data=eval_data, output_dir=output_dir,
                          **{**options, **overrides})


def test_dpo_learns_the_image_preference_rule(vlm, tmp_path):
    """80 steps of 8 pairs, full fine-tuning (vision tower frozen): held-out rewards/accuracies
    (chance 1/2: chosen and rejected colours are both uniform) reaches 0.75 and the margin is
    positive. Measured on 64 held-out pairs: Qwen2-VL 0.875, LLaVA 0.922."""
    arch, path = vlm
    data = write_image_rows(tmp_path, colour_pairs(640, seed=0), "train")
    eval_data = write_image_rows(tmp_path, colour_pairs(64, seed=99), "eval")
    result = _train_dpo(path, data, eval_data, tmp_path / "run")
    metrics = result.eval_metrics
    print(arch, {k: round(v, 3) for k, v in metrics.items()})
    assert metrics["eval/rewards/accuracies"] >= 0.75
    assert metrics["eval/rewards/margins"] > 0.0
    assert (tmp_path / "run" / "reference_logps.safetensors").is_file()
    model, processor = load_vlm(str(result.final_dir), device="cpu")  # final/ with its processor
    assert hasattr(processor, "image_processor")


def test_reference_cache_keys_on_the_images(vlm, tmp_path):
    """The reference log-probs depend on the pixels: the same text with other images gives other
    values, and the cache of one run is not reused for the other (its fingerprint differs)."""
    from alignkit.training.offline.reference_cache import cache_fingerprint
    from alignkit.training.run.config import TrainConfig

    _, path = vlm
    model, processor = load_vlm(str(path), device="cpu")
    rows = colour_pairs(4, seed=3)
    flipped = [dict(row, images=[row["images"][0].transpose(0)]) for row in rows]  # mirrored images
    config = TrainConfig(algorithm="dpo", model=str(path), data="x", output="y")
    fingerprints = []
    for table_rows in (rows, flipped):
        examples, _ = tokenize_pairwise_images(RowTable(table_rows), processor, max_length=64)
        fingerprints.append(cache_fingerprint(config, model, processor.tokenizer, {"train": examples}))
    assert fingerprints[0] != fingerprints[1]


def test_vlm_dpo_resumes_exactly(vlm, tmp_path):
    """Cut at step 3 (checkpoint every 2 steps), resumed: every logged metric of steps 1..6
    equals the uninterrupted run's, and the final weights match."""
    _, path = vlm
    data = write_image_rows(tmp_path, colour_pairs(24, seed=1), "train")
    train = partial(_train_dpo, path, data, None, max_steps=6, batch_size=4, save_steps=2, logging_steps=1)
    runs = run_interrupted_and_resumed(train, tmp_path, at=3)
    assert_resumed_matches(runs.full, runs.resumed, PAIRWISE_DETERMINISTIC, steps=6)
    full, _ = load_vlm(str(runs.full_result.final_dir), device="cpu")
    resumed, _ = load_vlm(str(runs.resumed_result.final_dir), device="cpu")
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_bad_images_in_pairwise_data_are_clear_errors(vlm, tmp_path):
    _, path = vlm
    rows = colour_pairs(3)
    data = write_image_rows(tmp_path, rows, "train")
    lines = (tmp_path / "train.jsonl").read_text().splitlines()

    def write(name: str, changed: list[str]) -> str:
        (tmp_path / name).write_text("\n".join(changed) + "\n")
        return str(tmp_path / name)

    missing = json.loads(lines[1]) | {"images": ["img/nowhere.png"]}
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG not really")
    corrupt = json.loads(lines[1]) | {"images": ["img/corrupt.png"]}
    two = json.loads(lines[1])
    two["images"] = two["images"] * 2  # two images, one placeholder
    cases = {
        "missing.jsonl": r"missing\.jsonl.*row 2.*img/nowhere\.png.* not found",
        "corrupt.jsonl": r"corrupt\.jsonl.*row 2.*img/corrupt\.png.* cannot be read",
        "count.jsonl": r"count\.jsonl.*row 2.*2 image\(s\) but 1 \{'type': 'image'\} placeholder",
    }
    for (name, pattern), bad in zip(cases.items(), (missing, corrupt, two), strict=True):
        source = write(name, [lines[0], json.dumps(bad), lines[2]])
        with pytest.raises(Exception, match=pattern):
            _train_dpo(path, source, None, tmp_path / f"run-{name}", max_steps=1)
    assert data  # the intact file trains (see test_dpo_learns_the_image_preference_rule)


def test_images_refused_where_the_task_cannot_read_them(vlm, tmp_path):
    _, path = vlm
    data = write_image_rows(tmp_path, colour_pairs(4), "train")
    with pytest.raises(ValueError, match="--algorithm dpo: --set use_weighting does not take image rows yet"):
        _train_dpo(path, data, None, tmp_path / "wpo", max_steps=1, use_weighting=True)
    # a pairwise-data task whose loss reads no pixels yet: refused, not trained blind
    with pytest.raises(ValueError, match="--algorithm preference_model: data with images trains with sft, rm, cost"):
        alignkit.train("preference_model", model=str(path), data=data, output_dir=tmp_path / "pm", max_steps=1,
                       device="cpu", progress=False)


def test_vlm_dpo_with_lora_uses_the_adapter_free_model_as_reference(vlm, tmp_path):
    """LoRA on the language model: the cached reference log-probs are the initial model's (the
    adapter-free pass), so step 1's loss is exactly log 2 and its rewards 0; final/ is merged."""
    from run_helpers import read_metrics

    _, path = vlm
    data = write_image_rows(tmp_path, colour_pairs(8, seed=2), "train")
    result = _train_dpo(path, data, None, tmp_path / "lora", max_steps=2, batch_size=4, lora_r=4, lr=1e-2,
                        logging_steps=1)
    first = read_metrics(result.output_dir)[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    trained, _ = load_vlm(str(result.final_dir), device="cpu")
    start, _ = load_vlm(str(path), device="cpu")
    before = dict(start.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in trained.named_parameters())


def test_mixed_image_and_text_pairs_batch_like_single_rows(vlm):
    """A batch interleaving image pairs and text-only pairs gives each row the log-prob (policy)
    and score (reward head) it gets alone: pixels follow their rows, text rows read none."""
    from alignkit.models import sequence_logps
    from alignkit.models.vlm_reward import load_vlm_reward

    _, path = vlm
    model, processor = load_vlm(str(path), device="cpu")
    reward_model, _ = load_vlm_reward(str(path), device="cpu")
    text = {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "hi"}],
            "rejected": [{"role": "assistant", "content": "no, not now"}]}
    images = colour_pairs(2, seed=4)
    rows = [images[0], text, images[1], dict(text, chosen=[{"role": "assistant", "content": "hello"}])]
    pad = processor.tokenizer.pad_token_id
    examples, _ = tokenize_pairwise_images(RowTable(rows), processor, max_length=64)

    def values(batch):
        with torch.no_grad():
            args = (batch["input_ids"], batch["attention_mask"])
            logps, _ = sequence_logps(model, *args, batch["response_mask"], pixel_inputs=batch["pixel_inputs"])
            return logps, reward_scores(reward_model, *args, pixel_inputs=batch["pixel_inputs"])

    together = values(collate_image_pairs(examples, pad))
    alone = [values(collate_image_pairs([example], pad)) for example in examples]
    for k in range(2):  # log-probs, scores: rows 0..3 chosen, 4..7 rejected
        expected = torch.cat([torch.stack([a[k][0] for a in alone]), torch.stack([a[k][1] for a in alone])])
        torch.testing.assert_close(together[k], expected, rtol=1e-4, atol=1e-4)
