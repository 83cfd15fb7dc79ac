"""The reward server (`alignkit serve-rm`) and `--reward http://...`: scores through HTTP equal
in-process scores exactly (alignkit's /score and OpenRLHF's /get_reward), concurrent requests
are micro-batched, malformed requests and vanished clients leave the server serving, the client
retries then names the failing rows and URL, and a GRPO run trains against the server.

Every server here binds 127.0.0.1 on port 0 (a free port); nothing leaves the machine."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from run_helpers import read_metrics, write_jsonl

from alignkit.cli import main as cli_main
from alignkit.models import load_model, save_pretrained_merged
from alignkit.rewards import RewardError, load_reward, score_safely
from alignkit.rewards.base import RewardServiceError
from alignkit.rewards.http_reward import HTTPReward, parse_http_spec
from alignkit.rewards.http_server import RewardServer, load_served_reward

PROMPTS = ["Write a short review. The movie", "Hi", "What is two plus two?", "The film", "Tell me", "The story"]
COMPLETIONS = [" was good and great.", " no", " The answer is 4.", " was awful.", " a tale", " was sad"]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model (random head, so scores differ across texts), saved as alignkit saves one."""
    torch.manual_seed(0)
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward", device="cpu")
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return save_pretrained_merged(model, tokenizer, tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def rm_server(rm_dir):
    with RewardServer(load_served_reward(str(rm_dir), 32), max_batch=32) as server:
        yield server


def post(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_scores_through_the_server_equal_in_process_scores_exactly(rm_dir, rm_server):
    in_process = load_served_reward(str(rm_dir), 32)(PROMPTS, COMPLETIONS)
    assert in_process.std() > 0
    served = load_reward(f"{rm_server.url}/score")
    assert torch.equal(served(PROMPTS, COMPLETIONS), in_process)
    # OpenRLHF's format: the query is prompt + response, the server cuts the prompt off
    openrlhf = HTTPReward(f"{rm_server.url}/get_reward")
    assert openrlhf.protocol == "openrlhf"
    assert torch.equal(openrlhf(PROMPTS, COMPLETIONS), in_process)
    status, reply = post(f"{rm_server.url}/get_reward", json.dumps(
        {"query": [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)], "prompts": PROMPTS, "labels": [""] * 6}).encode())
    assert status == 200 and reply["rewards"] == reply["scores"] == in_process.tolist()
    # OpenRLHF before 0.5 sends only "query": the whole query is the response to an empty prompt
    status, reply = post(f"{rm_server.url}/get_reward", json.dumps({"query": COMPLETIONS}).encode())
    assert status == 200 and reply["rewards"] == load_served_reward(str(rm_dir), 32)([""] * 6, COMPLETIONS).tolist()
    # a client batch of 4 rows is two requests (4 + 2): each equals scoring those rows in process
    chunked = HTTPReward(f"{rm_server.url}/score#batch_size=4")
    before = rm_server.requests
    expected = torch.cat([load_served_reward(str(rm_dir), 32)(PROMPTS[:4], COMPLETIONS[:4]),
                          load_served_reward(str(rm_dir), 32)(PROMPTS[4:], COMPLETIONS[4:])])
    assert torch.equal(chunked(PROMPTS, COMPLETIONS), expected)
    assert rm_server.requests - before == 2


def test_concurrent_requests_are_micro_batched_and_each_gets_its_own_rows():
    batch_sizes = []

    def length(prompts, completions, **columns):
        batch_sizes.append(len(completions))
        return [float(len(c)) + float(w) for c, w in zip(completions, columns["weight"], strict=True)]

    with RewardServer(length, max_batch=8, max_wait_s=0.3) as server:
        client = HTTPReward(f"{server.url}/score")
        results = {}

        def send(k: int) -> None:
            completions = ["x" * k, "y" * (k + 10)]
            results[k] = client(["p", "q"], completions, weight=[k * 100, 0]).tolist()

        threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {k: [float(k + k * 100), float(k + 10)] for k in range(6)}
    assert sum(batch_sizes) == 12 and max(batch_sizes) <= 8
    assert len(batch_sizes) < 6  # requests were scored together, not one call each


def test_a_request_larger_than_max_batch_is_split():
    batch_sizes = []

    def length(prompts, completions):
        batch_sizes.append(len(completions))
        return [float(len(c)) for c in completions]

    with RewardServer(length, max_batch=3, max_wait_s=0.0) as server:
        scores = HTTPReward(f"{server.url}/score")(PROMPTS, COMPLETIONS)
    assert scores.tolist() == [float(len(c)) for c in COMPLETIONS]
    assert batch_sizes == [3, 3]


def test_malformed_requests_get_a_400_with_a_json_error_and_the_server_keeps_serving(rm_server):
    url = f"{rm_server.url}/score"
    cases = {
        b"not json": "not JSON",
        b"[1, 2]": "JSON object",
        json.dumps({"prompts": ["a"], "completions": ["b", "c"]}).encode(): "1 prompts but 2 completions",
        json.dumps({"prompts": "a", "completions": ["b"]}).encode(): "'prompts' must be a list",
        json.dumps({"prompts": ["a"], "completions": [3]}).encode(): "'completions' row 0",
        json.dumps({"prompts": ["a"], "completions": ["b"], "label": [1, 2]}).encode(): "column 'label'",
    }
    for body, message in cases.items():
        status, reply = post(url, body)
        assert status == 400 and message in reply["error"], (body, reply)
    status, reply = post(f"{rm_server.url}/get_reward", json.dumps({"query": ["hello"], "prompts": ["bye"]}).encode())
    assert status == 400 and "row 0: the query does not contain its prompt" in reply["error"]
    status, reply = post(f"{rm_server.url}/nowhere", b"{}")
    assert status == 404 and "POST /score" in reply["error"]
    status, reply = post(url, json.dumps({"prompts": PROMPTS[:2], "completions": COMPLETIONS[:2]}).encode())
    assert status == 200 and len(reply["rewards"]) == 2


def test_the_server_survives_clients_that_disconnect_mid_request():
    release = threading.Event()

    def slow(prompts, completions):
        release.wait(5)
        return [1.0] * len(completions)

    with RewardServer(slow, max_batch=8) as server:
        host, port = server._http.server_address[:2]
        # 1. headers promise 1000 bytes, 10 arrive, the client closes
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompts\"")
        # 2. a whole request, then the client leaves before its (slow) answer
        body = json.dumps({"prompts": ["p"], "completions": ["c"]}).encode()
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.2)
        release.set()
        time.sleep(0.2)
        status, reply = post(f"{server.url}/score", body)
        assert status == 200 and reply == {"rewards": [1.0]}
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as health:
            assert json.loads(health.read())["status"] == "ok"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_server_is_retried_then_named_with_the_rows_and_url():
    url = f"http://127.0.0.1:{free_port()}/score"
    client = HTTPReward(f"{url}#retries=2&backoff=0.01&timeout=2&batch_size=4")
    with pytest.raises(RewardServiceError, match=r"rows 0\.\.3: failed after 3 attempt\(s\)") as caught:
        client(PROMPTS, COMPLETIONS)
    assert url in str(caught.value) and client.requests_sent == 3
    # score_safely reports it as is: no row-by-row retry of a server that is down
    client.requests_sent = 0
    with pytest.raises(RewardError, match=r"rows 0\.\.3.*\[step 2\]"):
        score_safely(client, PROMPTS, COMPLETIONS, batch="step 2")
    assert client.requests_sent == 3


class FlakyHandler(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then one reward per row (OpenRLHF's reply)."""

    failures = 2
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FlakyHandler.seen.append(body)
        if len(FlakyHandler.seen) <= FlakyHandler.failures:
            status, reply = 503, {"error": "warming up"}
        else:
            status, reply = 200, [float(len(q)) for q in body["query"]]
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        return


def test_5xx_is_retried_with_backoff_and_the_openrlhf_body_is_what_openrlhf_sends():
    FlakyHandler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = HTTPReward(f"http://127.0.0.1:{server.server_address[1]}/get_reward#retries=3&backoff=0.01")
        scores = client(PROMPTS[:2], COMPLETIONS[:2], label=["a", "b"], completion_ids=[[1], [2]])
    finally:
        server.shutdown()
        server.server_close()
    assert scores.tolist() == [float(len(p + c)) for p, c in zip(PROMPTS[:2], COMPLETIONS[:2], strict=True)]
    assert len(FlakyHandler.seen) == 3
    assert FlakyHandler.seen[-1] == {"query": [p + c for p, c in zip(PROMPTS[:2], COMPLETIONS[:2], strict=True)],
                                     "prompts": PROMPTS[:2], "labels": ["a", "b"]}


def test_a_row_the_server_cannot_score_fails_at_once_naming_the_row():
    def picky(prompts, completions):
        return [float("nan") if "boom" in c else 1.0 for c in completions]

    with RewardServer(picky, max_batch=8) as server:
        client = HTTPReward(f"{server.url}/score#retries=3&backoff=0.01")
        with pytest.raises(RewardServiceError, match=r"rows 0\.\.2: HTTP 422: .*row 2 .*non-finite") as caught:
            client(["a", "b", "c"], ["fine", "ok", "boom"])
    assert client.requests_sent == 1 and server.url in str(caught.value)


def test_spec_options_and_their_errors():
    url, options = parse_http_spec("http://127.0.0.1:9/score#batch_size=8&timeout=2.5", retries=0)
    assert url == "http://127.0.0.1:9/score" and (options.batch_size, options.timeout, options.retries) == (8, 2.5, 0)
    assert parse_http_spec("http://127.0.0.1:9/score#batch_size=8", batch_size=2)[1].batch_size == 2
    for spec, message in [
        ("http://127.0.0.1:9/score#batchsize=8", "unknown option 'batchsize'"),
        ("http://127.0.0.1:9/score#batch_size=many", "batch_size='many' is not a int"),
        ("http://127.0.0.1:9/score#batch_size=0", "batch_size must be >= 1"),
        ("http://127.0.0.1:9/score#protocol=grpc", "protocol must be one of"),
        ("http:///score", "expected http://HOST:PORT/PATH"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_reward(spec)


def test_grpo_trains_against_the_reward_server(tiny_model_dir, rm_server, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    before = rm_server.requests
    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "run"),
                     "--max-steps", "2", "--batch-size", "2", "--reward", f"{rm_server.url}/score",
                     "--set", "group_size=2", "--set", "max_new_tokens=4", "--set", "reward_http_batch_size=3",
                     "--no-progress"])
    assert code == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["reward/mean"])) for r in rows)
    assert rm_server.requests - before == 4  # 2 steps x 4 samples, 3 rows a request: 2 requests a step


def test_reward_http_settings_without_a_server_are_an_error(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "run"),
                     "--max-steps", "1", "--batch-size", "2", "--reward", "length:3", "--set",
                     "reward_http_timeout=5", "--no-progress"])
    assert code == 2


def test_alignkit_eval_scores_through_the_server_as_in_process(tiny_model_dir, rm_dir, rm_server, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a short review."},
                                                        {"prompt": [{"role": "user", "content": "The movie"}]}])
    results = {}
    for name, reward in (("served", f"{rm_server.url}/score"), ("local", str(rm_dir))):
        assert cli_main(["eval", "--model", str(tiny_model_dir), "--prompts", prompts, "--reward", reward,
                         "--samples", "2", "--max-new-tokens", "6", "--no-embeddings", "--output",
                         str(tmp_path / name)]) == 0
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert results["served"]["n"] == 4
    assert results["served"]["gold_reward"] == pytest.approx(results["local"]["gold_reward"], abs=1e-5)


def test_the_serve_rm_verb_serves_until_stopped(rm_dir):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve-rm", str(rm_dir), "--port", "0",
                                "--max-batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {rm_dir} at http://127.0.0.1:"), (line, process.stderr.read())
        url = line.split(" at ")[1].split()[0]
        scores = HTTPReward(f"{url}/score")(PROMPTS, COMPLETIONS)  # the server scores rows 0-3, then 4-5
        scorer = load_served_reward(str(rm_dir), 4)
        local = torch.cat([scorer(PROMPTS[:4], COMPLETIONS[:4]), scorer(PROMPTS[4:], COMPLETIONS[4:])])
        # another process with its own thread count: the same batches, float-level differences only
        # (the in-process tests above compare bit for bit); a fresh-clone run differed in the last bit
        torch.testing.assert_close(scores, local, rtol=1e-5, atol=1e-6)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_rm_flag_errors_are_one_line(capsys):
    assert cli_main(["serve-rm", "vader", "--port", "70000"]) == 2
    assert "--port 70000: must be in [0, 65535]" in capsys.readouterr().err
    assert cli_main(["serve-rm", "no_such_module:fn", "--port", "0"]) == 2
    assert "module 'no_such_module' not found" in capsys.readouterr().err
