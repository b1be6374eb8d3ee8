"""``pie-rs bench --serving``: continuous batching under an open-loop workload, with and without pie-rs.

Requests arrive as a Poisson process at each given rate; prompt and output lengths are drawn from a
seeded log-normal shaped like chat traffic (or read from a JSONL of ``{"prompt": n, "output": m}``).
The same requests run, in one process, against:

- ``cb``: transformers' continuous batching with a device KV cache of the budget B;
- ``cb+offload``: the same with transformers' own CPU offloading of preempted requests (CUDA only:
  it needs pinned memory);
- ``pie``: the same with pie-rs attached at budget B (pooled layers in host memory);
- ``pie-resident`` (``--resident-check``): pie-rs with everything resident and as many blocks as
  ``cb``, to measure what the integration costs when nothing is pooled.

Reported per method and rate: output tokens/s, time to first token and time per output token
(p50, p99), peak running requests, preemptions, device KV bytes and blocks; greedy tokens are
compared with ``cb``'s request by request. Table, JSON and plots (throughput against rate, latency
CDFs) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._copy_cost import measure_copy_compute_cost
from .bench import ModelShape, build_model, cpu_threads, percentile, resolve_device, resolve_shape

__all__ = ["add_arguments", "make_workload", "run_serving"]

#: Llama-3-8B layer shapes (the GPU default; few layers so it fits the GPU script's time).
LLAMA3_8B = ModelShape(layers=8, hidden=4096, heads=32, kv_heads=8, vocab=32000, intermediate=14336)
CPU_SERVING = ModelShape(layers=8, hidden=256, heads=8, kv_heads=4, vocab=256)
METHODS = ("cb", "cb+offload", "pie")


@dataclass
class Request:
    """One request of the workload."""

    rid: str
    arrival: float
    prompt: list[int]
    output: int


def make_workload(
    n: int,
    rate: float,
    *,
    seed: int,
    vocab: int,
    prompt_median: float,
    output_median: float,
    sigma: float,
    max_prompt: int,
    max_output: int,
    lengths: list[tuple[int, int]] | None = None,
) -> list[Request]:
    """``n`` requests with Poisson arrivals at ``rate`` per second and log-normal (or given) lengths."""
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(1.0, generator=gen) / rate
    arrivals = torch.cumsum(gaps, 0) - gaps[0]
    out = []
    for i in range(n):
        if lengths:
            p, o = lengths[i % len(lengths)]
        else:
            z = torch.randn(2, generator=gen)
            p = round(prompt_median * math.exp(sigma * float(z[0])))
            o = round(output_median * math.exp(sigma * float(z[1])))
        p = max(1, min(max_prompt, p))
        o = max(1, min(max_output, o))
        ids = torch.randint(3, vocab, (p,), generator=gen).tolist()
        out.append(Request(f"r{i}", float(arrivals[i]), ids, o))
    return out


def read_lengths(path: str) -> list[tuple[int, int]]:
    """Reads ``{"prompt": n, "output": m}`` lines."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                rows.append((int(d["prompt"]), int(d["output"])))
    if not rows:
        raise ValueError(f"{path} holds no lengths")
    return rows


@dataclass
class Result:
    """What one method did at one rate."""

    method: str
    rate: float
    requests: int
    ok: bool = True
    note: str = ""
    wall_s: float = 0.0
    output_tokens: int = 0
    tokens_per_s: float = 0.0
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    tpot_p50_ms: float = float("nan")
    tpot_p99_ms: float = float("nan")
    peak_running: int = 0
    preemptions: int = 0
    num_blocks: int = 0
    device_kv_bytes: int = 0
    pooled_layers: int = 0
    pooled: list[int] = field(default_factory=list)
    prefetch_depth: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    tokens_match: bool | None = None
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)


def record_steps(bp: Any, steps: list[dict[str, float]]) -> None:
    """Records every step of a batch processor: tokens in the batch, KV tokens read, wall seconds.

    A step is timed from the start of the scheduling that found work (``prepare_next_batch``) to the
    end of ``update_batch``: the forward, sampling and transformers' own per-step Python all count,
    since a serving step costs all of them. ``context_tokens`` sums, over the batch's requests, the
    KV the step's attention reads (past plus new tokens).
    """
    prepare, generate, update = bp.prepare_next_batch, bp._generation_step, bp.update_batch
    current: dict[str, float] = {}

    def prepare_next_batch() -> bool:
        t = time.perf_counter()
        found = prepare()
        if found:
            current.clear()
            current["start"] = t
        return found

    def generation_step(model: Any) -> None:
        batch = bp.inputs_and_outputs.requests_in_batch
        current["tokens"] = sum(fs.query_length for fs in batch)
        # position_offset already counts this step's tokens (prepare_batch_tensors advanced it).
        current["context_tokens"] = sum(fs.state.position_offset for fs in batch)
        generate(model)

    def update_batch() -> None:
        update()
        if "tokens" in current:
            steps.append(
                {
                    "tokens": current["tokens"],
                    "context_tokens": current["context_tokens"],
                    "seconds": time.perf_counter() - current["start"],
                }
            )
            current.clear()

    bp.prepare_next_batch, bp._generation_step, bp.update_batch = prepare_next_batch, generation_step, update_batch


def cache_geometry(model: torch.nn.Module, page: int) -> dict[str, int]:
    """Bytes of transformers' whole-model block and of a sector (one block here: one attention type)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.empty((), dtype=model.dtype).element_size()
    block = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * elem * page
    sector = math.lcm(block, 128)
    return {"block": block, "sector": sector, "token": block // page}


def run_one(
    model: torch.nn.Module,
    workload: list[Request],
    method: str,
    rate: float,
    *,
    budget: int,
    page: int,
    max_batch_tokens: int,
    objective: str,
    progress: bool,
    steps: bool = False,
    num_blocks: int | None = None,
) -> Result:
    """Runs ``workload`` open-loop through one method; never raises for a method that cannot run."""
    from tqdm.auto import tqdm
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import pie_rs

    from .serving import Instrument, instrument_processor

    res = Result(method=method, rate=rate, requests=len(workload))
    geo = cache_geometry(model, page)
    # transformers' cache is (sectors + 2 trash sectors) * sector bytes: what fits the budget.
    cb_blocks = max(1, (budget // geo["sector"] - 2) * geo["sector"] // geo["block"])
    cfg: dict[str, Any] = {"page_size": page, "max_batch_tokens": max_batch_tokens, "use_async_batching": False}
    pool = None
    if method in ("cb", "cb+offload", "pie-resident"):
        cfg["num_blocks"] = cb_blocks
    if method == "cb+offload":
        if model.device.type != "cuda":
            res.ok, res.note = False, "transformers' CPU offloading needs CUDA pinned memory"
            return res
        cfg["cpu_offload_space"] = max(1.0, 4 * budget / 2**30)
    if method == "pie":
        pool = pie_rs.attach(model, gpu_budget=budget, objective=objective)
    elif method == "pie-resident":
        pool = pie_rs.attach(model, gpu_budget=None)
    elif method == "pie-compute":
        # Everything resident with as many blocks as the pie run: the same batches without copies.
        cfg["num_blocks"] = num_blocks or cb_blocks
        pool = pie_rs.attach(model, gpu_budget=None)
    gen = GenerationConfig(max_new_tokens=max(r.output for r in workload), do_sample=False, eos_token_id=-1)
    counters = Instrument()
    manager = None
    try:
        manager = model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cfg)
        )
        manager.start()
        deadline = time.time() + 60
        while getattr(manager, "batch_processor", None) is None and time.time() < deadline:
            time.sleep(0.005)
        bp = manager.batch_processor
        if bp is None:
            raise RuntimeError("the continuous batching manager did not start")
        if pool is None:
            instrument_processor(bp, counters)
        if steps:
            record_steps(bp, res.steps)
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        arrival: dict[str, float] = {}
        pending = list(workload)
        bar = tqdm(
            total=len(workload), desc=f"{method} @ {rate:g} req/s", unit="req", disable=not progress, leave=False
        )
        t0 = time.perf_counter()
        while len(done) < len(workload):
            now = time.perf_counter() - t0
            while pending and pending[0].arrival <= now:
                r = pending.pop(0)
                arrival[r.rid] = t0 + r.arrival
                manager.add_request(r.prompt, request_id=r.rid, max_new_tokens=r.output, streaming=True)
            wait = 0.05 if not pending else max(0.0, min(0.05, pending[0].arrival - now))
            out = manager.get_result(timeout=wait) if wait > 0 or not pending else None
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching loop stopped")
                continue
            t = time.perf_counter()
            if out.generated_tokens and out.request_id not in first:
                first[out.request_id] = t
            if out.is_finished():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                done[out.request_id] = t
                res.tokens[out.request_id] = list(out.generated_tokens)
                bar.update(1)
        bar.close()
        res.wall_s = max(done.values()) - t0
        res.output_tokens = sum(len(v) for v in res.tokens.values())
        res.tokens_per_s = res.output_tokens / res.wall_s
        res.ttft_ms = [1e3 * (first[k] - arrival[k]) for k in done]
        res.tpot_ms = [1e3 * (done[k] - first[k]) / (len(res.tokens[k]) - 1) for k in done if len(res.tokens[k]) > 1]
        for name, values in (("ttft", res.ttft_ms), ("tpot", res.tpot_ms)):
            setattr(res, f"{name}_p50_ms", percentile(values, 50))
            setattr(res, f"{name}_p99_ms", percentile(values, 99))
        if pool is not None:
            s = pool.stats()["serving"]
            res.peak_running, res.preemptions = s["peak_running"], s["preemptions"]
            res.num_blocks, res.device_kv_bytes = s["num_blocks"], s["device_kv_bytes"]
            res.pooled_layers, res.h2d_bytes, res.d2h_bytes = s["pooled_layers"], s["h2d_bytes"], s["d2h_bytes"]
            res.pooled, res.prefetch_depth = list(s["pooled"]), int(s["prefetch_depth"])
        else:
            res.peak_running, res.preemptions = counters.peak_running, counters.preemptions
            cache = bp.cache
            res.num_blocks = cache.num_sectors * next(iter(cache.cache_allocators.values())).blocks_per_sector
            res.device_kv_bytes = (cache.num_sectors + 2) * cache.bytes_per_sector
    except Exception as e:  # a method that fails is reported, the others still run
        res.ok, res.note = False, f"{type(e).__name__}: {e}"[:300]
    finally:
        if manager is not None:
            manager.stop(block=True, timeout=30)
        if pool is not None:
            pool.detach()
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--serving`` options of ``pie-rs bench``."""
    g = parser.add_argument_group("serving (with --serving)")
    g.add_argument("--serving", action="store_true", help="run the continuous-batching serving benchmark")
    g.add_argument("--rates", default=None, help="arrival rates, requests/s, comma-separated (CPU default 4,16)")
    g.add_argument("--requests", type=int, default=None, help="requests per rate (CPU default 24)")
    g.add_argument("--lengths", default=None, help='JSONL of {"prompt": n, "output": m} instead of log-normal')
    g.add_argument("--prompt-median", type=float, default=None, help="log-normal median prompt length")
    g.add_argument("--output-median", type=float, default=None, help="log-normal median output length")
    g.add_argument("--sigma", type=float, default=0.6, help="log-normal sigma of both lengths (default 0.6)")
    g.add_argument("--budget", default=None, help="device KV budget B ('64MiB', bytes); default: --budget-share")
    g.add_argument("--budget-share", type=float, default=1 / 3, help="B as a share of the workload's KV (default 1/3)")
    g.add_argument("--page-size", type=int, default=None, help="tokens per page (CPU default 16, CUDA 256)")
    g.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per forward (CPU 256, CUDA 4096)")
    g.add_argument("--objective", default="memory", choices=("speed", "memory"), help="pie-rs objective")
    g.add_argument(
        "--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)},pie-resident,pie-compute"
    )
    g.add_argument("--resident-check", action="store_true", help="add pie-resident (everything resident)")
    g.add_argument(
        "--calibration-out",
        default=None,
        help="write the pie run (first rate) as benches/serving_calibration.py's measured run (adds pie-compute)",
    )
    g.add_argument("--llama3-8b", action="store_true", help="Llama-3-8B layer shapes (8 layers; CUDA default)")


def _shape(args: argparse.Namespace, device: torch.device) -> ModelShape:
    base = LLAMA3_8B if (args.llama3_8b or device.type == "cuda") else CPU_SERVING
    return resolve_shape(args, device, base)


_COLUMNS = (
    ("method", "method", "s"),
    ("rate", "req/s", "g"),
    ("tokens_per_s", "out tok/s", ".1f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
    ("tpot_p50_ms", "TPOT p50 ms", ".1f"),
    ("tpot_p99_ms", "TPOT p99 ms", ".1f"),
    ("peak_running", "peak run", "d"),
    ("preemptions", "preempt", "d"),
    ("num_blocks", "blocks", "d"),
    ("pooled_layers", "pooled", "d"),
    ("device_kv_mib", "dev KV MiB", ".2f"),
    ("tokens_match", "tokens", "s"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the results."""
    head = [title for _, title, _ in _COLUMNS]
    body = []
    for r in rows:
        line = []
        for key, _, spec in _COLUMNS:
            v = r.get(key)
            if key == "tokens_match":
                v = "-" if v is None else ("same" if v else "DIFFER")
            if not r["ok"] and key not in ("method", "rate"):
                line.append("n/a" if key != "tokens_match" else r["note"][:60])
                continue
            try:
                line.append(format(v, spec) if spec != "s" else str(v))
            except (TypeError, ValueError):
                line.append(str(v))
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def plot(rows: list[dict[str, Any]], curves: dict[str, Any], out: Path) -> list[str]:
    """Throughput against rate, and TTFT/TPOT CDFs at the highest rate."""
    from .plots import _pyplot

    plt = _pyplot()
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r["rate"] for r in rows if math.isfinite(r["rate"])]
    # Every request at once (rate inf) sits right of the finite rates, labelled as such.
    at_once = 2 * max(finite) if finite else 1.0

    def x(rate: float) -> float:
        return rate if math.isfinite(rate) else at_once

    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(x(r["rate"]), r["tokens_per_s"]) for r in rows if r["method"] == method and r["ok"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    if any(not math.isfinite(r["rate"]) for r in rows):
        ticks = [*sorted(set(finite)), at_once]
        ax.set_xticks(ticks, [*(f"{t:g}" for t in ticks[:-1]), "all at once"])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("continuous batching throughput at device KV budget B")
    ax.legend()
    fig.tight_layout()
    path = out / "serving_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(str(path))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "tpot_ms", "time per output token")):
        for method, c in curves.items():
            values = sorted(c[key])
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=method)
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} (highest rate)")
        if curves:
            ax.legend()
    fig.tight_layout()
    path = out / "serving_latency_cdf.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(str(path))
    return files


def run_serving(args: argparse.Namespace) -> int:
    """``pie-rs bench --serving``; returns 1 if pie-rs gave other greedy tokens than ``cb``."""
    from ._budget import parse_budget
    from .serving import serving_supported

    reason = serving_supported()
    if reason is not None:
        print(f"pie-rs bench --serving: {reason}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    with cpu_threads(device, args.threads) as threads:
        shape = _shape(args, device)
        dtype = getattr(torch, args.dtype) if args.dtype != "float32" or not cuda else torch.bfloat16
        model = build_model(shape, device, dtype, seed=args.seed)
        model.set_attn_implementation("sdpa")
        rates = [float(x) for x in (args.rates or ("2,8" if cuda else "4,16")).split(",")]
        n = args.requests or (64 if cuda else (12 if args.quick else 24))
        page = args.page_size or (256 if cuda else 16)
        mbt = args.max_batch_tokens or (4096 if cuda else 256)
        lengths = read_lengths(args.lengths) if args.lengths else None
        pm = args.prompt_median or (512 if cuda else 48)
        om = args.output_median or (128 if cuda else 24)
        workloads = {
            rate: make_workload(
                n,
                rate,
                seed=args.seed + 1,
                vocab=shape.vocab,
                prompt_median=pm,
                output_median=om,
                sigma=args.sigma,
                max_prompt=int(pm * 4),
                max_output=int(om * 4),
                lengths=lengths,
            )
            for rate in rates
        }
        geo = cache_geometry(model, page)
        kv = sum(len(r.prompt) + r.output for r in workloads[rates[0]]) * geo["token"]
        budget = parse_budget(args.budget, None) if args.budget else max(1, int(kv * args.budget_share))
        methods = [m for m in args.methods.split(",") if m]
        calibrating = bool(getattr(args, "calibration_out", None))
        if calibrating and "pie" not in methods:
            methods.append("pie")
        if args.resident_check and "pie-resident" not in methods:
            methods.append("pie-resident")
        if calibrating:
            methods = [m for m in methods if m != "pie-compute"] + ["pie-compute"]
        results: list[Result] = []
        every_run: dict[float, dict[str, list[Result]]] = {}
        repeats = max(1, args.repeats or 1)
        for rate in rates:
            runs: dict[str, list[Result]] = {m: [] for m in methods}
            # Methods interleaved, each repeated: the reported run is the one of median throughput
            # (a shared machine's noise hits every method alike).
            for _ in range(repeats):
                for method in methods:
                    runs[method].append(
                        run_one(
                            model,
                            workloads[rate],
                            method,
                            rate,
                            budget=budget,
                            page=page,
                            max_batch_tokens=mbt,
                            objective=args.objective,
                            progress=not args.no_progress,
                            steps=calibrating and rate == rates[0],
                            num_blocks=next((r.num_blocks for r in runs.get("pie", []) if r.ok), None),
                        )
                    )
            every_run[rate] = runs
            by_method = {}
            for method, rs in runs.items():
                ok = sorted((r for r in rs if r.ok), key=lambda r: r.tokens_per_s)
                chosen = ok[len(ok) // 2] if ok else rs[0]
                chosen.note = chosen.note or f"median of {len(ok)}: " + ", ".join(f"{r.tokens_per_s:.1f}" for r in ok)
                if any(r.tokens != rs[0].tokens for r in ok):
                    chosen.tokens_match = False
                by_method[method] = chosen
                results.append(chosen)
            ref = by_method.get("cb")
            for r in by_method.values():
                if ref is not None and ref.ok and r.ok and r is not ref and r.tokens_match is not False:
                    r.tokens_match = r.tokens == ref.tokens
        # On the host backend the link's copies share the processor with compute: what that costs is
        # measured apart from the runs (the simulator charges it per byte copied).
        copy_cost = measure_copy_compute_cost(model) if calibrating and not cuda else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in results:
        d = asdict(r)
        for k in ("ttft_ms", "tpot_ms", "tokens", "steps", "pooled"):
            d.pop(k)
        d["device_kv_mib"] = r.device_kv_bytes / 2**20
        rows.append(d)
    top = max(rates)
    curves = {r.method: {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms} for r in results if r.rate == top and r.ok}
    summary = {
        "device": str(device),
        "threads": threads,
        "model": shape.describe(),
        "dtype": str(model.dtype),
        "page_size": page,
        "max_batch_tokens": mbt,
        "budget_bytes": budget,
        "workload_kv_bytes": kv,
        "requests_per_rate": n,
        "lengths": args.lengths or f"log-normal medians {pm}/{om}, sigma {args.sigma}, seed {args.seed + 1}",
        "rows": rows,
        "ratios": _ratios(rows),
    }
    (out / "serving.json").write_text(json.dumps(summary, indent=2, default=float))
    if calibrating:
        try:
            measured = calibration_run(
                model, results, workloads[rates[0]], rates[0], budget=budget, mbt=mbt, compute_runs=every_run[rates[0]]
            )
            if copy_cost is not None:
                measured["copy_compute"] = copy_cost
                measured["copy_compute_ns_per_byte"] = copy_cost["copy_compute_ns_per_byte"]
        except RuntimeError as e:
            print(f"pie-rs bench --serving --calibration-out: {e}", file=sys.stderr)
            return 2
        Path(args.calibration_out).write_text(json.dumps(measured, indent=1, default=float))
        if not args.json:
            print(f"wrote {args.calibration_out} (the measured run for benches/serving_calibration.py)")
    files = plot(rows, curves, out)
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    else:
        print(f"pie-rs bench --serving: {shape.describe()}, {model.dtype}, {device}, {threads} threads")
        print(
            f"{n} requests per rate, {summary['lengths']}; page {page}; budget B = {budget / 2**20:.2f} MiB "
            f"({budget / kv:.2f} of the workload's KV)"
        )
        print(format_table(rows))
        for line in _ratios(rows):
            print(line)
        print(f"wrote {out / 'serving.json'}, {', '.join(files)}")
    return 1 if any(r.tokens_match is False for r in results) else 0


def calibration_run(
    model: torch.nn.Module,
    results: list[Result],
    workload: list[Request],
    rate: float,
    *,
    budget: int,
    mbt: int,
    compute_runs: dict[str, list[Result]] | None = None,
) -> dict[str, Any]:
    """The measured run in ``benches/serving_calibration.py``'s format.

    Requests, KV budget, scheduler limits and throughput are the ``pie`` run's (the median of the
    repeats); the per-step timings that fix the compute model are ``pie-compute``'s (pie-rs
    attached with everything resident and as many blocks as the ``pie`` run: the same batches,
    no copies), so that the simulator adds the link's cost once, from
    the measured link, rather than again on top of step times that already hold it. The ``pie``
    run's own steps are kept as ``pie_steps``. With ``--repeats`` the steps of every
    ``pie-compute`` repeat count (``compute_runs``): the repeats are interleaved with ``pie``'s, so
    the fit sees the machine's load as the median ``pie`` run does, on average.
    """
    by = {r.method: r for r in results if r.rate == rate}
    pie, resident = by.get("pie"), by.get("pie-compute")
    if pie is None or not pie.ok or resident is None or not resident.ok:
        bad = next((r for r in (pie, resident) if r is not None and not r.ok), None)
        raise RuntimeError(f"calibration needs pie and pie-compute runs: {bad.note if bad else 'missing'}")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = cfg.num_hidden_layers

    def per_layer(steps: list[dict[str, float]]) -> list[dict[str, float]]:
        return [
            {"tokens": s["tokens"], "context_tokens": s["context_tokens"], "layer_seconds": s["seconds"] / layers}
            for s in steps
        ]

    return {
        "method": "pie",
        "model_shape": {
            "layers": layers,
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim,
            "elem_size": torch.empty((), dtype=model.dtype).element_size(),
        },
        "kv_budget_mib": budget / 2**20,
        # transformers' scheduler has no limit on running requests: every request may run.
        "max_running": len(workload),
        "max_batched_tokens": mbt,
        "rate": rate if math.isfinite(rate) else None,
        "requests": [{"arrival": r.arrival, "prompt": len(r.prompt), "output": r.output} for r in workload],
        "throughput_tok_s": pie.tokens_per_s,
        "throughput_runs": pie.note,
        "pooled_layers": pie.pooled_layers,
        "num_blocks": pie.num_blocks,
        # The pool as pie-rs's continuous batching sized it (once, at start): the simulator replays it.
        "pie_pool": {"blocks": pie.num_blocks, "pooled_layers": pie.pooled, "prefetch_depth": pie.prefetch_depth},
        "peak_running": pie.peak_running,
        "steps": per_layer([s for r in (compute_runs or {}).get("pie-compute", [resident]) if r.ok for s in r.steps]),
        "pie_steps": per_layer(pie.steps),
        "compute_run": {"throughput_tok_s": resident.tokens_per_s, "peak_running": resident.peak_running},
        "repeats": _paired_repeats(compute_runs or {}, per_layer),
    }


def _paired_repeats(
    runs: dict[str, list[Result]], per_layer: Callable[[list[dict[str, float]]], list[dict[str, float]]]
) -> list[dict[str, Any]]:
    """Repeat i: the ``pie`` run and the steps of the ``pie-compute`` runs just before and after it.

    Runs alternate (pie, pie-compute, pie, ...), so the two neighbours bracket the pie run in time:
    on a shared machine whose load drifts, their mean sees the load the pie run saw.
    """
    pies, computes = runs.get("pie", []), runs.get("pie-compute", [])
    paired = []
    for i, p in enumerate(pies):
        neighbours = [c for c in computes[max(0, i - 1) : i + 1] if c.ok]
        if p.ok and neighbours:
            paired.append(
                {"throughput_tok_s": p.tokens_per_s, "steps": per_layer([s for c in neighbours for s in c.steps])}
            )
    return paired


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for rate in dict.fromkeys(r["rate"] for r in rows):
        at = {r["method"]: r for r in rows if r["rate"] == rate and r["ok"]}
        pie = at.get("pie")
        for base in ("cb", "cb+offload"):
            b = at.get(base)
            if pie and b and b["tokens_per_s"] > 0:
                lines.append(
                    f"@ {rate:g} req/s pie vs {base}: throughput {pie['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                    f"peak running {pie['peak_running'] / max(1, b['peak_running']):.2f}x, "
                    f"TPOT p99 {pie['tpot_p99_ms'] / b['tpot_p99_ms']:.2f}x"
                )
        res, cb = at.get("pie-resident"), at.get("cb")
        if res and cb and cb["tokens_per_s"] > 0:
            lines.append(
                f"@ {rate:g} req/s pie-resident vs cb (same blocks, nothing pooled): throughput "
                f"{res['tokens_per_s'] / cb['tokens_per_s']:.3f}x"
            )
    return lines
