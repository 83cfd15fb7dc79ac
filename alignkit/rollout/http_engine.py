"""`HTTPEngine`: a `RolloutEngine` over vLLM's OpenAI-compatible server (token ids in and out).

alignkit never imports vLLM: it talks to the server's HTTP endpoints, so vLLM lives in its own
environment and its version churn stays there. Per call, one `/v1/completions` request per
prompt (sent concurrently; the server batches them), each asking for `n` samples:

    {"prompt": [ids], "n": n, "max_tokens": ..., "temperature": ..., "seed": fold32(seed, p),
     "logprobs": 0, "return_token_ids": true, "stop_token_ids": [...], ...}

where p is the prompt's global index (`first_sample // n + i`), so a data-parallel rank that
samples prompts k.. sends the seeds one process sends. The choices come back with their
`token_ids`, each sampled token's log-prob and a finish reason; row `i * n + j` of the
`Rollout` is choice `j` of prompt `i`.

Log-probs: vLLM's default `--logprobs-mode raw_logprobs` scores the *untempered, unfiltered*
model, which is the `Rollout` contract at temperature 1; `processed_logprobs` scores the
tempered distribution after top-k/top-p/min-p, the contract at any temperature when nothing
is filtered. A request whose log-probs would break the contract is refused before it is sent.
The engine's log-probs are never exact (another process, other kernels): the online loop
recomputes old log-probs with the trainer and logs the difference.

Weights (`update_weights(source, version)`): the (HF name, tensor) pairs are written as one
safetensors file into a fresh directory (under /dev/shm where it exists), then
`/pause?mode=wait` -> `/collective_rpc reload_weights(weights_path=DIR)` ->
`/reset_prefix_cache` -> `/update_weight_version` -> `/resume`; `/weight_info` must then
report `version`. The server needs `VLLM_SERVER_DEV_MODE=1` for these endpoints.

Adapter only (`update_adapter(source, version, config)`, a LoRA policy on a server started
with `--enable-lora`): the adapter is written into a directory of its own per version and
loaded under a new name (`alignkit.rollout.lora_sync`), the previous one unloaded; requests
then name it as their `model`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.rollout.lora_sync import ADAPTER_PREFIX, adapter_name, adapter_tensors, write_adapter
from alignkit.rollout.types import Rollout, SamplingParams

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
FINISH_REASONS = {"stop": "stop", "length": "length"}
_MASK64 = (1 << 64) - 1


class EngineError(RuntimeError, ValueError):
    """The server refused a request, answered something alignkit cannot use, or is gone. A
    ValueError too: the CLI reports it as one line naming the server."""


def fold32(seed: int, index: int) -> int:
    """A 31-bit request seed from a 64-bit run seed and a prompt index (splitmix64 finaliser):
    vLLM's seeds must fit 32 bits, alignkit's step seeds reach 2^62."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def request_body(prompt: list[int], n: int, sampling: SamplingParams, seed: int, model: str | None,
                 logprobs_mode: str) -> dict[str, Any]:
    """The `/v1/completions` body for `n` samples of one prompt; refuses settings whose
    log-probs would not follow the `Rollout` contract (see the module docstring)."""
    filtered = sampling.top_k > 0 or sampling.top_p < 1.0 or sampling.min_p > 0.0
    tempered = not sampling.is_greedy and sampling.temperature != 1.0
    if logprobs_mode == "raw_logprobs" and tempered:
        raise ValueError(
            f"temperature {sampling.temperature}: a raw_logprobs server scores the untempered model; "
            "start it with --logprobs-mode processed_logprobs (and no top-k/top-p/min-p) or sample at 1")
    if logprobs_mode == "processed_logprobs" and filtered and not sampling.is_greedy:
        raise ValueError("top_k/top_p/min_p with a processed_logprobs server: its log-probs are of the "
                         "filtered distribution; use a raw_logprobs server at temperature 1")
    body: dict[str, Any] = {
        "prompt": [int(t) for t in prompt],
        "n": n,
        "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if sampling.is_greedy else sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "min_p": sampling.min_p,
        "seed": seed,
        "stop_token_ids": [int(t) for t in sampling.stop_token_ids],
        "ignore_eos": sampling.ignore_eos,
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": False,
    }
    if model:
        body["model"] = model
    return body


def parse_choices(response: dict[str, Any], n: int, max_new_tokens: int) -> list[tuple[list[int], list[float], str]]:
    """(token ids, sampled-token log-probs, finish reason) of the `n` choices, by index."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise EngineError(f"asked for {n} samples, the server returned {len(choices)} choices")
    out = []
    for choice in choices:
        ids = choice.get("token_ids")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if ids is None or logprobs is None:
            raise EngineError("the server returned no token_ids/logprobs: it must support "
                              "return_token_ids (vLLM >= 0.10) and logprobs=0")
        if len(ids) != len(logprobs) or len(ids) > max_new_tokens:
            raise EngineError(f"choice {choice.get('index')}: {len(ids)} tokens, {len(logprobs)} log-probs "
                              f"(at most {max_new_tokens} tokens asked)")
        reason = FINISH_REASONS.get(choice.get("finish_reason"))
        if reason is None:
            raise EngineError(f"choice {choice.get('index')}: finish_reason {choice.get('finish_reason')!r}")
        if any(value is None for value in logprobs):
            raise EngineError(f"choice {choice.get('index')}: a sampled token without a log-prob")
        out.append(([int(t) for t in ids], [float(v) for v in logprobs], reason))
    return out


def write_weights(source: Iterable[tuple[str, Tensor]], directory: Path) -> Path:
    """Write (name, tensor) pairs as `directory/model.safetensors` (tensors that share storage,
    such as tied embeddings, once: the loader ties them again); returns the file."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in source:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    final = directory / "model.safetensors"
    os.replace(partial, final)
    return final


def weights_root() -> Path:
    """Where weight files for the server go: /dev/shm (memory) where it exists."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class HTTPEngine:
    """`RolloutEngine` over an OpenAI-compatible completions server (vLLM, or alignkit's
    reference server). `url`: the server's base URL (http://127.0.0.1:8000);
    `logprobs_mode`: the server's `--logprobs-mode`; `model`: the served model name (None:
    the server's only one); `timeout`: seconds per request; `concurrency`: requests in flight;
    `pad_id`: fills response rows after their last token."""

    shares_policy = False
    exact_logprobs = False
    merged_weights = True

    def __init__(self, url: str, *, logprobs_mode: str = "raw_logprobs", model: str | None = None,
                 timeout: float = 600.0, concurrency: int = 64, pad_id: int = 0) -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.url, self.pad_id = url.rstrip("/"), int(pad_id)
        self.logprobs_mode, self.model, self.timeout = logprobs_mode, model, timeout
        self.concurrency = max(1, concurrency)
        self.version: int | None = None
        self._weights_dir: Path | None = None

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                text = reply.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise EngineError(f"{method} {self.url}{path}: HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise EngineError(f"{method} {self.url}{path}: the rollout server did not answer ({reason})") from None
        if not text.strip():
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # vLLM answers some endpoints (load_lora_adapter) in plain text
            return {"text": text.decode(errors="replace")}

    def wait_ready(self, timeout: float = 120.0, alive: Any = None) -> None:
        """Poll `/health` until the server answers (`alive()` False: it died; stop waiting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/health")
                return
            except EngineError as error:
                if (alive is not None and not alive()) or time.monotonic() > deadline:
                    raise EngineError(f"rollout server at {self.url} not ready after {timeout:.0f} s: {error}") from None
            time.sleep(0.25)

    # ------------------------------------------------------------------ RolloutEngine

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """`n` samples per prompt; row `i * n + j` is sample `j` of prompt `i`."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompt_ids or any(len(prompt) == 0 for prompt in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty prompts")
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
        first_prompt = sampling.first_sample // n
        bodies = [request_body(prompt, n, sampling, fold32(seed, first_prompt + i), self.model, self.logprobs_mode)
                  for i, prompt in enumerate(prompt_ids)]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            replies = list(pool.map(lambda body: self._call("POST", "/v1/completions", body), bodies))
        rows = [row for reply in replies for row in parse_choices(reply, n, sampling.max_new_tokens)]
        width = max(1, max(len(ids) for ids, _, _ in rows))
        count = len(rows)
        response_ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        response_logprobs = torch.zeros((count, width), dtype=torch.float32)
        response_mask = torch.zeros((count, width), dtype=torch.bool)
        for row, (ids, logprobs, _) in enumerate(rows):
            response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_logprobs[row, : len(ids)] = torch.tensor(logprobs, dtype=torch.float32)
            response_mask[row, : len(ids)] = True
        return Rollout(
            prompt_ids=[list(prompt) for prompt in prompt_ids for _ in range(n)],
            response_ids=response_ids,
            response_logprobs=response_logprobs,
            response_mask=response_mask,
            finish_reason=[reason for _, _, reason in rows],
            group_index=torch.arange(len(prompt_ids)).repeat_interleave(n),
            extras={"seconds": time.perf_counter() - started,
                    "generated_tokens": int(response_mask.sum()), "seed": seed, "requests": len(bodies)},
        )

    def update_weights(self, source: Iterable[tuple[str, Tensor]] | None, version: int) -> None:
        """Load the policy's weights after optimizer step `version` into the server and check
        that it reports that version (a mismatch is an error: the run would sample stale weights)."""
        if source is None:
            raise ValueError("HTTPEngine holds its own copy of the weights: pass the policy's (name, tensor) pairs")
        write_weights(source, self.weights_dir())

        def reload() -> None:
            self._call("POST", "/collective_rpc",
                       {"method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir())}})
            self.reset_prefix_cache()

        self._load_paused(reload, version, "weights")

    def update_adapter(self, source: Iterable[tuple[str, Tensor]], version: int, config: dict[str, Any]) -> None:
        """Load the policy's LoRA adapter after step `version` (the base stays the server's):
        written once, every earlier alignkit adapter on the server unloaded (this run's and any
        a killed run left), the new one loaded as `adapter_name(version)`, the version set and
        checked as in `update_weights`; later requests sample the new adapter."""
        directory = write_adapter(adapter_tensors(source), config, self.weights_dir() / f"adapter-v{version}")
        name = adapter_name(version)

        def load() -> None:
            for stale in self.served_adapters():
                self._call("POST", "/v1/unload_lora_adapter", {"lora_name": stale})
            try:
                self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
            except EngineError as error:
                if "HTTP 404" in str(error):
                    raise EngineError(f"{error}: start the server with --enable-lora --max-lora-rank R and "
                                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or sync merged weights") from None
                raise
            self.model = name

        self._load_paused(load, version, "adapter")
        for old in self.weights_dir().glob("adapter-v*"):
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)

    def _load_paused(self, load: Callable[[], None], version: int, what: str) -> None:
        """`/pause?mode=wait` -> load() -> `/update_weight_version` -> `/resume` (always), then
        the server must report `version` (else an EngineError: the run would sample stale weights)."""
        self._call("POST", "/pause?mode=wait")
        try:
            load()
            self._call("POST", "/update_weight_version", {"new_version": str(version)})
        finally:
            self._call("POST", "/resume")
        reported = self.weight_version()
        if reported != str(version):
            raise EngineError(f"rollout server at {self.url} reports weight version {reported!r} after "
                              f"loading step {version}'s {what}")
        self.version = version

    def weights_dir(self) -> Path:
        """This engine's directory for weight files (made on first use, removed by `close`)."""
        if self._weights_dir is None:
            self._weights_dir = Path(tempfile.mkdtemp(prefix="alignkit-weights-", dir=weights_root()))
        return self._weights_dir

    def reset_prefix_cache(self) -> None:
        """Drop the server's cached KV blocks, computed with the weights just replaced (vLLM's
        /pause clears them too, but its clear_cache flag is deprecated: asked for explicitly)."""
        if self._call("POST", "/reset_prefix_cache").get("success") is False:
            raise EngineError(f"rollout server at {self.url} could not reset its prefix cache after a weight load")

    def served_adapters(self) -> list[str]:
        """The alignkit adapters the server holds (`/v1/models` ids starting with ADAPTER_PREFIX)."""
        models = self._call("GET", "/v1/models").get("data") or []
        return [str(m.get("id")) for m in models if str(m.get("id", "")).startswith(ADAPTER_PREFIX)]

    def weight_version(self) -> str | None:
        """The weight version the server reports (`/weight_info`)."""
        version = self._call("GET", "/weight_info").get("weight_version")
        return None if version is None else str(version)

    def close(self) -> None:
        """Remove the weight files this engine wrote."""
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None
