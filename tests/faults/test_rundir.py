"""Run directories: another run's --output, --resume with other data or settings, stale
reference caches, two runs at once, damaged checkpoints, torn metrics, Ctrl-C / SIGTERM, and
--resume of every trainer. (The policy: alignkit/training/run/rundir.py, checkpoint.py,
interrupt.py; caches: alignkit/training/offline/reference_cache.py.)"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import alignkit
from alignkit.testing import build_tiny_model, synthetic_pairs, synthetic_ratings
from faults.helpers import assert_one_line_error, pairs, run_cli, write_jsonl

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
QUICK = {"batch_size": 4, "progress": False, "warmup_ratio": 0.0}


class Cut(Exception):
    """Raised by `cut_at`'s callback: an exception ends the run after a step (a crash)."""


def cut_at(call: int):
    """A training callback raising Cut on its `call`-th call (steps of every member count)."""
    calls = []

    def callback(step, metrics):
        calls.append(step)
        if len(calls) == call:
            raise Cut

    return callback


@pytest.fixture(autouse=True)
def warnings_captured(caplog):
    caplog.set_level(logging.WARNING, logger="alignkit")
    return caplog


def warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def columns(rows: list[dict], keys) -> list:
    """The values of `keys`, row after row, in one flat list (pytest.approx compares it)."""
    return [row.get(key) for row in rows for key in keys]


def numbers(rows: list[dict]) -> list[dict]:
    """Each row's numeric metrics, without the timing ones (they differ run to run)."""
    return [{k: v for k, v in row.items() if isinstance(v, int | float) and not k.startswith(("throughput", "time/"))}
            for row in rows]


def other_pairs(n: int = 8) -> list[dict]:
    """n pairs unlike `pairs(n)` (same row count)."""
    return [{"prompt": f"Tell me about topic {i}", "chosen": f"a fine long reply {i}", "rejected": f"no {i}"}
            for i in range(n)]


def dpo(model, data, out, *extra) -> list:
    return ["train", "dpo", "--model", model, "--data", data, "--output", out, "--no-progress",
            "--batch-size", "4", *extra]


def cut_dpo_run(model, data, out: Path, at: int = 2, max_steps: int = 4) -> None:
    """A DPO run that crashed after step `at` (a checkpoint every step)."""
    with pytest.raises(Cut):
        alignkit.train("dpo", model=str(model), data=str(data), output_dir=out, max_steps=max_steps,
                       save_steps=1, callbacks=(cut_at(at),), **QUICK)


@pytest.fixture
def files(tmp_path):
    """Two pair files of the same row count, with other rows."""
    return write_jsonl(tmp_path / "a.jsonl", pairs(8)), write_jsonl(tmp_path / "b.jsonl", other_pairs(8))


# ------------------------------------------------------------------------ output directories


@pytest.mark.parametrize("change", ["other data", "other lr"])
def test_output_holding_another_run_is_refused(tiny_model_dir, files, tmp_path, change):
    """--output DIR that holds another run (other data or settings) -> one-line error naming DIR and --overwrite"""
    out = tmp_path / "run"
    assert run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "1")).code == 0
    extra = ("--lr", "1e-3") if change == "other lr" else ()
    data = files[1] if change == "other data" else files[0]
    before = (out / "metrics.jsonl").read_text()
    line = assert_one_line_error(run_cli(*dpo(tiny_model_dir, data, out, "--max-steps", "1", *extra)), "train",
                                 str(out), "another run", "--overwrite")
    assert ("data" if change == "other data" else "lr") in line
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the first run was touched


def test_identical_command_in_a_finished_runs_directory_is_refused(tiny_model_dir, files, tmp_path):
    """the identical command again in a finished run's --output -> refused, suggesting --overwrite (retrain) or another --output"""
    out = tmp_path / "run"
    command = dpo(tiny_model_dir, files[0], out, "--max-steps", "1")
    assert run_cli(*command).code == 0
    assert_one_line_error(run_cli(*command), "train", str(out), "finished run", "--overwrite")


def test_identical_command_in_an_unfinished_runs_directory_suggests_resume(tiny_model_dir, files, tmp_path):
    """the identical command again in a crashed run's --output -> refused, naming `alignkit train --resume DIR`"""
    out = tmp_path / "run"
    cut_dpo_run(tiny_model_dir, files[0], out)
    command = dpo(tiny_model_dir, files[0], out, "--max-steps", "4", "--save-steps", "1", "--warmup-ratio", "0")
    assert_one_line_error(run_cli(*command), "train", f"alignkit train --resume {out}", "step-000002")


def test_overwrite_starts_afresh(tiny_model_dir, files, tmp_path):
    """--overwrite in another run's --output -> its checkpoints, metrics and final/ are removed, the new run starts at step 1"""
    out = tmp_path / "run"
    assert run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "3", "--save-steps", "1")).code == 0
    assert len(list((out / "checkpoints").glob("step-*"))) == 2
    run = run_cli(*dpo(tiny_model_dir, files[1], out, "--max-steps", "1", "--overwrite"))
    assert run.code == 0, run.err
    assert not (out / "checkpoints").exists()
    assert [r["step"] for r in metrics_rows(out)] == [1]
    assert (out / "final" / "config.json").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["fingerprint"]["config"]["data"] == str(files[1])


def test_output_with_unrelated_files_is_refused(tiny_model_dir, files, tmp_path):
    """--output DIR holding files that are not a run -> one-line error naming them; --overwrite writes the run next to them"""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert_one_line_error(run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "1")), "train",
                          str(out), "thesis.tex", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "1", "--overwrite")).code == 0
    assert (out / "thesis.tex").read_text() == "do not delete" and (out / "final").is_dir()


def test_output_that_is_a_file(tiny_model_dir, files, tmp_path):
    """--output naming an existing file -> one-line error naming the path"""
    target = tmp_path / "model.bin"
    target.write_text("x")
    assert_one_line_error(run_cli(*dpo(tiny_model_dir, files[0], target, "--max-steps", "1")), "train",
                          str(target), "not a directory")
    assert target.read_text() == "x"


@pytest.fixture
def world_writable_dir():
    """A fresh directory every user can read and write (tmp_path's parents are private)."""
    folder = Path(tempfile.mkdtemp(prefix="alignkit-ro-"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o777)
    shutil.rmtree(folder, ignore_errors=True)


def test_read_only_output(tiny_model_dir, world_writable_dir):
    """--output in a read-only directory -> one-line error naming the path"""
    shared = world_writable_dir
    model = shared / "model"
    shutil.copytree(tiny_model_dir, model)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    data = write_jsonl(shared / "pairs.jsonl", pairs(8))
    locked = shared / "locked"
    locked.mkdir()
    out = locked / "run"
    locked.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: run the command as an unprivileged user
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "HOME": str(shared), "HF_HUB_OFFLINE": "1", "HF_HOME": str(shared / "hf")}
    done = subprocess.run([*prefix, str(PYTHON), "-m", "alignkit", *map(str, dpo(model, data, out, "--max-steps", "1"))],
                          capture_output=True, text=True, env=env, cwd=str(shared), timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("alignkit train: error: ")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(out) in lines[0] and "cannot write" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------ --resume


def test_resume_refuses_edited_data(tiny_model_dir, files, tmp_path, caplog):
    """--resume DIR after its data file was edited -> one-line error naming data and --override; --override data continues and logs it"""
    out = tmp_path / "run"
    cut_dpo_run(tiny_model_dir, files[0], out)
    write_jsonl(files[0], other_pairs(8))  # the same path, other rows
    assert_one_line_error(run_cli("train", "--resume", out), "train", str(out), "data", "--override data")
    run = run_cli("train", "--resume", out, "--override", "data")
    assert run.code == 0, run.err
    assert "data: its content changed" in warnings(caplog)
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4]


def test_resume_refuses_changed_hyperparameters(tiny_model_dir, files, tmp_path, caplog):
    """--resume DIR --lr 1e-3 --set beta=0.5 (not the run's) -> one-line error naming lr and beta; --override lr,beta continues"""
    out = tmp_path / "run"
    cut_dpo_run(tiny_model_dir, files[0], out)
    changed = ("--lr", "1e-3", "--set", "beta=0.5")
    assert_one_line_error(run_cli("train", "--resume", out, *changed), "train", "lr", "beta", "--override")
    run = run_cli("train", "--resume", out, *changed, "--override", "lr,beta")
    assert run.code == 0, run.err
    assert "lr:" in warnings(caplog) and "beta:" in warnings(caplog)
    assert json.loads((out / "run.json").read_text())["fingerprint"]["config"]["lr"] == 1e-3


@pytest.mark.parametrize("where", ["missing", "empty", "unrelated"])
def test_resume_without_a_run(tmp_path, where):
    """--resume PATH that holds no run (missing, empty, other files) -> one-line error, nothing created"""
    target = tmp_path / "nothing"
    if where != "missing":
        target.mkdir()
    if where == "unrelated":
        (target / "notes.txt").write_text("x")
    before = sorted(p.name for p in target.iterdir()) if target.exists() else None
    assert_one_line_error(run_cli("train", "--resume", target), "train", str(target))
    assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before


# ------------------------------------------------------------------------ reference caches


def test_second_dpo_run_with_other_data_recomputes_the_reference(tiny_model_dir, files, tmp_path):
    """a second DPO run, other data of the same row count, in the same --output (--overwrite) -> step-1 loss is ln 2, not the first run's cache"""
    out = tmp_path / "run"
    assert run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "1")).code == 0
    assert run_cli(*dpo(tiny_model_dir, files[1], out, "--max-steps", "1", "--overwrite")).code == 0
    assert metrics_rows(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("replaced", ["data edited in place", "reference weights replaced in place"])
def test_cached_reference_values_follow_the_content(tiny_model_dir, files, tmp_path, replaced):
    """a resumed run whose data file or --ref-model weights changed at the same path -> the reference cache is recomputed"""
    ref = tmp_path / "ref"
    shutil.copytree(tiny_model_dir, ref)
    out = tmp_path / "run"
    with pytest.raises(Cut):
        alignkit.train("dpo", model=str(tiny_model_dir), ref_model=str(ref), data=str(files[0]), output_dir=out,
                       max_steps=4, save_steps=1, callbacks=(cut_at(2),), **QUICK)
    override = ()
    if replaced == "data edited in place":
        write_jsonl(files[0], other_pairs(8))
        override = ("--override", "data")
    else:
        shutil.rmtree(ref)
        build_tiny_model(ref, seed=7)
    assert run_cli("train", "--resume", out, *override).code == 0
    fresh = tmp_path / "fresh"
    assert run_cli(*dpo(tiny_model_dir, files[0], fresh, "--max-steps", "1", "--ref-model", ref)).code == 0
    cached = load_file(str(out / "reference_logps.safetensors"))
    expected = load_file(str(fresh / "reference_logps.safetensors"))
    assert cached.keys() == expected.keys()
    assert all(cached[k].tolist() == pytest.approx(expected[k].tolist(), abs=1e-5) for k in expected)


# ------------------------------------------------------------------------ two runs at once

HOLD_LOCK = """
import sys, time
from pathlib import Path
from alignkit.training.run.rundir import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_two_runs_in_one_directory_at_once(tiny_model_dir, files, tmp_path):
    """a second run while another process holds --output DIR -> one-line error naming DIR and the holder's pid; after kill -9 of the holder a run starts"""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([str(PYTHON), "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "1")), "train",
                              str(out), f"pid {holder.pid}")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = run_cli(*dpo(tiny_model_dir, files[0], out, "--max-steps", "1"))  # no stale lock left behind
    assert run.code == 0, run.err
    assert not (out / ".alignkit.lock").exists()


# ------------------------------------------------------------------------ damaged checkpoints


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tiny_model_dir, files, tmp_path, caplog):
    """--resume with the newest checkpoint truncated -> a warning naming both checkpoints, resumed from the previous one, same metrics as an uninterrupted run"""
    full = tmp_path / "full"
    alignkit.train("dpo", model=str(tiny_model_dir), data=str(files[0]), output_dir=full, max_steps=5, **QUICK)
    out = tmp_path / "run"
    cut_dpo_run(tiny_model_dir, files[0], out, at=3, max_steps=5)
    weights = out / "checkpoints" / "step-000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert run_cli("train", "--resume", out).code == 0
    warned = warnings(caplog)
    assert "step-000003" in warned and "step-000002" in warned
    keys = ("loss", "grad_norm", "rewards/margins", "lr")
    assert columns(metrics_rows(out), keys) == pytest.approx(columns(metrics_rows(full), keys), rel=1e-6)


def test_no_intact_checkpoint_is_one_line_error(tiny_model_dir, files, tmp_path):
    """--resume when every checkpoint is damaged -> one-line error naming them"""
    out = tmp_path / "run"
    cut_dpo_run(tiny_model_dir, files[0], out)
    for step in (1, 2):
        (out / "checkpoints" / f"step-00000{step}" / "optimizer.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_cli("train", "--resume", out), "train", "no intact checkpoint", "step-000001",
                          "step-000002")


def test_torn_last_metrics_line_is_dropped(tiny_model_dir, files, tmp_path, caplog):
    """--resume after a kill left half a JSON line at the end of metrics.jsonl -> the line is dropped with a warning, the run continues"""
    out = tmp_path / "run"
    cut_dpo_run(tiny_model_dir, files[0], out)
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 0.69')
    run = run_cli("train", "--resume", out)
    assert run.code == 0, run.err
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4]
    assert "torn" in warnings(caplog)


# ------------------------------------------------------------------------ Ctrl-C and SIGTERM


def signalled_run(command: list, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start `alignkit COMMAND` in a subprocess, send it `sig` once a step is in metrics.jsonl,
    and wait for it to end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([str(PYTHON), "-m", "alignkit", *map(str, command)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_stopped_and_resumable(done: subprocess.CompletedProcess, out: Path) -> int:
    """Exit 130, no traceback, the resume command printed, a checkpoint at the last logged step."""
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert f"alignkit train --resume {out}" in done.stderr
    last = metrics_rows(out)[-1]["step"]
    assert (out / "checkpoints" / f"step-{last:06d}" / "state.json").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    return last


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_an_offline_run_with_a_checkpoint(tiny_model_dir, files, tmp_path, sig):
    """Ctrl-C / SIGTERM during an offline run -> the step finishes, a checkpoint is written, the --resume command is printed, exit 130; resuming continues"""
    out = tmp_path / "run"
    done = signalled_run(dpo(tiny_model_dir, files[0], out, "--max-steps", "100000"), out, sig)
    last = assert_stopped_and_resumable(done, out)
    run = run_cli("train", "--resume", out, "--max-steps", last + 2, "--override", "max_steps")
    assert run.code == 0, run.err
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, last + 3))


def test_sigterm_stops_an_online_run_with_a_checkpoint(tiny_model_dir, tmp_path):
    """SIGTERM during an online (GRPO) run -> the step finishes, a checkpoint is written, the --resume command is printed, exit 130; resuming continues"""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}"} for i in range(8)])
    out = tmp_path / "run"
    command = ["train", "grpo", "--model", tiny_model_dir, "--data", data, "--output", out, "--no-progress",
               "--reward", "length:4", "--batch-size", "2", "--max-steps", "100000",
               "--set", "group_size=2", "--set", "max_new_tokens=4", "--allow-degenerate"]
    last = assert_stopped_and_resumable(signalled_run(command, out, signal.SIGTERM), out)
    run = run_cli("train", "--resume", out, "--max-steps", last + 1, "--override", "max_steps")
    assert run.code == 0, run.err
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, last + 2))


# ------------------------------------------------------------------------ every trainer resumes


def runner_cases(tmp_path: Path, model: Path) -> dict[str, tuple[dict, int, list[int]]]:
    """algorithm -> (alignkit.train settings, the callback call to crash on, the steps the
    resumed run trains: only those after the crash)."""
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=1))
    ratings = write_jsonl(tmp_path / "ratings.jsonl", synthetic_ratings(40, seed=0))
    common = {"model": str(model), "data": str(pair_file), "max_steps": 4, "save_steps": 1, **QUICK}
    return {
        "rm_ensemble": ({**common, "members": 2}, 6, [3, 4]),  # member 1, step 2: member 0 is kept
        "rm_ensemble-shared_trunk": ({**common, "members": 2, "shared_trunk": True}, 6, [3, 4]),
        "rm_multi": ({**common, "data": str(ratings), "pairs": str(pair_file), "gate_width": 16,
                      "gate_hidden_layers": 1}, 3, [4]),
        "rm_embedding": ({**common, "max_steps": 6}, 3, [4, 5, 6]),
    }


@pytest.mark.parametrize("case", ["rm_ensemble", "rm_ensemble-shared_trunk", "rm_multi", "rm_embedding"])
def test_reward_runners_resume_exactly(tiny_model_dir, tmp_path, case):
    """--resume of a crashed rm_ensemble / rm_multi / rm_embedding run -> continues from its checkpoints (an ensemble member by member) to the uninterrupted run's metrics"""
    settings, crash_on, remaining = runner_cases(tmp_path, tiny_model_dir)[case]
    algorithm = case.split("-")[0]
    alignkit.train(algorithm, output_dir=tmp_path / "full", **settings)
    with pytest.raises(Cut):
        alignkit.train(algorithm, output_dir=tmp_path / "cut", callbacks=(cut_at(crash_on),), **settings)
    trained = []
    alignkit.train(algorithm, output_dir=tmp_path / "unused", resume=str(tmp_path / "cut"),
                   callbacks=(lambda step, metrics: trained.append(step),), **settings)
    assert trained == remaining
    full, resumed = numbers(metrics_rows(tmp_path / "full")), numbers(metrics_rows(tmp_path / "cut"))
    assert [sorted(r) for r in resumed] == [sorted(r) for r in full]  # the same steps and keys
    assert [r[k] for r in resumed for k in sorted(r)] == pytest.approx([r[k] for r in full for k in sorted(r)],
                                                                      rel=1e-5, abs=1e-7)
    assert not (tmp_path / "unused").exists()
