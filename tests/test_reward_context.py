"""Factually Augmented RLHF: `rm_context_columns` appends ground-truth columns to the reward
model's prompt, in one format at training and at scoring time, for text and image rows."""

from __future__ import annotations

import json
import random

import pytest
import torch

import alignkit
from alignkit.data.context import (
    CONTEXT_FILE,
    parse_context_columns,
    prompt_with_context,
    table_with_context,
)
from alignkit.data.table import RowTable
from alignkit.rewards import load_reward

COLOURS = ("red", "green", "blue", "yellow")


def test_the_context_block_format():
    row = {"caption": "a red square", "options": ["red", "blue"]}
    assert prompt_with_context("Colour?", row, ["caption", "options"]) == (
        "Colour?\n\nFacts (for the reward model only):\ncaption: a red square\noptions: red | blue"
    )
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    augmented = prompt_with_context(conversation, row, ["caption"])
    assert augmented[1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "Colour?"},
        {"type": "text", "text": "\n\nFacts (for the reward model only):\ncaption: a red square"},
    ]
    assert conversation[1]["content"][-1] == {"type": "text", "text": "Colour?"}  # input untouched
    plain = [{"role": "user", "content": "Colour?"}]
    assert prompt_with_context(plain, row, ["caption"])[0]["content"].endswith("caption: a red square")
    assert prompt_with_context("Colour?", row, []) == "Colour?"
    with pytest.raises(ValueError, match="names a column twice"):
        parse_context_columns("caption,caption")


def test_a_row_without_the_column_is_an_error_naming_it():
    table = RowTable([{"prompt": "p", "chosen": "a", "rejected": "b", "caption": "c"},
                      {"prompt": "p", "chosen": "a", "rejected": "b"}], [("data.jsonl", 1), ("data.jsonl", 2)])
    with pytest.raises(Exception, match=r"data\.jsonl.*row 2.*column 'caption', which this row lacks"):
        table_with_context(table, ["caption"])


def caption_pairs(n: int, seed: int) -> list[dict]:
    """The chosen answer repeats the colour in the (policy-hidden) caption, the rejected one
    another colour: from the prompt and answers alone no reward beats chance (1/2)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(COLOURS)
        wrong = rng.choice([c for c in COLOURS if c != colour])
        rows.append({"prompt": "What colour is the item?", "chosen": f"It is {colour}.",
                     "rejected": f"It is {wrong}.", "caption": f"a {colour} item"})
    return rows


def _train_rm(tiny_model_dir, tmp_path, name, **overrides):
    return alignkit.train(
        "rm", model=str(tiny_model_dir), data=caption_pairs(8 * 200, 0), eval_data=caption_pairs(64, 99),
        output_dir=tmp_path / name, max_steps=200, batch_size=8, lr=1e-3, eval_steps=200, device="cpu",
        dtype="float32", progress=False, **overrides,
    )


def test_rm_learns_a_rule_that_needs_the_caption(tiny_model_dir, tmp_path):
    """The same 200 steps with and without `rm_context_columns=caption`: with the caption the
    held-out accuracy reaches 0.8 (measured 0.969 on 64 pairs), without it stays near chance
    (<= 0.65). The saved model
    records its columns, and `rm:DIR` reads them from each row's columns when scoring (a missing
    column is an error naming it); the policy-side prompt is never changed."""
    with_caption = _train_rm(tiny_model_dir, tmp_path, "with", rm_context_columns="caption")
    without = _train_rm(tiny_model_dir, tmp_path, "without")
    accuracy = with_caption.eval_metrics["eval/rewards/accuracies"]
    blind = without.eval_metrics["eval/rewards/accuracies"]
    print(f"held-out accuracy with the caption {accuracy:.3f}, without {blind:.3f}")
    assert accuracy >= 0.8
    assert blind <= 0.65

    final = with_caption.final_dir
    assert json.loads((final / CONTEXT_FILE).read_text()) == {"context_columns": ["caption"]}
    scorer = load_reward(f"rm:{final}")
    rows = caption_pairs(64, 99)
    prompts = [r["prompt"] for r in rows]
    captions = [r["caption"] for r in rows]
    chosen = scorer(prompts, [r["chosen"] for r in rows], caption=captions)
    rejected = scorer(prompts, [r["rejected"] for r in rows], caption=captions)
    assert float((chosen > rejected).float().mean()) == pytest.approx(accuracy, abs=1e-6)
    assert prompts[0] == "What colour is the item?"
    with pytest.raises(ValueError, match=r"reads context column\(s\) \['caption'\]"):
        scorer(prompts, [r["chosen"] for r in rows])
    # other captions, other scores: the caption is read
    swapped = scorer(prompts, [r["chosen"] for r in rows], caption=captions[1:] + captions[:1])
    assert not torch.allclose(swapped, chosen)


def test_context_columns_change_the_reward_models_input(tiny_model_dir):
    """The tokenised RM input holds the facts block exactly when rm_context_columns is set."""
    from alignkit.models import load_model
    from alignkit.training.offline.tasks import RewardModelTask
    from alignkit.training.run.config import TrainConfig

    _, tokenizer = load_model(str(tiny_model_dir), kind="reward", device="cpu")
    table = RowTable(caption_pairs(2, 0))
    texts = []
    for hparams in ({}, {"rm_context_columns": "caption"}):
        task = RewardModelTask(TrainConfig(algorithm="rm", hparams=hparams))
        examples, _ = task.tokenize(table, tokenizer)
        texts.append(tokenizer.decode(examples[0].prompt_ids))
    assert "Facts" not in texts[0]
    assert texts[1].endswith(f"Facts (for the reward model only):\ncaption: {table.rows[0]['caption']}")


def test_context_on_image_rows_follows_the_images(tmp_path):
    """On a VLM the facts block is a text part after the image placeholder: the prompt keeps its
    image tokens (expanded by the processor) and ends with the caption."""
    from alignkit.models import load_vlm
    from alignkit.testing_vlm import build_tiny_vlm, draw_shape_image
    from alignkit.training.offline.tasks import RewardModelTask
    from alignkit.training.run.config import TrainConfig

    _, processor = load_vlm(str(build_tiny_vlm(tmp_path / "vlm", "qwen2_vl")), device="cpu")
    question = [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    row = {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": "red"}],
           "rejected": [{"role": "assistant", "content": "blue"}], "images": [draw_shape_image("square", "red")],
           "caption": "a red square"}
    task = RewardModelTask(TrainConfig(algorithm="rm", hparams={"rm_context_columns": "caption"}))
    (example,), _ = task.tokenize(RowTable([row]), processor)
    text = processor.tokenizer.decode(example.prompt_ids)
    assert text.count("<|image_pad|>") == 4
    assert text.index("<|image_pad|>") < text.index("Colour?") < text.index("caption: a red square")
    assert example.pixel_inputs["pixel_values"].shape[0] == 16


def test_cli_set_rm_context_columns(tiny_model_dir, tmp_path):
    """`alignkit train rm --set rm_context_columns=caption,options`: both columns reach the saved
    model's manifest, in the order given."""
    from run_helpers import write_jsonl

    from alignkit.cli import main

    rows = [dict(r, options=list(COLOURS)) for r in caption_pairs(8, 0)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", "rm", "--model", str(tiny_model_dir), "--data", data, "--output", str(out),
                 "--max-steps", "1", "--device", "cpu", "--set", "rm_context_columns=caption,options"]) == 0
    assert json.loads((out / "final" / CONTEXT_FILE).read_text()) == {"context_columns": ["caption", "options"]}
