"""``pie-rs bench``: DynamicCache, transformers' own caches and pie-rs on the same model and inputs.

Everything here is measured in one process on one model: per decode step the time is taken by a
``LogitsProcessor`` that records ``time.perf_counter()`` (after ``torch.cuda.synchronize()`` on
CUDA) each time ``generate`` asks it for scores, so per-token latency is a real distribution
(median and p99), not a difference of two ``generate`` calls.

The building blocks (:func:`build_model`, :class:`StepClock`, :class:`Method`, :func:`measure`,
:func:`capacity_search`) are reused by ``pie-rs demo`` and by ``benches/gpu/e2e_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _core
from ._engine import engine_layers, sliding_kv_bytes
from ._errors import BudgetError
from ._model import inspect_model
from .pool import attach

__all__ = [
    "Method",
    "ModelShape",
    "StepClock",
    "add_arguments",
    "build_model",
    "capacity_search",
    "default_methods",
    "dynamic_kv_bytes",
    "measure",
    "pie_plan_bytes",
    "pie_slot_bytes",
    "run_bench",
]


# ----------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-architecture model built from a config with random weights."""

    layers: int = 8
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 256
    intermediate: int | None = None
    head_dim: int | None = None

    def describe(self) -> str:
        """A one-line description."""
        return (
            f"Llama-architecture, {self.layers} layers, hidden {self.hidden}, {self.heads} heads "
            f"({self.kv_heads} KV), vocab {self.vocab}, random weights"
        )


#: The CPU default: small enough that the whole demo takes seconds on two cores.
CPU_SHAPE = ModelShape()
#: The GPU default: big enough that the KV cache and its copies matter.
GPU_SHAPE = ModelShape(layers=16, hidden=2048, heads=16, kv_heads=8, vocab=32000, intermediate=5632)
#: Llama-3-8B layer shapes (fewer layers), for benches/gpu/e2e_bench.py.
LLAMA3_8B_SHAPE = ModelShape(layers=8, hidden=4096, heads=32, kv_heads=8, vocab=32000, intermediate=14336)


def build_model(
    shape: ModelShape = CPU_SHAPE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.nn.Module:
    """A Llama-architecture causal LM with fixed-seed random weights, built on ``device`` (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {} if shape.head_dim is None else {"head_dim": shape.head_dim}
    config = AutoConfig.for_model(
        "llama",
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate or 2 * shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=16384,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_inputs(vocab: int, batch: int, context: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Fixed-seed random prompt ids ``[batch, context]`` (ids 3.. avoid pad/bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, context), generator=gen).to(device)


def dynamic_kv_bytes(model: torch.nn.Module, batch: int, tokens: int, layers: int | None = None) -> int:
    """KV bytes transformers' DynamicCache holds on the device for ``batch`` sequences of ``tokens``.

    Computed from the shapes (DynamicCache allocates through torch; its peak is all layers at the
    final length) by ``_core.layer_geometry``. ``layers`` counts only that many layers (e.g. 2 for
    an offloaded cache).
    """
    info = inspect_model(model)
    elem = info.dtype.itemsize
    chosen = info.layers if layers is None else info.layers[:layers]
    return sum(
        _core.layer_geometry(batch, li.kv_heads, li.k_dim, li.v_dim, elem, max(tokens, 0))["bytes"] for li in chosen
    )


def pie_slot_bytes(model: torch.nn.Module, batch: int, max_length: int) -> int:
    """Bytes of one pie-rs layer slot (one layer's K and V at the rounded capacity, aligned), from ``_core``."""
    info = inspect_model(model)
    shape = engine_layers(info, batch, info.dtype.itemsize)[0]
    return int(_core.layer_geometry(*shape, _core.round_capacity(max_length))["slot_bytes"])


def pie_plan_bytes(model: torch.nn.Module, batch: int, max_length: int, pooled: int, prefetch_depth: int = 1) -> int:
    """Device bytes of a plan pooling ``pooled`` full-attention layers (``_core.device_bytes``).

    At ``batch`` sequences of ``max_length`` tokens, through ``prefetch_depth`` staging slots.
    The model's full-attention layers have one shape, so which layers are pooled does not matter.
    """
    info = inspect_model(model)
    layers = engine_layers(info, batch, info.dtype.itemsize)
    return int(_core.device_bytes(layers, _core.round_capacity(max_length), list(range(pooled)), prefetch_depth))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- timing
class StepClock:
    """A ``LogitsProcessor`` that timestamps every decode step (``generate`` calls it once per step).

    ``stamps[0]`` is taken after the prefill forward, ``stamps[i]`` after the forward of step ``i``;
    the differences are the per-token latencies. ``on_step(i)`` runs after each stamp (the demo
    reads the engine's telemetry there).
    """

    def __init__(self, device: torch.device, on_step: Callable[[int], None] | None = None) -> None:
        self.device = device
        self.on_step = on_step
        self.start = 0.0
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step(len(self.stamps) - 1)
        return scores

    def begin(self) -> None:
        """Marks the start of ``generate``."""
        _sync(self.device)
        self.stamps = []
        self.start = time.perf_counter()

    @property
    def step_seconds(self) -> list[float]:
        """Per decode step seconds (one fewer than the tokens generated)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]

    @property
    def prefill_seconds(self) -> float:
        """From the start of ``generate`` to the first token's logits."""
        return self.stamps[0] - self.start if self.stamps else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (``nan`` for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def generate_timed(
    model: torch.nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    clock: StepClock,
    **kwargs: Any,
) -> tuple[torch.Tensor, float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens with ``clock`` attached; returns (ids, wall s)."""
    from transformers import LogitsProcessorList

    clock.begin()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
            **kwargs,
        )
    _sync(ids.device)
    return out, time.perf_counter() - clock.start


# ----------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One way of holding the KV cache.

    ``kind``: ``"dynamic"`` (transformers' DynamicCache), ``"offloaded"``
    (``cache_implementation="offloaded"``, CUDA only), ``"static"`` (StaticCache), or ``"pie"``.
    For pie-rs: ``budget_fraction`` of the all-resident KV (rounded to whole layer slots; ``None``:
    no budget), ``objective``, and optionally a pinned plan (``pinned``: ``"half"`` pools every
    other layer, ``"all"`` pools every layer) with ``prefetch_depth`` staging slots.
    """

    name: str
    kind: str
    budget_fraction: float | None = None
    objective: str = "speed"
    pinned: str | None = None
    prefetch_depth: int | None = None
    budget_bytes: int | float | str | None = None

    def pie_kwargs(self, model: torch.nn.Module, batch: int, max_length: int) -> dict[str, Any]:
        """``attach`` keyword arguments for this method at a batch and length."""
        info = inspect_model(model)
        managed = info.managed
        kw: dict[str, Any] = {"objective": self.objective}
        if self.budget_bytes is not None:
            kw["gpu_budget"] = self.budget_bytes
        elif self.budget_fraction is not None:
            slots = max(1, round(self.budget_fraction * len(managed)))
            kw["gpu_budget"] = slots * pie_slot_bytes(model, batch, max_length)
        if self.pinned == "half":
            kw["pooled_layers"] = managed[1::2]
        elif self.pinned == "all":
            kw["pooled_layers"] = list(managed)
        if self.prefetch_depth is not None:
            kw["prefetch_depth"] = self.prefetch_depth
        return kw


def default_methods(
    device: torch.device, budgets: Sequence[float] = (1.0, 0.5, 0.25), objectives: Sequence[str] = ("speed", "memory")
) -> list[Method]:
    """DynamicCache, StaticCache, HF offloading (CUDA) and pie-rs at each budget and objective."""
    methods = [Method("DynamicCache", "dynamic"), Method("StaticCache", "static")]
    if device.type == "cuda":
        methods.append(Method("HF offloaded", "offloaded"))
    for objective in objectives:
        for fraction in budgets:
            methods.append(Method(f"pie-rs {objective} {fraction:.0%}", "pie", fraction, objective))
    return methods


@dataclass
class Row:
    """One measurement."""

    method: str
    kind: str
    batch: int
    context: int
    new_tokens: int
    objective: str | None = None
    budget_fraction: float | None = None
    budget_bytes: int | None = None
    identical: bool | None = None
    e2e_s: float = math.nan
    prefill_s: float = math.nan
    step_median_ms: float = math.nan
    step_p99_ms: float = math.nan
    decode_tok_s: float = math.nan
    e2e_tok_s: float = math.nan
    peak_device_kv_bytes: int | None = None
    kv_bytes_source: str = ""
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    stall_s: float = 0.0
    resident_layers: int | None = None
    pooled_layers: int | None = None
    pooled: list[int] = field(default_factory=list)
    prefetch_depth: int | None = None
    plan_changes: int | None = None
    step_ms: list[float] = field(default_factory=list)
    note: str = ""
    error: str | None = None

    def as_dict(self, with_steps: bool = True) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        if not with_steps:
            out.pop("step_ms")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _fill_timing(row: Row, clock: StepClock, wall: float, batch: int, new_tokens: int) -> None:
    steps = clock.step_seconds
    row.e2e_s = wall
    row.prefill_s = clock.prefill_seconds
    row.step_ms = [s * 1e3 for s in steps]
    row.step_median_ms = statistics.median(steps) * 1e3 if steps else math.nan
    row.step_p99_ms = percentile(steps, 99) * 1e3 if steps else math.nan
    row.decode_tok_s = batch * len(steps) / sum(steps) if steps and sum(steps) > 0 else math.nan
    row.e2e_tok_s = batch * new_tokens / wall if wall > 0 else math.nan


def measure(
    model: torch.nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    method: Method,
    reference: torch.Tensor | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    raise_errors: bool = False,
) -> tuple[Row, torch.Tensor | None]:
    """Generates ``new_tokens`` greedily with ``method``; returns the row and the output ids.

    Errors (a BudgetError, an unsupported cache) are recorded in ``row.error``, not raised.
    ``on_step(step, cache)`` is called after each step's forward (``cache`` is the :class:`PieCache`
    for pie-rs, else ``None``). ``raise_errors`` raises instead of recording.
    """
    batch, context = int(ids.shape[0]), int(ids.shape[1])
    total = context + new_tokens
    row = Row(method.name, method.kind, batch, context, new_tokens)
    out: torch.Tensor | None = None
    device = ids.device
    try:
        if method.kind == "pie":
            kw = method.pie_kwargs(model, batch, total)
            row.objective, row.budget_fraction, row.budget_bytes = kw["objective"], method.budget_fraction, None
            with attach(model, **kw) as pool:
                row.budget_bytes = pool.budget_bytes
                cache = pool.new_cache(max_length=total)
                hook = None if on_step is None else (lambda i: on_step(i, cache))
                clock = StepClock(device, hook)
                try:
                    out, wall = generate_timed(model, ids, new_tokens, clock, **{pool.info.cache_keyword: cache})
                    stats = pool.stats()
                finally:
                    cache.close()
            _fill_timing(row, clock, wall, batch, new_tokens)
            row.peak_device_kv_bytes = int(stats["peak_device_kv_bytes"])
            row.kv_bytes_source = "engine"
            row.h2d_bytes, row.d2h_bytes = int(stats["h2d_bytes"]), int(stats["d2h_bytes"])
            row.stall_s = float(stats["stall_seconds"])
            row.resident_layers, row.pooled_layers = int(stats["resident_layers"]), int(stats["pooled_layers"])
            row.pooled = list(stats.get("pooled", []))
            row.prefetch_depth = stats.get("prefetch_depth")
            row.plan_changes = stats.get("plan_changes")
        else:
            kwargs: dict[str, Any] = {}
            if method.kind in ("static", "offloaded"):
                kwargs["cache_implementation"] = method.kind
            elif method.kind != "dynamic":
                raise ValueError(f"unknown method kind {method.kind!r}")
            clock = StepClock(device, None if on_step is None else (lambda i: on_step(i, None)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' notes on its own cache choices
                out, wall = generate_timed(model, ids, new_tokens, clock, **kwargs)
            _fill_timing(row, clock, wall, batch, new_tokens)
            final = total - 1  # the last token is sampled, never cached
            if method.kind == "dynamic":
                row.peak_device_kv_bytes = dynamic_kv_bytes(model, batch, final)
                row.kv_bytes_source = "shapes"
            elif method.kind == "static":
                row.peak_device_kv_bytes = dynamic_kv_bytes(model, batch, total)
                row.kv_bytes_source = "shapes (max_cache_len)"
            else:
                row.peak_device_kv_bytes = dynamic_kv_bytes(model, batch, final, layers=2)
                row.kv_bytes_source = "shapes (2 layers on device)"
                info = inspect_model(model)
                row.h2d_bytes = row.d2h_bytes = 0
                row.note = f"{len(info.layers)} layers offloaded by transformers; copies not counted"
    except Exception as exc:  # recorded per row: one method failing must not end the benchmark
        if raise_errors:
            raise
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        out = None
    if out is not None and reference is not None:
        row.identical = bool(torch.equal(out, reference))
    return row, out


def merge_rows(rows: Sequence[Row]) -> Row:
    """One row from repeated runs: steps pooled (median, p99 over all), medians of the rest."""
    ok = [r for r in rows if r.error is None]
    if not ok:
        return rows[0]
    first = ok[0]
    merged = Row(**{**asdict(first), "pooled": list(first.pooled)})
    steps = [ms for r in ok for ms in r.step_ms]
    merged.step_ms = steps
    merged.step_median_ms = statistics.median(steps) if steps else math.nan
    merged.step_p99_ms = percentile(steps, 99) if steps else math.nan
    for key in ("e2e_s", "prefill_s", "e2e_tok_s", "stall_s"):
        setattr(merged, key, statistics.median(getattr(r, key) for r in ok))
    total_s = sum(steps) / 1e3
    merged.decode_tok_s = first.batch * len(steps) / total_s if total_s > 0 else math.nan
    identical = [r.identical for r in ok if r.identical is not None]
    merged.identical = all(identical) if identical else None
    if len(ok) < len(rows):
        merged.note = (merged.note + f"; {len(rows) - len(ok)} of {len(rows)} runs failed").lstrip("; ")
    merged.note = (merged.note + f"; {len(ok)} runs").lstrip("; ")
    return merged


# ----------------------------------------------------------------------------------- capacity
def _pie_fits(model: torch.nn.Module, batch: int, max_length: int, budget: int) -> bool:
    """Whether some plan holds ``batch`` x ``max_length`` under ``budget`` (``_core.fit_plan``, no engine).

    The budget left after the sliding-window layers must hold every layer pooled through one
    staging slot, as for the engine a cache would make.
    """
    info = inspect_model(model)
    elem = info.dtype.itemsize
    capacity = _core.round_capacity(max_length)
    left = budget - sliding_kv_bytes(info, batch, capacity, elem)
    if left <= 0:
        return False
    try:
        _core.fit_plan(engine_layers(info, batch, elem), capacity, left, 1)
    except BudgetError:
        return False
    return True


def capacity_search(
    model: torch.nn.Module,
    device: torch.device,
    contexts: Sequence[int],
    new_tokens: int,
    budget_bytes: int,
    max_factor: int = 8,
    objective: str = "speed",
    vocab: int = 256,
    seed: int = 1,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """For a fixed device budget: the largest batch each method runs at each context, and its throughput.

    DynamicCache's limit is emulated from the KV bytes it would need (it allocates through torch,
    which cannot be capped per cache). pie-rs's limit is the largest batch for which ``_core.fit_plan``
    finds a plan (the engine's own fit, no engine built), searched up to ``max_factor`` times
    DynamicCache's batch, then confirmed by a real run there.
    """
    results = []
    for context in contexts:
        total = context + new_tokens
        per_seq = dynamic_kv_bytes(model, 1, total - 1)
        dyn_batch = budget_bytes // per_seq
        entry: dict[str, Any] = {"context": context, "budget_bytes": budget_bytes, "new_tokens": new_tokens}
        # pie-rs: largest batch the engine accepts (doubling, then bisection), capped.
        cap = max(1, dyn_batch) * max_factor
        lo, hi = 0, None
        b = 1
        while b <= cap:
            if _pie_fits(model, b, total, budget_bytes):
                lo = b
                b *= 2
            else:
                hi = b
                break
        if hi is None:
            hi = cap + 1
            if lo < cap and _pie_fits(model, cap, total, budget_bytes):
                lo = cap
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _pie_fits(model, mid, total, budget_bytes):
                lo = mid
            else:
                hi = mid
        pie_batch = lo
        for name, batch, method in (
            ("DynamicCache", dyn_batch, Method("DynamicCache", "dynamic")),
            (
                f"pie-rs {objective}",
                pie_batch,
                Method(f"pie-rs {objective}", "pie", objective=objective, budget_bytes=budget_bytes),
            ),
        ):
            record: dict[str, Any] = {"max_batch": int(batch), "tokens": int(batch) * context}
            if batch >= 1:
                ids = make_inputs(vocab, int(batch), context, device, seed)
                row, _ = measure(model, ids, new_tokens, method)
                record.update(
                    decode_tok_s=row.decode_tok_s,
                    step_median_ms=row.step_median_ms,
                    peak_device_kv_bytes=row.peak_device_kv_bytes,
                    error=row.error,
                )
            else:
                record["error"] = "the budget does not hold one sequence"
            if progress is not None:
                progress.update(1)
            entry[name] = record
        dyn_tokens = entry["DynamicCache"]["tokens"]
        entry["capacity_ratio"] = entry[f"pie-rs {objective}"]["tokens"] / dyn_tokens if dyn_tokens else math.inf
        results.append(entry)
    return results


# ----------------------------------------------------------------------------------- output
_COLUMNS = (
    ("method", "method", "{}"),
    ("batch", "batch", "{}"),
    ("context", "ctx", "{}"),
    ("step_median_ms", "ms/tok p50", "{:.2f}"),
    ("step_p99_ms", "p99", "{:.2f}"),
    ("decode_tok_s", "tok/s", "{:.1f}"),
    ("e2e_s", "e2e s", "{:.3f}"),
    ("speed_ratio", "tok/s vs Dyn", "{:.2f}x"),
    ("peak_device_kv_bytes", "peak dev KV MiB", "mib"),
    ("kv_ratio", "KV vs Dyn", "{:.2f}x"),
    ("h2d_bytes", "H2D MiB", "mib"),
    ("d2h_bytes", "D2H MiB", "mib"),
    ("stall_s", "stall s", "{:.4f}"),
    ("plan", "plan", "{}"),
    ("identical", "same tokens", "{}"),
)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "mib":
        return f"{value / 2**20:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return spec.format(value)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Adds ``speed_ratio``, ``latency_ratio``, ``e2e_ratio`` and ``kv_ratio`` against DynamicCache at each point."""
    base = {(r["batch"], r["context"]): r for r in rows if r["kind"] == "dynamic" and not r.get("error")}
    for r in rows:
        b = base.get((r["batch"], r["context"]))
        r["plan"] = (
            f"{r['resident_layers']}R/{r['pooled_layers']}P d{r['prefetch_depth']}" if r["kind"] == "pie" else ""
        )
        if r.get("error") or b is None:
            continue

        def ratio(num: Any, den: Any) -> float | None:
            return num / den if num is not None and den else None

        r["speed_ratio"] = ratio(r["decode_tok_s"], b["decode_tok_s"])
        r["latency_ratio"] = ratio(r["step_median_ms"], b["step_median_ms"])
        r["e2e_ratio"] = ratio(r["e2e_s"], b["e2e_s"])
        r["kv_ratio"] = ratio(r["peak_device_kv_bytes"], b["peak_device_kv_bytes"])


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = _COLUMNS) -> str:
    """A Markdown table of ``rows`` (errors in their own column)."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r.get("error"):
            cells = [str(r["method"]), str(r["batch"]), str(r["context"]), f"error: {r['error']}"]
            cells += [""] * (len(columns) - len(cells))
        else:
            cells = [_fmt(r.get(key), spec) for key, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_capacity(entries: list[dict[str, Any]], objective: str = "speed") -> str:
    """A Markdown table of :func:`capacity_search` results."""
    name = f"pie-rs {objective}"
    lines = [
        "| context | budget MiB | DynamicCache max batch | tok/s | pie-rs max batch | tok/s | batch x ctx vs Dyn |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        d, p = e["DynamicCache"], e[name]
        lines.append(
            f"| {e['context']} | {e['budget_bytes'] / 2**20:.2f} | {d['max_batch']} "
            f"| {_fmt(d.get('decode_tok_s'), '{:.1f}')} | {p['max_batch']} "
            f"| {_fmt(p.get('decode_tok_s'), '{:.1f}')}{' (' + p['error'] + ')' if p.get('error') else ''} "
            f"| {e['capacity_ratio']:.2f}x |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the random model shared by ``demo`` and ``bench`` (defaults depend on the device)."""
    g = parser.add_argument_group("model (default: a small Llama on CPU, a larger one on CUDA)")
    g.add_argument("--layers", type=int, default=None, help="decoder layers (CPU default 8, CUDA 16)")
    g.add_argument("--hidden", type=int, default=None, help="hidden size (CPU 256, CUDA 2048)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (CPU 8, CUDA 16)")
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads (CPU 4, CUDA 8)")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary size (CPU 256, CUDA 32000)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="default float32")
    g.add_argument("--seed", type=int, default=0, help="seed of weights and prompts (default 0)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for both methods (CPU default: cores - 1, leaving one to the copy engines)",
    )
    parser.add_argument("--out", default="pie-rs-out", help="output directory (default ./pie-rs-out)")
    parser.add_argument("--quick", action="store_true", help="a reduced run (smaller model and grid), for tests")
    parser.add_argument("--json", action="store_true", help="print the JSON summary instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[int]:
    """Sets torch's CPU threads for the run (both methods alike) and restores them afterwards.

    On CPU the default leaves one core to the host backend's copy and policy threads: with every
    core busy in torch, an oversubscribed machine stalls torch's thread barriers for tens of
    milliseconds at random, which would measure the scheduler rather than the cache.
    """
    before = torch.get_num_threads()
    if threads is None:
        threads = max(1, (os.cpu_count() or 2) - 1) if device.type == "cpu" else before
    torch.set_num_threads(max(1, threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_shape(args: argparse.Namespace, device: torch.device, base: ModelShape | None = None) -> ModelShape:
    """The model shape from the options over ``base`` (default: the device's), and ``--quick``."""
    if base is None:
        base = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    if getattr(args, "quick", False) and device.type != "cuda":
        base = ModelShape(layers=4, hidden=64, heads=4, kv_heads=2, vocab=128)
    return ModelShape(
        layers=args.layers or base.layers,
        hidden=args.hidden or base.hidden,
        heads=args.heads or base.heads,
        kv_heads=args.kv_heads or base.kv_heads,
        vocab=args.vocab or base.vocab,
        intermediate=None if args.hidden else base.intermediate,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pie-rs bench``."""
    add_model_arguments(parser)
    g = parser.add_argument_group("grid")
    g.add_argument("--batches", type=_ints, default=None, help="batch sizes, comma-separated (CPU default 1,4)")
    g.add_argument("--contexts", type=_ints, default=None, help="prompt lengths (CPU default 128,512)")
    g.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (CPU default 16)")
    g.add_argument("--budgets", type=_floats, default=None, help="pie-rs budgets as fractions of all-resident KV")
    g.add_argument("--objectives", default="speed,memory", help="pie-rs objectives (default speed,memory)")
    g.add_argument("--repeats", type=int, default=None, help="runs per method and point, interleaved (default 3)")
    g = parser.add_argument_group("capacity at a fixed budget")
    g.add_argument("--capacity-budget", default=None, help="device KV budget ('2MiB', bytes); default: Dyn at 2x ctx")
    g.add_argument("--capacity-contexts", type=_ints, default=None, help="contexts for the capacity search")
    g.add_argument("--capacity-max-factor", type=int, default=8, help="search pie-rs up to this x Dyn's batch")
    g.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    from . import serve_bench

    serve_bench.add_arguments(parser)


def _progress(total: int, desc: str, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=disable, file=sys.stderr, leave=False)


def run_bench(args: argparse.Namespace) -> int:
    """``pie-rs bench``: the grid, the capacity search, a table, JSON and plots; 1 if tokens differ."""
    if getattr(args, "serving", False):
        from . import serve_bench

        return serve_bench.run_serving(args)
    device = resolve_device(args.device)
    with cpu_threads(device, args.threads) as threads:
        return _run_bench(args, device, threads)


def _run_bench(args: argparse.Namespace, device: torch.device, threads: int) -> int:
    from . import plots
    from ._budget import parse_budget

    dtype = getattr(torch, args.dtype)
    shape = resolve_shape(args, device)
    cuda = device.type == "cuda"
    quick = args.quick
    batches = args.batches or ([8, 16] if cuda else [1, 2] if quick else [1, 4])
    contexts = args.contexts or ([512, 2048] if cuda else [32, 96] if quick else [128, 512])
    new_tokens = args.new_tokens or (32 if cuda else 6 if quick else 16)
    budgets = args.budgets or ([1.0, 0.5] if quick else [1.0, 0.5, 0.25])
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(shape, device, dtype, args.seed)
    methods = default_methods(device, budgets, objectives)
    notes = []
    if not cuda:
        notes.append("HF offloaded (cache_implementation='offloaded') needs CUDA: skipped on CPU")
    notes.append("DynamicCache/StaticCache device KV is computed from shapes; pie-rs's from its engine")
    notes.append("per-token latency: one perf_counter stamp per decode step from a LogitsProcessor")

    cap_contexts = args.capacity_contexts or [max(contexts)]
    repeats = max(1, args.repeats or (1 if quick else 3))
    n_runs = repeats * len(batches) * len(contexts) * len(methods) + (0 if args.no_capacity else 2 * len(cap_contexts))
    bar = _progress(n_runs, "pie-rs bench", args.no_progress)
    # Warm-up: first calls pay for kernel selection and allocator growth.
    warm = make_inputs(shape.vocab, 1, 8, device, args.seed + 1)
    measure(model, warm, 2, Method("warm", "dynamic"))
    measure(model, warm, 2, Method("warm", "pie", 0.5))
    rows: list[dict[str, Any]] = []
    identical = True
    t0 = time.perf_counter()
    for batch in batches:
        for context in contexts:
            ids = make_inputs(shape.vocab, batch, context, device, args.seed + 1)
            reference = None
            runs: dict[str, list[Row]] = {m.name: [] for m in methods}
            for _ in range(repeats):  # interleaved, so drift in machine load hits every method alike
                for method in methods:
                    bar.set_postfix_str(f"{method.name} b{batch} ctx{context}")
                    row, out = measure(model, ids, new_tokens, method, reference)
                    if method.kind == "dynamic" and reference is None:
                        reference = out
                    runs[method.name].append(row)
                    bar.update(1)
            for method in methods:
                row = merge_rows(runs[method.name])
                if row.identical is False:
                    identical = False
                rows.append(row.as_dict())
    add_ratios(rows)

    capacity: list[dict[str, Any]] = []
    cap_budget = None
    if not args.no_capacity:
        if args.capacity_budget is not None:
            text = args.capacity_budget
            cap_budget = parse_budget(int(text) if text.isdigit() else text, None)
        else:  # what DynamicCache needs for batch 2 at the largest context
            cap_budget = dynamic_kv_bytes(model, 2, max(cap_contexts) + new_tokens - 1)
        bar.set_postfix_str("capacity search")
        capacity = capacity_search(
            model,
            device,
            cap_contexts,
            new_tokens,
            int(cap_budget),
            args.capacity_max_factor,
            "speed",
            shape.vocab,
            args.seed + 1,
            bar,
        )
    bar.close()
    elapsed = time.perf_counter() - t0

    summary = _summary(rows, capacity)
    result = {
        "model": shape.describe(),
        "shape": asdict(shape),
        "device": str(device),
        "dtype": args.dtype,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "new_tokens": new_tokens,
        "batches": batches,
        "contexts": contexts,
        "notes": notes,
        "rows": rows,
        "capacity": capacity,
        "summary": summary,
        "all_identical": identical,
        "seconds": elapsed,
    }
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    table = format_table(rows)
    cap_table = format_capacity(capacity) if capacity else ""
    text = [
        f"pie-rs bench: {shape.describe()}; {device}, {args.dtype}, {threads} torch threads, {new_tokens} new tokens",
        "",
        table,
        "",
    ]
    if cap_table:
        text += [
            f"Largest batch at a fixed device KV budget ({int(cap_budget or 0) / 2**20:.2f} MiB):",
            "",
            cap_table,
            "",
        ]
    text += [f"- {line}" for line in summary["lines"]]
    text += [f"- note: {n}" for n in notes]
    (out_dir / "bench.md").write_text("\n".join(text) + "\n")
    pngs = plots.bench_plots(rows, capacity, out_dir)
    result["plots"] = [str(p) for p in pngs]
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print("\n".join(text))
        print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}, " + ", ".join(str(p) for p in pngs))
        if not identical:
            print("pie-rs produced DIFFERENT tokens from DynamicCache (see 'same tokens')")
    return 0 if identical else 1


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _summary(rows: list[dict[str, Any]], capacity: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline ratios (worst case over the grid) and a few lines of text."""
    ok = [r for r in rows if not r.get("error")]
    lines = []
    out: dict[str, Any] = {}

    resident = [r["e2e_ratio"] for r in ok if r["kind"] == "pie" and r["pooled_layers"] == 0 and r.get("e2e_ratio")]
    if resident:
        out["resident_e2e_ratio_median"] = statistics.median(resident)
        out["resident_e2e_ratio_worst"] = max(resident)
        lines.append(
            f"pie-rs everything resident: end-to-end time {statistics.median(resident):.2f}x DynamicCache "
            f"(median over the grid; worst {max(resident):.2f}x; target <= 1.10x)"
        )
    mem = [r for r in ok if r["kind"] == "pie" and r["objective"] == "memory"]
    if mem:
        lat = max(r["latency_ratio"] or 0 for r in mem)
        kv = min(r["kv_ratio"] or 0 for r in mem)
        out["memory_latency_ratio_worst"] = lat
        lines.append(f"pie-rs objective memory: step time up to {lat:.2f}x DynamicCache, device KV down to {kv:.2f}x")
    pooled = [r for r in ok if r["kind"] == "pie" and (r["pooled_layers"] or 0) > 0]
    if pooled:
        lat = max(r["latency_ratio"] or 0 for r in pooled)
        stall = max(r["stall_s"] for r in pooled)
        lines.append(f"pie-rs with layers pooled: step time up to {lat:.2f}x DynamicCache, stall up to {stall:.4f} s")
    if capacity:
        ratio = min(e["capacity_ratio"] for e in capacity)
        out["capacity_ratio"] = ratio
        lines.append(f"at a fixed device budget pie-rs holds {ratio:.2f}x the batch x context of DynamicCache")
    identical = [r["identical"] for r in ok if r["identical"] is not None]
    lines.append(f"tokens identical to DynamicCache in {sum(identical)}/{len(identical)} runs")
    out["lines"] = lines
    return out
