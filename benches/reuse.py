"""KV reuse: the prefix store against recomputing, and N copies of a pooled cache against DynamicCache.

Time to first token with a stored prefix and recomputed, the device memory of N copies of a
pooled cache against N DynamicCache copies, and continuous batching (``generate_batch``) of N
requests sharing a system prompt with the store and without, all measured in the same run.

    python benches/reuse.py [--prefix 2000] [--suffix 16] [--copies 8] [--repeats 3] [--json out.json]
                            [--serving-requests 4] [--serving-new 8] [--only generate|serving]

A Llama built from a config (fixed-seed random weights, no downloads), on CUDA when there is one,
else on the CPU (host backend). Prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig

import pie_rs
from pie_rs import _core
from pie_rs._engine import engine_layers
from pie_rs._model import cache_keyword, inspect_model


def make_model(device: str) -> torch.nn.Module:
    big = device == "cuda"
    config = AutoConfig.for_model(
        "llama",
        vocab_size=32000,
        hidden_size=2048 if big else 512,
        intermediate_size=5632 if big else 1408,
        num_hidden_layers=16 if big else 8,
        num_attention_heads=16 if big else 8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if big else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ttft(model: torch.nn.Module, ids: torch.Tensor, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0
    )
    sync(device)
    return time.perf_counter() - start


def allocated(device: str) -> int:
    """Bytes torch's CUDA allocator holds now (0 on the CPU, where it is not tracked)."""
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def kv_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def serving_run(model: torch.nn.Module, prompts: list[list[int]], new: int) -> dict[str, object]:
    """One ``generate_batch`` of ``prompts``: wall time, each request's time to first token, the tokens."""
    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=gen, record_timestamps=True, progress_bar=False)
    ordered = [out[k] for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]
    ttft = [o.timestamps[0] - o.created_time for o in ordered]
    # From the first request added to the last token: the serving itself, without generate_batch's
    # set-up (building the manager and its warm-up, seconds on a CPU and the same both ways).
    wall = max(o.timestamps[-1] for o in ordered) - min(o.created_time for o in ordered)
    return {"wall": wall, "ttft": statistics.median(ttft), "tokens": [list(o.generated_tokens) for o in ordered]}


def serving_bench(model: torch.nn.Module, prefix: list[int], suffixes: list[list[int]], args: Any) -> dict[str, Any]:
    """N requests sharing a system prompt through continuous batching: no store, then the store.

    Both with transformers' own prefix sharing on (its default): it lends a request's computed
    blocks to requests admitted after it in the same session, the store covers what it does not
    (the first request, and every request of a later session).
    """
    prompts = [prefix + s for s in suffixes[: args.serving_requests]]
    new = args.serving_new
    with torch.no_grad(), pie_rs.attach(model) as pool:
        serving_run(model, prompts[:1], 1)  # warm-up: the paged cache and its engine built once
        base = [serving_run(model, prompts, new) for _ in range(args.repeats)]
        t0 = time.perf_counter()
        pool.cache_prefix(prefix)
        register = time.perf_counter() - t0
        before = pool.stats()
        store = [serving_run(model, prompts, new) for _ in range(args.repeats)]
        stats = pool.stats()
    b_wall = statistics.median(r["wall"] for r in base)
    s_wall = statistics.median(r["wall"] for r in store)
    b_ttft = statistics.median(r["ttft"] for r in base)
    s_ttft = statistics.median(r["ttft"] for r in store)
    runs = len(store)
    return {
        "serving_requests": len(prompts),
        "serving_new_tokens": new,
        "serving_wall_no_store_s": b_wall,
        "serving_wall_store_s": s_wall,
        "serving_ttft_no_store_s": b_ttft,
        "serving_ttft_store_s": s_ttft,
        "serving_ttft_speedup": b_ttft / s_ttft,
        "serving_throughput_no_store_tok_s": len(prompts) * new / b_wall,
        "serving_throughput_store_tok_s": len(prompts) * new / s_wall,
        "serving_register_s": register,
        "serving_hits_last_run": stats["serving"]["prefix_hits"],
        "serving_tokens_reused_per_run": (stats["prefix_tokens_reused"] - before["prefix_tokens_reused"]) / runs,
        "serving_tokens_equal": all(r["tokens"] == base[0]["tokens"] for r in base + store),
    }


def print_serving(r: dict[str, Any]) -> None:
    n, new = r["serving_requests"], r["serving_new_tokens"]
    print(
        f"| generate_batch, {n} requests x {new} new tokens: median time to first token, no store | "
        f"{r['serving_ttft_no_store_s'] * 1e3:.1f} ms |"
    )
    print(f"| same, system prompt from the store | {r['serving_ttft_store_s'] * 1e3:.1f} ms |")
    print(f"| speed-up (time to first token) | {r['serving_ttft_speedup']:.1f}x |")
    print(
        f"| from the first request to the last token, no store / store | "
        f"{r['serving_wall_no_store_s'] * 1e3:.0f} / {r['serving_wall_store_s'] * 1e3:.0f} ms |"
    )
    print(
        f"| throughput, no store / store | {r['serving_throughput_no_store_tok_s']:.1f} / "
        f"{r['serving_throughput_store_tok_s']:.1f} tokens/s |"
    )
    print(
        f"| store tokens reused per batch (requests hit in the last) | {r['serving_tokens_reused_per_run']:.0f} "
        f"({r['serving_hits_last_run']}) |"
    )
    print(f"| tokens equal with and without the store | {r['serving_tokens_equal']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--suffix", type=int, default=16)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--serving-requests", type=int, default=4, help="requests of the generate_batch part (0: skip)")
    parser.add_argument("--serving-new", type=int, default=8, help="new tokens per request in the generate_batch part")
    parser.add_argument("--only", choices=["generate", "serving"], default=None, help="run one part")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = make_model(device)
    kw = cache_keyword(model)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 32000, (1, args.prefix), generator=gen).to(device)
    count = max(args.repeats + 1, args.serving_requests)
    suffixes = [torch.randint(3, 32000, (1, args.suffix), generator=gen).to(device) for _ in range(count)]
    prompts = [torch.cat([prefix, s], dim=1) for s in suffixes]
    results: dict[str, object] = {
        "device": device,
        "prefix": args.prefix,
        "suffix": args.suffix,
        "threads": torch.get_num_threads(),
    }
    if args.only == "serving":
        results |= serving_bench(model, prefix[0].tolist(), [x[0].tolist() for x in suffixes], args)
        print(
            f"KV reuse in continuous batching on {device}: {args.prefix}-token system prompt + {args.suffix}-token "
            f"suffixes, {torch.get_num_threads()} torch threads"
        )
        print()
        print("| what | figure |")
        print("|---|---|")
        print_serving(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return

    # ---- time to first token: the store against recomputing, same pool, same prompts
    with torch.no_grad(), pie_rs.attach(model) as pool:
        ttft(model, prompts[-1], device)  # warm-up (engine kept, allocator warm)
        recompute = [ttft(model, p, device) for p in prompts[: args.repeats]]
        t0 = time.perf_counter()
        held = pool.cache_prefix(prefix[0])
        register = time.perf_counter() - t0
        reuse = [ttft(model, p, device) for p in prompts[: args.repeats]]
        stats = pool.stats()
        # Exactness on a longer generation, both ways.
        with_store = model.generate(input_ids=prompts[0], max_new_tokens=16, do_sample=False, pad_token_id=0)
        pool.prefix_store().clear()
        without = model.generate(input_ids=prompts[0], max_new_tokens=16, do_sample=False, pad_token_id=0)
    r_med, s_med = statistics.median(recompute), statistics.median(reuse)
    results |= {
        "ttft_recompute_s": r_med,
        "ttft_store_s": s_med,
        "ttft_speedup": r_med / s_med,
        "register_s": register,
        "tokens_held": held,
        "prefix_hits": stats["prefix_hits"],
        "prefix_tokens_reused": stats["prefix_tokens_reused"],
        "prefix_bytes": stats["prefix_bytes"],
        "tokens_equal": bool(torch.equal(with_store, without)),
    }

    # ---- device memory of N copies of a prefix cache
    n = args.copies
    info = inspect_model(model)
    layers = engine_layers(info, 1, info.dtype.itemsize)
    capacity = _core.round_capacity(args.prefix + 8)
    half = len(layers) // 2
    budget = _core.device_bytes(layers, capacity, list(range(half)), 1)  # about half the layers pooled
    with torch.no_grad():
        ref = DynamicCache(config=model.config)
        model(input_ids=prefix, use_cache=True, **{kw: ref})
        base = allocated(device)
        dyn = [copy.deepcopy(ref) for _ in range(n)]
        dyn_bytes = sum(kv_bytes(c) for c in dyn)
        dyn_allocated = allocated(device) - base
        del dyn
        with pie_rs.attach(model, gpu_budget=budget) as pool:
            source = pool.new_cache(max_length=args.prefix + 8)
            model(input_ids=prefix, use_cache=True, **{kw: source})
            src = source.stats()
            base = allocated(device)
            copies = [copy.deepcopy(source) for _ in range(n)]
            parked_allocated = allocated(device) - base
            parked_device = sum(c.stats()["device_kv_bytes"] for c in copies)
            parked_host = sum({id(c._shared.parked): c.stats()["parked_kv_bytes"] for c in copies}.values())
            # Every copy takes one decode step and all are held at once: each has its own engine.
            step = torch.randint(3, 32000, (1, 1), generator=gen).to(device)
            for c in copies:
                model(input_ids=step, use_cache=True, **{kw: c})
            live_allocated = allocated(device) - base  # engines' arenas are not torch's: see below
            live_device = sum(c.stats()["device_kv_bytes"] for c in copies)
            live_host = sum(c.stats()["host_kv_bytes"] for c in copies)
            pooled = copies[0].stats()["pooled_layers"]
    results |= {
        "copies": n,
        "dynamic_device_bytes": dyn_bytes,
        "source_device_bytes": src["device_kv_bytes"],
        "source_host_bytes": src["host_kv_bytes"],
        "parked_copies_device_bytes": parked_device,
        "parked_copies_host_bytes": parked_host,
        "live_copies_device_bytes": live_device,
        "live_copies_host_bytes": live_host,
        "live_copy_pooled_layers": pooled,
        "layers": len(layers),
        "torch_allocated_dynamic_copies": dyn_allocated,
        "torch_allocated_parked_copies": parked_allocated,
        "torch_allocated_live_copies": live_allocated,
    }

    mib = 1 << 20
    print(
        f"KV reuse on {device}: {len(layers)}-layer Llama, {args.prefix}-token prefix + {args.suffix}-token suffix, "
        f"{torch.get_num_threads()} torch threads"
    )
    print()
    print("| what | figure |")
    print("|---|---|")
    print(f"| time to first token, recomputing the prefix (median of {args.repeats}) | {r_med * 1e3:.1f} ms |")
    print(f"| time to first token, prefix from the store | {s_med * 1e3:.1f} ms |")
    print(f"| speed-up | {r_med / s_med:.1f}x |")
    print(f"| registering the prefix once (`pool.cache_prefix`) | {register * 1e3:.1f} ms, {held} tokens held |")
    print(
        f"| store: hits, tokens reused, bytes held | {stats['prefix_hits']}, {stats['prefix_tokens_reused']}, "
        f"{stats['prefix_bytes'] / mib:.1f} MiB |"
    )
    print(f"| tokens equal with and without the store (16 new) | {results['tokens_equal']} |")
    print(f"| {n} DynamicCache copies, device KV | {dyn_bytes / mib:.1f} MiB |")
    print(
        f"| source PieCache (budget pools {src['pooled_layers']}/{len(layers)} layers), device / host KV | "
        f"{src['device_kv_bytes'] / mib:.1f} / {src['host_kv_bytes'] / mib:.1f} MiB |"
    )
    print(
        f"| {n} PieCache copies, parked: device / host KV | {parked_device / mib:.1f} / {parked_host / mib:.1f} MiB "
        "(one shared snapshot) |"
    )
    print(
        f"| {n} PieCache copies, each one step further, all held: device / host KV | "
        f"{live_device / mib:.1f} / {live_host / mib:.1f} MiB ({pooled}/{len(layers)} layers pooled each) |"
    )
    print(f"| device KV, {n} PieCache copies used vs DynamicCache copies | {live_device / dyn_bytes:.2f}x |")
    if device == "cuda":
        print(
            f"| torch.cuda.memory_allocated growth: {n} DynamicCache copies / {n} parked PieCache copies | "
            f"{dyn_allocated / mib:.1f} / {parked_allocated / mib:.1f} MiB (engine arenas are allocated by "
            "pie-rs, not torch, and counted in the rows above) |"
        )
    if args.only is None and args.serving_requests > 0:
        results |= serving_bench(model, prefix[0].tolist(), [x[0].tolist() for x in suffixes], args)
        print_serving(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
