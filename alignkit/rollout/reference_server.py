"""A reference server that speaks the subset of vLLM's HTTP API `HTTPEngine` uses, over
`HFEngine`: so the client path (requests, sockets, JSON, weight reloads) runs in every test
run without vLLM. It binds 127.0.0.1 only.

Endpoints: GET /health, /v1/models, /weight_info; POST /v1/completions (token-id prompts,
`n`, max_tokens, temperature, top_p, top_k, min_p, seed, stop_token_ids, ignore_eos,
logprobs=0, return_token_ids), /pause, /resume, /collective_rpc (reload_weights with a
weights_path), /reset_prefix_cache, /update_weight_version, and with `max_lora_rank` (vLLM's
--enable-lora) /v1/load_lora_adapter and /v1/unload_lora_adapter. Any other request field is refused (400),
so a client that starts sending something vLLM would treat differently shows up in tests. A
request's `model` names the served model or a loaded adapter (else 404, as vLLM answers).

Adapters are applied as vLLM applies them, W' = W + s B A (`lora_sync.adapter_deltas`), read
from the peft directory alignkit writes: a test of the file as much as of the client. The one
adapter in use is folded into the weights (the base kept aside) while its requests run.

Its log-probs are `HFEngine`'s: log softmax(logits / temperature), unfiltered, which equals
vLLM's raw_logprobs at temperature 1 and its processed_logprobs when nothing is filtered.

    python -m alignkit.rollout.reference_server --model DIR [--port 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from alignkit.rollout.hf_engine import HFEngine, copy_named_weights
from alignkit.rollout.lora_sync import adapter_deltas, read_adapter
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
                 name: str = "alignkit-reference", max_lora_rank: int | None = None) -> None:
        self.model, self.name = model.eval(), name
        self.engine = HFEngine(model, pad_id=pad_id, eos_ids=eos_ids)
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[str, dict[str, Tensor]] = {}  # name -> {module: s B A}
        self.applied: str | None = None  # the adapter folded into the weights now
        self._base: dict[str, Tensor] = {}  # module -> its base weight, while an adapter is folded in
        self.version: str | None = None
        self.paused = False
        self.requests = 0
        self.cache_resets = 0
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
        model = body.get("model")
        if model not in (None, self.name) and model not in self.adapters:
            raise LookupError(f"the model `{model}` does not exist")
        if self.paused:
            raise RequestError("generation is paused")
        with self._lock:
            self.requests += 1
            self._apply(model if model in self.adapters else None)
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
            self._apply(None)
            load_weights_dir(self.model, str(body["kwargs"]["weights_path"]))
        return {"results": [None]}

    def load_lora_adapter(self, body: dict[str, Any]) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise RequestError("load_lora_adapter needs lora_name and lora_path")
        if name in self.adapters and not body.get("load_inplace"):
            raise RequestError(f"The lora adapter '{name}' has already been loaded.")
        try:
            config, tensors = read_adapter(path)
            deltas = adapter_deltas(config, tensors)
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise RequestError(f"adapter {name} at {path}: {error}") from None
        if int(config["r"]) > int(self.max_lora_rank or 0):
            raise RequestError(f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}")
        modules = dict(self.model.named_modules())
        for module, delta in deltas.items():
            weight = getattr(modules.get(module), "weight", None)
            if weight is None or tuple(weight.shape) != tuple(delta.shape):
                raise RequestError(f"adapter {name}: module {module} is not a layer of shape {tuple(delta.shape)}")
        with self._lock:
            if self.applied == name:
                self._apply(None)
            self.adapters[name] = deltas
        return f"Success: LoRA adapter '{name}' added successfully."  # plain text, as vLLM answers

    def unload_lora_adapter(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        if name not in self.adapters:
            raise LookupError(f"The lora adapter '{name}' cannot be found.")
        with self._lock:
            if self.applied == name:
                self._apply(None)
            del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _apply(self, name: str | None) -> None:
        """Fold adapter `name` into the weights (None: the base alone); call under the lock."""
        if name == self.applied:
            return
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for module, base in self._base.items():
                modules[module].weight.copy_(base)
            self._base = {}
            for module, delta in self.adapters.get(name, {}).items():
                weight = modules[module].weight
                self._base[module] = weight.detach().clone()
                weight.copy_((weight.float() + delta).to(weight.dtype))
        self.applied = name
    def route(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any] | str:
        routes = {
            ("GET", "/health"): lambda: {},
            ("GET", "/v1/models"): lambda: {"object": "list", "data": [
                {"id": model, "object": "model"} for model in (self.name, *self.adapters)]},
            ("GET", "/weight_info"): lambda: {"weight_version": self.version},
            ("POST", "/v1/completions"): lambda: self.completions(body),
            ("POST", "/pause"): lambda: self._set_paused(True),
            ("POST", "/resume"): lambda: self._set_paused(False),
            ("POST", "/collective_rpc"): lambda: self.collective_rpc(body),
            ("POST", "/update_weight_version"): lambda: self._set_version(body),
            ("POST", "/reset_prefix_cache"): lambda: self._reset_cache(),
        }
        if self.max_lora_rank:  # vLLM serves these with --enable-lora and runtime updating only
            routes[("POST", "/v1/load_lora_adapter")] = lambda: self.load_lora_adapter(body)
            routes[("POST", "/v1/unload_lora_adapter")] = lambda: self.unload_lora_adapter(body)
        if (method, path) not in routes:
            raise LookupError(f"{method} {path}")
        return routes[(method, path)]()

    def _reset_cache(self) -> dict[str, Any]:
        self.cache_resets += 1  # no prefix cache here: counted, so tests see the client ask
        return {"success": True}

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
            plain = isinstance(reply, str)
            data = reply.encode() if plain else json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if plain else "application/json")
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

    parser = argparse.ArgumentParser(prog="python -m alignkit.rollout.reference_server",
                                     description="vLLM's other flags are accepted and ignored, so a "
                                                 "stand-in can take a vLLM server's command line")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"])
    parser.add_argument("--served-model-name", default="alignkit-reference")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        print(f"ignored: {' '.join(ignored)}", file=sys.stderr, flush=True)
    runtime_lora = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")
    model, tokenizer = load_model(args.model, device="cpu")
    server = ReferenceServer(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,),
                             port=args.port, name=args.served_model_name,
                             max_lora_rank=args.max_lora_rank if args.enable_lora and runtime_lora else None)
    print(server.url, flush=True)
    try:
        server._http.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
