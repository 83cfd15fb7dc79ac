"""`--reward http://HOST:PORT/PATH`: score through a reward server, alignkit's own
(`alignkit serve-rm`) or any server speaking OpenRLHF's `--remote_rm_url` protocol.

Protocols (chosen by the path: `/score` is alignkit's, any other path OpenRLHF's; the option
`protocol=alignkit|openrlhf` overrides):

- alignkit: POST `{"prompts": [...], "completions": [...], COLUMN: [...]}` -> `{"rewards": [...]}`;
  prompts and completions go as they are (strings or message lists), with the extra dataset
  columns that are JSON (the policy's `completion_ids` and `trainer_state` stay home: they mean
  nothing to another model).
- openrlhf: POST `{"query": [prompt + completion], "prompts": [prompt], "labels": [label]}` ->
  `{"rewards": [...]}` or a bare list, as OpenRLHF's `remote_rm_utils.request_api_wrapper` sends
  and reads it (checked against openrlhf/utils/remote_rm_utils.py and cli/serve_rm.py). Labels
  come from the `label` column (option `label_column`), "" when the batch has none; text only.

Options, in the URL's fragment (never sent to the server) or as keyword arguments (which win;
the online presets' `--set reward_http_batch_size=...` etc. arrive that way):
`http://127.0.0.1:8000/score#batch_size=16&timeout=30&retries=3`

- batch_size (64): rows per request; a batch is sent as consecutive requests of that many rows;
- timeout (60 s): seconds to wait for one request's answer;
- retries (3): further attempts after a failed request, `backoff` (0.5 s) x 2^attempt apart.
  Connection errors, timeouts and HTTP 5xx/429 are retried; any other 4xx is the request's
  fault and fails at once.

When a request finally fails, `RewardServiceError` names the URL, the rows (`rows i..j` of the
batch being scored) and the last error; `score_safely` reports it as is instead of retrying
row by row.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urldefrag, urlparse

import torch
from torch import Tensor

from alignkit.rewards.base import RewardServiceError
from alignkit.rewards.outputs import RewardOutputError, as_reward_tensor

PROTOCOLS = ("alignkit", "openrlhf")
LOCAL_COLUMNS = frozenset({"completion_ids", "trainer_state"})  # the policy's, not the server's
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HTTPRewardOptions:
    """The client's options (module docstring)."""

    batch_size: int = 64
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    protocol: str | None = None
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {self.backoff}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


_CASTS = {"batch_size": int, "timeout": float, "retries": int, "backoff": float, "protocol": str,
          "label_column": str}


def parse_http_spec(spec: str, **overrides: Any) -> tuple[str, HTTPRewardOptions]:
    """(URL without fragment, options) of `http://HOST:PORT/PATH#key=value&...`; `overrides`
    (keyword arguments) win over the fragment. A bad URL or option is a ValueError naming it."""
    url, fragment = urldefrag(spec.strip())
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"reward spec {spec!r}: expected http://HOST:PORT/PATH")
    try:
        parsed.port  # noqa: B018 (raises on a bad port)
    except ValueError as error:
        raise ValueError(f"reward spec {spec!r}: {error}") from None
    given: dict[str, Any] = {}
    for key, value in parse_qsl(fragment, keep_blank_values=True):
        if key not in _CASTS:
            raise ValueError(f"reward spec {spec!r}: unknown option {key!r}; accepted: {sorted(_CASTS)}")
        try:
            given[key] = _CASTS[key](value)
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: option {key}={value!r} is not a {_CASTS[key].__name__}") from None
    unknown = sorted(set(overrides) - set(_CASTS))
    if unknown:
        raise ValueError(f"reward spec {spec!r}: unknown argument(s) {unknown}; accepted: {sorted(_CASTS)}")
    try:
        options = HTTPRewardOptions(**{**given, **overrides})
    except ValueError as error:
        raise ValueError(f"reward spec {spec!r}: {error}") from None
    return url, options


def _json_column(values: Any, n: int) -> list[Any] | None:
    """`values` as a JSON-ready list of n values, or None when it is not one (skipped)."""
    if isinstance(values, Tensor):
        values = values.tolist()
    if not isinstance(values, list | tuple) or len(values) != n:
        return None
    try:
        json.dumps(list(values))
    except (TypeError, ValueError):
        return None
    return list(values)


class HTTPReward:
    """A reward function scoring through a reward server (module docstring)."""

    def __init__(self, spec: str, **options: Any) -> None:
        self.url, self.options = parse_http_spec(spec, **options)
        path = urlparse(self.url).path.rstrip("/")
        self.protocol = self.options.protocol or ("alignkit" if path.endswith("/score") else "openrlhf")
        self.alignkit_reward_name = self.url
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"HTTPReward({self.url}, protocol={self.protocol}, batch_size={self.options.batch_size})"

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        if n == 0:
            return torch.zeros(0)
        size = self.options.batch_size
        chunks = [self._score_rows(prompts, completions, columns, start, min(start + size, n))
                  for start in range(0, n, size)]
        return torch.cat(chunks) if chunks[0].ndim == 1 else torch.cat(chunks, dim=0)

    # ------------------------------------------------------------------ one request

    def _body(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any], start: int,
              stop: int) -> dict[str, Any]:
        rows = stop - start
        if self.protocol == "alignkit":
            body = {"prompts": list(prompts[start:stop]), "completions": list(completions[start:stop])}
            for key, values in columns.items():
                column = None if key in LOCAL_COLUMNS or key in body else _json_column(values, len(completions))
                if column is not None:
                    body[key] = column[start:stop]
            return body
        texts = [(p, c) for p, c in zip(prompts[start:stop], completions[start:stop], strict=True)]
        if not all(isinstance(p, str) and isinstance(c, str) for p, c in texts):
            raise RewardServiceError(
                f"reward {self.url}: rows {start}..{stop - 1}: the OpenRLHF protocol sends text, and these rows "
                "hold message lists; serve them with `alignkit serve-rm` and use its /score path")
        labels = _json_column(columns.get(self.options.label_column), len(completions))
        return {"query": [p + c for p, c in texts], "prompts": [p for p, _ in texts],
                "labels": labels[start:stop] if labels is not None else [""] * rows}

    def _score_rows(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any], start: int,
                    stop: int) -> Tensor:
        where = f"reward {self.url}: rows {start}..{stop - 1}"
        data = json.dumps(self._body(prompts, completions, columns, start, stop)).encode()
        attempts = self.options.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.options.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            self.requests_sent += 1
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout) as reply:
                    text = reply.read()
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code not in RETRIED_STATUS:
                    raise RewardServiceError(f"{where}: HTTP {error.code}: {detail}") from None
                last = f"HTTP {error.code}: {detail}"
                continue
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                last = f"no answer ({getattr(error, 'reason', error)})"
                continue
            return self._parse(text, start, stop, where)
        raise RewardServiceError(f"{where}: failed after {attempts} attempt(s) "
                                 f"(timeout {self.options.timeout:g} s): {last}")

    def _parse(self, text: bytes, start: int, stop: int, where: str) -> Tensor:
        rows = stop - start
        try:
            reply = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RewardServiceError(f"{where}: the answer is not JSON: {text[:200]!r}") from None
        values = reply.get("rewards") if isinstance(reply, dict) else reply
        if values is None:
            raise RewardServiceError(f"{where}: the answer has no 'rewards' list: {str(reply)[:200]}")
        try:
            scores = as_reward_tensor(values, rows)
        except RewardOutputError as error:
            raise RewardServiceError(f"{where}: the server {error.detail}") from None
        if not bool(torch.isfinite(scores).all()):
            bad = next(i for i, v in enumerate(scores.reshape(rows, -1).tolist()) if not all(map(math.isfinite, v)))
            raise RewardServiceError(f"{where}: the server answered a non-finite reward for row {start + bad}")
        return scores


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The server's `{"error": ...}` message, else the start of its body."""
    body = error.read().decode(errors="replace")
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body[:300]
    return str(parsed.get("error", parsed))[:300] if isinstance(parsed, dict) else body[:300]
