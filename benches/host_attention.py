"""The host decode-attention kernel's KV read rate against this machine's memory bandwidth.

For one Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16 KV, one query
token per sequence) at several batch sizes and context lengths, single- and
multi-threaded: the rate at which ``pie_rs.host_attention`` reads K and V (bytes per
second, best of several calls), the STREAM triad bandwidth measured in the same run on
the same threads (``_core.stream_triad``), their ratio (issue 17's target: at least 0.7),
and torch's CPU ``scaled_dot_product_attention`` on the same bf16 tensors for reference.

    python benches/host_attention.py                    # the full table
    python benches/host_attention.py --quick --json out.json

Timings on a shared machine are noisy: the kernel is compared with a triad measured
moments before, on the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from pie_rs import _core
from pie_rs.host_attention import host_attention

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
SHAPES = [(1, 4096), (1, 32768), (4, 8192), (8, 4096), (8, 32768)]
QUICK = [(1, 4096), (1, 32768), (8, 4096)]


def _best(fn, kv_bytes: int) -> float:
    fn()
    reps = max(3, min(50, int(4e9 / kv_bytes)))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three smaller shapes")
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default: 1 and all cores)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch SDPA column")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, cores})
    rows = []
    header = (
        f"{'threads':>7} {'batch':>5} {'tokens':>6} {'KV MiB':>6} {'kernel GB/s':>11} "
        f"{'triad GB/s':>10} {'ratio':>5} {'torch GB/s':>10}"
    )
    print(header)
    g = torch.Generator().manual_seed(0)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        triad = _core.stream_triad(threads=n_threads)["bytes_per_second"]
        for batch, tokens in QUICK if args.quick else SHAPES:
            q = torch.randn(batch, Q_HEADS, 1, DIM, generator=g).to(torch.bfloat16)
            k = torch.randn(batch, KV_HEADS, tokens, DIM, generator=g).to(torch.bfloat16)
            v = torch.randn(batch, KV_HEADS, tokens, DIM, generator=g).to(torch.bfloat16)
            kv_bytes = 2 * k.numel() * k.element_size()
            rate = kv_bytes / _best(lambda q=q, k=k, v=v, t=n_threads: host_attention(q, k, v, threads=t), kv_bytes)
            torch_rate = None
            if not args.no_torch:

                def sdpa(q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                torch_rate = kv_bytes / _best(sdpa, kv_bytes)
            row = {
                "threads": n_threads,
                "batch": batch,
                "tokens": tokens,
                "kv_bytes": kv_bytes,
                "kernel_gbps": rate / 1e9,
                "triad_gbps": triad / 1e9,
                "ratio": rate / triad,
                "torch_sdpa_gbps": None if torch_rate is None else torch_rate / 1e9,
            }
            rows.append(row)
            torch_col = "-" if torch_rate is None else f"{torch_rate / 1e9:.2f}"
            print(
                f"{n_threads:>7} {batch:>5} {tokens:>6} {kv_bytes / 2**20:>6.0f} {rate / 1e9:>11.2f} "
                f"{triad / 1e9:>10.2f} {rate / triad:>5.2f} {torch_col:>10}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
