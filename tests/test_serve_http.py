"""``pie-rs serve``: the OpenAI-compatible server, run as a subprocess on a free port.

A tiny Llama and a word-level tokenizer with a chat template are saved to a temporary folder
(offline). One server with a pie-rs pool (every layer pooled by a small budget) answers most
tests; a second one without pie-rs gives the reference greedy text; a third is stopped by SIGINT
in the middle of a request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pie_rs import serve as serve_module
from pie_rs.serving import serving_supported

from models import save_chat_model

for _name in serve_module.EXTRAS:
    pytest.importorskip(_name)
if serving_supported() is not None:
    pytest.skip(serving_supported(), allow_module_level=True)

START_TIMEOUT = 300.0
POOLED = ["--gpu-budget", "200000", "--objective", "memory", "--page-size", "8", "--max-batch-tokens", "64"]
PLAIN = ["--no-pool", "--num-blocks", "96", "--page-size", "8", "--max-batch-tokens", "64"]
PROMPTS = ["tell me a story", "the cat sat on the mat", "one two three", "why is the dog blue"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ``pie-rs serve`` subprocess; ``stop()`` always leaves no process behind."""

    def __init__(self, model: str, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pie_rs.cli", "serve", model, "--port", str(self.port), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError):
                if get(self.url + "/health", timeout=5)[0] == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server not up after {START_TIMEOUT} s:\n{self.log_text()}")
            time.sleep(0.5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def get(url: str, timeout: float = 60) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def stream(url: str, body: dict, timeout: float = 120) -> Iterator[dict]:
    """The JSON events of a server-sent event stream (``data: [DONE]`` ends it)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body | {"stream": True}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            yield json.loads(line[len("data: ") :])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_chat_model(str(tmp_path_factory.mktemp("chat-model")))


@pytest.fixture(scope="module")
def pooled(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(model_dir, POOLED, tmp_path_factory.mktemp("logs") / "pooled.log")
    yield server
    server.stop()  # SIGTERM: a clean stop, the pool detached and no thread left
    assert server.proc.returncode == 0, server.log_text()
    assert "pie-rs serve: stopped" in server.log_text()


def complete(server: Server, prompt: str, max_tokens: int = 8, **kw: object) -> dict:
    status, body = post(server.url + "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **kw})
    assert status == 200, body
    return body


def metrics(server: Server) -> dict[str, float]:
    """``/metrics``: each sample summed over its labels."""
    _, text = get(server.url + "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)  # summed over labels
    return out


def test_models_completion_chat_and_metrics(pooled: Server, model_dir: str) -> None:
    status, text = get(pooled.url + "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(text)["data"]] == [model_dir]

    body = complete(pooled, "tell me a story", max_tokens=8, model=model_dir)
    assert body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == 4
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["choices"][0]["text"].strip()

    status, chat = post(
        pooled.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6},
    )
    assert status == 200, chat
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["message"]["content"].strip()
    assert chat["usage"]["prompt_tokens"] == 7  # "user : hello world </s> assistant :"

    stats = metrics(pooled)
    assert stats["pie_rs_pool_attached"] == 1
    assert stats["pie_rs_serving_pooled_layers"] == 4  # the budget pools every layer
    assert stats["pie_rs_serving_h2d_bytes"] > 0
    assert stats["pie_rs_serving_d2h_bytes"] > 0
    assert stats["pie_rs_http_requests_total"] >= 3


def test_streaming_gives_several_chunks_with_the_same_text(pooled: Server) -> None:
    messages = [{"role": "user", "content": "tell me about the red cat"}]
    events = list(stream(pooled.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 8}))
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    pieces = [p for p in pieces if p]
    assert len(pieces) >= 3, events
    status, whole = post(pooled.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 8})
    assert status == 200
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]

    chunks = list(stream(pooled.url + "/v1/completions", {"prompt": "one two three", "max_tokens": 6}))
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0].get("text")) >= 3


def test_four_concurrent_requests_all_answer(pooled: Server) -> None:
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        results[i] = complete(pooled, PROMPTS[i], max_tokens=12)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(results) == [0, 1, 2, 3]
    for i, body in results.items():  # batched together, greedy text as when each comes alone
        assert body["choices"][0]["text"] == complete(pooled, PROMPTS[i], max_tokens=12)["choices"][0]["text"]
    assert metrics(pooled)["pie_rs_serving_peak_running"] >= 1


def test_bad_requests_get_4xx_and_the_server_keeps_serving(pooled: Server) -> None:
    url = pooled.url + "/v1/completions"
    status, body = post(url, {"prompt": "hello", "max_tokens": -3})
    assert status == 400 and "max_tokens" in body["detail"]
    status, body = post(url, {"prompt": "hello", "model": "no/such-model"})
    assert status == 404 and "no/such-model" in body["detail"]
    status, body = post(url, {"prompt": " ".join(["hello"] * 300), "max_tokens": 4})
    assert status == 400 and "context" in body["detail"]
    status, body = post(
        pooled.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": " ".join(["cat"] * 300)}], "stream": True},
    )
    assert status == 400 and "context" in body["detail"]
    status, body = post(pooled.url + "/v1/chat/completions", {"messages": []})
    assert status == 400
    assert complete(pooled, "hello world", max_tokens=4)["choices"][0]["text"].strip()


def test_greedy_text_equals_the_server_without_pie_rs(
    pooled: Server, model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plain = Server(model_dir, PLAIN, tmp_path_factory.mktemp("logs") / "plain.log")
    try:
        _, text = get(plain.url + "/metrics")
        assert "pie_rs_pool_attached{" not in text  # no pool in this one
        for prompt in PROMPTS:
            a = complete(pooled, prompt, max_tokens=16)["choices"][0]["text"]
            b = complete(plain, prompt, max_tokens=16)["choices"][0]["text"]
            assert a == b, prompt
        plain.proc.terminate()
        assert plain.proc.wait(timeout=60) == 0, plain.log_text()
    finally:
        plain.stop()


@pytest.mark.slow
def test_sigint_stops_the_server_cleanly(model_dir: str, tmp_path: Path) -> None:
    server = Server(model_dir, POOLED, tmp_path / "sigint.log")
    try:
        received: list[dict] = []

        def long_stream() -> None:
            with contextlib.suppress(Exception):
                received.extend(stream(server.url + "/v1/completions", {"prompt": "tell", "max_tokens": 200}))

        client = threading.Thread(target=long_stream)
        client.start()
        time.sleep(1.0)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        rc = server.proc.wait(timeout=60)
        took = time.monotonic() - start
        client.join(timeout=30)
        log = server.log_text()
        assert rc == 0, log
        assert took < 20, (took, log)
        assert "pie-rs serve: stopped" in log
        assert "threads still running" not in log
        assert not client.is_alive()
        with pytest.raises(OSError):
            get(server.url + "/health", timeout=5)
    finally:
        server.stop()


def test_a_budget_too_small_exits_1_with_the_reason(model_dir: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = ["serve", model_dir, "--port", str(free_port()), "--gpu-budget", "1000", "--objective", "memory"]
    done = subprocess.run(
        [sys.executable, "-m", "pie_rs.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot hold a paged cache" in done.stderr
    assert "continuous batching failed to start" in done.stderr
