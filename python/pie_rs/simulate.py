"""``pie-rs simulate``: what-if runs of the engine in virtual time.

The simulation backend (``pie_core::sim``) replays the swap pipeline of a model on a
named machine with the adaptive policy, and compares the plan it settles on with the
best static plan. Profiles give the numbers; explicit options override them::

    pie-rs simulate --machine gh200 --model llama-3-70b --batch 8 --context 16384
    pie-rs simulate --layers 32 --layer-compute-ms 0.3 --layer-kv-mib 256 --h2d-gbps 25
    pie-rs simulate --list

Pooled layers are copied to the device before they run or, with ``--host-attention``
(``auto``, the default: per layer, whichever the cost model predicts faster; ``never``;
``always``), attended on the CPU where their KV lives, at the machine's CPU memory
bandwidth and cores (``--cpu-memory-gbps``, ``--cpu-cores`` override them)::

    pie-rs simulate --machine a100-pcie-gen4 --context 4096 --host-attention never

With ``--serving`` it answers the serving question instead: chat-like requests (seeded)
through a continuous-batching scheduler like vLLM's, in front of the engine on the
simulated machine, for four ways of holding the KV (``no_pooling``, ``swap``,
``static_offload`` as FlexGen, ``pie``), and the smallest budget at which ``pie`` matches
``no_pooling``'s throughput::

    pie-rs simulate --serving --machine gh200 --model llama-3-70b --gpu-budget-mib 16384
    pie-rs simulate --serving --rates 2,4,8 --requests 300 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "build_request",
    "build_serving_request",
    "format_report",
    "format_serving_report",
    "main",
    "parser",
]

METHODS = ("no_pooling", "swap", "static_offload", "pie")
HOST_ATTENTION = ("auto", "never", "always")


def _rate(text: str) -> float:
    """A rate in requests per second, or ``inf`` (all requests at once)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of requests per second (or inf)") from None


def _rates(text: str) -> list[float]:
    return [_rate(part.strip()) for part in text.split(",") if part.strip()] or [_rate(text)]


def _methods(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    for n in names:
        if n not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
    return names


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
    p.add_argument(
        "--memory-slowdown",
        type=float,
        metavar="FACTOR",
        help="with --objective memory: the step may be at most FACTOR x all-resident (default 1.02)",
    )
    p.add_argument("--steps", type=int, help="decode steps to simulate (default 30)")
    p.add_argument(
        "--host-attention",
        choices=HOST_ATTENTION,
        default="auto",
        help="where pooled layers' attention may run: auto (per layer, whichever is predicted "
        "faster), never (always copy the KV to the device), always (on the CPU); default auto",
    )
    p.add_argument("--cpu-memory-gbps", type=float, help="override: the host CPU's memory bandwidth, GB/s")
    p.add_argument("--cpu-cores", type=int, help="override: host CPU cores for attention")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    serving = p.add_argument_group("serving (--serving)")
    serving.add_argument(
        "--serving", action="store_true", help="simulate continuous-batching serving of chat-like requests"
    )
    rate = serving.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=_rate, help="arrival rate, requests/s (default inf: all at once)")
    rate.add_argument("--rates", type=_rates, help="several arrival rates, comma-separated (e.g. 2,4,8)")
    serving.add_argument("--requests", type=int, help="requests per run (default 300)")
    serving.add_argument("--seed", type=int, help="workload seed (default 0)")
    serving.add_argument("--methods", type=_methods, help=f"methods to run (default all: {','.join(METHODS)})")
    serving.add_argument(
        "--no-equal-performance",
        action="store_true",
        help="skip the search for the smallest budget at which pie matches no_pooling",
    )
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
    "host_attention",
    "cpu_memory_gbps",
    "cpu_cores",
    "memory_slowdown",
)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request dict for ``pie_rs._core.simulate`` (options left out are defaults)."""
    return {k: getattr(args, k) for k in _REQUEST_KEYS if getattr(args, k) is not None}


_SINGLE_ONLY = (
    "batch",
    "context",
    "layers",
    "layer_compute_ms",
    "layer_kv_mib",
    "steps",
    "cpu_memory_gbps",
    "cpu_cores",
    "memory_slowdown",
)


def build_serving_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request dict for ``pie_rs._core.simulate_serving``."""
    req: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "machine",
            "model",
            "requests",
            "gpu_budget_mib",
            "seed",
            "h2d_gbps",
            "d2h_gbps",
            "methods",
            "host_attention",
        )
        if getattr(args, k) is not None
    }
    if args.rates is not None:
        req["rates"] = args.rates
    elif args.rate is not None:
        req["rates"] = [args.rate]
    if args.no_equal_performance:
        req["equal_performance"] = False
    return req


def _rate_text(rate: Any) -> str:
    if rate is None:
        return "given workload"
    if rate == "inf":
        return "all at once"
    return f"{rate:g} requests/s"


def format_serving_report(r: dict[str, Any]) -> str:
    """A readable table of a serving simulation report."""
    lines = [
        f"machine   {r['machine']} (H2D {r['h2d_gbps']:.1f} GB/s, D2H {r['d2h_gbps']:.1f} GB/s)",
        f"model     {r['model']}, device KV budget {r['gpu_budget_mib']:.0f} MiB "
        f"({r['device_pool_tokens']} tokens with every layer resident)",
        f"requests  {r['requests']} chat-like (mean prompt {r['mean_prompt']:.0f}, mean output "
        f"{r['mean_output']:.0f} tokens, seed {r['seed']})",
    ]
    header = (
        f"{'method':<15} {'tok/s':>9} {'TTFT p50':>9} {'p99 ms':>9} {'TPOT p50':>9} {'p99 ms':>8} "
        f"{'peak run':>8} {'preempt':>7} {'dev MiB':>8} {'host MiB':>8} {'pooled':>6} {'on CPU':>6}"
    )
    for run in r["runs"]:
        lines += ["", f"rate: {_rate_text(run['rate'])}", header]
        base = run["methods"].get("no_pooling")
        for name, m in run["methods"].items():
            ratio = ""
            if base and name != "no_pooling" and base["throughput_tok_s"] > 0:
                ratio = f"  ({m['throughput_tok_s'] / base['throughput_tok_s']:.2f}x)"
            lines.append(
                f"{name:<15} {m['throughput_tok_s']:>9.0f} {m['ttft_ms_p50']:>9.1f} {m['ttft_ms_p99']:>9.1f} "
                f"{m['tpot_ms_p50']:>9.2f} {m['tpot_ms_p99']:>8.2f} {m['peak_running']:>8} "
                f"{m['preemptions']:>7} {m['device_kv_mib']:>8.0f} {m['host_kv_mib']:>8.0f} "
                f"{m['pooled_layers']:>6} {m['host_attended_layers']:>6}{ratio}"
            )
    eq = r.get("equal_performance")
    if eq:
        lines += [
            "",
            f"equal performance ({_rate_text(eq['rate'])}): pie reaches no_pooling's "
            f"{eq['no_pooling_throughput_tok_s']:.0f} tok/s at {eq['no_pooling_budget_mib']:.0f} MiB with "
            f"{eq['pie_budget_mib']:.0f} MiB ({eq['pie_throughput_tok_s']:.0f} tok/s): "
            f"{eq['memory_ratio']:.2f}x less device memory; no_pooling itself needs "
            f"{eq['no_pooling_min_budget_mib']:.0f} MiB for it ({eq['memory_ratio_vs_min']:.2f}x)",
        ]
    return "\n".join(lines)


def _serving_main(args: argparse.Namespace) -> int:
    from . import _core

    given = [f"--{k.replace('_', '-')}" for k in _SINGLE_ONLY if getattr(args, k) is not None]
    if args.objective != "speed":
        given.append("--objective")
    if given:
        print(f"pie-rs simulate: {', '.join(given)} do not apply to --serving", file=sys.stderr)
        return 2
    try:
        report = _core.simulate_serving(build_serving_request(args))
    except _core.PieError as exc:
        print(f"pie-rs simulate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_serving_report(report))
    return 0


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
        (
            "host attention",
            f"{r['host_attention']} (CPU reads KV at {r['cpu_attention_gbps']:.0f} GB/s); on the CPU: "
            f"{_layers(r['host_attended_layers'], r['layers'])}, {r['host_ms_per_step']:.3f} ms/step",
        ),
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
        (
            "copy-only pooling",
            f"{r['copy_only_step_ms']:.3f} ms best static plan "
            f"({r['copy_only_step_ms'] / max(r['predicted_step_ms'], 1e-12):.2f}x the predicted step)",
        ),
        ("transparent share", f"{100 * r['transparent_fraction']:.1f}% of the KV can be pooled with no stall"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'step':>5} {'pooled':>6} {'on CPU':>6} {'depth':>5} {'step ms':>10} {'stall ms':>10}")
    steps = r["steps"]
    for i, s in enumerate(steps):
        if s["switched"] or i == len(steps) - 1:
            mark = "  <- new plan" if s["switched"] else ""
            lines.append(
                f"{s['step']:>5} {s['pooled_count']:>6} {s['host_count']:>6} {s['prefetch_depth']:>5} "
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
    if args.serving:
        return _serving_main(args)
    serving_only = [f"--{k}" for k in ("rate", "rates", "requests", "seed", "methods") if getattr(args, k) is not None]
    if args.no_equal_performance:
        serving_only.append("--no-equal-performance")
    if serving_only:
        print(f"pie-rs simulate: {', '.join(serving_only)} need --serving", file=sys.stderr)
        return 2
    try:
        report = _core.simulate(build_request(args))
    except _core.PieError as exc:  # bad input: what to change, exit 2 as everywhere in the CLI
        print(f"pie-rs simulate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
