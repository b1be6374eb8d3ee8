"""Decode with every layer pooled: attended on the host vs copied to the device vs everything resident.

A model with Llama-3-8B layer shapes (8 layers, 32 query heads over 8 KV heads, head_dim 128,
random weights built on the device, bf16) decodes greedily after a long prompt, so the pooled KV
is large (batch 8 x 4096 tokens: 1 GiB). Three pie-rs runs on the same inputs, interleaved:

* ``resident``: no budget, every layer in device memory (no copies, no host work);
* ``pooled, copied`` (``host_attention="never"``): every layer in pinned host memory, copied to a
  staging slot every step over the link;
* ``pooled, host-attended`` (``host_attention="always"``): every layer stays in host memory, its
  decode attention runs on the CPU (the host kernel) and only the query and a partial result cross.

Prints per-step latency (median, p99), bytes copied each way, the host kernel's seconds, and
whether the tokens equal DynamicCache's (bf16: the split sums in float32 where sdpa rounds, so a
mismatch is reported with the first differing position, not hidden). Ratios are within this run.

    python benches/gpu/host_attention_bench.py [out.json]            # CUDA
    python benches/gpu/host_attention_bench.py --device cpu          # a tiny CPU check of the script
    python benches/gpu/host_attention_bench.py --serving [--device cpu]  # continuous batching instead
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import pie_rs
from pie_rs._model import inspect_model
from pie_rs.bench import LLAMA3_8B_SHAPE, ModelShape, StepClock, build_model, generate_timed, make_inputs, percentile

warnings.filterwarnings("ignore")


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a != b).nonzero()
    if diff.numel() == 0:
        return ""
    row, col = (int(x) for x in diff[0])
    return f"first at row {row}, position {col}; {int((a != b).any(dim=1).sum())}/{a.shape[0]} rows differ"


def run(model: torch.nn.Module, ids: torch.Tensor, new: int, kind: str) -> tuple[dict, torch.Tensor]:
    device = ids.device
    clock = StepClock(device)
    managed = inspect_model(model).managed
    if kind == "dynamic":
        out, wall = generate_timed(model, ids, new, clock)
        stats: dict = {}
    else:
        kw: dict = {"host_attention": "never"}
        if kind != "resident":
            kw = {"pooled_layers": list(managed), "prefetch_depth": 2, "host_attention": kind}
            if kind == "always":
                kw["prefetch_depth"] = 1
        with pie_rs.attach(model, **kw) as pool:
            cache = pool.new_cache(max_length=ids.shape[1] + new)
            try:
                out, wall = generate_timed(model, ids, new, clock, **{pool.info.cache_keyword: cache})
                stats = pool.stats()
            finally:
                cache.close()
    steps = [s * 1e3 for s in clock.step_seconds]
    row = {
        "method": kind,
        "step_median_ms": statistics.median(steps),
        "step_p99_ms": percentile(steps, 99),
        "wall_s": wall,
        "h2d_bytes": int(stats.get("h2d_bytes", 0)),
        "d2h_bytes": int(stats.get("d2h_bytes", 0)),
        "host_attention_s": float(stats.get("host_attention_seconds", 0.0)),
        "host_layer_steps": int(stats.get("host_attended_layer_steps", 0)),
        "pooled_layers": int(stats.get("pooled_layers", 0)),
        "device_kv_bytes": int(stats.get("peak_device_kv_bytes", 0)),
    }
    return row, out


NAMES = {
    "dynamic": "DynamicCache",
    "resident": "pie-rs resident",
    "never": "pie-rs pooled, copied",
    "always": "pie-rs pooled, host-attended",
}


def serving(model: torch.nn.Module, prompts: list[list[int]], new: int, repeats: int) -> list[dict]:
    """Continuous batching (``generate_batch``), every layer pooled: host-attended vs copied vs plain."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    total = sum(len(p) + new for p in prompts)
    page = 64
    # Every layer pooled, the budget leaving room for the staging slots and one page per layer.
    row = 2 * model.config.num_key_value_heads * model.config.head_dim * model.dtype.itemsize
    budget = 4 * page * model.config.num_hidden_layers * row + 2 * total * row

    def run_batch(kind: str) -> tuple[dict, dict]:
        # Continuous batching alone gets room for every request (its own sizing would take most
        # free memory, which on the CPU costs seconds of zeroing).
        blocks = None if kind != "plain" else sum(-(-(len(p) + new) // page) for p in prompts) + 8
        config = ContinuousBatchingConfig(page_size=page, max_batch_tokens=512, num_blocks=blocks)
        start = time.perf_counter()
        if kind == "plain":
            out = model.generate_batch(
                prompts, generation_config=gen, continuous_batching_config=config, progress_bar=False
            )
            stats: dict = {}
        else:
            with pie_rs.attach(model, gpu_budget=budget, objective="memory", host_attention=kind) as pool:
                out = model.generate_batch(
                    prompts, generation_config=gen, continuous_batching_config=config, progress_bar=False
                )
                stats = pool.stats()["serving"]
        seconds = time.perf_counter() - start
        got = {k: list(v.generated_tokens) for k, v in out.items()}
        return {"method": kind, "seconds": seconds, **{k: stats.get(k) for k in SERVING_STATS}}, got

    rows: dict[str, list[dict]] = {k: [] for k in ("plain", "never", "always")}
    results: dict[str, dict] = {}
    for _ in range(repeats):
        for kind in rows:
            row, got = run_batch(kind)
            rows[kind].append(row)
            results[kind] = got
    merged = []
    for kind, runs in rows.items():
        m = dict(runs[-1])
        m["seconds"] = statistics.median(r["seconds"] for r in runs)
        m["tokens_equal"] = results[kind] == results["plain"]
        merged.append(m)
    return merged


SERVING_STATS = ("pooled_layers", "h2d_bytes", "host_attended_layer_steps", "host_attention_seconds", "forward_steps")


def print_serving(rows: list[dict], prompts: list[list[int]], new: int) -> None:
    print(
        f"continuous batching, every layer pooled: {len(prompts)} requests, prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {new} new tokens each"
    )
    print(
        "| method | s (median) | pooled | H2D MiB | host layer-steps | forward steps | host kernel s | tokens = plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = {"plain": "continuous batching alone", "never": "pie-rs, copied", "always": "pie-rs, host-attended"}
    for m in rows:
        h2d = (m["h2d_bytes"] or 0) / 2**20
        print(
            f"| {names[m['method']]} | {m['seconds']:.2f} | {m['pooled_layers'] or '-'} | {h2d:.0f} | "
            f"{m['host_attended_layer_steps'] or 0} | {m['forward_steps'] or '-'} | "
            f"{m['host_attention_seconds'] or 0:.3f} | {'yes' if m['tokens_equal'] else 'NO'} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="also write the rows as JSON here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--new", type=int)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--serving", action="store_true", help="continuous batching instead (transformers >= 5.24)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        shape, dtype = LLAMA3_8B_SHAPE, torch.bfloat16
        batch, prompt, new = args.batch or 8, args.prompt or 4096, args.new or 16
    else:
        torch.set_num_threads(1)
        shape = ModelShape(layers=4, hidden=64, heads=4, kv_heads=2, vocab=128)
        dtype = torch.float32
        batch, prompt, new = args.batch or 2, args.prompt or 48, args.new or 6
    model = build_model(shape, device, dtype, seed=0)
    if args.serving:
        model.set_attn_implementation("sdpa")
        gen = torch.Generator().manual_seed(1)
        lengths = [prompt // 4 + (prompt * i) // max(1, batch - 1) for i in range(batch)]  # mixed lengths
        prompts = [torch.randint(3, shape.vocab, (n,), generator=gen).tolist() for n in lengths]
        rows_s = serving(model, prompts, new, args.repeats)
        print_serving(rows_s, prompts, new)
        print(f"{time.perf_counter() - t0:.0f} s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"serving": rows_s}, f, indent=1)
        return 0
    ids = make_inputs(shape.vocab, batch, prompt, device, seed=1)
    head_dim = shape.head_dim or shape.hidden // shape.heads
    kv_bytes = 2 * shape.layers * shape.kv_heads * head_dim * dtype.itemsize * batch * (prompt + new)
    run(model, ids[:, :64], 2, "resident")  # warm-up: kernels, allocator
    reference = None
    rows: dict[str, list[dict]] = {k: [] for k in NAMES}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for kind in NAMES:
            row, out = run(model, ids, new, kind)
            rows[kind].append(row)
            outs[kind] = out
            if kind == "dynamic" and reference is None:
                reference = out
            print(f"  {NAMES[kind]}: {row['step_median_ms']:.2f} ms/step", file=sys.stderr)
    assert reference is not None
    merged = []
    for kind, runs in rows.items():
        m = dict(runs[-1])
        m["step_median_ms"] = statistics.median(r["step_median_ms"] for r in runs)
        m["step_p99_ms"] = max(r["step_p99_ms"] for r in runs)
        m["name"] = NAMES[kind]
        m["tokens_equal"] = bool(torch.equal(outs[kind], reference))
        m["difference"] = _first_difference(outs[kind], reference)
        merged.append(m)
    by = {m["method"]: m for m in merged}
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU check of the script"
    label = "Llama-3-8B layer shapes" if shape == LLAMA3_8B_SHAPE else "tiny shape"
    print(
        f"host attention vs copies, every layer pooled: {shape.layers} layers ({label}: "
        f"{shape.heads} heads, {shape.kv_heads} KV, head_dim {head_dim}) {str(dtype).removeprefix('torch.')}, "
        f"batch {batch}, prompt {prompt}, {new} new tokens, KV {kv_bytes / 2**30:.2f} GiB, {args.repeats} "
        f"interleaved runs; {where}; {torch.get_num_threads()} CPU threads"
    )
    print("| method | ms/step (median) | p99 | vs resident | H2D MiB | D2H MiB | host kernel s | tokens = Dynamic |")
    print("|---|---|---|---|---|---|---|---|")
    base = by["resident"]["step_median_ms"]
    for m in merged:
        same = "yes" if m["tokens_equal"] else f"no ({m['difference']})"
        print(
            f"| {m['name']} | {m['step_median_ms']:.2f} | {m['step_p99_ms']:.2f} | {m['step_median_ms'] / base:.2f}x "
            f"| {m['h2d_bytes'] / 2**20:.0f} | {m['d2h_bytes'] / 2**20:.0f} | {m['host_attention_s']:.3f} | {same} |"
        )
    ratio = by["never"]["step_median_ms"] / by["always"]["step_median_ms"]
    print(f"host-attended vs copied (ms/step ratio, >1: host attention faster): {ratio:.2f}x")
    layer_steps = by["always"]["host_layer_steps"]
    print(f"host-attended layer-steps: {layer_steps} (expected {shape.layers * new}); {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": merged, "copied_over_host": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
