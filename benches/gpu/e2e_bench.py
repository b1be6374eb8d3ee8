"""End-to-end decode on the GPU: DynamicCache, transformers' offloading and pie-rs, one process.

A bf16 model with Llama-3-8B layer shapes (random weights built on the device, 8 layers) generates
with DynamicCache, transformers' offloaded cache and pie-rs (resident, half pooled, all pooled,
objective memory) on the same inputs; then the largest batch each of DynamicCache and pie-rs runs
at one fixed device KV budget.

Per-token latency is measured per decode step (a LogitsProcessor stamps time.perf_counter() after
torch.cuda.synchronize() once per step): median and p99 over all steps of all runs. It reuses
pie_rs.bench, so it needs the pie_rs wheel built from this tree. Usage:
    python benches/gpu/e2e_bench.py [out.json]
PIE_E2E_SMOKE=1 runs the same code on the CPU with a tiny model, to check the script without a GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

from pie_rs.bench import (
    LLAMA3_8B_SHAPE,
    Method,
    ModelShape,
    add_ratios,
    build_model,
    capacity_search,
    dynamic_kv_bytes,
    format_capacity,
    format_table,
    make_inputs,
    measure,
    merge_rows,
)

warnings.filterwarnings("ignore")
BATCH, PROMPT, NEW, REPEATS = 16, 2048, 32, 2
CAP_CONTEXT, CAP_BASE_BATCH, CAP_MAX_FACTOR, CAP_NEW = 2048, 8, 4, 8
SMOKE = os.environ.get("PIE_E2E_SMOKE") == "1"
if SMOKE:
    BATCH, PROMPT, NEW, REPEATS = 2, 32, 6, 1
    torch.set_num_threads(1)
    CAP_CONTEXT, CAP_BASE_BATCH, CAP_NEW = 32, 2, 4


def main() -> int:
    t0 = time.perf_counter()
    device = torch.device("cpu" if SMOKE else "cuda")
    shape = ModelShape(layers=4, hidden=64, heads=4, kv_heads=2, vocab=128) if SMOKE else LLAMA3_8B_SHAPE
    model = build_model(shape, device, torch.float32 if SMOKE else torch.bfloat16, seed=0)
    ids = make_inputs(shape.vocab, BATCH, PROMPT, device, seed=1)
    methods = [
        Method("DynamicCache", "dynamic"),
        Method("HF offloaded", "offloaded"),
        Method("pie-rs resident", "pie"),
        Method("pie-rs half pooled", "pie", pinned="half", prefetch_depth=2),
        Method("pie-rs all pooled", "pie", pinned="all", prefetch_depth=2),
        Method("pie-rs objective memory", "pie", objective="memory"),
    ]
    warm = make_inputs(shape.vocab, 2, 64, device, seed=2)
    for method in (methods[0], methods[2]):
        measure(model, warm, 2, method)
    runs: dict[str, list] = {m.name: [] for m in methods}
    reference = None
    for _ in range(REPEATS):
        for method in methods:
            row, out = measure(model, ids, NEW, method, reference)
            if method.kind == "dynamic" and reference is None:
                reference = out
            runs[method.name].append(row)
            print(f"  {method.name}: {row.step_median_ms:.2f} ms/token {row.error or ''}", file=sys.stderr)
    rows = [merge_rows(runs[m.name]).as_dict(with_steps=False) for m in methods]
    add_ratios(rows)
    budget = dynamic_kv_bytes(model, CAP_BASE_BATCH, CAP_CONTEXT + CAP_NEW - 1)
    capacity = capacity_search(
        model, device, [CAP_CONTEXT], CAP_NEW, budget, CAP_MAX_FACTOR, "speed", shape.vocab, seed=3
    )

    by = {r["method"]: r for r in rows}

    def ratio(a: str, b: str) -> float | None:
        ra, rb = by.get(a, {}), by.get(b, {})
        if ra.get("error") or rb.get("error") or not ra.get("step_median_ms") or not rb.get("step_median_ms"):
            return None
        return ra["step_median_ms"] / rb["step_median_ms"]

    checks = [
        ("pie-rs all pooled vs HF offloaded (ms/token)", ratio("pie-rs all pooled", "HF offloaded"), "<=", 0.6),
        (
            "pie-rs objective memory vs DynamicCache (ms/token)",
            ratio("pie-rs objective memory", "DynamicCache"),
            "<=",
            1.05,
        ),
        ("pie-rs resident vs DynamicCache (ms/token)", ratio("pie-rs resident", "DynamicCache"), "<=", 1.10),
        ("batch x context at a fixed budget, pie-rs vs DynamicCache", capacity[0]["capacity_ratio"], ">=", 1.5),
    ]
    print(
        f"model: {'tiny, float32 (smoke)' if SMOKE else 'Llama-3-8B layer shapes, bf16'}, {shape.layers} layers, "
        f"random weights; batch {BATCH}, "
        f"prompt {PROMPT}, {NEW} new tokens, {REPEATS} interleaved runs each; "
        f"{'CPU smoke run' if SMOKE else torch.cuda.get_device_name()}"
    )
    print(format_table(rows))
    print()
    print(
        f"Largest batch at a fixed device KV budget of {budget / 2**30:.2f} GiB (DynamicCache at batch "
        f"{CAP_BASE_BATCH}); pie-rs searched up to {CAP_MAX_FACTOR}x:"
    )
    print(format_capacity(capacity))
    print()
    print("| target | measured | goal | met |")
    print("|---|---|---|---|")
    results = []
    for name, value, op, goal in checks:
        met = None if value is None else (value <= goal if op == "<=" else value >= goal)
        results.append({"target": name, "value": value, "goal": f"{op} {goal}", "met": met})
        shown = "n/a" if value is None else f"{value:.2f}x"
        print(f"| {name} | {shown} | {op} {goal}x | {'-' if met is None else 'yes' if met else 'NO'} |")
    identical = [r["identical"] for r in rows if r.get("identical") is not None]
    print(
        f"tokens identical to DynamicCache: {sum(identical)}/{len(identical)} methods; {time.perf_counter() - t0:.0f} s"
    )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"rows": rows, "capacity": capacity, "targets": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
