"""Placed runs on one Ray cluster, for tests/test_ray_placement.py: `python ray_worker.py SPEC`.

Run inside a private network namespace (tests/dist_helpers.in_namespace). Starts a head node on
127.0.0.1 (`ray start --head`), then every case of the spec joins it with `ray_address`:

- a run: `alignkit.train(..., placement=P)`; its error, if any, is recorded;
- `kill_rollout_at`: the run in a thread; once metrics.jsonl has that step, the rollout worker's
  process (from workers.json) is killed; the error and the seconds it took are recorded;
- `resume`: `alignkit train --resume DIR --ray-address ADDR` through the CLI;
- `cli`: `python -m alignkit ARGS` in a subprocess, `{address}` in ARGS replaced by the head's
  address, with the variables in `drop_env` unset (a client without the cluster's token); its
  exit code, stderr and seconds are recorded. With `interrupt_after_step`, SIGTERM is sent to it
  once its `metrics` file has that step (what a scheduler sends; Ctrl-C's SIGINT takes the same
  path, but a process started in the background, as `make test &` starts this one, inherits
  SIGINT ignored, so the test cannot rely on it).

Writes SPEC's `out`/results.json; stops the cluster at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import alignkit
from alignkit.cli import main as cli_main


def start_head(port: int) -> str:
    """A head node with token auth, as a user's cluster would have; its clients share the token."""
    import secrets

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    return f"127.0.0.1:{port}"


def stop_head() -> None:
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)


def train(case: dict, address: str) -> dict:
    out = Path(case["output"])
    try:
        result = alignkit.train(case["algorithm"], model=case["model"], data=case["data"], output_dir=out,
                                progress=False, placement=case["placement"], ray_address=address,
                                **case["overrides"])
        return {"final_dir": str(result.final_dir), "metrics": result.metrics}
    except Exception as error:  # recorded for the test to judge
        return {"error": f"{type(error).__name__}: {error}"}


def kill_rollout(case: dict, address: str) -> dict:
    out = Path(case["output"])
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(train(case, address)))
    thread.start()
    wait_for_step(out / "metrics.jsonl", case["kill_rollout_at"], alive=thread.is_alive)
    if not thread.is_alive():
        return {**box, "never_killed": True}
    workers = json.loads((out / "workers.json").read_text())["workers"]
    pid = next(w["pid"] for w in workers if w["role"] == "rollout")
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    return {**box, "seconds_to_error": time.time() - killed}


def cli_subprocess(case: dict, address: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in case.get("drop_env", ())}
    env["HOME"] = case.get("home", env.get("HOME", ""))  # no ~/.ray/auth_token to fall back on
    args = [arg.replace("{address}", address) for arg in case["cli"]]
    started = time.time()
    run = subprocess.Popen([sys.executable, "-m", "alignkit", *args], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    if "interrupt_after_step" in case:
        wait_for_step(Path(case["metrics"]), case["interrupt_after_step"], alive=lambda: run.poll() is None)
        run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=300)
    return {"exit": run.returncode, "stderr": stderr, "seconds": time.time() - started}


def wait_for_step(metrics: Path, step: int, alive, timeout: float = 300) -> None:
    """Until `metrics` (a metrics.jsonl) has `step`, `alive()` turns False, or `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.1)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    address = start_head(spec["port"])
    try:
        for case in spec["cases"]:
            if "kill_rollout_at" in case:
                results[case["name"]] = kill_rollout(case, address)
            elif "cli" in case:
                results[case["name"]] = cli_subprocess(case, address)
            elif "resume" in case:
                code = cli_main(["train", "--resume", case["resume"], "--ray-address", address, "--no-progress"])
                results[case["name"]] = {"exit": code}
            else:
                results[case["name"]] = train(case, address)
    finally:
        stop_head()
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
