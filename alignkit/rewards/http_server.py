"""A reward server: any alignkit reward function over HTTP, with concurrent requests
micro-batched into the model's batches (`alignkit serve-rm DIR --port P`).

Endpoints (JSON in, JSON out; every error is `{"error": "..."}` with a 4xx/5xx status):

- `POST /score` (alignkit's own): `{"prompts": [...], "completions": [...], COLUMN: [...]}`
  -> `{"rewards": [...]}`. Prompts and completions are strings or message lists; every other
  key is a dataset column with one value per row, passed to the reward by name (as
  `score_safely` passes columns). A multi-objective reward answers one list per row.
- `POST /get_reward` (OpenRLHF's `--remote_rm_url` protocol, checked against OpenRLHF's
  `openrlhf/utils/remote_rm_utils.py`, whose `request_api_wrapper` posts
  `{"query": [...], "prompts": [...], "labels": [...]}`, and its `update_samples_with_rewards`,
  which reads `rewards` and, when present, `scores`): each query is the prompt followed by the
  response, so the response is what follows the row's prompt in its query (a query that does
  not contain its prompt is a 400 naming the row); without `prompts` (OpenRLHF before 0.5)
  the whole query is scored as the response to an empty prompt. `labels` reach the reward as
  the `label` column. -> `{"rewards": [...], "scores": [...]}` (the same values).
- `GET /health` -> `{"status": "ok", "reward": NAME, "max_batch": N}`.

Micro-batching: a request's rows join a queue; one scoring thread takes rows from the
requests waiting (in arrival order, whole requests of the same columns together, a large
request split) up to `max_batch` rows, waiting at most `max_wait_s` for more to arrive, scores
them in one call and hands each request its rows back. A batch that fails is scored again one
request at a time, so a bad request fails alone. A reward that fails on a row answers 422 with
`score_safely`'s message (the row's index in that request); a malformed body answers 400;
the server keeps serving after a client that disconnects mid-request (its reply is dropped).

Bound to 127.0.0.1 unless `host` says otherwise: a reward server runs arbitrary models on
whatever it is sent, so exposing it is the user's explicit choice.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from alignkit.rewards.base import RewardError, reward_name, score_safely

MAX_BODY_BYTES = 64 * 1024 * 1024
SOCKET_TIMEOUT_S = 60.0  # a client that stops sending frees its thread after this long


class RequestError(ValueError):
    """A request the server refuses: answered with HTTP 400 and this message."""


@dataclass
class ScoreJob:
    """One request's rows waiting to be scored; `done` is set once `scores` or `error` is."""

    prompts: list[Any]
    completions: list[Any]
    columns: dict[str, list[Any]]
    scores: list[Any] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.columns))


@dataclass
class _Slice:
    """Rows [start, stop) of a job, as one piece of a micro-batch."""

    job: ScoreJob
    start: int
    stop: int


class MicroBatcher:
    """Scores `ScoreJob`s with `reward` on one thread, at most `max_batch` rows per call."""

    def __init__(self, reward: Callable[..., Any], *, max_batch: int = 32, max_wait_s: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.reward, self.max_batch, self.max_wait_s = reward, max_batch, max_wait_s
        self.batches_scored = 0
        self._queue: queue.Queue[_Slice | None] = queue.Queue()
        self._held: _Slice | None = None  # taken from the queue but did not fit the last batch
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def score(self, job: ScoreJob) -> ScoreJob:
        """Queue `job` (split into pieces of at most max_batch rows) and wait for its scores."""
        if not job.completions:
            job.done.set()
            return job
        job.scores = [None] * len(job.completions)
        for start in range(0, len(job.completions), self.max_batch):
            self._queue.put(_Slice(job, start, min(start + self.max_batch, len(job.completions))))
        job.done.wait()
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _next(self, timeout: float | None) -> _Slice | None:
        if self._held is not None:
            held, self._held = self._held, None
            return held
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _gather(self) -> list[_Slice] | None:
        """The next micro-batch: the first waiting piece, then pieces with its columns while
        they fit in max_batch and arrive within max_wait_s. None: closing."""
        first = self._next(None)
        if first is None:
            return None
        batch, rows = [first], first.stop - first.start
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            try:
                piece = self._next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if piece is None:
                self._queue.put(None)  # close after this batch
                break
            size = piece.stop - piece.start
            if piece.job.column_names != first.job.column_names or rows + size > self.max_batch:
                self._held = piece
                break
            batch.append(piece)
            rows += size
        return batch

    def _score_pieces(self, pieces: list[_Slice]) -> None:
        prompts = [p for s in pieces for p in s.job.prompts[s.start:s.stop]]
        completions = [c for s in pieces for c in s.job.completions[s.start:s.stop]]
        columns = {name: [v for s in pieces for v in s.job.columns[name][s.start:s.stop]]
                   for name in pieces[0].job.column_names}
        offset = pieces[0].start if len(pieces) == 1 else 0
        scores, _ = score_safely(self.reward, prompts, completions, row_offset=offset, **columns)
        self.batches_scored += 1
        values = scores.tolist()
        at = 0
        for piece in pieces:
            size = piece.stop - piece.start
            piece.job.scores[piece.start:piece.stop] = values[at:at + size]
            at += size
            if all(value is not None for value in piece.job.scores):
                piece.job.done.set()

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                self._score_pieces(batch)
            except Exception:  # isolate: each piece on its own, so only the bad request fails
                for piece in batch:
                    if piece.job.done.is_set():
                        continue
                    try:
                        self._score_pieces([piece])
                    except Exception as error:  # noqa: BLE001 (answered to the client as 422)
                        piece.job.error = str(error) if isinstance(error, RewardError) else (
                            f"{type(error).__name__}: {error}")
                        piece.job.done.set()


def _rows(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if not isinstance(value, list):
        raise RequestError(f"'{key}' must be a list (one entry per row), got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not (isinstance(entry, str) or (isinstance(entry, list) and all(isinstance(m, dict) for m in entry))):
            raise RequestError(f"'{key}' row {i}: expected a string or a message list, got {type(entry).__name__}")
    return value


def score_job(body: Any) -> ScoreJob:
    """The `ScoreJob` of a `/score` body (RequestError when malformed)."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    prompts, completions = _rows(body, "prompts"), _rows(body, "completions")
    if len(prompts) != len(completions):
        raise RequestError(f"{len(prompts)} prompts but {len(completions)} completions")
    columns = {}
    for key, value in body.items():
        if key in ("prompts", "completions"):
            continue
        if not isinstance(value, list) or len(value) != len(completions):
            raise RequestError(f"column '{key}' must be a list with one value per row ({len(completions)})")
        columns[key] = value
    return ScoreJob(prompts, completions, columns)


def openrlhf_job(body: Any) -> ScoreJob:
    """The `ScoreJob` of an OpenRLHF `/get_reward` body: the response is the query after its
    prompt (module docstring)."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    queries = body.get("query")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError("'query' must be a list of strings (prompt + response per row)")
    prompts = body.get("prompts")
    if prompts is None:
        prompts, completions = [""] * len(queries), list(queries)
    else:
        if not isinstance(prompts, list) or len(prompts) != len(queries) or not all(isinstance(p, str) for p in prompts):
            raise RequestError(f"'prompts' must be a list of {len(queries)} strings, one per query")
        completions = []
        for i, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
            at = query.find(prompt)
            if at < 0:
                raise RequestError(f"row {i}: the query does not contain its prompt {prompt[:60]!r}")
            completions.append(query[at + len(prompt):])
    columns = {}
    labels = body.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) != len(queries):
            raise RequestError(f"'labels' must be a list of {len(queries)} values, one per query")
        columns["label"] = labels
    return ScoreJob(list(prompts), completions, columns)


class RewardServer:
    """Serves `reward` (any reward function) on `host`:`port` (port 0: a free one)."""

    def __init__(self, reward: Callable[..., Any], *, host: str = "127.0.0.1", port: int = 0,
                 max_batch: int = 32, max_wait_s: float = 0.01, name: str | None = None) -> None:
        self.name = name or reward_name(reward)
        self.batcher = MicroBatcher(reward, max_batch=max_batch, max_wait_s=max_wait_s)
        self.requests = 0
        self._count_lock = threading.Lock()  # handler threads count requests concurrently
        self._http = ThreadingHTTPServer((host, port), _handler(self))
        self._http.daemon_threads = True
        self._http.handle_error = lambda request, address: None  # a vanished client is not an error
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RewardServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread = None
        self._http.server_close()
        self.batcher.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def answer(self, method: str, path: str, body: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        """(status, reply) of one request; `body` is the parsed JSON (None for GET)."""
        if (method, path) == ("GET", "/health"):
            return HTTPStatus.OK, {"status": "ok", "reward": self.name, "max_batch": self.batcher.max_batch}
        parsers = {"/score": score_job, "/get_reward": openrlhf_job}
        if method != "POST" or path not in parsers:
            return HTTPStatus.NOT_FOUND, {"error": f"not served: {method} {path} (POST /score, POST /get_reward, "
                                                   "GET /health)"}
        job = parsers[path](body)
        with self._count_lock:
            self.requests += 1
        job = self.batcher.score(job)
        if job.error is not None:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": job.error}
        if path == "/get_reward":
            return HTTPStatus.OK, {"rewards": job.scores, "scores": job.scores}
        return HTTPStatus.OK, {"rewards": job.scores}


def _handler(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT_S
        protocol_version = "HTTP/1.1"

        def _body(self) -> Any:
            text = self.headers.get("Content-Length")
            if text is None:
                raise RequestError("Content-Length is required")
            try:
                length = int(text)
            except ValueError:
                raise RequestError(f"bad Content-Length {text!r}") from None
            if length < 0 or length > MAX_BODY_BYTES:
                raise RequestError(f"Content-Length {length} outside [0, {MAX_BODY_BYTES}]")
            data = self.rfile.read(length)
            if len(data) < length:
                raise ConnectionAbortedError("the client closed the connection mid-request")
            try:
                return json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(f"the body is not JSON: {error}") from None

        def _answer(self, method: str) -> None:
            try:
                body = self._body() if method == "POST" else None
                status, reply = server.answer(method, urlparse(self.path).path, body)
            except RequestError as error:
                status, reply = HTTPStatus.BAD_REQUEST, {"error": str(error)}
            except (ConnectionError, TimeoutError):
                self.close_connection = True
                return
            except Exception as error:  # noqa: BLE001 (a bug here answers 500, and the server keeps serving)
                status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"}
            data = json.dumps(reply).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (ConnectionError, TimeoutError):  # the client left before its answer
                self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def log_message(self, *args: Any) -> None:  # quiet: one line per request would drown the run's log
            return

    return Handler


def load_served_reward(spec: str, max_batch: int) -> Callable[..., Any]:
    """The reward `serve-rm` serves: a saved reward-model directory (any kind
    `load_reward_model` loads, scoring `max_batch` rows per forward) or any reward spec
    (`rm:DIR`, a built-in, `file.py:function`, `module:function`)."""
    from pathlib import Path

    from alignkit.rewards.loading import load_reward
    from alignkit.rewards.saved import load_reward_model, reward_model_kind

    directory = spec[3:] if spec.startswith("rm:") else spec
    if Path(directory).is_dir():
        kwargs = {} if reward_model_kind(directory) == "embedding_rm" else {"batch_size": max_batch}
        return load_reward_model(directory, **kwargs)
    if spec.startswith(("http://", "https://")):
        raise ValueError(f"serve-rm {spec}: serve a reward model or a reward function, not another server")
    return load_reward(spec)


def main(argv: list[str] | None = None) -> int:
    """alignkit serve-rm DIR|SPEC [--port P] [--host H] [--max-batch N] [--max-wait-ms MS]"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="alignkit serve-rm",
        description="Serve a reward model (any saved alignkit reward-model directory) or reward spec over "
        "HTTP: POST /score {prompts, completions, columns...} -> {rewards}, POST /get_reward (OpenRLHF's "
        "remote_rm_url format: {query, prompts, labels} -> {rewards, scores}), GET /health. Concurrent "
        "requests are micro-batched. Train against it with --reward http://HOST:PORT/score.",
    )
    parser.add_argument("reward", help="reward-model directory, rm:DIR, or a reward spec (vader, file.py:fn, ...)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--max-batch", type=int, default=32, help="most rows scored in one call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a batch waits for more requests to join it")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in [0, 65535]")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch}: must be >= 1")
    if args.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms {args.max_wait_ms}: must be >= 0")
    reward = load_served_reward(args.reward, args.max_batch)
    try:
        server = RewardServer(reward, host=args.host, port=args.port, max_batch=args.max_batch,
                              max_wait_s=args.max_wait_ms / 1000, name=args.reward)
    except OSError as error:
        raise ValueError(f"serve-rm: cannot bind {args.host}:{args.port}: {error.strerror or error}") from None
    print(f"serving {args.reward} at {server.url} (POST /score, POST /get_reward, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
