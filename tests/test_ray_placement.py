"""`--placement` on a local Ray cluster (127.0.0.1, inside a private network namespace when the
machine allows one) equals `--placement local` on the same seed: colocate:2 (two policy
workers, one torch.distributed group, each sampling its own module) and split:P,R (P policy
workers, R rollout workers with their own copy synced through Ray's object store), for GRPO and
PPO, 3 steps each: sampled tokens identical (reward/mean, reward/std and response_length equal
at every step), losses, grad norms and KL to 1e-5, final weights to 1e-4, the rollout's weight
version equal to the step. A killed policy worker ends the CLI run with a one-line error naming
it and exit 1, and `--resume` continues to the uninterrupted run's metrics; a killed rollout
worker ends the run with an error naming it. A stop signal to the driver checkpoints the workers and
`--resume` continues to the same metrics; joining a cluster without its token, or where none
listens, fails in one line. One cluster serves the cases (tests/ray_worker.py);
the killed-policy run starts (and stops) its own through the CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import assert_runs_match, environment, free_port, in_namespace
from run_helpers import read_metrics, write_jsonl
from safetensors.torch import load_file

import alignkit
from alignkit.rollout import Rollout
from alignkit.training.cluster.placement import Placement, parse_placement
from alignkit.training.cluster.ray_rollout import concat_rollouts
from alignkit.training.run.checkpoint import checkpoint_dir

ray = pytest.importorskip("ray")

PROMPTS = ["Write a short review.", "The movie", "Tell me", "What is two plus two?", "Say something nice",
           "A story about"]
BASE = {"padding_free": False, "batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0,
        "scheduler": "constant", "max_new_tokens": 8, "group_size": 4, "reward": "dist_helpers:count_e",
        "logging_steps": 1}
CASES = {  # name: (algorithm, placement)
    "grpo-colocate": ("grpo", "colocate:2"),
    "grpo-split-1-2": ("grpo", "split:1,2"),
    "ppo-colocate": ("ppo", "colocate:2"),
    "ppo-split-2-1": ("ppo", "split:2,1"),
}
KILLED = {**BASE, "max_steps": 5, "save_steps": 1, "reward": "dist_helpers:slow_count_e"}
WORKER = Path(__file__).with_name("ray_worker.py")


# ------------------------------------------------------------------------- without a cluster


def test_placement_specs():
    assert parse_placement("local") == Placement()
    assert parse_placement("colocate:3") == Placement("colocate", 3)
    assert parse_placement("split:6,2") == Placement("split", 6, 2)
    for bad in ("split:2", "colocate:0", "split:1,0", "ray", "split:a,b"):
        with pytest.raises(ValueError, match="--placement"):
            parse_placement(bad)


def _rollout(groups: int, n: int, width: int, first: int) -> Rollout:
    rows = groups * n
    ids = torch.arange(rows * width).reshape(rows, width) + first
    return Rollout(prompt_ids=[[g] for g in range(groups) for _ in range(n)], response_ids=ids,
                   response_logprobs=-ids.float() / 100, response_mask=torch.ones(rows, width, dtype=torch.bool),
                   finish_reason=["length"] * rows, group_index=torch.arange(groups).repeat_interleave(n),
                   extras={"generated_tokens": rows * width, "decoded_rows": rows, "seconds": float(groups)})


def test_concat_rollouts_keeps_rows_and_offsets_groups():
    a, b = _rollout(2, 3, 4, 0), _rollout(1, 3, 2, 1000)
    both = concat_rollouts([a, b], pad_id=7)
    assert both.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert both.response_ids.shape == (9, 4)
    assert torch.equal(both.response_ids[:6], a.response_ids)
    assert both.response_ids[6:, 2:].eq(7).all() and not both.response_mask[6:, 2:].any()
    assert both.response_logprobs[6:, 2:].eq(0).all()
    assert both.extras["generated_tokens"] == 24 + 6 and both.extras["seconds"] == 2.0


@pytest.mark.parametrize(("flags", "message"), [
    ({"placement": "split:1,1", "algorithm": "dpo"}, "rollout pool is for online"),
    ({"placement": "split:1,1", "rollout": "vllm", "vllm_url": "http://127.0.0.1:1"}, "drop --vllm-url"),
    ({"placement": "split:1"}, "expected local, colocate"),
])
def test_placement_refusals(tiny_model_dir, tmp_path, flags, message):
    flags = dict(flags)
    algorithm = flags.pop("algorithm", "grpo")
    online = algorithm == "grpo"
    data = [{"prompt": "hi"}] if online else [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    with pytest.raises(ValueError, match=message):
        alignkit.train(algorithm, model=str(tiny_model_dir), data=data, output_dir=tmp_path / "run",
                       **({"reward": "dist_helpers:count_e"} if online else {}), **flags)


def test_shipped_paths_are_absolute_and_keep_a_venv_interpreter_link(tmp_path, monkeypatch):
    """A worker gets absolute paths; .venv-vllm/bin/python stays the link (resolved, it would
    be the base interpreter, which has no vllm: the split vLLM rollout worker died of that)."""
    from types import SimpleNamespace

    from alignkit.training.cluster.launch import shipped_config

    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "reward.py").write_text("def fn(): pass\n")
    monkeypatch.chdir(tmp_path)
    config = SimpleNamespace(vllm_python="venv/bin/python", output="out", data="reward.py", reward="reward.py:fn")
    shipped = shipped_config(config)
    assert shipped.vllm_python == str(tmp_path / "venv" / "bin" / "python")
    assert shipped.output == str(tmp_path / "out") and shipped.reward == f"{tmp_path / 'reward.py'}:fn"
    assert config.vllm_python == "venv/bin/python"  # the driver's own config is untouched


# ---------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def placed(tmp_path_factory, tiny_model_dir):
    """(results of tests/ray_worker.py, root, data, the killed CLI run's output): the killed
    CLI run first (its own cluster), then one cluster for every other case."""
    tmp = tmp_path_factory.mktemp("ray-placement")
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 3])
    killed = _killed_cli_run(tmp, str(tiny_model_dir), data)
    cases = [{"name": name, "algorithm": algorithm, "placement": placement, "model": str(tiny_model_dir),
              "data": data, "output": str(tmp / name), "overrides": BASE}
             for name, (algorithm, placement) in CASES.items()]
    cases.append({"name": "rollout-killed", "algorithm": "grpo", "placement": "split:1,1", "model": str(tiny_model_dir),
                  "data": data, "output": str(tmp / "rollout-killed"), "overrides": KILLED, "kill_rollout_at": 1})
    cases.append({"name": "resumed", "resume": killed["output"]})
    join = ["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--reward", "vader",
            "--placement", "colocate:1", "--no-progress"]
    cases.append({"name": "join-without-token", "drop_env": ["RAY_AUTH_TOKEN", "RAY_AUTH_MODE"],
                  "home": str(tmp / "home"), "cli": [*join, "--output", str(tmp / "j1"), "--ray-address", "{address}"]})
    cases.append({"name": "join-nothing-there",
                  "cli": [*join, "--output", str(tmp / "j2"), "--ray-address", "127.0.0.1:1"]})  # port 1: nothing listens in the namespace
    cases.append({"name": "local-beside-a-head", "cli": [*join, "--output", str(tmp / "j3"), "--max-steps", "1",
                                                         "--batch-size", "2", "--no-padding-free"]})
    interrupted = tmp / "interrupted"
    slower = {**KILLED, "save_steps": 0, "reward": "dist_helpers:slower_count_e"}  # 2 s steps: the stop lands mid-run
    cases.append({"name": "interrupted", "interrupt_after_step": 1, "metrics": str(interrupted / "metrics.jsonl"),
                  "cli": ["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(interrupted),
                          "--placement", "colocate:2", "--ray-address", "{address}", *cli_flags(slower)]})
    cases.append({"name": "interrupted-resumed", "resume": str(interrupted)})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(tmp / "out"), "port": free_port()}))
    done = subprocess.run(in_namespace([sys.executable, str(WORKER), str(spec)]), env=environment(),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"ray_worker.py exited {done.returncode}:\n{done.stderr[-6000:]}")
    results = json.loads((tmp / "out" / "results.json").read_text())
    return results, tmp, data, killed


def _killed_cli_run(tmp: Path, model: str, data: str) -> dict:
    """`alignkit train grpo --placement colocate:2` (a local cluster of its own); policy worker 1
    killed once step 2 is in metrics.jsonl. Returns its exit code, stderr and timing."""
    out = tmp / "policy-killed"
    command = [sys.executable, "-m", "alignkit", "train", "grpo", "--model", model, "--data", data, "--output",
               str(out), "--placement", "colocate:2", *cli_flags(KILLED)]
    run = subprocess.Popen(in_namespace(command), env=environment(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 2 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.1)
    workers = json.loads((out / "workers.json").read_text())["workers"]
    pid = next(w["pid"] for w in workers if w["role"] == "policy" and w["index"] == 1)
    killed = time.time()
    signal_sent = _kill(pid)
    _, stderr = run.communicate(timeout=300)
    return {"output": str(out), "exit": run.returncode, "stderr": stderr, "seconds": time.time() - killed,
            "signal_sent": signal_sent}


def cli_flags(overrides: dict) -> list[str]:
    """`overrides` (as BASE) as `alignkit train` flags."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()
             if k not in ("max_new_tokens", "group_size", "padding_free")]
    return [*flags, "--no-padding-free", "--no-progress", "--set", f"max_new_tokens={overrides['max_new_tokens']}",
            "--set", f"group_size={overrides['group_size']}"]


def _kill(pid: int) -> bool:
    import os

    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


_local: dict[str, list[dict]] = {}


def local_run(algorithm: str, model_dir, data: str, root: Path, **overrides) -> tuple[list[dict], Path]:
    key = f"{algorithm}-{sorted(overrides.items())}"
    out = root / f"local-{algorithm}-{len(_local)}"
    if key not in _local:
        alignkit.train(algorithm, model=str(model_dir), data=data, output_dir=out, progress=False,
                       **{**BASE, **overrides})
        _local[key] = (read_metrics(out), out)
    return _local[key]


@pytest.mark.parametrize("name", list(CASES))
def test_placed_run_equals_local(placed, tiny_model_dir, name):
    results, root, data, _ = placed
    assert "error" not in results[name], results[name]["error"]
    algorithm, _ = CASES[name]
    one, local_dir = local_run(algorithm, tiny_model_dir, data, root)
    rows = read_metrics(root / name)
    assert_runs_match(rows, one)
    if name.startswith(("grpo-split", "ppo-split")):
        assert [r["rollout/weight_version"] for r in rows] == [float(r["step"]) for r in rows]
        assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-4  # the same kernels, another process
    placed_weights = load_file(str(root / name / "final" / "model.safetensors"))
    local_weights = load_file(str(local_dir / "final" / "model.safetensors"))
    for key, value in local_weights.items():
        torch.testing.assert_close(placed_weights[key], value, rtol=0, atol=1e-4, msg=key)


def test_killed_policy_worker_is_named_and_the_run_resumes(placed, tiny_model_dir):
    results, root, data, killed = placed
    assert killed["signal_sent"], "the run ended before the worker could be killed"
    assert killed["exit"] == 1, killed["stderr"][-3000:]
    last = killed["stderr"].strip().splitlines()[-1]
    assert "policy worker 1 (rank 1 of 2) died" in last and "--resume" in last, killed["stderr"][-3000:]
    assert killed["seconds"] < 60
    assert "Traceback" not in killed["stderr"] and "raylet" not in killed["stderr"]
    assert results["resumed"]["exit"] == 0
    one, _ = local_run("grpo", tiny_model_dir, data, root, **{k: v for k, v in KILLED.items() if k not in BASE or
                                                              BASE[k] != v})
    assert_runs_match(read_metrics(Path(killed["output"])), one)


def test_killed_rollout_worker_is_named(placed):
    results = placed[0]["rollout-killed"]
    assert "rollout worker 0" in results.get("error", ""), results
    assert results["seconds_to_error"] < 60


@pytest.mark.parametrize("name, message", [
    ("join-without-token", "the cluster wants its auth token; set RAY_AUTH_MODE=token"),
    ("join-nothing-there", "nothing answers there"),
])
def test_joining_a_cluster_fails_in_one_line(placed, name, message):
    result = placed[0][name]
    lines = result["stderr"].strip().splitlines()
    assert result["exit"] == 2, result["stderr"][-3000:]
    assert lines[0].startswith("alignkit train: error: --ray-address 127.0.0.1:") and message in lines[0], lines
    assert len(lines) == 2 and "ALIGNKIT_DEBUG" in lines[1], lines  # the error, then how to see the traceback
    assert result["seconds"] < 120


def test_a_stop_signal_to_the_driver_checkpoints_the_workers_and_the_run_resumes(placed, tiny_model_dir):
    """SIGTERM (or Ctrl-C: the same handler) to the driver reaches both policy workers: they finish the step, write its
    checkpoint (none is due: save_steps 0), stop with exit 130; --resume then ends where the
    uninterrupted run ends."""
    results, root, data, _ = placed
    stopped = results["interrupted"]
    last = stopped["stderr"].strip().splitlines()[-1]
    assert stopped["exit"] == 130, stopped["stderr"][-3000:]
    assert "SIGTERM: stopped after step" in last and "continue with: alignkit train --resume" in last, last
    assert "Traceback" not in stopped["stderr"]
    step = int(last.split("stopped after step ")[1].split(",")[0])
    assert 1 <= step < KILLED["max_steps"]
    assert checkpoint_dir(root / "interrupted", step).is_dir()
    assert results["interrupted-resumed"]["exit"] == 0
    one, _ = local_run("grpo", tiny_model_dir, data, root, **{k: v for k, v in KILLED.items() if k not in BASE or
                                                              BASE[k] != v})
    assert_runs_match(read_metrics(root / "interrupted"), one)


def test_without_an_address_a_run_starts_its_own_cluster_beside_a_running_head(placed):
    """`ray start` leaves /tmp/ray/ray_current_cluster, which a plain ray.init() joins: a run
    without --ray-address must start (and stop) its own cluster instead."""
    result = placed[0]["local-beside-a-head"]
    assert result["exit"] == 0, result["stderr"][-3000:]
    assert "on Ray (local cluster)" in result["stderr"], result["stderr"][-3000:]
