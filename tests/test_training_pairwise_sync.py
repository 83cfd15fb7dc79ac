"""TR-DPO (Gorbatovski et al. 2024): the live reference that `ref_sync` moves toward the policy,
theta_ref <- alpha theta + (1 - alpha) theta_ref every tau steps (hard: alpha = 1), for full
fine-tuning (a deep copy) and LoRA (a copy of the adapter), checkpointed and resumed exactly."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from run_helpers import assert_resumed_matches, read_metrics, run_interrupted_and_resumed
from safetensors.torch import load_file

import alignkit
from alignkit.data import load_rows
from alignkit.models import apply_lora, load_model
from alignkit.testing import synthetic_pairs
from alignkit.training.offline.pairwise_options import LiveReference
from alignkit.training.offline.tasks import make_task
from alignkit.training.run.config import TrainConfig


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def task_model_batch(tiny_model_dir, lora_r: int, **hparams):
    config = TrainConfig(algorithm="dpo", model=str(tiny_model_dir)).apply_overrides(hparams)
    task = make_task(config)
    model, tokenizer = load_model(str(tiny_model_dir))
    if lora_r:
        model = apply_lora(model, r=lora_r, alpha=8, dropout=0.0, target_modules="all-linear", task="causal_lm")
    examples, _ = task.tokenize(load_rows(synthetic_pairs(6, seed=4)), tokenizer)
    return task, model, task.collate(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_soft_sync_mixes_by_alpha_and_hard_sync_copies_the_policy(tiny_model_dir, lora_r):
    task, model, batch = task_model_batch(tiny_model_dir, lora_r, ref_sync="soft")
    task.attach_model(model)
    reference = task.live_reference
    assert reference is not None and reference.adapter == bool(lora_r)
    perturb(model, seed=0)
    before = {name: ref.clone() for name, ref in reference.reference_tensors()}
    policy = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any(not torch.equal(before[n], policy[n]) for n in before)

    reference.sync(model, 0.6)
    for name, ref in reference.reference_tensors():
        torch.testing.assert_close(ref, 0.6 * policy[name] + 0.4 * before[name])

    # the reference forward leaves the policy's weights exactly as they were
    logps = task.pair_logps(model, batch)
    for name, param in model.named_parameters():
        assert torch.equal(param, policy[name]), name
    assert not torch.allclose(logps.ref_chosen, logps.chosen)

    reference.sync(model, 1.0)  # hard sync
    for name, ref in reference.reference_tensors():
        assert torch.equal(ref, policy[name]), name
    logps = task.pair_logps(model, batch)
    torch.testing.assert_close(logps.ref_chosen, logps.chosen.detach())
    torch.testing.assert_close(logps.ref_rejected, logps.rejected.detach())


@pytest.mark.parametrize("lora_r", [0, 4])
def test_after_a_hard_sync_the_reference_equals_the_policy(tiny_model_dir, tmp_path, lora_r):
    """Sync after steps 3 and 6: steps 4 and 7 start with pi_ref = pi_theta, so their first
    micro-batch has zero implicit rewards and DPO loss log 2; other steps do not."""
    alignkit.train(
        "dpo", model=str(tiny_model_dir), data=synthetic_pairs(48, seed=1), output_dir=tmp_path / "run",
        batch_size=8, max_steps=7, lr=1e-2, lora_r=lora_r, warmup_ratio=0.0, progress=False,
        ref_sync="hard", ref_sync_steps=3,
    )
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    for step in (1, 4, 7):
        assert rows[step]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5), step
        assert rows[step]["rewards/rejected"] == pytest.approx(0.0, abs=1e-5), step
        assert rows[step]["loss"] == pytest.approx(math.log(2), abs=1e-5), step
    for step in (3, 6):
        assert rows[step]["rewards/margins"] > 0.01, step  # learned since the last sync


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_with_ref_sync_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, lora_r):
    """Checkpoints at steps 3 and 6 carry the reference (synced after steps 2 and 4 by then);
    a run cut at step 5 resumes from step 3 and must reproduce every metric exactly."""
    common = dict(
        model=str(tiny_model_dir), data=synthetic_pairs(24, seed=3), batch_size=4, max_steps=8,
        lr=5e-3, save_steps=3, lora_r=lora_r, progress=False,
        ref_sync="soft", ref_sync_alpha=0.5, ref_sync_steps=2,
    )

    def reference_is_checkpointed(cut_dir):
        saved = load_file(str(cut_dir / "checkpoints" / "step-000003" / "extra.safetensors"))
        assert saved and all(key.startswith("ref_model.") for key in saved)
        if lora_r:
            assert all("lora" in key for key in saved)  # LoRA keeps only the reference adapter

    runs = run_interrupted_and_resumed(partial(alignkit.train, "dpo", **common), tmp_path, at=5,
                                       inspect_cut=reference_is_checkpointed)
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=8)


def test_ref_sync_options_are_checked(tiny_model_dir, tmp_path):
    run = dict(model=str(tiny_model_dir), data=synthetic_pairs(4), output_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="ref_sync must be"):
        alignkit.train("dpo", ref_sync="sometimes", **run)
    with pytest.raises(ValueError, match="ref_sync_alpha"):
        alignkit.train("dpo", ref_sync="soft", ref_sync_alpha=1.5, **run)
    model, _ = load_model(str(tiny_model_dir))
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", task="causal_lm")
    with pytest.raises(ValueError, match="ref-model"):
        LiveReference(lora, reference=model)
