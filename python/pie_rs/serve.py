"""``pie-rs serve MODEL``: an OpenAI-compatible HTTP server whose KV cache is pooled by pie-rs.

It is transformers' own server (``transformers serve --continuous-batching``: FastAPI + uvicorn,
``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` with ``"stream": true`` as
server-sent events) with the model loaded once, a pool attached (``pie_rs.attach``) so that
continuous batching runs through pie-rs, requests checked before they reach the model (a 4xx
with a message for a negative ``max_tokens``, an unknown model or a prompt longer than the
context), and the pool's stats on ``/metrics`` in the Prometheus text format.

SIGINT or SIGTERM stop it: in-flight requests get a few seconds to end, then continuous
batching is stopped and the pool detached.

Needs the serving extras: ``pip install 'pie-rs[serve]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["EXTRAS", "add_arguments", "build_app", "missing_extras", "run_serve"]

#: The modules the server needs beyond pie-rs' own dependencies (``pie-rs[serve]``).
EXTRAS = ("fastapi", "uvicorn", "openai", "prometheus_client")


def missing_extras() -> list[str]:
    """The serving modules that are not installed."""
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``pie-rs serve``'s options to ``parser``."""
    parser.add_argument("model", help="a local model folder or a hub id")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument(
        "--gpu-budget",
        default=None,
        help="device memory the KV cache may use: bytes, a size (6GiB) or a fraction of free memory "
        "(default: everything resident if it fits)",
    )
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    parser.add_argument("--objective", choices=("speed", "memory"), default="speed")
    parser.add_argument("--device", default="auto", help="where to load the model (auto, cpu, cuda, 0, ...)")
    parser.add_argument("--dtype", default="auto", help="torch dtype of the weights (default: from the checkpoint)")
    parser.add_argument("--page-size", type=int, default=None, help="continuous batching page (block) size in tokens")
    parser.add_argument("--num-blocks", type=int, default=None, help="continuous batching blocks wanted")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="most tokens in one batch")
    parser.add_argument(
        "--no-pool",
        action="store_true",
        help="serve without pie-rs (transformers' own paged cache), for comparisons",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=3.0,
        help="seconds in-flight requests get to end after SIGINT/SIGTERM (default 3)",
    )


def _budget(text: str | None) -> int | float | str | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool | int | float):
        yield prefix, float(value)
    elif isinstance(value, dict):
        for key, sub in value.items():
            yield from _flatten(f"{prefix}_{_NAME.sub('_', str(key))}", sub)


class _PoolCollector:
    """Prometheus collector: every number in ``pool.stats()`` as a gauge ``pie_rs_<path>``."""

    def __init__(self, pools: dict[str, Any]):
        self._pools = pools

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, GaugeMetricFamily] = {}
        attached = GaugeMetricFamily("pie_rs_pool_attached", "1 while a pie-rs pool is attached", labels=["model"])
        for model_id, pool in list(self._pools.items()):
            attached.add_metric([model_id], 1.0)
            try:
                stats = pool.stats()
            except Exception:  # a pool being detached right now: skip it this scrape
                continue
            for name, number in _flatten("pie_rs", stats):
                if name not in families:
                    families[name] = GaugeMetricFamily(name, f"pool.stats() {name[len('pie_rs_') :]}", labels=["model"])
                families[name].add_metric([model_id], number)
        yield attached
        yield from families.values()


def build_app(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Builds transformers' server for ``args``; returns ``(app, warm_up, shutdown)``.

    ``warm_up()`` starts continuous batching (and waits until its cache is allocated).
    ``shutdown()`` stops continuous batching, detaches the pool and unloads the model; it is
    idempotent.
    """
    from fastapi import HTTPException
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import CBGenerateManager, GenerationState

    import pie_rs

    pools: dict[str, Any] = {}
    served = args.model

    class PooledModelManager(ModelManager):
        """transformers' model manager that attaches a pie-rs pool to every model it loads."""

        def _load_model(self, model_id_and_revision: str, *a: Any, **kw: Any) -> Any:
            model = super()._load_model(model_id_and_revision, *a, **kw)
            if not args.no_pool:
                pools[model_id_and_revision] = pie_rs.attach(
                    model, gpu_budget=_budget(args.gpu_budget), backend=args.backend, objective=args.objective
                )
            return model

        def list_models(self, cache_dir: str | None = None) -> list[dict]:
            return [{"id": served, "object": "model", "created": int(started), "owned_by": "pie-rs"}]

        def shutdown(self) -> None:
            # Continuous batching stops before the pool and the model go. transformers' own stop
            # flushes: it would finish every pending request first; the server has already given
            # in-flight requests their grace period, so what is left is failed at once.
            cb_manager, state._cb_manager = state._cb_manager, None
            cb = getattr(cb_manager, "_cb", None)
            if cb is not None:
                cb.stop(block=True, timeout=10, hard_stop=True)
            for key in list(pools):
                pools.pop(key).detach()
            super().shutdown()

    def context_of(model: Any) -> int | None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return getattr(config, "max_position_embeddings", None)

    class CheckedCBManager(CBGenerateManager):
        """Refuses a prompt that does not fit the context, caps the output at what remains."""

        def _check(self, model: Any, inputs: dict, gen_config: Any) -> None:
            ids = inputs["input_ids"]
            n = len(ids) if isinstance(ids, list) else int(ids.shape[-1])
            context = context_of(model)
            if context is None:
                return
            if n >= context:
                raise HTTPException(
                    status_code=400,
                    detail=f"the prompt has {n} tokens; the model's context is {context} tokens",
                )
            if gen_config.max_new_tokens is None or gen_config.max_new_tokens > context - n:
                gen_config.max_new_tokens = context - n

        def generate_streaming(self, model: Any, processor: Any, inputs: dict, gen_config: Any, *a: Any, **kw: Any):
            self._check(model, inputs, gen_config)
            return super().generate_streaming(model, processor, inputs, gen_config, *a, **kw)

        async def generate_non_streaming(
            self, model: Any, processor: Any, inputs: dict, gen_config: Any, *a: Any, **kw: Any
        ):
            self._check(model, inputs, gen_config)
            return await super().generate_non_streaming(model, processor, inputs, gen_config, *a, **kw)

    class CheckedState(GenerationState):
        def get_manager(self, model_id: str, use_cb: bool = False):
            if use_cb and (self._cb_manager is None or self._cb_model_id != model_id):
                if self._cb_manager is not None:
                    self._cb_manager.stop()
                self._cb_manager = CheckedCBManager(cb_config=self._cb_config)
                self._cb_model_id = model_id
            return super().get_manager(model_id, use_cb=use_cb)

    def check_body(body: dict) -> None:
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = body.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HTTPException(status_code=400, detail=f"{field} must be a positive integer, not {value!r}")
        for field in ("temperature", "top_p"):
            value = body.get(field)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise HTTPException(status_code=400, detail=f"{field} must be a number >= 0, not {value!r}")
        model = body.get("model")
        if model is not None and model != served:
            raise HTTPException(
                status_code=404, detail=f"model {model!r} is not served here; this server serves {served!r}"
            )

    class CheckedCompletion(CompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            check_body(body)
            return await super().handle_request(body, request_id)

    class CheckedChat(ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            check_body(body)
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise HTTPException(status_code=400, detail="messages must be a non-empty list")
            return await super().handle_request(body, request_id)

    cb_kwargs = {
        key: value
        for key, value in {
            "page_size": args.page_size,
            "num_blocks": args.num_blocks,
            "max_batch_tokens": args.max_batch_tokens,
        }.items()
        if value is not None
    }
    started = time.time()
    state = CheckedState(
        continuous_batching=True, cb_config=ContinuousBatchingConfig(**cb_kwargs) if cb_kwargs else None
    )
    manager = PooledModelManager(
        device=args.device,
        dtype=args.dtype,
        attn_implementation="sdpa",
        continuous_batching=True,
        model_timeout=-1,
        force_model=served,
    )
    handlers = {"model_manager": manager, "generation_state": state}
    completion = CheckedCompletion(**handlers)
    app = build_server(
        manager,
        CheckedChat(**handlers),
        completion_handler=completion,
        response_handler=ResponseHandler(**handlers),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(**handlers),
        generation_state=state,
    )

    registry = CollectorRegistry()
    registry.register(_PoolCollector(pools))
    requests_total = Counter("pie_rs_http_requests", "HTTP requests answered", ["path", "status"], registry=registry)

    @app.middleware("http")
    async def count_requests(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        requests_total.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def warm_up(timeout: float = 600.0) -> None:
        """Loads the model and starts continuous batching before the first request.

        The generation loop sizes and allocates its cache when it starts, which may take a while;
        the server listens only once that is done. The batch-wide sampling settings come from
        the model's generation config (transformers' server would take the first request's).
        """
        model_id = manager.process_model_name(served)
        model, _ = manager.load_model_and_processor(model_id)
        gen_config = completion._build_generation_config({}, model.generation_config, use_cb=True)
        context = context_of(model)
        if context is not None and (gen_config.max_new_tokens or context) > context:
            gen_config.max_new_tokens = context  # no request is longer (CheckedCBManager); the cache is sized by it
        cb_manager = state.get_manager(model_id, use_cb=True)
        cb_manager.init_cb(model, gen_config)
        deadline = time.monotonic() + timeout
        while cb_manager._cb.batch_processor is None:
            if not cb_manager.is_alive():
                raise RuntimeError("continuous batching failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"continuous batching did not start within {timeout:.0f} s")
            time.sleep(0.05)

    done = threading.Event()

    def shutdown() -> None:
        if not done.is_set():
            done.set()
            manager.shutdown()

    app.state.pie_rs_pools = pools
    return app, warm_up, shutdown


def _quiet_server(uvicorn: Any) -> type:
    """The uvicorn server, without re-raising the stopping signal once it has stopped.

    uvicorn turns SIGINT/SIGTERM into a graceful exit, then raises the signal again, which would
    kill the process (SIGTERM) or raise ``KeyboardInterrupt`` (SIGINT) before the pool is detached.
    """

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def _threads_still_running(deadline: float) -> list[str]:
    """Names of the non-daemon threads alive at `deadline`.

    Threads told to stop may still be on their way out when the server returns
    (anyio's worker threads stop on a callback of the event loop's last task), so
    each gets until the deadline to end before it counts as left behind.
    """
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]


def run_serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGINT or SIGTERM; returns the exit status."""
    missing = missing_extras()
    if missing:
        print(
            f"pie-rs serve needs the serving extras (missing: {', '.join(missing)}); "
            "install them with: pip install 'pie-rs[serve]'",
            file=sys.stderr,
        )
        return 2
    from .serving import serving_supported

    why_not = serving_supported()
    if why_not is not None:
        print(f"pie-rs serve: {why_not}", file=sys.stderr)
        return 2
    import uvicorn

    app, warm_up, shutdown = build_app(args)
    try:
        warm_up()
    except RuntimeError as exc:  # the generation loop's own error is in the log above
        shutdown()
        print(f"pie-rs serve: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        shutdown()
        raise
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    server = _quiet_server(uvicorn)(config)
    mode = "without pie-rs" if args.no_pool else "with a pie-rs pool"
    print(f"pie-rs serve: {args.model} {mode} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.run()  # uvicorn turns SIGINT/SIGTERM into a graceful exit
    finally:
        shutdown()
    left = _threads_still_running(deadline=time.monotonic() + 5.0)
    if left:
        print(f"pie-rs serve: threads still running: {left}", file=sys.stderr)
        return 1
    print("pie-rs serve: stopped", file=sys.stderr, flush=True)
    return 0
