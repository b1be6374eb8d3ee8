"""``pie-rs demo``: a Llama-architecture model generates with DynamicCache and with pie-rs.

No downloads: the model is built from a config with fixed-seed random weights, small on CPU (the
host backend: the CPU stands in for the device, real copies by threads) and larger on CUDA. pie-rs
runs at a budget that pools about half the layers in host memory. The demo checks that the tokens
are identical (exit status 1 if not), prints a small table (tokens/s, latency, peak device KV
against the baseline's, bytes moved each way, stall time, the plan the policy chose) and writes a
step timeline (PNG) and every figure (JSON) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ._model import inspect_model
from .bench import (
    Method,
    add_model_arguments,
    build_model,
    cpu_threads,
    make_inputs,
    measure,
    pie_plan_bytes,
    resolve_device,
    resolve_shape,
)

__all__ = ["add_arguments", "half_pooled_budget", "run_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pie-rs demo``."""
    add_model_arguments(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--batch", type=int, default=None, help="batch size (CPU default 4, CUDA 8)")
    g.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (CPU default 64, CUDA 1024)")
    g.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (CPU default 64, CUDA 128)")
    g.add_argument(
        "--budget",
        default=None,
        help="gpu_budget for pie-rs (bytes, '6GiB', a fraction); default: pool about half the layers",
    )
    g.add_argument("--trace-steps", type=int, default=4, help="decode steps drawn in the timeline (default 4)")


def half_pooled_budget(model: torch.nn.Module, batch: int, max_length: int) -> int:
    """A device budget under which the engine pools about half the full-attention layers.

    The device bytes ``_core`` computes for ``M // 2`` of ``M`` layers pooled through one staging slot.
    """
    managed = len(inspect_model(model).managed)
    return pie_plan_bytes(model, batch, max_length, pooled=max(1, managed // 2), prefetch_depth=1)


def _parse_budget_arg(text: str | None) -> int | float | str | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return value if "." in text or "e" in text.lower() else int(value)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def run_demo(args: argparse.Namespace) -> int:
    """``pie-rs demo``: one comparison; exit status 1 if the tokens differ."""
    device = resolve_device(args.device)
    with cpu_threads(device, args.threads) as threads:
        return _run_demo(args, device, threads)


def _run_demo(args: argparse.Namespace, device: torch.device, threads: int) -> int:
    from tqdm.auto import tqdm

    from . import plots

    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    shape = resolve_shape(args, device)
    quick = args.quick
    batch = args.batch or (8 if cuda else 2 if quick else 4)
    prompt = args.prompt_len or (1024 if cuda else 8 if quick else 64)
    new = args.new_tokens or (128 if cuda else 8 if quick else 64)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, args.seed)
    ids = make_inputs(shape.vocab, batch, prompt, device, args.seed + 1)
    budget = _parse_budget_arg(args.budget)
    if budget is None:
        budget = half_pooled_budget(model, batch, prompt + new)

    bar = tqdm(
        total=2 * new + 2, desc="pie-rs demo", unit="tok", disable=args.no_progress, file=sys.stderr, leave=False
    )
    # The engine times every 4th step (TIMING_EVERY), so look that much further back.
    trace_from = max(1, new - 4 * max(0, args.trace_steps))
    samples: list[dict[str, Any]] = []

    def tick(step: int, cache: Any) -> None:
        bar.update(1)
        if cache is not None and step >= trace_from and cache.engine is not None:
            cache.engine.flush_telemetry()  # the sample of the step that just finished
            sample = cache.engine.last_sample()
            if sample is not None and (not samples or samples[-1].get("step") != sample.get("step")):
                samples.append(dict(sample))
                del samples[: -max(1, args.trace_steps)]

    warm = make_inputs(shape.vocab, 1, 4, device, args.seed)
    bar.set_postfix_str("warm-up")
    measure(model, warm, 2, Method("warm-up", "dynamic"), raise_errors=True)
    measure(model, warm, 2, Method("warm-up", "pie", budget_fraction=0.5), raise_errors=True)
    bar.update(2)
    bar.set_postfix_str("DynamicCache")
    base, expected = measure(model, ids, new, Method("DynamicCache", "dynamic"), on_step=tick, raise_errors=True)
    bar.set_postfix_str("pie-rs")
    pie, _ = measure(
        model, ids, new, Method("pie-rs", "pie", budget_bytes=budget), expected, on_step=tick, raise_errors=True
    )
    bar.close()
    identical = bool(pie.identical)

    pngs = []
    if samples:
        pngs.append(
            plots.timeline(
                samples,
                out_dir / "demo_timeline.png",
                title=(
                    f"pie-rs, {len(samples)} sampled decode steps: {pie.resident_layers} resident / "
                    f"{pie.pooled_layers} pooled layers, prefetch depth {pie.prefetch_depth} ({device.type})"
                ),
            )
        )
    seconds = time.perf_counter() - t0
    result = {
        "model": shape.describe(),
        "device": str(device),
        "backend": "cuda" if cuda else "host",
        "dtype": args.dtype,
        "threads": threads,
        "batch": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "identical": identical,
        "budget_bytes": pie.budget_bytes,
        "baseline": base.as_dict(),
        "pie": pie.as_dict(),
        "kv_ratio": (pie.peak_device_kv_bytes or 0) / base.peak_device_kv_bytes if base.peak_device_kv_bytes else None,
        "speed_ratio": pie.decode_tok_s / base.decode_tok_s if base.decode_tok_s else None,
        "timeline_samples": samples,
        "timeline_note": (
            "compute and stall per layer are measured by the engine; copy bars are placed from the "
            "step's total H2D/D2H seconds by the FIFO rule (the engine does not expose per-copy times)"
        ),
        "seconds": seconds,
        "plots": [str(p) for p in pngs],
    }
    json_path = out_dir / "demo.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_table(result, base, pie, shape.describe(), json_path, pngs)
    return 0 if identical else 1


def _print_table(result: dict[str, Any], base: Any, pie: Any, model: str, json_path: Path, pngs: list[Path]) -> None:
    def num(value: float, spec: str) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    plan = (
        f"{pie.resident_layers} resident, {pie.pooled_layers} pooled {pie.pooled}, prefetch depth {pie.prefetch_depth}"
    )
    print(
        f"pie-rs demo: {model}; {result['device']} ({result['backend']} backend, {result['threads']} torch threads), "
        f"batch {result['batch']}, "
        f"{result['prompt_len']}+{result['new_tokens']} tokens"
    )
    print(f"  tokens identical to DynamicCache: {'yes' if result['identical'] else 'NO'}")
    rows = [
        ("", "DynamicCache", "pie-rs"),
        ("decode tokens/s", num(base.decode_tok_s, ".1f"), num(pie.decode_tok_s, ".1f")),
        ("ms/token median", num(base.step_median_ms, ".2f"), num(pie.step_median_ms, ".2f")),
        ("ms/token p99", num(base.step_p99_ms, ".2f"), num(pie.step_p99_ms, ".2f")),
        ("end-to-end s", num(base.e2e_s, ".3f"), num(pie.e2e_s, ".3f")),
        ("peak device KV", _mib(base.peak_device_kv_bytes), _mib(pie.peak_device_kv_bytes)),
        ("  vs DynamicCache", "1.00x", num(result["kv_ratio"], ".2f") + "x"),
        ("budget", "-", _mib(pie.budget_bytes) if isinstance(pie.budget_bytes, int) else str(pie.budget_bytes)),
        ("bytes host->device", "-", _mib(pie.h2d_bytes)),
        ("bytes device->host", "-", _mib(pie.d2h_bytes)),
        ("stall", "-", f"{pie.stall_s * 1e3:.2f} ms"),
        ("plan", "all on the device", plan),
    ]
    width = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    for label, a, b in rows:
        print(f"  {label:<{width}}{a:<{w1}}{b}")
    print(f"  wrote {json_path}" + "".join(f", {p}" for p in pngs))
