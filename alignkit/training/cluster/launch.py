"""The driver process of `--placement colocate[:N]|split:P,R`: start (or join) Ray, start the
worker groups, watch them, report.

1. Ray: `--ray-address auto|HOST:PORT` joins a running cluster; without it a local cluster
   starts on 127.0.0.1 (nothing else bound) and stops with the run. Ray's usage report is off,
   its dashboard not started, its workers' output kept in Ray's own log files
   (ALIGNKIT_RAY_LOGS=1 forwards it here).
2. Rollout workers (split): R actors, each loading the policy's model and its engine.
3. Policy workers: N actors forming one torch.distributed group (gloo on CPU, nccl with one GPU
   each): worker 0 gives its node's address and a free port, every worker runs the same
   `run_online` a torchrun rank runs. OUTPUT/workers.json lists every worker's role, node and
   process id; OUTPUT/workers/*.log holds each worker's alignkit log.
4. The driver waits on every worker's long call: a policy worker's `run` and a rollout worker's
   `serve`. The first that fails ends the run: a worker that died is named (`WorkerDied`:
   role, index, rank), an error it raised is re-raised as itself; every other worker is killed.
   A progress bar follows OUTPUT/metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignkit.training.cluster.placement import parse_placement

log = logging.getLogger("alignkit")
POLL_S = 1.0


class WorkerDied(RuntimeError):
    """A Ray worker of the run died (its process was killed, its node lost)."""

    one_line = True


@contextlib.contextmanager
def stderr_to(path: Path | None) -> Iterator[None]:
    """File descriptor 2 of this process (and of what it starts meanwhile) written to `path`;
    restored after. None: unchanged."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def ray_init(address: str | None, cpus_needed: int, log_dir: Path) -> bool:
    """Connect to Ray; returns whether this process started the cluster (and must stop it).
    Unless ALIGNKIT_RAY_LOGS is set, what Ray prints while starting (its IP lookup, that token
    auth is on) goes to `log_dir`/ray.log."""
    loud = bool(os.environ.get("ALIGNKIT_RAY_LOGS"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    if not loud:
        logging.getLogger("ray").setLevel(logging.ERROR)
    quiet = dict(log_to_driver=loud, logging_level=logging.INFO if loud else logging.ERROR, include_dashboard=False)
    with stderr_to(None if loud else log_dir / "ray.log"):
        if address:
            join_cluster(address, quiet)
        else:
            # "local": a cluster of its own even where `ray start` left one (plain ray.init() would join it)
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), _node_ip_address="127.0.0.1",
                     **quiet)
    if not loud:
        _raylet_notices_to(log_dir / "ray.log")
    return not address


def reachable(address: str, timeout: float = 10.0) -> str | None:
    """Why `HOST:PORT` cannot be a Ray head (nothing listens, the host does not answer), or
    None. Ray itself retries a dead address for minutes before it gives up; a TCP connect
    answers in milliseconds when the port is closed. `auto` and `ray://` are Ray's to resolve."""
    if address == "auto" or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return "expected HOST:PORT or auto"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        return f"nothing answers there ({error.strerror or error})"
    return None


def join_cluster(address: str, options: dict) -> None:
    """`ray.init(address=...)`, its failures one line naming --ray-address."""
    import ray

    problem = reachable(address)
    if problem:
        raise ValueError(f"--ray-address {address}: {problem}; start the head with `ray start --head` "
                         "or drop --ray-address to start a local cluster")
    try:
        ray.init(address=address, **options)
    except ConnectionError as error:
        if "AuthenticationError" in repr(error.__cause__):  # Ray's class is private: matched by name
            raise ValueError(f"--ray-address {address}: the cluster wants its auth token; set RAY_AUTH_MODE=token "
                             "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as on its nodes") from None
        raise ValueError(f"--ray-address {address}: no Ray cluster answers there ({error})") from None


def _raylet_notices_to(path: Path) -> None:
    """Ray's driver prints the raylet's notices (a worker died: a paragraph of advice) on
    stdout: append them to `path` instead; alignkit's own error names the worker. Ray's private
    printer: if it moves, the notices simply show."""
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_alignkit", False):
        return

    def to_file(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            return printer(data, ignore_prefix)
        with open(path, "a") as sink:
            sink.writelines(f"(raylet) {line}\n" for line in data.get("lines", ()))

    to_file._alignkit = True
    ray_worker.print_to_stdstream = to_file


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def worker_env(local_workers: int) -> dict[str, str]:
    """Variables every worker shares; LOCAL_WORLD_SIZE (the workers on one machine) splits the
    machine's cores between them (`--threads 0`)."""
    env = {"LOCAL_WORLD_SIZE": str(max(1, local_workers)), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "")}
    for name in ("GLOO_SOCKET_IFNAME", "ALIGNKIT_DIST_TIMEOUT", "ALIGNKIT_DEBUG", "HF_HOME"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return {k: v for k, v in env.items() if v}


def rank_env(rank: int, world: int, master: tuple[str, int], base: dict[str, str]) -> dict[str, str]:
    """What torchrun would set for rank `rank` (one device per worker: LOCAL_RANK 0)."""
    ip, port = master
    env = {**base, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "GROUP_RANK": "0",
           "MASTER_ADDR": ip, "MASTER_PORT": str(port)}
    if ip.startswith("127.") and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


PATH_FIELDS = ("output", "resume", "data", "eval_data", "model", "ref_model", "reward_model", "vllm_python")


def shipped_config(config: Any) -> Any:
    """A copy of `config` for the workers: local paths made absolute (a `file.py:fn` reward's
    file and a `--ref-model merge:...` spec's models too), so a worker finds them whatever its
    working directory. Symlinks are kept: a virtual environment's bin/python is a link to the
    base interpreter, and only the link finds the environment's packages."""
    import copy

    shipped = copy.deepcopy(config)
    for name in PATH_FIELDS:
        value = getattr(shipped, name, None)
        if name == "ref_model" and isinstance(value, str) and value.startswith("merge:"):
            from alignkit.merge.spec import absolute_model_spec

            setattr(shipped, name, absolute_model_spec(value))  # its models (or recipe file) absolute
        elif name == "ref_model" and isinstance(value, str) and "," in value:  # salsa's soup: each checkpoint
            setattr(shipped, name, ",".join(os.path.abspath(part) if Path(part).exists() else part
                                            for part in value.split(",")))
        elif isinstance(value, str) and value and (name == "output" or Path(value).exists()):
            setattr(shipped, name, os.path.abspath(value))
    reward = getattr(shipped, "reward", None)
    if isinstance(reward, list):
        shipped.reward = [_absolute_reward(one) for one in reward]
    elif isinstance(reward, str):
        shipped.reward = _absolute_reward(reward)
    if isinstance(getattr(shipped, "gold_reward", None), str):
        shipped.gold_reward = _absolute_reward(shipped.gold_reward)
    return shipped


def _absolute_reward(spec: str) -> str:
    """`file.py:fn` with the file's absolute path; any other spec unchanged."""
    file, sep, function = spec.rpartition(":")
    if sep and file.endswith(".py") and Path(file).exists():
        return f"{os.path.abspath(file)}:{function}"
    return spec


def driver_context() -> dict[str, Any]:
    """The driver's working directory and import path: a worker on the same machine uses them
    (a `module:function` reward importable here is importable there)."""
    import sys

    return {"cwd": os.getcwd(), "sys_path": [entry for entry in sys.path if entry and Path(entry).is_dir()]}


def run_placed(config: Any):
    """Train `config` on Ray workers as `config.placement` says; returns rank 0's `TrainResult`
    (no model in memory: it lives in the workers; final/ is on disk)."""
    import ray

    from alignkit.training.cluster import workers
    from alignkit.training.run.result import TrainResult

    config = shipped_config(config)
    needed = parse_placement(config.placement)
    started_here = ray_init(config.ray_address, needed.policy_workers + needed.rollout_workers,
                            Path(config.output) / "workers")
    actors: list[Any] = []
    try:
        gpus = cluster_gpus()
        placement = parse_placement(config.placement, gpus=gpus)
        gpu = 1 if gpus else 0
        log.info("placement: %s on Ray (%s)", placement.describe(), "local cluster" if started_here else
                 f"cluster at {config.ray_address}")
        output = Path(config.output)
        output.mkdir(parents=True, exist_ok=True)
        policy_cls = ray.remote(concurrency_groups={"control": 1})(workers.PolicyWorker)
        policy = [policy_cls.options(num_cpus=1, num_gpus=gpu, name=None).remote(rank)
                  for rank in range(placement.policy_workers)]
        actors += policy
        rollout_cls = ray.remote(concurrency_groups={"watch": 1})(workers.RolloutWorker)
        where = _get_all(policy, "policy", [w.where.remote() for w in policy], output)
        local_workers = placement.policy_workers + placement.rollout_workers if started_here else \
            sum(spot["ip"] == where[0]["ip"] for spot in where)
        base = worker_env(local_workers)
        context = driver_context()
        rollout = [rollout_cls.options(num_cpus=1, num_gpus=gpu)
                   .remote(config, k, base, context) for k in range(placement.rollout_workers)]
        actors += rollout
        watched: dict[Any, tuple[str, int]] = {}
        rollout_where = _get_all(rollout, "rollout", [w.where.remote() for w in rollout], output)
        for k, worker in enumerate(rollout):
            watched[worker.serve.remote()] = ("rollout", k)
        _write_workers(output, where, rollout_where)
        master = (where[0]["ip"], ray.get(policy[0].free_port.remote()))
        world = placement.policy_workers
        for rank, worker in enumerate(policy):
            env = rank_env(rank, world, master, base)
            watched[worker.run.remote(config, env, rollout, context)] = ("policy", rank)
        summary = _watch(watched, policy, output, config)
        for worker in rollout:
            ray.get(worker.close.remote())
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    return TrainResult(Path(summary["output_dir"]), Path(summary["final_dir"]), summary["steps"],
                       summary["metrics"], summary["eval_metrics"])


def _get_all(actors: list[Any], role: str, refs: list[Any], output: Path) -> list[Any]:
    """`ray.get` of one call per worker of `role`, a failure named as in `_watch`."""
    return [_result(ref, role, k, len(actors), output) for k, ref in enumerate(refs)]


def _result(ref: Any, role: str, index: int, world: int, output: Path) -> Any:
    """`ray.get(ref)`: a dead worker a `WorkerDied`, an error it raised re-raised as itself."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except RayActorError as error:
        rank = f" (rank {index} of {world})" if role == "policy" else ""
        raise WorkerDied(f"{role} worker {index}{rank} died ({type(error).__name__}): the run stopped; "
                         f"--resume {output} continues from its last checkpoint") from None
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def _watch(watched: dict[Any, tuple[str, int]], policy: list[Any], output: Path, config: Any) -> dict[str, Any]:
    """Wait for every policy worker's `run`, failing on the first worker that fails; a
    progress bar follows metrics.jsonl. Ctrl-C / SIGTERM here is passed on to the policy
    workers (they checkpoint after the step and stop: `RunInterrupted`); a second one stops at
    once. Returns rank 0's summary."""
    import ray
    from tqdm import tqdm

    from alignkit.training.run.interrupt import StopSignals

    world, results, forwarded = len(policy), {}, False
    bar = tqdm(total=config.max_steps if config.max_steps > 0 else None, desc=config.algorithm,
               disable=not config.progress, dynamic_ncols=True)
    stop = StopSignals().install()
    try:
        while len(results) < world:
            if stop.received and not forwarded:
                for worker in policy:
                    worker.stop.remote(stop.received)
                forwarded = True
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=POLL_S)
            _advance(bar, output / "metrics.jsonl")
            for ref in ready:
                role, index = watched.pop(ref)
                value = _result(ref, role, index, world, output)
                if role == "rollout":
                    raise WorkerDied(f"rollout worker {index} stopped serving before the run ended")
                if "interrupted" in value:
                    raise value["interrupted"]
                results[index] = value
        _advance(bar, output / "metrics.jsonl")
    finally:
        stop.restore()
        bar.close()
    return results[0]


def _advance(bar, metrics_file: Path) -> None:
    """Move `bar` to the last step written to metrics.jsonl."""
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return
    for line in reversed(lines):
        try:
            step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue
        if step > bar.n:
            bar.update(step - bar.n)
        return


def _write_workers(output: Path, policy: list[dict], rollout: list[dict]) -> None:
    """OUTPUT/workers.json: each worker's role, index, node and process id."""
    rows = [{"role": "policy", "index": k, **spot} for k, spot in enumerate(policy)]
    rows += [{"role": "rollout", "index": k, **spot} for k, spot in enumerate(rollout)]
    tmp = output / "workers.json.tmp"
    tmp.write_text(json.dumps({"written": time.time(), "workers": rows}, indent=1))
    tmp.replace(output / "workers.json")
