"""Compare the serving simulation with a measured continuous-batching run.

The measured run (pie-rs inside transformers' continuous batching on this machine, or any
other server) is described by a JSON file::

    {
      "method": "pie",                      # or "no_pooling": how the run held its KV
      "model_shape": {"layers": 4, "hidden": 64, "intermediate": 128, "heads": 4,
                      "kv_heads": 2, "head_dim": 16, "elem_size": 4},
      "kv_budget_mib": 1.5,                 # device KV the run had (blocks x block size x bytes)
      "max_running": 32, "max_batched_tokens": 512,
      "requests": [{"arrival": 0.0, "prompt": 37, "output": 20}, ...],   # seconds, tokens
      "throughput_tok_s": 812.0,            # output tokens / (last finish - first arrival)
      "pie_pool": {"blocks": 366, "pooled_layers": [0, 1, 2, 3], "prefetch_depth": 2},  # optional
      "steps": [{"tokens": 9, "context_tokens": 310, "layer_seconds": 0.00021}, ...]
    }

``pie_pool`` is the pool as pie-rs's continuous batching sized it (once, at start: blocks, pooled
layers, staging slots); with it the simulated ``pie`` replays that pool instead of growing its own
(the simulator's adaptive expansion, which the real integration does not do).

``steps`` are per-step timings of the run (tokens in the batch, tokens of KV its attention
read, wall seconds of the step divided by the layers); the script fits the simulator's
compute model ``fixed + per_token x tokens + per_context_token x context_tokens`` to them by
non-negative least squares. ``compute`` may be given instead of ``steps``. The link comes
from ``--link`` (the host backend's measured link: ``cargo run -p pie-host --release
--example calibrate -- --profile-json host-link.json``) or the run's own ``link`` entry.
``copy_compute_ns_per_byte`` (the link's or the run's; ``pie-rs bench --serving
--calibration-out`` measures it on CPU apart from the runs, ``pie_rs._copy_cost``) is the compute
time a copy takes from the processor per byte: the host backend's copies are memcpy on the same
cores and memory as the model, and the simulator charges it to the compute after each copy.

The simulation replays the same requests (arrival times and lengths) through the scheduler
with the measured compute and link, and the script prints predicted against measured
throughput; it exits 1 when they differ by more than ``--tolerance`` (default 10%).

    python benches/serving_calibration.py measured.json --link host-link.json [--json]

One command measures and compares: ``--run "ARGS"`` first runs ``pie-rs bench --serving ARGS
--calibration-out OUT/measured.json --out OUT`` (the ``pie`` run, plus ``pie-compute`` for the
compute model: see ``pie_rs.serve_bench.calibration_run``), and ``--measure-link`` first runs the
host backend's link calibration (``cargo run -p pie-host --release --example calibrate``)::

    python benches/serving_calibration.py --run "--rates inf --repeats 3" --measure-link --out calib
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pie_rs import _core

_COEFFS = ("fixed", "per_token", "per_context_token")


def fit_compute(steps: list[dict[str, float]]) -> dict[str, float]:
    """Non-negative least squares of ``layer_seconds`` on (1, tokens, context_tokens).

    Three unknowns: every subset of active coefficients is solved and the best fit whose
    coefficients are all non-negative wins (exact NNLS for so few variables).
    """
    if len(steps) < 3:
        raise ValueError(f"fitting the compute model needs at least 3 timed steps (got {len(steps)})")
    x = np.array([[1.0, s["tokens"], s["context_tokens"]] for s in steps], dtype=float)
    y = np.array([s["layer_seconds"] for s in steps], dtype=float)
    best: tuple[float, np.ndarray] | None = None
    for k in range(1, 4):
        for cols in itertools.combinations(range(3), k):
            sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            full = np.zeros(3)
            full[list(cols)] = sol
            err = float(((x @ full - y) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, full)
    if best is None:
        raise ValueError("no non-negative compute model fits the timed steps")
    return dict(zip(_COEFFS, (float(v) for v in best[1]), strict=True))


def simulate(measured: dict[str, Any], link: dict[str, float]) -> dict[str, Any]:
    """The simulator's report for the measured run's requests, compute and link."""
    compute = measured.get("compute") or fit_compute(measured["steps"])
    request: dict[str, Any] = {
        "model_shape": measured["model_shape"],
        "gpu_budget_mib": measured["kv_budget_mib"],
        "workload": [
            {"arrival": float(r["arrival"]), "prompt": int(r["prompt"]), "output": int(r["output"])}
            for r in measured["requests"]
        ],
        "compute": compute,
        "methods": [measured.get("method", "pie")],
        "equal_performance": False,
        "h2d_gbps": link["h2d_gbps"],
        "d2h_gbps": link["d2h_gbps"],
        "copy_latency_us": link.get("copy_latency_us", 5.0),
    }
    cost = link.get("copy_compute_ns_per_byte", measured.get("copy_compute_ns_per_byte"))
    if cost is not None:
        request["copy_compute_ns_per_byte"] = float(cost)
    for key in ("max_running", "max_batched_tokens", "pie_pool"):
        if key in measured:
            request[key] = measured[key]
    report = _core.simulate_serving(request)
    report["compute"] = compute
    return report


def compare(measured: dict[str, Any], link: dict[str, float]) -> dict[str, Any]:
    """Predicted against measured throughput for one measured run.

    With ``repeats`` (pairs of a measured throughput and the per-step timings of the compute runs
    on both sides of it), each pair is predicted on its own and the error is the median of the
    paired errors: on a shared machine the load moves between runs, and a pair sees about the
    same load. ``pooled_error`` is the single comparison (all steps, median throughput). With a
    copy cost (``copy_compute_ns_per_byte``, from the link or the measured run), the error without
    it is reported too (``error_without_copy_cost``).
    """
    result = _compare(measured, link)
    cost = link.get("copy_compute_ns_per_byte", measured.get("copy_compute_ns_per_byte"))
    result["copy_compute_ns_per_byte"] = cost
    if cost:  # the same comparison without the copies' cost to compute, to show what it accounts for
        free = {**link, "copy_compute_ns_per_byte": 0.0}
        result["error_without_copy_cost"] = _compare(measured, free)["error"]
    return result


def _compare(measured: dict[str, Any], link: dict[str, float]) -> dict[str, Any]:
    report = simulate(measured, link)
    method = measured.get("method", "pie")
    predicted = report["methods"][method]["throughput_tok_s"]
    actual = float(measured["throughput_tok_s"])
    paired = []
    for rep in measured.get("repeats") or []:
        if len(rep["steps"]) >= 3:
            sim = simulate({**measured, "steps": rep["steps"], "compute": None}, link)
            got = float(rep["throughput_tok_s"])
            paired.append({"measured_tok_s": got, "predicted_tok_s": sim["methods"][method]["throughput_tok_s"]})
    for p in paired:
        p["error"] = p["predicted_tok_s"] / p["measured_tok_s"] - 1.0
    pooled_error = predicted / actual - 1.0
    if len(paired) >= 2:
        mid = sorted(paired, key=lambda p: p["error"])[len(paired) // 2]
        actual, predicted = mid["measured_tok_s"], mid["predicted_tok_s"]
    return {
        "method": method,
        "pie_step_excess": _step_excess(measured.get("pie_steps") or [], report["compute"]),
        "measured_tok_s": actual,
        "predicted_tok_s": predicted,
        "error": predicted / actual - 1.0,
        "pooled_error": pooled_error,
        "paired": paired,
        "compute": report["compute"],
        "link": link,
        "simulated": report["methods"][method],
    }


def _step_excess(steps: list[dict[str, float]], compute: dict[str, float]) -> float | None:
    """Median of the measured run's own step times over the fitted compute model's, minus 1.

    What a pooled step costs beyond the same batch without copies (engine calls, copies sharing the
    CPU): a diagnostic beside the comparison, not an input to it.
    """
    fitted = [
        (
            s["layer_seconds"],
            compute["fixed"] + compute["per_token"] * s["tokens"] + compute["per_context_token"] * s["context_tokens"],
        )
        for s in steps
    ]
    ratios = sorted(got / want - 1.0 for got, want in fitted if want > 0)
    return ratios[len(ratios) // 2] if ratios else None


def measure_link(path: Path) -> None:
    """Runs the host backend's link calibration, which writes ``path``."""
    root = Path(__file__).resolve().parents[1]
    cmd = ["cargo", "run", "-q", "-p", "pie-host", "--release", "--example", "calibrate"]
    subprocess.run([*cmd, "--", "--profile-json", str(path.resolve())], cwd=root, check=True, stdout=sys.stderr)


def measure_run(bench_args: str, out: Path) -> Path:
    """Runs ``pie-rs bench --serving`` with ``bench_args``; returns the measured run it wrote."""
    from pie_rs.cli import main as cli

    path = out / "measured.json"
    argv = ["bench", "--serving", *shlex.split(bench_args), "--out", str(out), "--calibration-out", str(path)]
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the comparison's (--json: one object)
        rc = cli(argv)
    if rc != 0 or not path.exists():
        raise ValueError(f"pie-rs {' '.join(argv)} failed (exit code {rc})")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measured", type=Path, nargs="?", help="JSON of the measured run (see above)")
    p.add_argument("--link", type=Path, help="JSON of the measured link (h2d_gbps, d2h_gbps, copy_latency_us)")
    p.add_argument("--run", metavar="ARGS", help="first run pie-rs bench --serving ARGS to measure the run")
    p.add_argument("--measure-link", action="store_true", help="first measure the host backend's link (cargo)")
    p.add_argument("--out", type=Path, default=Path("serving-calibration"), help="folder for --run and --measure-link")
    p.add_argument("--tolerance", type=float, default=0.10, help="largest accepted relative error (default 0.10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        if args.run is not None or args.measure_link:
            args.out.mkdir(parents=True, exist_ok=True)
        if args.measure_link:
            args.link = args.out / "host-link.json"
            measure_link(args.link)
        if args.run is not None:
            args.measured = measure_run(args.run, args.out)
        if args.measured is None:
            raise ValueError("give the measured run's JSON, or --run to measure one")
        measured = json.loads(args.measured.read_text())
        link = json.loads(args.link.read_text()) if args.link else measured.get("link")
        if not link:
            raise ValueError("give --link or a 'link' entry in the measured run")
        result = compare(measured, link)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, subprocess.SubprocessError, _core.PieError) as exc:
        print(f"serving_calibration: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        c = result["compute"]
        print(
            f"compute per layer: {c['fixed'] * 1e6:.2f} us + {c['per_token'] * 1e9:.2f} ns/token "
            f"+ {c['per_context_token'] * 1e9:.3f} ns/context token"
        )
        print(f"link: H2D {link['h2d_gbps']:.1f} GB/s, D2H {link['d2h_gbps']:.1f} GB/s")
        for p in result["paired"]:
            print(
                f"  repeat: measured {p['measured_tok_s']:.1f} tok/s, predicted {p['predicted_tok_s']:.1f} "
                f"({100 * p['error']:+.1f}%)"
            )
        if len(result["paired"]) >= 2:
            print(f"pooled fit, median run: {100 * result['pooled_error']:+.1f}%; the median pair:")
        print(
            f"{result['method']}: measured {result['measured_tok_s']:.1f} tok/s, predicted "
            f"{result['predicted_tok_s']:.1f} tok/s ({100 * result['error']:+.1f}%)"
        )
        if result.get("error_without_copy_cost") is not None:
            print(
                f"copies cost compute {result['copy_compute_ns_per_byte']:.3f} ns/byte (measured apart); "
                f"without that cost the median pair would be {100 * result['error_without_copy_cost']:+.1f}%"
            )
        if result["pie_step_excess"] is not None:
            print(f"the measured run's steps against the compute fit: median {100 * result['pie_step_excess']:+.1f}%")
        sim = result["simulated"]
        keys = ("peak_running", "preemptions", "pooled_layers", "device_kv_mib")
        print("simulated: " + ", ".join(f"{k} {sim[k]}" for k in keys if k in sim))
        print(
            "measured: "
            + ", ".join(f"{k} {measured[k]}" for k in ("peak_running", "pooled_layers", "num_blocks") if k in measured)
        )
    return 0 if abs(result["error"]) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
