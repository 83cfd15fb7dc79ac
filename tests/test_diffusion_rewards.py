"""Image rewards (alignkit.diffusion.rewards), prompt data, and d3po's sampled-pairs path."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.data import DataError
from alignkit.diffusion.data import BUILTIN_PROMPTS, load_prompts
from alignkit.diffusion.rewards import (
    aesthetic,
    brightness,
    colour_features,
    load_image_reward,
    redness,
    score_images,
)
from alignkit.testing_diffusion import solid_image


def test_colour_rules_worked_examples():
    """Pure red (255, 0, 0): redness 1 - 0 = 1, brightness 0.299. Mid grey 128: redness 0,
    brightness 128/255 = 0.50196. Pure blue: redness 0 - 0.5 = -0.5, brightness 0.114."""
    images = [solid_image((255, 0, 0)), solid_image((128, 128, 128)), solid_image((0, 0, 255))]
    assert redness(None, images) == pytest.approx([1.0, 0.0, -0.5])
    assert brightness(None, images) == pytest.approx([0.299, 128 / 255, 0.114])


def test_aesthetic_stand_in_is_the_shipped_probe_over_colour_features():
    """Mid grey: brightness closeness 1 - 2|0.50196 - 0.5| = 0.99608, no contrast, saturation,
    colourfulness or clipped pixels, so the score is 1.0 x 0.99608. A colourful image beats it,
    an all-black one (dark fraction 1, closeness 0) scores 0 + (-2) = -2."""
    grey = solid_image((128, 128, 128))
    assert colour_features(grey) == pytest.approx([1 - 2 * abs(128 / 255 - 0.5), 0, 0, 0, 0, 0])
    assert aesthetic(None, [grey]) == pytest.approx([1 - 2 * abs(128 / 255 - 0.5)])
    from PIL import Image

    stripes = Image.new("RGB", (16, 16))
    stripes.paste((230, 40, 40), (0, 0, 8, 16))
    stripes.paste((40, 40, 230), (8, 0, 16, 16))
    black = solid_image((0, 0, 0))
    score_stripes, score_grey, score_black = aesthetic(None, [stripes, grey, black])
    assert score_stripes > score_grey > score_black == pytest.approx(-2.0)


def test_reward_specs_and_checked_outputs(tmp_path):
    assert load_image_reward("redness") is redness
    spec_file = tmp_path / "mine.py"
    spec_file.write_text("def two(prompts, images, **columns):\n    return [2.0] * len(images)\n"
                         "def short(prompts, images, **columns):\n    return [1.0]\n")
    two = load_image_reward(f"{spec_file}:two")
    assert score_images(two, ["a", "b"], [solid_image((0, 0, 0))] * 2, {}, "two") == [2.0, 2.0]
    with pytest.raises(ValueError, match="--reward short: .*1 values for a batch of 2"):
        score_images(load_image_reward(f"{spec_file}:short"), ["a", "b"], [solid_image((0, 0, 0))] * 2, {}, "short")
    with pytest.raises(ValueError, match="not a built-in image reward"):
        load_image_reward("vader")
    with pytest.raises(ValueError, match="one finite number per image"):
        score_images(lambda p, i, **c: [float("nan")], ["a"], [solid_image((0, 0, 0))], {}, "nan")


def test_prompt_data_builtin_and_errors(tmp_path):
    shipped = load_prompts(None)
    assert shipped.origin == BUILTIN_PROMPTS and shipped.prompts[0] == "a photo of a cat" and len(shipped.prompts) == 45
    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "a red fox", "style": "photo"}) + "\n")
    rows = load_prompts(str(good))
    assert rows.take([0]) == (["a red fox"], {"style": ["photo"]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl, row 2: missing column 'prompt'"):
        load_prompts(str(bad))


def test_d3po_with_a_reward_samples_pairs_and_puts_the_preferred_first(tmp_path):
    pytest.importorskip("diffusers")
    from alignkit.diffusion.pipeline import load_pipeline
    from alignkit.diffusion.rounds import SamplerSettings, sampled_round
    from alignkit.diffusion.sampling import decode_images
    from alignkit.testing_diffusion import build_tiny_pipeline

    pipeline = load_pipeline(build_tiny_pipeline(tmp_path / "pipe", image_size=8))
    settings = SamplerSettings(3, 1.0, 1.0, 0)
    pairs = sampled_round(pipeline, pipeline.unet, ["a cat"] * 6, {}, redness, "redness", settings,
                          torch.Generator().manual_seed(0), shared_noise=True)
    assert torch.equal(pairs.first.latents[:, 0], pairs.second.latents[:, 0])  # one x_T per pair
    assert bool((pairs.rewards_first >= pairs.rewards_second).all())
    rescored = redness(None, decode_images(pipeline, pairs.first.latents[:, -1]))
    assert rescored == pytest.approx(pairs.rewards_first.tolist(), abs=1e-6)
    assert pairs.weights.tolist() == [float(a != b) for a, b in zip(pairs.rewards_first, pairs.rewards_second, strict=True)]


def test_d3po_trains_online_from_prompts_and_a_reward(tmp_path):
    pytest.importorskip("diffusers")
    import alignkit
    from alignkit.testing_diffusion import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe", image_size=8)
    result = alignkit.train("d3po", model=str(pipe), reward="brightness", output_dir=tmp_path / "run",
                            max_steps=2, batch_size=3, num_steps=3, guidance_scale=1.0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"loss", "reward/mean", "reward/std", "ties", "rewards/margins"} <= set(r) for r in rows)
    assert (result.final_dir / "model_index.json").is_file()
