"""Copy bandwidth: the engine's CUDA copies against torch's pinned copies.

torch's ``copy_(non_blocking=True)`` runs on the same sizes in the same run.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import json
import sys

import torch

from pie_rs import _core

SIZES = [1 << 20, 16 << 20, 256 << 20, 1 << 30]


def _timed(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def torch_bench(n: int, iters: int) -> dict[str, float]:
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(n, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def h2d() -> None:
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)

    def d2h() -> None:
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s2)

    def both() -> None:
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    t_h2d, t_d2h, t_both = _timed(h2d, iters), _timed(d2h, iters), _timed(both, iters)
    return {"h2d_gbps": n / t_h2d / 1e9, "d2h_gbps": n / t_d2h / 1e9, "both_total_gbps": 2 * n / t_both / 1e9}


def main() -> int:
    rows = []
    engine = {r["bytes"]: r for r in _core.cuda_copy_bench(SIZES, 10)}
    for n in SIZES:
        iters = 20 if n < (256 << 20) else 5
        t = torch_bench(n, iters)
        e = engine[n]
        rows.append(
            {
                "bytes": n,
                "engine_h2d": e["h2d_gbps"],
                "torch_h2d": t["h2d_gbps"],
                "engine_d2h": e["d2h_gbps"],
                "torch_d2h": t["d2h_gbps"],
                "engine_both": e["both_total_gbps"],
                "torch_both": t["both_total_gbps"],
            }
        )
    print(
        "| size | engine H2D GB/s | torch H2D | ratio | engine D2H GB/s | torch D2H | ratio "
        "| engine both | both / one dir |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = max(r["engine_h2d"], r["engine_d2h"])
        print(
            f"| {r['bytes'] >> 20} MiB | {r['engine_h2d']:.1f} | {r['torch_h2d']:.1f} "
            f"| {r['engine_h2d'] / r['torch_h2d']:.2f} "
            f"| {r['engine_d2h']:.1f} | {r['torch_d2h']:.1f} | {r['engine_d2h'] / r['torch_d2h']:.2f} "
            f"| {r['engine_both']:.1f} | {r['engine_both'] / one:.2f} |"
        )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
