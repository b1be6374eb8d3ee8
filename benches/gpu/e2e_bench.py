"""End-to-end decode on the GPU: a bf16 model with Llama-3-8B layer shapes
(random weights, fewer layers), generated with DynamicCache, transformers'
offloaded cache and pie-rs at several budgets, all in one process.
Per-token decode latency = (T(new=N) - T(new=1)) / (N - 1), median of runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pie_rs

warnings.filterwarnings("ignore")
LAYERS, BATCH, PROMPT, NEW, RUNS = 8, 16, 2048, 32, 3


def build() -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=LAYERS,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def timed_generate(model, inputs, new: int, **kw) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def per_token(model, inputs, **kw) -> float:
    timed_generate(model, inputs, 2, **kw)  # warm-up
    samples = []
    for _ in range(RUNS):
        t_n = timed_generate(model, inputs, NEW, **kw)
        t_1 = timed_generate(model, inputs, 1, **kw)
        samples.append((t_n - t_1) / (NEW - 1))
    return statistics.median(samples)


def main() -> int:
    model = build()
    inputs = {
        "input_ids": torch.randint(0, 32000, (BATCH, PROMPT), device="cuda"),
        "attention_mask": torch.ones(BATCH, PROMPT, dtype=torch.long, device="cuda"),
    }
    kv_per_layer = BATCH * 8 * (PROMPT + NEW) * 128 * 2 * 2
    rows = []
    base = per_token(model, inputs)
    rows.append({"method": "DynamicCache", "ms_per_token": base * 1e3, "device_kv_mib": LAYERS * kv_per_layer / 2**20})
    try:
        t = per_token(model, inputs, cache_implementation="offloaded")
        rows.append({"method": "HF offloaded", "ms_per_token": t * 1e3, "device_kv_mib": 2 * kv_per_layer / 2**20})
    except Exception as e:
        rows.append({"method": "HF offloaded", "error": repr(e)[:120]})
    configs = [
        ("pie-rs resident", {}),
        ("pie-rs half pooled", {"pooled_layers": list(range(1, LAYERS, 2)), "prefetch_depth": 2}),
        ("pie-rs all pooled", {"pooled_layers": list(range(LAYERS)), "prefetch_depth": 2}),
        ("pie-rs memory", {"objective": "memory", "gpu_budget": LAYERS * kv_per_layer}),
    ]
    for name, kw in configs:
        try:
            with pie_rs.attach(model, **kw) as pool:
                t = per_token(model, inputs)
                s = pool.stats()
            rows.append(
                {
                    "method": name,
                    "ms_per_token": t * 1e3,
                    "device_kv_mib": s["device_kv_bytes"] / 2**20,
                    "pooled": s["pooled_layers"],
                    "stall_s": s["stall_seconds"],
                    "h2d_gib": s["h2d_bytes"] / 2**30,
                }
            )
        except Exception as e:
            rows.append({"method": name, "error": repr(e)[:160]})
    print(f"model: Llama-3-8B layer shapes, {LAYERS} layers, bf16, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens")
    print("| method | ms/token | vs DynamicCache | device KV MiB | pooled | stall s | H2D GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} | | | | | |")
            continue
        print(
            f"| {r['method']} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / (base * 1e3):.2f}x "
            f"| {r['device_kv_mib']:.0f} "
            f"| {r.get('pooled', '-')} | {r.get('stall_s', 0):.3f} | {r.get('h2d_gib', 0):.2f} |"
        )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
