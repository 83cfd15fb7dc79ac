"""The Ray actors of a placed run (`launch.py` starts them).

`PolicyWorker`: one torch.distributed rank. `run` sets the variables torchrun would (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...) and calls the same `run_online` /
`run_offline` a torchrun rank calls: the worker group trains exactly as `Ranks` do, rank 0
writing the run directory. `stop` (its own thread) passes on the driver's Ctrl-C / SIGTERM: the
group finishes the step, checkpoints and stops as one torchrun group does.

`RolloutWorker` (split placement): a copy of the policy behind the rollout calls. `--rollout hf`:
`HFEngine` sampling its own model, weights copied in by name; `--rollout vllm`: a vLLM server
this worker starts from --vllm-python (its log under OUTPUT/vllm-rollout{k}/), reloaded from
safetensors after every update. `serve` blocks until `close`: the driver waits on it, so a
worker that dies is noticed at once.

Each worker logs alignkit's messages to OUTPUT/workers/{role}-{k}.log.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import ray


def _log_to_file(path: Path, level: int) -> None:
    """alignkit's log records of this worker to `path` (Ray keeps the worker's stdout to itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("alignkit")
    logger.addHandler(handler)
    logger.setLevel(level)
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _enter(env: dict[str, str], context: dict[str, Any]) -> None:
    """Take the driver's variables, working directory and import path (where they exist here)."""
    import sys

    os.environ.update(env)
    os.environ["ALIGNKIT_RAY_WORKER"] = "1"
    if os.path.isdir(context.get("cwd", "")):
        os.chdir(context["cwd"])
    for entry in reversed(context.get("sys_path", [])):
        if entry not in sys.path and os.path.isdir(entry):
            sys.path.insert(0, entry)


class PolicyWorker:
    """Rank `rank` of the policy group."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def where(self) -> dict[str, Any]:
        """This worker's node address and process id."""
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    @ray.method(concurrency_group="control")
    def stop(self, signal_name: str) -> None:
        """The driver got `signal_name`: finish the step, checkpoint, stop (`RunInterrupted`)."""
        from alignkit.training.run.interrupt import request_stop

        request_stop(signal_name)

    def free_port(self) -> int:
        """A port free on this worker's node, for the group's rendezvous (rank 0)."""
        with socket.socket() as sock:
            sock.bind((ray.util.get_node_ip_address(), 0))
            return sock.getsockname()[1]

    def run(self, config: Any, env: dict[str, str], rollout_handles: list[Any],
            context: dict[str, Any]) -> dict[str, Any]:
        """Train as rank `rank` of the group; returns rank 0's result summary, or
        `{"interrupted": RunInterrupted}` when the driver's stop ended the run after a checkpoint."""
        _enter(env, context)
        _log_to_file(Path(config.output) / "workers" / f"policy-{self.rank}.log", logging.INFO)
        from alignkit.training.cluster.ray_rollout import set_rollout_workers
        from alignkit.training.run.interrupt import RunInterrupted, clear_stop_request
        from alignkit.training.run.registry import ALGORITHMS

        clear_stop_request()
        set_rollout_workers(rollout_handles)
        config.progress = False  # the driver process shows the progress bar
        if ALGORITHMS[config.algorithm].runner == "online":
            from alignkit.training.online.loop import run_online as run
        else:
            from alignkit.training.offline.loop import run_offline as run
        try:
            result = run(config)
        except RunInterrupted as stopped:  # a KeyboardInterrupt: Ray would report it as a cancelled task
            return {"interrupted": stopped}
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        return {"output_dir": str(result.output_dir), "final_dir": str(result.final_dir), "steps": result.steps,
                "metrics": dict(result.metrics), "eval_metrics": dict(result.eval_metrics)}


class RolloutWorker:
    """Rollout worker `index`: the engine of module docstring, on `config.model`'s weights until
    the first sync."""

    def __init__(self, config: Any, index: int, env: dict[str, str], context: dict[str, Any]) -> None:
        _enter(env, context)
        _log_to_file(Path(config.output) / "workers" / f"rollout-{index}.log", logging.INFO)
        import torch

        from alignkit.models import load_model
        from alignkit.training.online.build import _dtype
        from alignkit.training.online.roles import HFRollout
        from alignkit.training.online.server_rollout import ServerRollout
        from alignkit.training.online.settings import OnlineSettings
        from alignkit.training.run.registry import ALGORITHMS
        from alignkit.training.run.threads import configure_threads

        configure_threads(config)
        self.index, self.version, self._closed = index, 0, threading.Event()
        device = "cuda" if torch.cuda.is_available() and config.device in ("auto", "cuda") else None
        model, tokenizer = load_model(config.model, dtype=_dtype(config), device=device,
                                      trust_remote_code=config.trust_remote_code)
        model.eval().requires_grad_(False)
        settings: OnlineSettings = ALGORITHMS[config.algorithm].make_task(config)
        if config.rollout == "vllm":
            self.engine = ServerRollout.launch(config, model, tokenizer, name=f"vllm-rollout{index}")
            self.model = None
        else:
            self.engine = HFRollout(model, tokenizer, max_batch_size=settings.generation_batch_size or None)
            self.model = model

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any):
        """The engine's rollout of these prompts, its tensors on the CPU."""
        rollout = self.engine.generate(prompt_ids, n, sampling)
        for name in ("response_ids", "response_logprobs", "response_mask", "group_index"):
            setattr(rollout, name, getattr(rollout, name).cpu())
        return rollout

    def update_weights(self, state: dict[str, Any], version: int) -> int:
        """Load the policy's full weights (HF names, LoRA merged); returns the version now held."""
        from alignkit.rollout.hf_engine import copy_named_weights

        if self.model is None:  # the vLLM server: written once, reloaded, its version checked
            self.engine.update_weights(state.items(), version)
            self.version = int(self.engine.engine.weight_version())
        else:
            copied = copy_named_weights(self.model, state.items())
            if copied != len(state):
                raise ValueError(f"rollout worker {self.index}: {copied} of {len(state)} tensors loaded")
            self.version = version
        return self.version

    @ray.method(concurrency_group="watch")
    def serve(self) -> int:
        """Returns when `close` is called; the driver waits on it to notice a death at once."""
        self._closed.wait()
        return self.index

    def where(self) -> dict[str, Any]:
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def close(self) -> None:
        """Stop the vLLM server this worker started (if any) and release `serve`."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        self._closed.set()
