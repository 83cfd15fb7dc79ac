"""A reference server that speaks the subset of vLLM's HTTP API `HTTPEngine` uses, over
`HFEngine`: so the client path (requests, sockets, JSON, weight reloads) runs in every test
run without vLLM. It binds 127.0.0.1 only.

Endpoints: GET /health, /v1/models, /weight_info; POST /v1/completions (token-id prompts,
`n`, max_tokens, temperature, top_p, top_k, min_p, seed, stop_token_ids, ignore_eos,
logprobs=0, return_token_ids), /pause, /resume, /collective_rpc (reload_weights with a
weights_path), /update_weight_version. Any other request field is refused (400), so a client
that starts sending something vLLM would treat differently shows up in tests.

Its log-probs are `HFEngine`'s: log softmax(logits / temperature), unfiltered, which equals
vLLM's raw_logprobs at temperature 1 and its processed_logprobs when nothing is filtered.

    python -m alignkit.rollout.reference_server --model DIR [--port 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from alignkit.rollout.hf_engine import HFEngine, copy_named_weights
from alignkit.rollout.types import SamplingParams

ACCEPTED_FIELDS = frozenset({
    "model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop_token_ids",
    "ignore_eos", "logprobs", "return_token_ids", "skip_special_tokens",
})


class RequestError(ValueError):
    """A request the reference server refuses (answered with HTTP 400)."""


def sampling_from_body(body: dict[str, Any]) -> tuple[list[int], int, SamplingParams]:
    """(prompt ids, n, SamplingParams) of a /v1/completions body, as vLLM reads it."""
    unknown = sorted(set(body) - ACCEPTED_FIELDS)
    if unknown:
        raise RequestError(f"fields not served here: {unknown}")
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and t >= 0 for t in prompt):
        raise RequestError("prompt must be a non-empty list of token ids")
    if body.get("logprobs") != 0 or body.get("return_token_ids") is not True:
        raise RequestError("this server answers logprobs=0 with return_token_ids=true only")
    temperature = float(body.get("temperature", 1.0))
    top_k = int(body.get("top_k", -1))
    sampling = SamplingParams(
        max_new_tokens=int(body.get("max_tokens", 16)),
        temperature=temperature,
        top_p=float(body.get("top_p", 1.0)),
        top_k=0 if top_k == -1 else top_k,
        min_p=float(body.get("min_p", 0.0)),
        greedy=temperature == 0.0,
        stop_token_ids=tuple(int(t) for t in body.get("stop_token_ids") or ()),
        seed=None if body.get("seed") is None else int(body["seed"]),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    return prompt, int(body.get("n", 1)), sampling


def load_weights_dir(model: nn.Module, directory: str) -> int:
    """Copy every tensor of `directory/*.safetensors` into `model`'s parameters of that name
    (safetensors only); returns how many were loaded. An unknown name is an error."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise RequestError(f"no .safetensors file in {directory}")
    loaded = 0
    for file in files:
        try:
            loaded += copy_named_weights(model, load_file(str(file)).items())
        except KeyError as error:
            raise RequestError(f"{file.name}: {error.args[0]}") from None
    return loaded


class ReferenceServer:
    """Serves `model` (a transformers causal LM) on 127.0.0.1:`port` (0: a free port)."""

    def __init__(self, model: nn.Module, *, pad_id: int, eos_ids: tuple[int, ...] = (), port: int = 0,
                 name: str = "alignkit-reference") -> None:
        self.model, self.name = model.eval(), name
        self.engine = HFEngine(model, pad_id=pad_id, eos_ids=eos_ids)
        self.version: str | None = None
        self.paused = False
        self.requests = 0
        self._lock = threading.Lock()  # one generation or reload at a time
        self._http = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ReferenceServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="reference-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:  # shutdown() waits for a serve_forever that has started
            self._http.shutdown()
            self._thread = None
        self._http.server_close()

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ endpoints

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, n, sampling = sampling_from_body(body)
        if self.paused:
            raise RequestError("generation is paused")
        with self._lock:
            self.requests += 1
            rollout = self.engine.generate([prompt], n, sampling)
        choices = []
        for j in range(n):
            length = int(rollout.response_mask[j].sum())
            choices.append({
                "index": j,
                "text": "",
                "token_ids": rollout.response_ids[j, :length].tolist(),
                "logprobs": {"token_logprobs": rollout.response_logprobs[j, :length].tolist()},
                "finish_reason": rollout.finish_reason[j],
            })
        return {"object": "text_completion", "model": self.name, "choices": choices}

    def collective_rpc(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("method") != "reload_weights" or "weights_path" not in (body.get("kwargs") or {}):
            raise RequestError("collective_rpc serves reload_weights(weights_path=DIR) only")
        with self._lock:
            load_weights_dir(self.model, str(body["kwargs"]["weights_path"]))
        return {"results": [None]}

    def route(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        routes = {
            ("GET", "/health"): lambda: {},
            ("GET", "/v1/models"): lambda: {"object": "list", "data": [{"id": self.name, "object": "model"}]},
            ("GET", "/weight_info"): lambda: {"weight_version": self.version},
            ("POST", "/v1/completions"): lambda: self.completions(body),
            ("POST", "/pause"): lambda: self._set_paused(True),
            ("POST", "/resume"): lambda: self._set_paused(False),
            ("POST", "/collective_rpc"): lambda: self.collective_rpc(body),
            ("POST", "/update_weight_version"): lambda: self._set_version(body),
        }
        if (method, path) not in routes:
            raise LookupError(f"{method} {path}")
        return routes[(method, path)]()

    def _set_paused(self, paused: bool) -> dict[str, Any]:
        self.paused = paused
        return {"status": "paused" if paused else "resumed"}

    def _set_version(self, body: dict[str, Any]) -> dict[str, Any]:
        if "new_version" not in body:
            raise RequestError("update_weight_version needs new_version")
        self.version = str(body["new_version"])
        return {"success": True, "new_version": self.version}


def _handler(server: ReferenceServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                reply, status = server.route(method, urlparse(self.path).path, body), HTTPStatus.OK
            except LookupError as error:
                reply, status = {"error": f"not served: {error}"}, HTTPStatus.NOT_FOUND
            except (RequestError, ValueError, json.JSONDecodeError) as error:
                reply, status = {"error": str(error)}, HTTPStatus.BAD_REQUEST
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def log_message(self, *args: Any) -> None:  # quiet
            return

    return Handler


def main(argv: list[str] | None = None) -> int:
    from alignkit.models import load_model

    parser = argparse.ArgumentParser(prog="python -m alignkit.rollout.reference_server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, device="cpu")
    server = ReferenceServer(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,),
                             port=args.port)
    print(server.url, flush=True)
    try:
        server._http.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
