"""d3po (image pairs, and sampled pairs with --reward) and prdp on 2 torchrun ranks (gloo, CPU)
equal one process on the same global batch, on the 4x4 pipeline of alignkit.testing_diffusion:
2 steps of 4 pairs, each rank computing 2 of them from its rows of the global batch's noise.

One launch runs every 2-rank case (a launch costs 10-15 s here): the three algorithms, a prdp
run cut after step 1 and resumed on 2 ranks, and a batch too small to split (refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from dist_helpers import launch, read_params, relative_error  # noqa: E402
from run_helpers import read_metrics  # noqa: E402

import alignkit  # noqa: E402
from alignkit.testing_diffusion import build_tiny_pipeline, write_colour_pairs  # noqa: E402

# The rewards of the sampled cases. prdp's: at each round's start pi = pi_old, so its predicted
# reward difference is float noise: the UNet's CPU kernels round differently at batch 2 (a rank)
# and 8 (one process) (1.8e-7 measured on outputs of ~0.16), and its loss (dr / T - noise)^2
# differs by ~2 noise / (dr / T) between them: 1.3e-5 relative with redness's differences of
# ~0.1; tenfold redness keeps it ~1e-6. It also records how many images each call scored, per
# torchrun rank ("single": one process). d3po's: redness rounded to 1/20, so pairs tie.
REWARDS_FILE = """import os
from pathlib import Path

from alignkit.diffusion.rewards import redness


def tenfold_redness(prompts, images, **columns):
    with open(Path(__file__).with_name(f"scored-{os.environ.get('RANK', 'single')}.txt"), "a") as log:
        log.write(f"{len(images)}\\n")
    return [10.0 * value for value in redness(prompts, images)]


def rounded_redness(prompts, images, **columns):
    return [float(round(20.0 * value)) for value in redness(prompts, images)]
"""
BASE = {"batch_size": 4, "max_steps": 2, "lr": 3e-3, "seed": 3, "num_steps": 3, "guidance_scale": 1.0}
# name: (algorithm, uses the pair images, overrides)
CASES: dict[str, tuple[str, bool, dict]] = {
    "d3po-pairs": ("d3po", True, {"adapter": "none"}),  # the whole UNet, a frozen copy as reference
    # LoRA, guided sampling, a reward with ties (weight 0: the global count of teaching pairs matters)
    "d3po-reward": ("d3po", False, {"reward": "{tmp}/rewards.py:rounded_redness", "guidance_scale": 2.0}),
    # two updates per round; at the default clip_eps 1e-4 the second is clipped almost wholly and
    # its gradient cancels to 1/8 of the first (relative float error 7e-6); 0.05 keeps it whole
    "prdp": ("prdp", False, {"reward": "{tmp}/rewards.py:tenfold_redness", "lora_r": 2, "inner_epochs": 2,
                             "clip_eps": 0.05}),
}
RESUMED = {"name": "prdp-resumed", "of": "prdp", "interrupt_at": 1, "overrides": {"save_steps": 1}}
TOO_SMALL = {"name": "d3po-batch1", "of": "d3po-pairs", "overrides": {"batch_size": 1}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("diffusion-two-ranks")
    (tmp / "rewards.py").write_text(REWARDS_FILE)
    return {"model": str(build_tiny_pipeline(tmp / "pipe4", image_size=4)),
            "pairs": str(write_colour_pairs(tmp / "pairs", n=6, size=4)), "tmp": str(tmp)}


def case_spec(case: str, inputs: dict[str, str], **extra) -> dict:
    """The worker's spec of `case` of CASES; `extra` adds keys or replaces them (a new name)."""
    algorithm, uses_pairs, overrides = CASES[case]
    overrides = {k: v.format(tmp=inputs["tmp"]) if isinstance(v, str) else v for k, v in overrides.items()}
    spec = {"name": case, "algorithm": algorithm, "model": inputs["model"],
            "data": inputs["pairs"] if uses_pairs else None, "overrides": {**BASE, **overrides}}
    return {**spec, **extra}


@pytest.fixture(scope="module")
def runs(inputs) -> Path:
    """Every 2-rank case, trained in one launch; returns the launch's output directory."""
    tmp = Path(inputs["tmp"])
    cases = [case_spec(name, inputs) for name in CASES]
    resumed = case_spec(RESUMED["of"], inputs, name=RESUMED["name"], interrupt_at=RESUMED["interrupt_at"])
    resumed["overrides"].update(RESUMED["overrides"])
    too_small = case_spec(TOO_SMALL["of"], inputs, name=TOO_SMALL["name"], expect_error=True)
    too_small["overrides"].update(TOO_SMALL["overrides"])
    out = tmp / "out"
    launch({"cases": [*cases, resumed, too_small], "out": str(out), "audit_writes": True}, tmp)
    return out


_single: dict[str, tuple[list[dict], dict[str, torch.Tensor]]] = {}


def one_process(name: str, inputs: dict[str, str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The same run in this process (cached): its metrics and final parameters."""
    if name not in _single:
        spec = case_spec(name, inputs)
        out = Path(inputs["tmp"]) / f"single-{name}"
        result = alignkit.train(spec["algorithm"], model=spec["model"], data=spec["data"], output_dir=out,
                                progress=False, **spec["overrides"])
        params = {n: p.detach().float().clone() for n, p in result.model.named_parameters()}
        _single[name] = (read_metrics(out), params)
    return _single[name]


def two_ranks(out: Path, case: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Metrics and rank 0's parameters of a 2-rank case, after checking the ranks are bit-identical."""
    rank0 = read_params(out / case / "params-rank0.safetensors")
    rank1 = read_params(out / case / "params-rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"
    return read_metrics(out / case / "run"), rank0


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_and_log_as_one_process(runs, inputs, name):
    """Loss and grad norm per step to 1e-5 relative; every other logged metric (reward mean and
    std, ties, margins, accuracies, clip ratio, log-probs) to 1e-5 at step 1 and 1e-4 after
    (accuracies only where the margins are not float noise); the trained parameters to 1e-4."""
    two, params = two_ranks(runs, name)
    one, one_params = one_process(name, inputs)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one, strict=True):
        assert a.keys() == b.keys(), a.keys() ^ b.keys()
        for key in ("loss", "grad_norm"):
            assert relative_error(a[key], b[key]) < 1e-5, (a["step"], key, a[key], b[key])
        tolerance = 1e-5 if a["step"] == 1 else 1e-4
        for key, value in b.items():
            if key == "rewards/accuracies" and abs(b["rewards/margins"]) < 1e-5:
                # step 1, policy = reference: the whole-UNet case's margins are float noise between
                # the trained UNet's forward and its frozen copy's (1.3e-6), whose signs decide it
                continue
            assert a[key] == pytest.approx(value, rel=tolerance, abs=tolerance), (a["step"], key, a[key], value)
    if name != "d3po-pairs":
        assert "reward/mean" in one[0] and ("ties" in one[0]) == (CASES[name][0] == "d3po")
    assert params.keys() == one_params.keys()
    moved = max(float((params[n] - one_params[n]).abs().max()) for n in params)
    assert moved <= 1e-4, (name, moved)
    assert all(r["grad_norm"] > 0 for r in one), "no gradient: the comparison would be empty"


@pytest.mark.parametrize("name", list(CASES))
def test_rank_zero_alone_writes_the_run_directory(runs, name):
    run_dir = runs / name / "run"
    rank0 = json.loads((runs / name / "writes-rank0.json").read_text())
    rank1 = json.loads((runs / name / "writes-rank1.json").read_text())
    assert rank1 == [], rank1
    assert f"{run_dir}/config.yaml" in rank0 and f"{run_dir}/metrics.jsonl" in rank0
    assert str(run_dir / "final") in rank0
    assert (run_dir / "final" / "model_index.json").is_file()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # one writer: one line per step


def test_a_resumed_two_rank_run_reproduces_its_metrics(runs):
    """prdp cut after step 1 (checkpoint at 1) and resumed on 2 ranks: the same metrics.jsonl
    as the uninterrupted 2-rank run, and the same parameters, bit for bit."""
    resumed, resumed_params = two_ranks(runs, RESUMED["name"])
    full, full_params = two_ranks(runs, RESUMED["of"])
    assert resumed == full
    assert all(torch.equal(resumed_params[n], full_params[n]) for n in full_params)
    writes = json.loads((runs / RESUMED["name"] / "writes-rank0.json").read_text())
    assert any("/checkpoints/" in path for path in writes)  # the resumed half wrote none (step 2 is the last)
    assert json.loads((runs / RESUMED["name"] / "writes-rank1.json").read_text()) == []


def test_each_rank_scores_its_own_images(runs, inputs):
    """prdp's reward on 2 ranks: every call scores one rank's 2 pairs x 2 chains, not the batch's 8."""
    one_process("prdp", inputs)
    scored = {who: (Path(inputs["tmp"]) / f"scored-{who}.txt").read_text().split() for who in ("0", "1", "single")}
    assert scored["0"] == scored["1"] == ["4"] * 4  # prdp and prdp-resumed, 2 steps each
    assert scored["single"] == ["8", "8"]


def test_a_batch_part_keeps_its_rows_of_the_global_draw():
    """Rows (1, 3) of a batch of 4: the same numbers as rows 1 and 3 of one process's draw, for
    every draw in turn; a part's draw of the wrong size is refused."""
    from alignkit.diffusion.noise import BatchPart, standard_normal

    whole = torch.Generator().manual_seed(5)
    part = BatchPart(torch.Generator().manual_seed(5), 4, (1, 3))
    for shape in ((4, 4, 2, 2), (4, 3)):
        full = standard_normal(shape, whole)
        assert torch.equal(standard_normal((2, *shape[1:]), part), full[[1, 3]])
    with pytest.raises(ValueError, match="a draw of 4 rows for a batch part of 2"):
        part.randn((4, 3))
    assert torch.equal(BatchPart(whole, 3).gather(torch.arange(3.0)), torch.arange(3.0))  # one process: as is


def test_a_batch_smaller_than_the_ranks_is_refused(runs):
    for rank in (0, 1):
        message = (runs / TOO_SMALL["name"] / f"error-rank{rank}.txt").read_text()
        assert message.startswith("--batch-size 1: a step of 1 pair(s)"), message
        assert "cannot be split over 2 ranks" in message


def test_fsdp2_and_hft_are_refused_naming_the_flag(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"^--strategy fsdp2: d3po is data-parallel with --strategy ddp only"):
        alignkit.train("d3po", model=inputs["model"], data=inputs["pairs"], output_dir=tmp_path / "x",
                       strategy="fsdp2", max_steps=1)
    with pytest.raises(ValueError, match=r"^--set hft=true: prdp trains a UNet"):
        alignkit.train("prdp", model=inputs["model"], reward="redness", output_dir=tmp_path / "y", adapter="none",
                       hft=True, max_steps=1)
