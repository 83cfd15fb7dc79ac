"""Training on image rows on 2 torchrun ranks (gloo, CPU) equals one process, on the tiny
Qwen2-VL (sft, dpo, simpo, rm, cost, grpo, rloo, ppo, dapo, safe_ppo with a VLM cost model) and
LLaVA (sft, dpo, rm, grpo, ppo) under DDP, rm and grpo with LoRA, and sft and grpo under FSDP2. Offline each rank
collates the pixels of its own rows; online each rank samples a block of whole prompt groups
with their own pixel inputs (every prompt a different image, and a reward that is a checksum of
the sampled ids, so a rank sampling with another prompt's pixels changes reward/mean: checked
by hand), every rank holding the global batch with each row's pixels. Losses and grad norms to
1e-5 relative, reward/mean, reward/std and response_length equal, final weights to 1e-4, the
ranks bit-identical. A VLM reward model's LM head (unused: the score head replaces it) stays
frozen, else DDP waits for its gradient. One torchrun launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import assert_runs_match, launch, read_params
from run_helpers import read_metrics
from test_vlm_offline import QUESTION, colour_pairs

import alignkit
from alignkit.testing_vlm import COLOURS, build_tiny_vlm, draw_shape_image, write_image_rows

OFFLINE = {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0, "device": "cpu", "dtype": "float32"}
ONLINE = {**OFFLINE, "batch_size": 2, "group_size": 4, "max_new_tokens": 6, "scheduler": "constant",
          "reward": "test_distributed_vlm:token_checksum"}
COST_MODEL = "<cost model>"  # stands for the VLM cost model (random head) the fixture saves
CASES = {  # name: (architecture, algorithm, data, overrides)
    "qwen-sft": ("qwen2_vl", "sft", "sft", {}),
    "qwen-sft-fsdp2": ("qwen2_vl", "sft", "sft", {"strategy": "fsdp2"}),
    "qwen-dpo": ("qwen2_vl", "dpo", "pairs", {}),
    "qwen-simpo": ("qwen2_vl", "simpo", "pairs", {}),
    "qwen-rm": ("qwen2_vl", "rm", "pairs", {}),
    "qwen-cost": ("qwen2_vl", "cost", "safety_pairs", {}),
    "qwen-grpo": ("qwen2_vl", "grpo", "prompts", {}),
    "qwen-rloo": ("qwen2_vl", "rloo", "prompts", {}),
    "qwen-ppo": ("qwen2_vl", "ppo", "prompts", {}),
    "qwen-dapo": ("qwen2_vl", "dapo", "prompts", {}),
    "qwen-safe_ppo": ("qwen2_vl", "safe_ppo", "prompts", {"cost_model": COST_MODEL, "cost_limit": 0.0}),
    "qwen-rm-lora": ("qwen2_vl", "rm", "pairs", {"lora_r": 4}),
    "qwen-grpo-lora": ("qwen2_vl", "grpo", "prompts", {"lora_r": 4}),
    "qwen-grpo-fsdp2": ("qwen2_vl", "grpo", "prompts", {"strategy": "fsdp2"}),
    "llava-sft": ("llava", "sft", "sft", {}),
    "llava-dpo": ("llava", "dpo", "pairs", {}),
    "llava-rm": ("llava", "rm", "pairs", {}),
    "llava-grpo": ("llava", "grpo", "prompts", {}),
    "llava-ppo": ("llava", "ppo", "prompts", {}),
}


def token_checksum(prompts, completions, completion_ids, **columns) -> list[float]:
    """A rule reward that any flipped token is likely to change: the sum of the sampled token
    ids modulo 7 (so equal reward means and stds across runs mean equal samples)."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def write_data(folder: Path) -> dict[str, str]:
    pairs = colour_pairs(8, seed=0)
    sft = [{"prompt": r["prompt"], "completion": r["chosen"], "images": r["images"]} for r in colour_pairs(8, seed=1)]
    safety = [{**r, "chosen_is_safe": True, "rejected_is_safe": False} for r in colour_pairs(8, seed=2)]
    prompts = [{"prompt": [{"role": "user", "content": QUESTION}],  # a different image per prompt
                "images": [draw_shape_image("square", colour, (4 * k, 4 * k, 4 * k + 40, 4 * k + 40))]}
               for k, colour in enumerate(sorted(COLOURS))]
    return {name: write_image_rows(folder, rows, name)
            for name, rows in (("pairs", pairs), ("sft", sft), ("safety_pairs", safety), ("prompts", prompts))}


def save_cost_model(vlm_dir: Path, folder: Path) -> str:
    """A VLM cost model: the tiny VLM with a seeded random score head, saved as training would."""
    from alignkit.models.vlm_reward import load_vlm_reward

    torch.manual_seed(0)
    model, processor = load_vlm_reward(str(vlm_dir), device="cpu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def overrides_of(name: str, resources: dict[str, str]) -> dict:
    arch, algorithm, _, extra = CASES[name]
    base = ONLINE if CASES[name][2] == "prompts" else OFFLINE
    return {**base, **{k: resources.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-ranks-vlm")
    models = {arch: build_tiny_vlm(tmp / arch, arch) for arch in ("qwen2_vl", "llava")}
    data = write_data(tmp / "data")
    resources = {COST_MODEL: save_cost_model(models["qwen2_vl"], tmp / "cost-model")}
    cases = [{"name": name, "algorithm": algorithm, "model": str(models[arch]), "data": data[kind],
              "overrides": overrides_of(name, resources)} for name, (arch, algorithm, kind, _) in CASES.items()]
    launch({"cases": cases, "out": str(tmp / "out")}, tmp)
    yield tmp / "out", models, data, resources


def one_process(name: str, models: dict, data: dict, resources: dict, root: Path):
    arch, algorithm, kind, _ = CASES[name]
    overrides = {k: v for k, v in overrides_of(name, resources).items() if k != "strategy"}
    out = root / f"single-{name}"
    result = alignkit.train(algorithm, model=str(models[arch]), data=data[kind], output_dir=out, progress=False,
                            **overrides)
    return read_metrics(out), {n: p.detach().float().clone() for n, p in result.model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_on_image_rows_equal_one_process(runs, name):
    out, models, data, resources = runs
    one_metrics, one_params = one_process(name, models, data, resources, out.parent)
    two_metrics = read_metrics(out / name / "run")
    assert_runs_match(two_metrics, one_metrics, 1e-6 if "cost_model" in CASES[name][3] else 0.0)
    rank0, rank1 = (read_params(out / name / f"params-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"
    for n, value in one_params.items():
        torch.testing.assert_close(rank0[n], value, rtol=0, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_a_vlm_reward_models_lm_head_is_frozen_unless_tied_to_the_embeddings(tmp_path):
    """`set_vlm_trainable` leaves the reward model's unused LM head out of the trainable set (so
    DDP does not wait for its gradient); a head tied to the input embeddings stays trainable."""
    from torch import nn

    from alignkit.models.vlm import set_vlm_trainable, unused_output_head
    from alignkit.models.vlm_reward import load_vlm_reward

    model, _ = load_vlm_reward(str(build_tiny_vlm(tmp_path / "vlm", "qwen2_vl")), device="cpu")
    set_vlm_trainable(model, ("language", "projector"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "vlm.lm_head.weight" not in trainable
    assert {"score.weight", "vlm.model.language_model.embed_tokens.weight"} <= trainable

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    class TiedForSequenceClassification(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vlm = Tied()

    assert unused_output_head(TiedForSequenceClassification()) == []
    untied = TiedForSequenceClassification()
    untied.vlm.head.weight = nn.Parameter(torch.zeros(5, 3))
    assert unused_output_head(untied) == [untied.vlm.head.weight]
