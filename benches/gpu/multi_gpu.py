"""A model split across two GPUs by layers: an engine per device, checked on real devices.

Runs only where there are at least two CUDA devices (``benches/gpu/run.sh`` calls it then). A small
Llama is saved to a tmp folder and loaded with a ``device_map`` that puts half its decoder layers on
``cuda:0`` and half on ``cuda:1``. Checks, printing one line each and exiting non-zero on a failure:

- greedy, sampling (fixed seed) and beam search give DynamicCache's tokens with pie-rs attached at a
  budget that pools layers on both devices;
- each device has its own engine, whose device arena is on that device, and every layer's K/V views
  lie inside the arena of its own device;
- decode time per token against DynamicCache on the same split (a figure, not asserted).

Usage: python benches/gpu/multi_gpu.py [out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pie_rs
from pie_rs import _core, multidevice
from pie_rs._model import cache_keyword

LAYERS, BATCH, PROMPT, NEW = 8, 4, 64, 32


def build(tmp: str) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
    device_map = {"model.embed_tokens": 0, "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}
    for i in range(LAYERS):
        device_map[f"model.layers.{i}"] = 0 if i < LAYERS // 2 else 1
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp, device_map=device_map, dtype=torch.float16)
    except (ValueError, KeyError):
        device_map.pop("model.rotary_emb")
        model = AutoModelForCausalLM.from_pretrained(tmp, device_map=device_map, dtype=torch.float16)
    return model.eval()


def gen(model: torch.nn.Module, ids: torch.Tensor, mode: str) -> torch.Tensor:
    args: dict = dict(max_new_tokens=NEW, pad_token_id=0)
    if mode == "sample":
        args.update(do_sample=True, top_k=0, top_p=1.0)
    elif mode == "beam":
        args.update(do_sample=False, num_beams=2)
    else:
        args.update(do_sample=False)
    torch.manual_seed(1234)
    return model.generate(ids, **args)


def main() -> int:
    if torch.cuda.device_count() < 2:
        print("multi-GPU check skipped: fewer than 2 CUDA devices")
        return 0
    results: dict = {}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build(tmp)
        ids = torch.randint(3, 512, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1)).to("cuda:0")
        expected = {mode: gen(model, ids, mode) for mode in ("greedy", "sample", "beam")}
        # Half of each device's 4 layers pooled through one staging slot (beam doubles the batch).
        kv = model.config.num_key_value_heads
        dim = model.config.hidden_size // model.config.num_attention_heads
        cap = _core.round_capacity(PROMPT + NEW)
        budget = _core.device_bytes([(BATCH * 2, kv, dim, dim, 2)] * (LAYERS // 2), cap, [0, 2], 1)
        with pie_rs.attach(model, gpu_budget=budget) as pool:
            ok_type = isinstance(pool, multidevice.MultiDevicePool)
            print(f"pool per device: {ok_type} ({pool!r})")
            if not ok_type:
                failures.append("not a MultiDevicePool")
            for mode, want in expected.items():
                got = gen(model, ids, mode)
                same = bool(torch.equal(got.cpu(), want.cpu()))
                stats = pool.stats()
                pooled = [d["pooled_layers"] for d in stats["devices"]]
                print(f"{mode}: identical={same}, pooled per device={pooled}, h2d={stats['h2d_bytes']}")
                results[mode] = {"identical": same, "pooled_per_device": pooled}
                if not same:
                    failures.append(f"{mode} tokens differ")
                if not all(p > 0 for p in pooled):
                    failures.append(f"{mode}: a device pooled nothing")
            # Each engine's arena on its own device; each layer's views inside its device's arena.
            cache = pool.new_cache(max_length=PROMPT + NEW)
            with torch.no_grad():
                model(ids, use_cache=True, **{cache_keyword(model): cache})
            for k, engine in enumerate(cache.engines):
                dev = engine.device_region().__dlpack_device__()
                print(f"engine {k}: device region on {dev}")
                if dev[1] != k:
                    failures.append(f"engine {k} arena on device {dev}")
            for i, layer in enumerate(cache.layers):
                k = 0 if i < LAYERS // 2 else 1
                region = cache.engines[k].device_region()
                if cache.engines[k].device_offset(layer._e) is not None:
                    t = layer.keys
                    inside = region.addr <= t.data_ptr() < region.addr + region.nbytes and t.device.index == k
                    if not inside:
                        failures.append(f"layer {i} KV not in device {k}'s arena")
            cache.close()
            # Decode time per token, pie-rs vs DynamicCache on the same split.
            timings = {}
            for name in ("pie-rs", "DynamicCache"):
                if name == "DynamicCache":
                    pool.detach()
                for _ in range(2):
                    torch.cuda.synchronize("cuda:0")
                    torch.cuda.synchronize("cuda:1")
                    start = time.perf_counter()
                    gen(model, ids, "greedy")
                    torch.cuda.synchronize("cuda:0")
                    torch.cuda.synchronize("cuda:1")
                    timings[name] = (time.perf_counter() - start) / NEW * 1e3
            print(
                f"ms/token: pie-rs {timings['pie-rs']:.2f}, DynamicCache {timings['DynamicCache']:.2f} "
                f"({timings['pie-rs'] / timings['DynamicCache']:.2f}x)"
            )
            results["ms_per_token"] = timings
    results["failures"] = failures
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    print("multi-GPU check:", "ok" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
