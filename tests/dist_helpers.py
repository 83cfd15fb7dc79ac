"""Launching `torchrun` from tests: loopback only, inside a private network namespace when the
machine allows one (root: `unshare -n`), one thread per rank, and a spec file for
tests/dist_worker.py so that one launch serves many checks."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@functools.cache
def private_network() -> bool:
    """Whether `unshare -n` works here (then nothing can leave loopback)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")])))
    return env


def in_namespace(command: list[str]) -> list[str]:
    """`command` inside a fresh network namespace with loopback up (if the machine allows)."""
    if not private_network():
        return command
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def torchrun_args(nproc: int, port: int) -> list[str]:
    return [*TORCHRUN, f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}"]


def launch(spec: dict, tmp: Path, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run tests/dist_worker.py on `nproc` ranks with `spec`; fails the test on a non-zero exit."""
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    command = in_namespace([*torchrun_args(nproc, free_port()), str(WORKER), str(path)])
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"torchrun exited {done.returncode}:\n{done.stderr[-6000:]}")
    return done


def read_params(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def count_e(prompts, completions, **columns):
    """Reward for online tests: +1 per letter e of the completion (a random tiny model emits some)."""
    return [float(text.count("e")) for text in completions]


def e_and_o(prompts, completions, **columns):
    """Two attribute scores per completion for dpa tests: its letters e and its letters o."""
    return [[float(text.count("e")), float(text.count("o"))] for text in completions]


def even_tokens(prompts, completions, completion_ids, **columns):
    """A dense reward for online tests: +1 on each sampled token whose id is even, 0 elsewhere."""
    return [[float(token % 2 == 0) for token in ids] for ids in completion_ids]


def e_excess(prompts, completions, **columns):
    """Cost for safe_ppo tests: the letters e beyond 3, max(0, count_e - 3): maximising count_e
    alone drives it up, to 5 at 8 e's."""
    return [max(0.0, text.count("e") - 3.0) for text in completions]


def slow_count_e(prompts, completions, **columns):
    """`count_e` taking half a second: a run slow enough to kill a worker in the middle of it."""
    import time

    time.sleep(0.5)
    return count_e(prompts, completions)


def slower_count_e(prompts, completions, **columns):
    """`count_e` taking two seconds: a run that a Ctrl-C reaches several steps before its end,
    even on a loaded machine."""
    import time

    time.sleep(2.0)
    return count_e(prompts, completions)


SAMPLED = ("reward/mean", "reward/std", "response_length")  # functions of the sampled tokens only


def assert_runs_match(two: list[dict], one: list[dict], reward_tolerance: float = 0.0, rel: float = 1e-5) -> None:
    """`reward_tolerance`: a reward model scores each rank's rows in a batch of another shape,
    so its scores differ at float level (~1e-9); rule rewards of equal samples are equal.
    `rel`: the relative tolerance of loss, grad_norm and kl (float rounding of the update).
    A step without an update (no grad_norm: nothing kept) must be one in both runs."""
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        for key in SAMPLED + ("dynamic_sampling/generation_rounds", "dynamic_sampling/kept_groups",
                              "filter/kept_samples"):
            if key in b:
                tolerance = reward_tolerance if key.startswith("reward/") else 0.0
                assert a[key] == pytest.approx(b[key], rel=tolerance, abs=tolerance), (a["step"], key, a[key], b[key])
        assert abs(a["loss"] - b["loss"]) <= rel * abs(b["loss"]) + 1e-7, (a["step"], a["loss"], b["loss"])
        assert ("grad_norm" in a) == ("grad_norm" in b), (a["step"], "an update skipped in one run only")
        if "grad_norm" in b:
            assert relative_error(a["grad_norm"], b["grad_norm"]) < rel, (a["step"], a["grad_norm"], b["grad_norm"])
        for key in ("kl", "value_loss", "policy_loss"):
            if key in b:  # k1 KL: a sum of ~8 log-prob differences of ~6 each, which can cancel to ~0.1;
                # float32 rounding of terms of ~50 in all is ~50 x 1.2e-7 x a few = 1e-5..5e-5 absolute
                # (nash_md measured 1.6e-5 on 2026-12-07's environment; 1e-5 passed before)
                absolute = 5e-5 if key == "kl" else rel / 10
                assert a[key] == pytest.approx(b[key], rel=rel, abs=absolute), (a["step"], key, a[key], b[key])


class TwoTurns:
    """The scripted two-turn environment of the multi-turn tests (tests/test_online_multiturn.py loads it as a file spec), importable by the
    ranks (`--env dist_helpers:TwoTurns`): the user asks, then says "again"; the reward is the
    e's of the policy's second turn minus those of its first."""

    def reset(self, row):
        self.turn, self.first = 0, 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        self.turn += 1
        said = messages[-1]["content"]
        if self.turn == 1:
            self.first = said.count("e")
            return {"role": "user", "content": "again"}, 0.0, False, {"first_e": self.first}
        return None, float(said.count("e") - self.first), True, {"second_e": said.count("e")}


class RankDependent(TwoTurns):
    """`TwoTurns` whose second question names the torchrun rank: the ranks replay the same
    conversation differently (what `check_episodes_agree` must refuse)."""

    def step(self, messages):
        reply, reward, done, info = super().step(messages)
        if reply is not None:
            reply = {"role": "user", "content": f"again, rank {os.environ.get('RANK', '0')}"}
        return reply, reward, done, info
