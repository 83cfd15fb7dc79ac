"""Reward and cost models on tiny VLMs (both architectures): a score head on the language model
learns the planted image rule (chosen names the square's colour), final/ loads as a VLM and as a
reward model, and the rm:DIR reward spec scores image rows exactly as training scored them."""

from __future__ import annotations

import pytest
import torch
from test_vlm_offline import colour_pairs, write_image_rows

import alignkit
from alignkit.data.image_tokenize import collate_image_pairs, tokenize_pairwise_images
from alignkit.data.table import RowTable
from alignkit.models import reward_scores
from alignkit.models.vlm_reward import (
    REWARD_HEAD_FILE,
    VisionLanguageForSequenceClassification,
    load_vlm_reward,
)
from alignkit.rewards import load_reward
from alignkit.testing_vlm import build_tiny_vlm

ARCHS = ("qwen2_vl", "llava")


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, tmp_path_factory):
    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)


def _train(algorithm, path, data, eval_data, output_dir, **overrides):
    options = dict(max_steps=150, batch_size=8, lr=1e-3, device="cpu", dtype="float32",
                   progress=False, vlm_train="projector,vision")
    if eval_data is not None:  # evaluated once, at the end
        options["eval_steps"] = 150
    return alignkit.train(algorithm, model=str(path), data=data, eval_data=eval_data, output_dir=output_dir,
                          **{**options, **overrides})


def test_rm_learns_the_image_rule_and_rm_dir_scores_image_rows(vlm, tmp_path):
    """150 steps of 8 pairs, every part trained (a random tower's features must learn to tell
    the colours apart for a head read at the end of the answer): held-out pairwise accuracy
    (chance 1/2) reaches 0.7. Measured on 64 held-out pairs: Qwen2-VL 0.844, LLaVA 0.734.
    The saved reward model, loaded as `rm:DIR`, scores the held-out chosen answers with their
    images exactly as the trainer's batches scored them, and ranks the pairs as well."""
    from transformers import AutoModelForImageTextToText

    arch, path = vlm
    data = write_image_rows(tmp_path, colour_pairs(8 * 150, seed=0), "train")
    held_out = colour_pairs(64, seed=99)
    eval_data = write_image_rows(tmp_path, [dict(r) for r in held_out], "eval")
    result = _train("rm", path, data, eval_data, tmp_path / "run")
    metrics = result.eval_metrics
    print(arch, {k: round(v, 3) for k, v in metrics.items()})
    assert metrics["eval/rewards/accuracies"] >= 0.7
    assert metrics["eval/loss"] < 0.693 - 0.05  # below log 2, the loss of a constant score

    final = result.final_dir
    assert (final / REWARD_HEAD_FILE).is_file()
    AutoModelForImageTextToText.from_pretrained(final)  # the final/ contract: a VLM checkpoint
    model, processor = load_vlm_reward(str(final), device="cpu")
    examples, _ = tokenize_pairwise_images(RowTable(held_out), processor, max_length=128)
    batch = collate_image_pairs(examples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        trained = reward_scores(model, batch["input_ids"], batch["attention_mask"], pixel_inputs=batch["pixel_inputs"])
    scorer = load_reward(f"rm:{final}")
    prompts = [row["prompt"] for row in held_out]
    images = [row["images"] for row in held_out]
    chosen = scorer(prompts, [row["chosen"] for row in held_out], images=images)
    rejected = scorer(prompts, [row["rejected"] for row in held_out], images=images)
    torch.testing.assert_close(chosen, trained[:64], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rejected, trained[64:], rtol=1e-4, atol=1e-4)
    assert float((chosen > rejected).float().mean()) == pytest.approx(metrics["eval/rewards/accuracies"], abs=1e-6)


def test_cost_model_on_a_vlm(vlm, tmp_path):
    """Safe RLHF's cost model with a score head on the VLM: the answer that misnames the colour
    is the unsafe one. 150 steps, vision tower frozen (--vlm-train auto). Held-out: the unsafe
    answer costs more than the safe one on at least 75% of pairs (chance 1/2), and the cost's
    sign (cost > 0: unsafe) is right on at least 70% of answers. Measured on 64 held-out pairs:
    Qwen2-VL 0.906 / 0.859, LLaVA 0.891 / 0.875. final/ reloads as a cost (reward-head) model."""
    arch, path = vlm

    def rows(n, seed):
        return [dict(r, chosen_is_safe=True, rejected_is_safe=False) for r in colour_pairs(n, seed)]

    data = write_image_rows(tmp_path, rows(8 * 150, 0), "train")
    eval_data = write_image_rows(tmp_path, rows(64, 99), "eval")
    result = _train("cost", path, data, eval_data, tmp_path / "run", vlm_train="auto")
    metrics = result.eval_metrics
    print(arch, {k: round(v, 3) for k, v in metrics.items()})
    assert metrics["eval/rewards/accuracies"] >= 0.75
    assert metrics["eval/costs/sign_accuracy"] >= 0.7
    assert metrics["eval/costs/unsafer"] > 0 > metrics["eval/costs/safer"]
    model, _ = load_vlm_reward(str(result.final_dir), device="cpu")
    assert isinstance(model, VisionLanguageForSequenceClassification)


def test_reward_head_on_a_vlm_with_lora_saves_and_reloads(vlm, tmp_path):
    """LoRA on the language model (tower frozen) with the head trained in full: final/ holds the
    merged weights and the head; reloaded, it gives the scores the run ended with."""
    _, path = vlm
    data = write_image_rows(tmp_path, colour_pairs(16, seed=0), "train")
    result = _train("rm", path, data, None, tmp_path / "run", max_steps=2, lora_r=4, lr=1e-2, vlm_train="auto")
    model, processor = load_vlm_reward(str(result.final_dir), device="cpu")
    start, _ = load_vlm_reward(str(path), device="cpu")
    examples, _ = tokenize_pairwise_images(RowTable(colour_pairs(4, seed=7)), processor, max_length=128)
    batch = collate_image_pairs(examples, processor.tokenizer.pad_token_id)
    live = result.model.eval()
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"])
        expected = reward_scores(live, *args, pixel_inputs=batch["pixel_inputs"])
        torch.testing.assert_close(reward_scores(model, *args, pixel_inputs=batch["pixel_inputs"]), expected,
                                   rtol=1e-4, atol=1e-4)
    tower = [n for n, _ in model.named_parameters() if ".visual." in n or "vision_tower" in n]
    before = dict(start.named_parameters())
    assert tower and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in tower)


def test_a_plain_vlm_is_refused_as_a_reward_model(vlm):
    """rm:DIR on a VLM checkpoint without reward_head.safetensors: its head would be random."""
    _, path = vlm
    with pytest.raises(ValueError, match="score head|trained reward model|random"):
        load_reward(f"rm:{path}")
