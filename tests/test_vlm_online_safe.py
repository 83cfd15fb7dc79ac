"""Safe RLHF-V on tiny VLMs (Qwen2-VL, LLaVA): online reward and cost models that read the images.

A VLM reward model (`alignkit train rm` on image pairs) and a VLM cost model (`alignkit train
cost`, the planted rule: an answer that misnames the square's colour is unsafe, so the cost of
one answer depends on the image) are trained here, then used online: grpo's --reward-model
scores each sample exactly as the offline path scores the same row read from its file;
safe_ppo runs on a VLM policy with both models (and with a rule reward), logging the cost and
the Lagrange multiplier; the cost model online reads each sample's own image (its cost is the
offline cost with that image, and another image changes it). Text reward/cost models, a
head-less VLM and critics from reward models are refused on image prompts in one line."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from run_helpers import read_metrics

import alignkit
from alignkit.data import load_rows
from alignkit.data.image_tokenize import collate_image_sequences, tokenize_sft_images
from alignkit.models import reward_scores
from alignkit.models.vlm_reward import load_vlm_reward
from alignkit.rewards.scorer import RewardModelScorer
from alignkit.testing_vlm import COLOURS, build_tiny_vlm, draw_shape_image, write_image_rows

ARCHS = ("qwen2_vl", "llava")
QUESTION = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
SMOKE = dict(batch_size=2, max_new_tokens=4, lr=1e-3, lora_r=4, device="cpu", dtype="float32", progress=False,
             warmup_ratio=0.0)


def colour_pairs(n: int, seed: int) -> list[dict]:
    """Pairs over a coloured square: chosen names its colour (safe), rejected another (unsafe)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(sorted(COLOURS))
        wrong = rng.choice(sorted(set(COLOURS) - {colour}))
        x, y = rng.randrange(0, 24), rng.randrange(0, 24)
        rows.append({"prompt": [{"role": "user", "content": QUESTION}],
                     "chosen": [{"role": "assistant", "content": colour}],
                     "rejected": [{"role": "assistant", "content": wrong}],
                     "chosen_is_safe": True, "rejected_is_safe": False,
                     "images": [draw_shape_image("square", colour, (x, y, x + 30, y + 30))]})
    return rows


def colour_prompts(directory: Path, colours: list[str], name: str = "prompts") -> str:
    """Prompt rows "What colour is the square?" over a square of each colour, as JSONL + PNGs."""
    rows = [{"prompt": [{"role": "user", "content": QUESTION}], "colour": colour,
             "images": [draw_shape_image("square", colour, (12, 12, 42, 42))]} for colour in colours]
    return write_image_rows(directory, rows, name)


def distinct_characters(prompts, completions, **columns) -> list[float]:
    """A rule reward that varies between samples: the number of distinct characters."""
    return [float(len(set(str(completion)))) for completion in completions]


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory) -> dict[str, Path]:
    """The tiny VLM, and a reward model (20 steps) and a cost model (150 steps; tower frozen, as
    test_vlm_reward_models' cost model) trained from it on the colour pairs."""
    root = tmp_path_factory.mktemp(f"safev-{request.param}")
    vlm = build_tiny_vlm(root / "vlm", request.param)
    data = write_image_rows(root, colour_pairs(8 * 150, seed=0), "pairs")
    trained = {}
    for kind, steps in (("rm", 20), ("cost", 150)):
        result = alignkit.train(kind, model=str(vlm), data=data, output_dir=root / kind, max_steps=steps,
                                batch_size=8, lr=1e-3, device="cpu", dtype="float32", progress=False)
        trained[kind] = result.final_dir
    return {"vlm": vlm, **trained}


@pytest.fixture
def scored(monkeypatch) -> list[dict]:
    """Every call of a RewardModelScorer during the test: its inputs and raw scores."""
    calls: list[dict] = []
    original = RewardModelScorer.raw_scores

    def recording(self, prompts, completions, **columns):
        scores = original(self, prompts, completions, **columns)
        calls.append({"name": self.__name__, "prompts": list(prompts), "completions": list(completions),
                      "images": list(columns.get("images") or []), "scores": scores.clone()})
        return scores

    monkeypatch.setattr(RewardModelScorer, "raw_scores", recording)
    return calls


def offline_scores(model_dir: Path, prompts_file: str, call: dict, images: list[list[str]]) -> torch.Tensor:
    """The model's scores of one recorded call's samples read back as SFT rows from a JSONL file
    beside the prompts (images as paths relative to it, resolved by the offline loader), in one
    batch as the online scorer batched them."""
    lines = [json.dumps({"prompt": p, "completion": c, "images": i})
             for p, c, i in zip(call["prompts"], call["completions"], images, strict=True)]
    directory = Path(prompts_file).parent
    path = directory / f"offline-{len(list(directory.glob('offline-*')))}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    model, processor = load_vlm_reward(str(model_dir), device="cpu")
    examples, _ = tokenize_sft_images(load_rows(str(path)), processor, max_length=1024)
    batch = collate_image_sequences(examples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        return reward_scores(model, batch["input_ids"], batch["attention_mask"],
                             pixel_inputs=batch["pixel_inputs"]).float()


def image_paths_of(call: dict, prompts_file: str) -> list[list[str]]:
    """The image file (relative to the prompts file) of each recorded sample, found by pixels."""
    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines()]
    base = Path(prompts_file).parent
    files = {row["images"][0]: list(Image.open(base / row["images"][0]).convert("RGB").getdata()) for row in rows}
    found = []
    for images in call["images"]:
        pixels = list(images[0].getdata())
        found.append([next(name for name, data in files.items() if data == pixels)])
    return found


@pytest.mark.parametrize(("algorithm", "flag"), [("grpo", "--reward-model"), ("ppo", "--reward-model"),
                                               ("grpo", "--reward rm:DIR")])
def test_online_reward_model_scores_equal_offline_scores(algorithm, flag, models, tmp_path, scored):
    """grpo / ppo with --reward-model (or --reward rm:DIR), a VLM reward model, 2 steps: the scorer gets each row's prompt
    messages and its image opened from the file, and every online score equals (bitwise) the
    offline score of the same row written to a file and read back by the offline loader."""
    prompts = colour_prompts(tmp_path, ["red", "blue", "green", "yellow"])
    alignkit.train(algorithm, model=str(models["vlm"]), data=prompts, output_dir=tmp_path / "run",
                   **({"reward_model": str(models["rm"])} if flag == "--reward-model" else {"reward": f"rm:{models['rm']}"}),
                   max_steps=2, group_size=4, **SMOKE)
    assert len(scored) == 2
    for call in scored:
        assert len(call["scores"]) == 8 and all(p == [{"role": "user", "content": QUESTION}] for p in call["prompts"])
        paths = image_paths_of(call, prompts)  # each sample carries one of the rows' images, opened
        assert len({p[0] for p in paths}) == 2  # the step's two prompts, each with its own image
        offline = offline_scores(models["rm"], prompts, call, paths)
        assert torch.equal(call["scores"], offline), (call["scores"], offline)
    assert len({round(float(s), 6) for call in scored for s in call["scores"]}) > 1


@pytest.mark.parametrize("reward", ["reward_model", "rule"])
def test_safe_ppo_on_a_vlm_with_a_vlm_cost_model(models, tmp_path, reward):
    """safe_ppo, 3 steps, a VLM policy with LoRA, the VLM cost model and a VLM reward model or a
    rule reward: the cost and the Lagrange multiplier are logged each step, the multiplier moves
    (one step per training step), both critics' losses are finite."""
    prompts = colour_prompts(tmp_path, ["red", "blue", "green", "yellow"] * 2)
    chosen = ({"reward_model": str(models["rm"])} if reward == "reward_model"
              else {"reward": distinct_characters})
    alignkit.train("safe_ppo", model=str(models["vlm"]), data=prompts, output_dir=tmp_path / "run",
                   cost_model=str(models["cost"]), max_steps=3, group_size=2, **chosen, **SMOKE)
    rows = read_metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        for key in ("loss", "value_loss", "cost/mean", "cost/window_mean", "lambda"):
            assert math.isfinite(row[key]), (key, row)
    assert len({row["lambda"] for row in rows}) == 3  # lambda takes one step per training step


def test_the_cost_model_online_reads_each_samples_own_image(models, tmp_path, scored):
    """safe_ppo with the cost model on red and blue squares: each online cost is the offline
    cost of its sample with its own image, and the same sample over the other colour costs
    something else (the cost reads the pixels). Through the online role, the planted rule holds:
    the answer that misnames the colour costs more than the one that names it."""
    prompts = colour_prompts(tmp_path, ["red", "blue"] * 2)
    alignkit.train("safe_ppo", model=str(models["vlm"]), data=prompts, output_dir=tmp_path / "run",
                   reward=distinct_characters,
                   cost_model=str(models["cost"]), max_steps=2, group_size=2, **SMOKE)
    costs = [call for call in scored if call["name"].startswith("--cost-model")]
    assert len(costs) == 2
    swap = {"img/prompts-0.png": "img/prompts-1.png", "img/prompts-1.png": "img/prompts-0.png",
            "img/prompts-2.png": "img/prompts-3.png", "img/prompts-3.png": "img/prompts-2.png"}
    for call in costs:
        paths = image_paths_of(call, prompts)
        own = offline_scores(models["cost"], prompts, call, paths)
        assert torch.equal(call["scores"], own)
        other = offline_scores(models["cost"], prompts, call, [[swap[p[0]]] for p in paths])
        assert ((other - own).abs() > 1e-4).all(), (own, other)
    # the planted rule, on 32 held-out pairs: misnaming the square's colour costs more (chance 1/2)
    held_out = colour_pairs(32, seed=99)
    pairs_file = write_image_rows(tmp_path, [dict(row) for row in held_out], "held_out")
    files = [json.loads(line)["images"] for line in Path(pairs_file).read_text().splitlines()]
    both = {"prompts": [row["prompt"] for row in held_out] * 2,
            "completions": [row["chosen"] for row in held_out] + [row["rejected"] for row in held_out]}
    cost = offline_scores(models["cost"], pairs_file, both, files * 2)
    accuracy = (cost[32:] > cost[:32]).float().mean().item()
    print("held-out: unsafe answer costs more on", accuracy, "of pairs")
    assert accuracy >= 0.75


def test_bad_reward_and_cost_models_on_image_prompts_are_one_line_errors(models, tiny_model_dir, tmp_path):
    """On image prompts: a text reward model (--reward-model, --reward rm:DIR) or cost model,
    a VLM without a trained score head as --cost-model, critics from a reward model, and a prompt
    image that is missing; each a one-line ValueError naming the flag and directory (or the file,
    row and image), before anything trains."""
    prompts = colour_prompts(tmp_path, ["red", "blue"])
    text = re.escape(str(tiny_model_dir))
    run = dict(model=str(models["vlm"]), data=prompts, max_steps=1, **SMOKE)
    cases = [
        ("grpo", dict(reward_model=str(tiny_model_dir)), f"not supported with --reward-model {text} \\(a text reward model"),
        ("grpo", dict(reward=f"rm:{tiny_model_dir}"), f"not supported with --reward {text} \\(a text reward model"),
        ("safe_ppo", dict(reward=distinct_characters, cost_model=str(tiny_model_dir)),
         f"not supported with --cost-model {text} \\(a text reward model"),
        ("safe_ppo", dict(reward=distinct_characters, cost_model=str(models["vlm"])),
         "--cost-model .* is not a reward model: .* without a score head.*`alignkit train cost` on image rows"),
        ("safe_ppo", dict(reward=distinct_characters, cost_model=str(models["cost"]),
                          cost_critic_init=str(models["cost"])), "not supported with critic_init / cost_critic_init"),
        ("ppo", dict(reward=distinct_characters, critic_init=str(models["rm"])),
         "not supported with critic_init / cost_critic_init"),
    ]
    missing = colour_prompts(tmp_path, ["red", "blue"], name="missing")
    (tmp_path / "img" / "missing-1.png").unlink()
    cases.append(("safe_ppo", dict(data=missing, reward=distinct_characters, cost_model=str(models["cost"])),
                  "missing.jsonl.*row 2.*image 'img/missing-1.png' not found"))
    for k, (algorithm, options, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message) as caught:
            alignkit.train(algorithm, output_dir=tmp_path / f"run{k}", **{**run, **options})
        assert "\n" not in str(caught.value)
        assert not (tmp_path / f"run{k}" / "final").exists()
