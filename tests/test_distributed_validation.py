"""Validation (--eval-data) on 2 torchrun ranks (gloo, CPU) equals one process: every rank
validates at the same steps, the engine splits each chunk of held-out prompt groups across the
ranks (5 prompts x 4 samples in chunks of 4 prompts: the last chunk leaves rank 1 without a
prompt), the log-probs split rows; under FSDP2 with LoRA the policy and reference forwards run
in lockstep, and the root is resharded after them (checkpoint and final/ then save); multi-turn
(--env) held-out conversations are played with each round of turns split across the ranks. The eval rows equal one process's (rule rewards of the same samples exactly, the
KL to rounding), and so do the training rows. One torchrun launch."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import assert_runs_match, launch, read_params
from run_helpers import read_metrics, write_jsonl

import alignkit
from alignkit.eval.report import validation_points

PROMPTS = ["Write a short review.", "The movie", "Tell me", "What is two plus two?", "Say something nice",
           "A story about"]
HELD_OUT = ["The film was", "Once upon a time", "Describe the sea", "Good morning", "Name a colour"]
BASE = {"padding_free": False, "batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0,
        "scheduler": "constant", "max_new_tokens": 8, "group_size": 4, "reward": "dist_helpers:count_e",
        "beta": 0.05, "eval_steps": 2, "eval_samples": 4, "eval_k": "1,4", "gold_reward": "regex:e"}
CASES = {
    "grpo-eval": ("grpo", {}),
    # a checkpoint right after a validation (FSDP2 leaves the root unsharded after a forward)
    "grpo-eval-lora-fsdp2": ("grpo", {"strategy": "fsdp2", "lora_r": 4, "save_steps": 2}),
    # multi-turn: the held-out prompts played as conversations, each round's turns split by rank
    "grpo-eval-multiturn": ("grpo", {"env": "dist_helpers:TwoTurns", "max_turns": 2, "max_episode_tokens": 64}),
}
# eval/kl sums the engine's log-probs: a multi-turn round's later turns are sampled in rank blocks
# padded to other widths than one process's batch, which rounds their log-probs apart (~1e-6 each;
# measured 2e-5 relative on a sum of ~0.5)
KL_REL = {"grpo-eval-multiturn": 1e-4}
EVAL_KEYS = ("eval/reward", "eval/gold", "eval/pass@1", "eval/pass@4", "eval/length")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("two-ranks-validation")
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 3])
    held_out = write_jsonl(tmp / "held_out.jsonl", [{"prompt": p} for p in HELD_OUT])
    cases = [{"name": name, "algorithm": algorithm, "model": str(tiny_model_dir), "data": data,
              "overrides": {**BASE, **extra, "eval_data": held_out}} for name, (algorithm, extra) in CASES.items()]
    launch({"cases": cases, "out": str(tmp / "out")}, tmp)
    return tmp / "out", data, held_out


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_validate_as_one_process(runs, tiny_model_dir, tmp_path, name):
    out, data, held_out = runs
    algorithm, extra = CASES[name]
    single = {k: v for k, v in {**BASE, **extra}.items() if k != "strategy"}
    alignkit.train(algorithm, model=str(tiny_model_dir), data=data, eval_data=held_out, output_dir=tmp_path / "one",
                   progress=False, **single)
    two, one = read_metrics(out / name / "run"), read_metrics(tmp_path / "one")
    validated = [[p for p in validation_points(rows) if "eval/reward" in p] for rows in (two, one)]
    assert [p["step"] for p in validated[0]] == [0, 2, 3]
    assert_runs_match(two, one)
    for a, b in zip(*validated, strict=True):
        assert {k: a[k] for k in EVAL_KEYS} == {k: b[k] for k in EVAL_KEYS}, a["step"]
        assert a["eval/kl"] == pytest.approx(b["eval/kl"], rel=KL_REL.get(name, 1e-5), abs=1e-6), a["step"]
    rank0, rank1 = (read_params(out / name / f"params-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"
