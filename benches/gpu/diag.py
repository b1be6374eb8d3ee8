"""Where does pie-rs's per-token time go on the GPU.

Profiles a decode of DynamicCache and pie-rs (all resident) on the e2e model,
and times SDPA on a contiguous K/V against a capacity-strided view.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import pie_rs
from pie_rs.bench import LLAMA3_8B_SHAPE, build_model

warnings.filterwarnings("ignore")
BATCH, PROMPT = 16, 2048


def build() -> torch.nn.Module:
    return build_model(LLAMA3_8B_SHAPE, torch.device("cuda"), torch.bfloat16, seed=0)


def sdpa_check() -> None:
    b, hq, hk, n, d, cap = BATCH, 32, 8, PROMPT, 128, PROMPT + 64
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    buf = torch.randn(b, hk, cap, d, device="cuda", dtype=torch.bfloat16)
    k_view = buf[:, :, :n]
    k_cont = k_view.contiguous()
    for name, k in [("contiguous", k_cont), ("strided view", k_view)]:
        for gqa in (True, False):
            kk = k if gqa else k.repeat_interleave(4, dim=1)
            for _ in range(3):
                F.scaled_dot_product_attention(q, kk, kk, enable_gqa=gqa)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                F.scaled_dot_product_attention(q, kk, kk, enable_gqa=gqa)
            torch.cuda.synchronize()
            print(f"sdpa {name:12s} gqa={gqa}: {(time.perf_counter() - t) / 50 * 1e6:.1f} us")


def prof(model, inputs, label: str) -> None:
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
    print(f"==== {label}")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


def main() -> None:
    sdpa_check()
    model = build()
    inputs = {
        "input_ids": torch.randint(0, 32000, (BATCH, PROMPT), device="cuda"),
        "attention_mask": torch.ones(BATCH, PROMPT, dtype=torch.long, device="cuda"),
    }
    prof(model, inputs, "DynamicCache")
    with pie_rs.attach(model):
        prof(model, inputs, "pie-rs resident")


if __name__ == "__main__":
    main()
