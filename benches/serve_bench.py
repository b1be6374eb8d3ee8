"""``pie-rs serve`` under load: requests/s and p50/p99 latency, with pie-rs and without it.

Starts ``pie-rs serve MODEL`` twice on free ports, one after the other in the same run (with a
pool: ``--pooled-args``; without: ``--no-pool`` and ``--plain-args``), and sends each the same
``--requests`` completions (``--max-tokens`` greedy tokens each) at a fixed rate (open loop:
request ``i`` leaves at ``i / rate`` seconds, whatever the answers). It prints, for each server,
requests/s (answered requests over the time from the first send to the last answer), p50 and
p99 of the latency of a request, and checks that both servers answered the same text.

    python benches/serve_bench.py                       # a tiny Llama saved to a temporary folder
    python benches/serve_bench.py --rate 8 --requests 64 --json out.json
    python benches/serve_bench.py --model path/to/model --pooled-args "--gpu-budget 2GiB"

Needs the serving extras (``pip install 'pie-rs[serve]'``). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

PROMPTS = ["tell me a story", "the cat sat on the mat", "one two three", "why is the dog blue", "hello world"]
TINY_POOLED = "--gpu-budget 200000 --objective memory --page-size 8 --max-batch-tokens 64"
TINY_PLAIN = "--num-blocks 96 --page-size 8 --max-batch-tokens 64"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def server(model: str, extra: list[str], log: Path, timeout: float = 600):
    """A ``pie-rs serve`` subprocess, up and answering; stopped by SIGINT on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TRANSFORMERS_VERBOSITY="error")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pie_rs.cli", "serve", model, "--port", str(port), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {timeout} s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load(url: str, requests: int, rate: float, max_tokens: int) -> dict[str, Any]:
    """Sends ``requests`` completions at ``rate`` per second; latencies and texts."""
    latencies: list[float | None] = [None] * requests
    texts: list[str | None] = [None] * requests
    errors: list[str] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            body = post(url + "/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens})
            texts[i] = body["choices"][0]["text"]
            latencies[i] = time.perf_counter() - start
        except Exception as exc:
            errors.append(repr(exc))

    post(url + "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})  # warm up
    threads = []
    t0 = time.perf_counter()
    for i in range(requests):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    done = sorted(x for x in latencies if x is not None)
    q = statistics.quantiles(done, n=100, method="inclusive") if len(done) > 1 else done * 99
    return {
        "answered": len(done),
        "errors": errors[:5],
        "requests_per_s": len(done) / wall,
        "latency_p50_ms": 1e3 * q[49],
        "latency_p99_ms": 1e3 * q[98],
        "texts": texts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: a tiny Llama, saved)")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second sent (default 4)")
    parser.add_argument("--requests", type=int, default=32, help="requests per server (default 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    parser.add_argument("--pooled-args", default=None, help=f"pie-rs serve options (tiny default: {TINY_POOLED})")
    parser.add_argument("--plain-args", default=None, help=f"options without pie-rs (tiny default: {TINY_PLAIN})")
    parser.add_argument("--plain-first", action="store_true", help="run the server without pie-rs first")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pie-rs-serve-bench-") as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from models import save_chat_model

            model = save_chat_model(str(Path(tmp) / "model"))
        pooled = shlex.split(args.pooled_args if args.pooled_args is not None else TINY_POOLED)
        plain = ["--no-pool", *shlex.split(args.plain_args if args.plain_args is not None else TINY_PLAIN)]
        results = {}
        order = [("pie-rs", pooled), ("without pie-rs", plain)]
        for name, extra in reversed(order) if args.plain_first else order:
            with server(model, extra, Path(tmp) / f"{name.replace(' ', '-')}.log") as url:
                results[name] = load(url, args.requests, args.rate, args.max_tokens)
    same = results["pie-rs"]["texts"] == results["without pie-rs"]["texts"]
    print(f"{args.requests} requests at {args.rate:g}/s, {args.max_tokens} tokens each; same text: {same}")
    for name, r in results.items():
        print(
            f"  {name:15s} {r['answered']:4d} answered  {r['requests_per_s']:7.2f} req/s  "
            f"p50 {r['latency_p50_ms']:8.1f} ms  p99 {r['latency_p99_ms']:8.1f} ms"
            + (f"  errors: {r['errors']}" if r["errors"] else "")
        )
    if args.json:
        out = {name: {k: v for k, v in r.items() if k != "texts"} for name, r in results.items()}
        Path(args.json).write_text(json.dumps(out | {"same_text": same, "args": vars(args)}, indent=2))
    ok = same and all(r["answered"] == args.requests for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
