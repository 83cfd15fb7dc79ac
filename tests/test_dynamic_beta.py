"""MM-DPO's dynamic beta (MM-RLHF dynamic reward scaling): the pure function against hand
computations, and the trainer feeding it a `reward_margin` column or a reward model's margins."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import read_metrics

import alignkit
from alignkit.objectives import mm_dpo_beta


def test_mm_dpo_beta_worked_example():
    """beta = 0.1, w = 0.5, k = 1:
    delta = 0      -> 1 - e^0 = 0          -> 0.1 * (1 + 0)            = 0.1
    delta = ln 2   -> 1 - 1/2 = 0.5        -> 0.1 * (1 + 0.25)         = 0.125
    delta = ln 4   -> 1 - 1/4 = 0.75       -> 0.1 * (1 + 0.375)        = 0.1375
    delta = -ln 3  -> 1 - 3 = -2           -> 0.1 * (1 - 1) = 0, clipped to min_beta 0.001
    and k = 2 at delta = ln 2 -> 1 - 1/4 = 0.75 -> 0.1375."""
    margins = torch.tensor([0.0, math.log(2), math.log(4), -math.log(3)])
    beta = mm_dpo_beta(margins, beta=0.1, weight=0.5, k=1.0)
    torch.testing.assert_close(beta, torch.tensor([0.1, 0.125, 0.1375, 0.001]))
    torch.testing.assert_close(mm_dpo_beta(torch.tensor([math.log(2)]), 0.1, 0.5, k=2.0), torch.tensor([0.1375]))
    # saturates at beta (1 + w) and never takes gradients from the margin
    margin = torch.tensor([50.0], requires_grad=True)
    saturated = mm_dpo_beta(margin, 0.1, 0.5)
    torch.testing.assert_close(saturated, torch.tensor([0.15]))
    assert not saturated.requires_grad


def _pairs(n: int, margin: float | None = None) -> list[dict]:
    rows = [{"prompt": f"Say something {'nice' if k % 2 else 'kind'}.", "chosen": " Great work, well done.",
             "rejected": " Bad."} for k in range(n)]
    return rows if margin is None else [dict(r, reward_margin=margin) for r in rows]


def _dpo(tiny_model_dir, tmp_path, name, data, **overrides):
    return alignkit.train("dpo", model=str(tiny_model_dir), data=data, output_dir=tmp_path / name, max_steps=3,
                          batch_size=4, lr=1e-2, device="cpu", dtype="float32", progress=False, logging_steps=1,
                          **overrides)


def test_a_constant_margin_is_dpo_with_the_scaled_beta(tiny_model_dir, tmp_path):
    """Every pair's margin ln 2 with w = 0.5, k = 1 gives beta_i = 0.125 (worked example above):
    the run logs dynamic_beta/mean = 0.125 and its loss and gradient norms equal plain DPO with
    beta = 0.125, step for step."""
    dynamic = _dpo(tiny_model_dir, tmp_path, "dynamic", _pairs(12, math.log(2)), beta=0.1, dynamic_beta=0.5)
    plain = _dpo(tiny_model_dir, tmp_path, "plain", _pairs(12, math.log(2)), beta=0.125)
    rows, expected = read_metrics(dynamic.output_dir), read_metrics(plain.output_dir)
    assert [r["dynamic_beta/mean"] for r in rows] == pytest.approx([0.125] * 3)
    for got, want in zip(rows, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def test_dynamic_beta_needs_margins_and_plain_dpo(tiny_model_dir, tmp_path):
    with pytest.raises(Exception, match=r"row 1.*dynamic_beta needs a numeric 'reward_margin' column"):
        _dpo(tiny_model_dir, tmp_path, "missing", _pairs(4), dynamic_beta=0.1)
    with pytest.raises(ValueError, match="dynamic_beta_rm scores the margins of dynamic_beta"):
        _dpo(tiny_model_dir, tmp_path, "no-w", _pairs(4), dynamic_beta_rm=str(tiny_model_dir))
    with pytest.raises(ValueError, match="dynamic_beta \\(w\\) must be >= 0"):
        _dpo(tiny_model_dir, tmp_path, "negative", _pairs(4, 1.0), dynamic_beta=-0.1)
    with pytest.raises(ValueError, match="dynamic_beta \\(MM-DPO\\) scales dpo's beta"):
        alignkit.train("ipo", model=str(tiny_model_dir), data=_pairs(4, 1.0), output_dir=tmp_path / "ipo",
                       max_steps=1, device="cpu", dynamic_beta=0.1)


def test_margins_from_a_vlm_reward_model_on_image_pairs(tmp_path):
    """`dynamic_beta_rm=DIR` with a VLM reward model: the margins come from scoring each image
    pair through `rm:DIR`, and step 1's logged mean beta (all 8 pairs in one batch) equals
    mean_i mm_dpo_beta(r(chosen_i) - r(rejected_i)) computed from that scorer directly."""
    from test_vlm_offline import colour_pairs, write_image_rows

    from alignkit.rewards import load_reward
    from alignkit.testing_vlm import build_tiny_vlm

    path = build_tiny_vlm(tmp_path / "vlm", "qwen2_vl")
    data = write_image_rows(tmp_path, colour_pairs(8, seed=0), "train")
    rm = alignkit.train("rm", model=str(path), data=data, output_dir=tmp_path / "rm", max_steps=2, batch_size=8,
                        lr=1e-2, device="cpu", dtype="float32", progress=False)
    run = alignkit.train("dpo", model=str(path), data=data, output_dir=tmp_path / "dpo", max_steps=1, batch_size=8,
                         lr=1e-3, device="cpu", dtype="float32", progress=False, beta=0.1, dynamic_beta=0.5,
                         dynamic_beta_k=2.0, dynamic_beta_rm=str(rm.final_dir))
    scorer = load_reward(f"rm:{rm.final_dir}")
    rows = colour_pairs(8, seed=0)
    prompts, images = [r["prompt"] for r in rows], [r["images"] for r in rows]
    margins = scorer(prompts, [r["chosen"] for r in rows], images=images) - scorer(
        prompts, [r["rejected"] for r in rows], images=images)
    assert margins.abs().max() > 0
    expected = float(mm_dpo_beta(margins, 0.1, 0.5, k=2.0).mean())
    assert read_metrics(run.output_dir)[0]["dynamic_beta/mean"] == pytest.approx(expected, rel=1e-5)
