"""``pie-rs simulate``: what-if runs of the engine in virtual time.

The simulation backend (``pie_core::sim``) replays the swap pipeline of a model on a
named machine with the adaptive policy, and compares the plan it settles on with the
best static plan. Profiles give the numbers; explicit options override them::

    pie-rs simulate --machine gh200 --model llama-3-70b --batch 8 --context 16384
    pie-rs simulate --layers 32 --layer-compute-ms 0.3 --layer-kv-mib 256 --h2d-gbps 25
    pie-rs simulate --list
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_request", "format_report", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``pie-rs simulate``."""
    p = argparse.ArgumentParser(
        prog="pie-rs simulate",
        description="What-if runs of pie-rs in virtual time: which layers to pool, how deep "
        "to prefetch, and what it costs, for a model on a machine.",
    )
    p.add_argument("--machine", help="machine profile (see --list; default h100-pcie-gen5)")
    p.add_argument("--model", help="model shape (see --list; default llama-3-8b)")
    p.add_argument("--batch", type=int, help="sequences per batch (default 8)")
    p.add_argument("--context", type=int, help="context tokens per sequence (default 8192)")
    p.add_argument("--layers", type=int, help="override: number of layers")
    p.add_argument("--layer-compute-ms", type=float, help="override: decode compute per layer, ms")
    p.add_argument("--layer-kv-mib", type=float, help="override: KV per layer, MiB")
    p.add_argument("--h2d-gbps", type=float, help="override: host-to-device bandwidth, GB/s")
    p.add_argument("--d2h-gbps", type=float, help="override: device-to-host bandwidth, GB/s")
    p.add_argument(
        "--gpu-budget-mib",
        type=float,
        help="device budget for the KV, MiB (default: half the KV for speed, all of it for memory)",
    )
    p.add_argument("--objective", choices=["speed", "memory"], default="speed", help="what to optimise (default speed)")
    p.add_argument("--steps", type=int, help="decode steps to simulate (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--list", action="store_true", help="list the machine and model profiles and exit")
    return p


_REQUEST_KEYS = (
    "machine",
    "model",
    "batch",
    "context",
    "layers",
    "layer_compute_ms",
    "layer_kv_mib",
    "h2d_gbps",
    "d2h_gbps",
    "gpu_budget_mib",
    "objective",
    "steps",
)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request dict for ``pie_rs._core.simulate`` (options left out are defaults)."""
    return {k: getattr(args, k) for k in _REQUEST_KEYS if getattr(args, k) is not None}


def _layers(layers: list[int], total: int) -> str:
    if not layers:
        return "none"
    if len(layers) <= 12:
        shown = ", ".join(str(i) for i in layers)
    else:
        shown = ", ".join(str(i) for i in layers[:10]) + f", ... {layers[-1]}"
    return f"{len(layers)}/{total}: {shown}"


def format_report(r: dict[str, Any]) -> str:
    """A readable table of a simulation report."""
    rows = [
        ("machine", r["machine"]),
        ("model", f"{r['model']} ({r['layers']} layers), batch {r['batch']}, context {r['context']}"),
        ("link", f"H2D {r['h2d_gbps']:.1f} GB/s, D2H {r['d2h_gbps']:.1f} GB/s"),
        ("per layer", f"{r['layer_compute_ms']:.3f} ms compute, {r['layer_kv_mib']:.1f} MiB KV"),
        ("KV / budget", f"{r['total_kv_mib']:.1f} MiB / {r['gpu_budget_mib']:.1f} MiB ({r['objective']})"),
        ("pooled layers", _layers(r["pooled_layers"], r["layers"])),
        ("prefetch depth", str(r["prefetch_depth"])),
        ("device KV", f"{r['device_kv_mib']:.1f} MiB ({100 * r['offloaded_share']:.1f}% of the KV freed)"),
        ("step (all on GPU)", f"{r['all_gpu_step_ms']:.3f} ms"),
        ("step (predicted)", f"{r['predicted_step_ms']:.3f} ms, stall {r['stall_ms_per_step']:.3f} ms"),
        ("step (simulated)", f"{r['simulated_step_ms']:.3f} ms (last step)"),
        (
            "best static plan",
            f"{r['best_static_step_ms']:.3f} ms, {len(r['best_static_pooled_layers'])} pooled, "
            f"depth {r['best_static_prefetch_depth']}",
        ),
        ("transparent share", f"{100 * r['transparent_fraction']:.1f}% of the KV can be pooled with no stall"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'step':>5} {'pooled':>6} {'depth':>5} {'step ms':>10} {'stall ms':>10}")
    steps = r["steps"]
    for i, s in enumerate(steps):
        if s["switched"] or i == len(steps) - 1:
            mark = "  <- new plan" if s["switched"] else ""
            lines.append(
                f"{s['step']:>5} {s['pooled_count']:>6} {s['prefetch_depth']:>5} "
                f"{s['step_ms']:>10.3f} {s['stall_ms']:>10.3f}{mark}"
            )
    return "\n".join(lines)


def _format_profiles(profiles: dict[str, dict[str, str]]) -> str:
    lines = ["machines:"]
    lines += [f"  {name:<20} {desc}" for name, desc in profiles["machines"].items()]
    lines.append("models:")
    lines += [f"  {name:<20} {desc}" for name, desc in profiles["models"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``pie-rs simulate`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from . import _core

    if args.list:
        profiles = _core.list_profiles()
        print(json.dumps(profiles, indent=2) if args.json else _format_profiles(profiles))
        return 0
    try:
        report = _core.simulate(build_request(args))
    except _core.PieError as exc:
        print(f"pie-rs simulate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
