"""Online training on tiny VLMs (Qwen2-VL, LLaVA) from prompt rows with an `images` column (PNG
files next to the JSONL, paths relative to it): grpo / rloo / ppo / dapo run, rewards get each
row's columns, LoRA trains the language model only, a resumed run matches the uninterrupted
one, and GRPO with `choice_accuracy` learns which shape is in the picture."""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

import pytest
import torch
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
)

import alignkit
from alignkit.models import load_vlm
from alignkit.models.vlm import module_role
from alignkit.rewards.rules import completion_text
from alignkit.testing_vlm import build_tiny_vlm, draw_shape_image, write_image_rows

ARCHS = ("qwen2_vl", "llava")
LETTERS = {"square": "s", "triangle": "t"}
"""The answer to "square or triangle?": one letter, one token of the tiny tokenizer."""


@pytest.fixture(scope="module", params=ARCHS)
def vlm_dir(request, tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)


def shape_rows(n: int, seed: int, *, name_in_prompt: bool = False) -> list[dict]:
    """"Square or triangle?" over a red square or triangle filling most of the canvas; `answer`
    is the shape's letter, `boxes` the shape's box (Visual-RFT's ground truth for `iou`).
    `name_in_prompt` also names the shape in the question text (so a reward can check that each
    sample got its own row's columns)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shape = rng.choice(sorted(LETTERS))
        box = (8, 8, 48, 48)
        question = f"Square or triangle ({shape})?" if name_in_prompt else "Square or triangle?"
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "images": [draw_shape_image(shape, "red", box)],
            "answer": LETTERS[shape],
            "boxes": [list(box)],
            "completion": [{"role": "assistant", "content": LETTERS[shape]}],
        })
    return rows


def columns_checked_reward(prompts, completions, answer, images, boxes, **columns):
    """Fails unless each sample got its own row's `answer` (that of the shape named in its
    prompt), `boxes` and `images`; scores the number of distinct characters, which varies
    between samples."""
    assert len(answer) == len(images) == len(boxes) == len(completions)
    for prompt, letter, truth in zip(prompts, answer, boxes, strict=True):
        named = next(shape for shape in LETTERS if f"({shape})" in str(prompt))
        assert letter == LETTERS[named], (prompt, letter)
        assert truth == [[8, 8, 48, 48]], (prompt, truth)
    return [float(len(set(completion_text(completion)))) for completion in completions]


SMOKE = dict(max_steps=2, batch_size=2, group_size=4, max_new_tokens=4, lr=1e-3, lora_r=4, device="cpu",
             dtype="float32", progress=False, warmup_ratio=0.0)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "ppo", "dapo"])
def test_two_steps_of_each_online_preset_on_a_vlm(algorithm, vlm_dir, tmp_path):
    """Two steps with LoRA: losses finite, the reward saw every row's columns, the reference's
    KL is 0 at step 1 (it reads the same images as the policy), final/ loads with its processor and only the language model changed (adapters merged; tower and projector
    frozen)."""
    data = write_image_rows(tmp_path, shape_rows(8, 0, name_in_prompt=True), "train")
    result = alignkit.train(algorithm, model=str(vlm_dir), data=data, output_dir=tmp_path / "run",
                            reward=columns_checked_reward, **SMOKE)
    rows = read_metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]
    if "kl" in rows[0]:  # step 1: LoRA's B = 0, so the adapter-off reference, fed the same pixels, is the policy
        assert abs(rows[0]["kl"]) < 1e-4
    for row in rows:
        assert math.isfinite(row["loss"]) and row["reward/std"] > 0
        if algorithm == "ppo":
            assert math.isfinite(row["value_loss"])
    assert (result.final_dir / "processor_config.json").is_file()
    final, _ = load_vlm(str(result.final_dir), device="cpu")
    start, _ = load_vlm(str(vlm_dir), device="cpu")
    before = dict(start.named_parameters())
    changed = {module_role(n) for n, p in final.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"language"}


def test_image_prompts_with_a_text_model_or_a_reward_model_are_clear_errors(vlm_dir, tiny_model_dir, tmp_path):
    data = write_image_rows(tmp_path, shape_rows(4, 0), "train")
    settings = dict(SMOKE, max_steps=1)
    with pytest.raises(ValueError, match="the prompts have images but --model .* is not a vision-language model"):
        alignkit.train("grpo", model=str(tiny_model_dir), data=data, output_dir=tmp_path / "a",
                       reward="choice_accuracy", **settings)
    with pytest.raises(ValueError, match="image prompts: not supported with --reward-model"):
        alignkit.train("grpo", model=str(vlm_dir), data=data, output_dir=tmp_path / "b",
                       reward_model=str(tiny_model_dir), **settings)


def test_resumed_vlm_grpo_matches_the_uninterrupted_run(vlm_dir, tmp_path):
    """Full fine-tuning (language model + projector), 4 steps, checkpoint at 2, cut at 3."""
    data = write_image_rows(tmp_path, shape_rows(8, 1, name_in_prompt=True), "train")
    settings = dict(SMOKE, max_steps=4, save_steps=2, lora_r=0, lr=5e-3)
    train = partial(alignkit.train, "grpo", model=str(vlm_dir), data=data, reward=columns_checked_reward,
                    **settings)
    runs = run_interrupted_and_resumed(train, tmp_path, at=3)
    assert abs(runs.full[0]["kl"]) < 1e-4  # the frozen copy of the policy as reference, same pixels
    assert_resumed_matches(runs.full, runs.resumed, ("loss", "reward/mean", "kl", "grad_norm", "entropy"), steps=4,
                           tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_cli_grpo_with_vlm_train_projector_trains_the_projector_beside_lora(vlm_dir, tmp_path):
    """`alignkit train grpo --lora-r 4 --vlm-train projector` on image prompts: final/ differs
    from the start in the language model (merged adapters) and the projector, never the tower."""
    from alignkit.cli import main as cli_main

    data = write_image_rows(tmp_path, shape_rows(8, 2), "train")
    reward_file = tmp_path / "varied.py"
    reward_file.write_text("def reward(prompts, completions, **kw):\n    return [len(set(str(c))) for c in completions]\n")
    code = cli_main(["train", "grpo", "--model", str(vlm_dir), "--data", data, "--output", str(tmp_path / "cli"),
                     "--max-steps", "2", "--batch-size", "2", "--reward", f"{reward_file}:reward", "--lora-r", "4",
                     "--vlm-train", "projector", "--lr", "1e-3", "--device", "cpu", "--dtype", "float32",
                     "--set", "group_size=4", "--set", "max_new_tokens=4", "--no-progress"])
    assert code == 0
    final, _ = load_vlm(str(tmp_path / "cli" / "final"), device="cpu")
    start, _ = load_vlm(str(vlm_dir), device="cpu")
    before = dict(start.named_parameters())
    changed = {module_role(n) for n, p in final.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"language", "projector"}


def test_ppo_with_a_shared_value_head_on_a_vlm(vlm_dir, tmp_path):
    """critic=shared: the value head sits on the VLM language model's hidden states (its width
    read from the text config)."""
    data = write_image_rows(tmp_path, shape_rows(8, 3, name_in_prompt=True), "train")
    alignkit.train("ppo", model=str(vlm_dir), data=data, output_dir=tmp_path / "run",
                   reward=columns_checked_reward, critic="shared", **SMOKE)
    rows = read_metrics(tmp_path / "run")
    assert all(math.isfinite(row["value_loss"]) for row in rows)


def test_image_prompt_rows_are_checked_and_never_truncated(vlm_dir):
    """A prompt whose placeholders do not match its images, or that does not fit
    --max-prompt-length with its image tokens, is an error naming the row."""
    from alignkit.data import DataError
    from alignkit.data.image_tokenize import tokenize_image_prompts
    from alignkit.data.table import RowTable

    _, processor = load_vlm(str(vlm_dir), device="cpu")
    rows = shape_rows(2, 4)
    ids, inputs, _ = tokenize_image_prompts(RowTable(rows), processor, max_prompt_length=256)
    assert len(ids) == 2 and all("pixel_values" in one for one in inputs)
    with pytest.raises(DataError, match="row 1.*the prompt takes .* tokens .*over --max-prompt-length 10"):
        tokenize_image_prompts(RowTable(rows), processor, max_prompt_length=10)
    rows[1]["images"] = rows[1]["images"] * 2
    with pytest.raises(DataError, match="row 2.*2 image\\(s\\) but 1 placeholder"):
        tokenize_image_prompts(RowTable(rows), processor, max_prompt_length=256)
