"""The offline trainer on 2 torchrun ranks (gloo, CPU) equals one process on the same global
batch: sft, dpo, simpo, kto and rm, under DDP and FSDP2, with and without LoRA, on rows of
unequal lengths (so per-rank means would be wrong). Plus: the wrapper-bypass guard, an
interrupted 2-rank run resumed, a 2-rank checkpoint resumed by one process, a killed rank, and
the multi-node torchrun line through the CLI (`-m alignkit train`).

One torchrun launch runs all the 2-rank cases (a launch costs 10-15 s here)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import (
    TORCHRUN,
    WORKER,
    environment,
    free_port,
    in_namespace,
    launch,
    private_network,
    read_params,
    relative_error,
    torchrun_args,
)
from run_helpers import read_metrics, write_jsonl

import alignkit

WORDS = ["good", "bad", "fine", "great", "awful", "nice", "sad", "happy"]
BASE = {"batch_size": 4, "max_steps": 4, "lr": 1e-2, "warmup_ratio": 0.0}
ALGORITHMS = {"sft": "sft", "dpo": "pairs", "simpo": "pairs", "kto": "unpaired", "rm": "pairs"}
CASES = [(algorithm, strategy, lora) for strategy in ("ddp", "fsdp2") for lora in (0, 4) for algorithm in ALGORITHMS]
RESUME = {"max_steps": 6, "save_steps": 2, "grad_accum": 2, "strategy": "fsdp2"}
ENSEMBLE = {"members": 2, "max_steps": 3}
SHARED_TRUNK = {"members": 2, "shared_trunk": True}
DROPOUT = {"lora_r": 4, "lora_dropout": 0.5, "max_steps": 5, "save_steps": 1}
# HFT (the frozen half's gradients dropped after the all-reduce / reduce-scatter) and SSF
METHODS = {"dpo-ddp-hft": {"strategy": "ddp", "hft": True, "hft_round_steps": 2},
           "dpo-fsdp2-hft": {"strategy": "fsdp2", "hft": True, "hft_round_steps": 2, "weight_decay": 0.1},
           "dpo-fsdp2-ssf": {"strategy": "fsdp2", "adapter": "ssf"}}


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_data(folder: Path) -> dict[str, str]:
    """Rows whose lengths vary 1-14 words, so the ranks' token counts differ."""
    rng = random.Random(0)
    sft = [{"prompt": f"Say {_phrase(rng, 1, 4)}.", "completion": " " + _phrase(rng, 1, 14)} for _ in range(32)]
    pairs = [{"prompt": f"Review {_phrase(rng, 1, 4)}.", "chosen": " " + _phrase(rng, 1, 12),
              "rejected": " " + _phrase(rng, 1, 12)} for _ in range(32)]
    unpaired = [{"prompt": f"Review {_phrase(rng, 1, 4)}.", "completion": " " + _phrase(rng, 1, 12),
                 "label": bool(i % 3)} for i in range(32)]
    return {name: write_jsonl(folder / f"{name}.jsonl", rows)
            for name, rows in (("sft", sft), ("pairs", pairs), ("unpaired", unpaired))}


def case_name(algorithm: str, strategy: str, lora: int) -> str:
    return f"{algorithm}-{strategy}-r{lora}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every 2-rank case, trained in one launch; returns (out dir, data files)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    data = write_data(tmp)
    cases = [{"name": case_name(a, s, r), "algorithm": a, "model": str(tiny_model_dir), "data": data[ALGORITHMS[a]],
              "overrides": {**BASE, "strategy": s, "lora_r": r}} for a, s, r in CASES]
    cases.append({"name": "dpo-resumed", "algorithm": "dpo", "model": str(tiny_model_dir), "data": data["pairs"],
                  "overrides": {**BASE, **RESUME}, "interrupt_at": 3})
    cases.append({"name": "ensemble-replicated", "algorithm": "rm_ensemble", "model": str(tiny_model_dir),
                  "data": data["pairs"], "overrides": {**BASE, **SHARED_TRUNK}})
    for name, interrupt in (("sft-dropout", None), ("sft-dropout-resumed", 3)):
        cases.append({"name": name, "algorithm": "sft", "model": str(tiny_model_dir), "data": data["sft"],
                      "overrides": {**BASE, **DROPOUT}, **({"interrupt_at": interrupt} if interrupt else {})})
    cases.append({"name": "rm_ensemble", "algorithm": "rm_ensemble", "model": str(tiny_model_dir),
                  "data": data["pairs"], "overrides": {**BASE, **ENSEMBLE}})
    cases += [{"name": name, "algorithm": "dpo", "model": str(tiny_model_dir), "data": data["pairs"],
               "overrides": {**BASE, **overrides}} for name, overrides in METHODS.items()]
    launch({"cases": cases, "out": str(tmp / "out"), "guard": True}, tmp)
    return tmp / "out", data


_single: dict[tuple, tuple] = {}


def one_process(algorithm: str, lora: int, model_dir, data: str, root: Path, **overrides):
    """The same run in this process (cached: ddp and fsdp2 share it)."""
    key = (algorithm, lora, data, tuple(sorted(overrides.items())))
    if key not in _single:
        out = root / f"single-{algorithm}-r{lora}-{len(_single)}"
        result = alignkit.train(algorithm, model=str(model_dir), data=data, output_dir=out, progress=False,
                                **{**BASE, "lora_r": lora, **overrides})
        params = {n: p.detach().float().clone() for n, p in result.model.named_parameters()}
        _single[key] = (read_metrics(out), params)
    return _single[key]


def assert_runs_match(two: list[dict], one: list[dict], metrics=("rewards/margins", "rewards/accuracies",
                                                                     "logps/chosen", "logps/completion")) -> None:
    """Loss to 1e-5 and grad norm to 3e-5 relative, step by step, and the row-mean metrics
    `metrics`. The grad norm is a float32 sum over every parameter of gradients reduced in another
    order on two ranks: the reward model's measured 1.05e-5 is that rounding, not a lost term (a
    lost row or a per-rank mean is off by whole percents)."""
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        for key, tolerance in (("loss", 1e-5), ("grad_norm", 3e-5)):
            assert relative_error(a[key], b[key]) < tolerance, (a["step"], key, a[key], b[key])
        for key in metrics:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def assert_params_match(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> None:
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize(("algorithm", "strategy", "lora"), CASES, ids=[case_name(*c) for c in CASES])
def test_two_ranks_equal_one_process(runs, tiny_model_dir, algorithm, strategy, lora):
    out, data = runs
    case = out / case_name(algorithm, strategy, lora)
    one_metrics, one_params = one_process(algorithm, lora, tiny_model_dir, data[ALGORITHMS[algorithm]], out.parent)
    # KTO's class metrics average over the chosen (or rejected) rows only: ranks weigh by those
    assert_runs_match(read_metrics(case / "run"), one_metrics,
                      ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen") if algorithm == "kto" else
                      ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/completion"))
    rank0, rank1 = read_params(case / "params-rank0.safetensors"), read_params(case / "params-rank1.safetensors")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"
    assert_params_match(rank0, one_params)
    assert (case / "run" / "final" / "config.json").exists()


@pytest.mark.parametrize("name", list(METHODS))
def test_hft_and_ssf_on_two_ranks_equal_one_process(runs, tiny_model_dir, name):
    out, data = runs
    overrides = {k: v for k, v in METHODS[name].items() if k != "strategy"}
    one_metrics, one_params = one_process("dpo", 0, tiny_model_dir, data["pairs"], out.parent, **overrides)
    assert_runs_match(read_metrics(out / name / "run"), one_metrics)
    assert_params_match(read_params(out / name / "params-rank0.safetensors"), one_params)


def test_rank_zero_alone_writes_the_run_files(runs):
    out, _ = runs
    run = out / case_name("dpo", "fsdp2", 0) / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "final", "metrics.jsonl",
                                                      "reference_logps.safetensors", "run.json"]
    assert len(read_metrics(run)) == BASE["max_steps"]  # one writer: no interleaved lines


def test_interrupted_two_rank_run_resumes_to_the_same_metrics(runs, tiny_model_dir):
    out, data = runs
    one_metrics, one_params = one_process("dpo", 0, tiny_model_dir, data["pairs"], out.parent, **RESUME)
    assert_runs_match(read_metrics(out / "dpo-resumed" / "run"), one_metrics)
    assert_params_match(read_params(out / "dpo-resumed" / "params-rank0.safetensors"), one_params)


def test_two_rank_fsdp2_checkpoint_resumes_in_one_process(runs, tiny_model_dir, tmp_path):
    out, data = runs
    run = tmp_path / "run"
    shutil.copytree(out / "dpo-resumed" / "run", run)
    shutil.rmtree(run / "final")
    assert (run / "checkpoints" / "step-000004" / "state.json").exists()
    alignkit.train("dpo", model=str(tiny_model_dir), data=data["pairs"], output_dir=tmp_path / "unused",
                   resume=str(run), progress=False, **{**BASE, **RESUME})
    assert_runs_match(read_metrics(run), read_metrics(out / "dpo-resumed" / "run"))


def test_a_forward_around_the_wrapper_raises(runs):
    out, _ = runs
    for rank in (0, 1):
        outcome = json.loads((out / f"guard-rank{rank}.json").read_text())
        assert outcome["through_wrapper"] == "ok"
        assert "outside its DDP wrapper" in outcome["bypass"]


def test_ranks_draw_their_own_dropout_masks_and_resume_them(runs):
    """With LoRA dropout each rank draws its own masks (rank 0 the stream one process would use,
    rank 1 a reseeded one; DDP keeps the weights equal), every rank's RNG state is checkpointed,
    and an interrupted run resumes to exactly the uninterrupted run's metrics and weights."""
    from safetensors.torch import load_file

    out, _ = runs
    rng = load_file(str(out / "sft-dropout" / "run" / "checkpoints" / "step-000004" / "rng.safetensors"))
    assert {"torch_cpu", "torch_cpu.rank1", "torch_shared"} <= set(rng)
    assert not torch.equal(rng["torch_cpu"], rng["torch_cpu.rank1"])
    full, resumed = read_metrics(out / "sft-dropout" / "run"), read_metrics(out / "sft-dropout-resumed" / "run")
    assert [r["loss"] for r in full] == [r["loss"] for r in resumed]
    weights = [read_params(out / name / "params-rank0.safetensors") for name in ("sft-dropout", "sft-dropout-resumed")]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    rank1 = read_params(out / "sft-dropout" / "params-rank1.safetensors")
    assert all(torch.equal(weights[0][n], rank1[n]) for n in rank1)


def test_reward_ensemble_members_train_data_parallel(runs, tiny_model_dir, tmp_path):
    """rm_ensemble's members are full `rm` runs: data-parallel under torchrun, rank 0 moving
    them into final/ and writing ensemble.json."""
    from safetensors.torch import load_file

    out, data = runs
    run = out / "rm_ensemble" / "run"
    alignkit.train("rm_ensemble", model=str(tiny_model_dir), data=data["pairs"], output_dir=tmp_path / "one",
                   progress=False, **{**BASE, **ENSEMBLE})
    assert_runs_match(read_metrics(run), read_metrics(tmp_path / "one"), ("rewards/accuracies",))
    assert json.loads((run / "final" / "ensemble.json").read_text())["members"] == ["member_0", "member_1"]
    for member in ("member_0", "member_1"):
        two, one = (load_file(str(d / "final" / member / "model.safetensors")) for d in (run, tmp_path / "one"))
        assert_params_match(two, one)


def test_head_loops_on_frozen_features_run_whole_on_every_rank(runs, tiny_model_dir, tmp_path):
    """rm_ensemble's shared trunk fits heads on precomputed features (seconds, no collectives):
    every rank runs it whole, rank 0 into the run directory, the others into scratch files;
    the result equals one process and each rank reports rank 0's directory."""
    from safetensors.torch import load_file

    out, data = runs
    run = out / "ensemble-replicated" / "run"
    alignkit.train("rm_ensemble", model=str(tiny_model_dir), data=data["pairs"], output_dir=tmp_path / "one",
                   progress=False, **{**BASE, **SHARED_TRUNK})
    assert read_metrics(run) == read_metrics(tmp_path / "one")
    for member in ("member_0", "member_1"):
        two, one = (load_file(str(d / "final" / member / "model.safetensors")) for d in (run, tmp_path / "one"))
        assert_params_match(two, one)
    for rank in (0, 1):
        assert (out / "ensemble-replicated" / f"final-rank{rank}.txt").read_text() == str(run / "final")


def test_a_killed_rank_ends_the_run_with_an_error_naming_it(tmp_path, tiny_model_dir):
    data = write_data(tmp_path)
    case = {"name": "killed", "algorithm": "sft", "model": str(tiny_model_dir), "data": data["sft"],
            "overrides": {**BASE, "max_steps": 200, "batch_size": 2}}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": [case], "out": str(tmp_path / "out"), "die_at": {"rank": 1, "step": 2}}))
    started = time.monotonic()
    done = subprocess.run(in_namespace([*torchrun_args(2, free_port()), str(WORKER), str(spec)]),
                          env=environment(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "rank     : 1" in done.stderr or "rank: 1" in done.stderr, done.stderr[-3000:]
    assert "SIGKILL" in done.stderr or "-9" in done.stderr
    assert elapsed < 60 + 30  # within the timeout plus the launch


@pytest.mark.skipif(not private_network(), reason="two torchrun nodes share one private network namespace")
def test_multi_node_torchrun_line_through_the_cli(tmp_path, tiny_model_dir):
    """`torchrun --nnodes=2 --node-rank=N --rdzv-endpoint=... -m alignkit train sft ...`, two
    nodes of one process each on loopback, equals one process."""
    data = write_data(tmp_path)
    port = free_port()
    train = ["-m", "alignkit", "train", "sft", "--model", str(tiny_model_dir), "--data", data["sft"],
             "--output", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "4", "--lr", "0.01",
             "--warmup-ratio", "0", "--no-progress"]
    launcher = " ".join(TORCHRUN + ["--nproc-per-node=1", "--nnodes=2", "--rdzv-backend=c10d",
                                    f"--rdzv-endpoint=127.0.0.1:{port}"])
    command = " ".join(train)
    script = (f"ip link set lo up && {{ {launcher} --node-rank=1 {command} > {tmp_path}/node1.log 2>&1 & }} "
              f"&& {launcher} --node-rank=0 {command}; status=$?; wait; exit $status")
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    one_metrics, _ = one_process("sft", 0, tiny_model_dir, data["sft"], tmp_path)
    assert_runs_match(read_metrics(tmp_path / "run"), one_metrics)
