"""PNG figures for ``pie-rs demo`` (a step timeline) and ``pie-rs bench`` (throughput, latency, memory).

Matplotlib runs with the non-interactive ``Agg`` backend; nothing opens a window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["bench_plots", "exact_timeline", "timeline"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def exact_timeline(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lays out measured per-layer starts and per-copy spans (``Engine.last_sample()``).

    Steps are placed one after another (the gap between steps is not drawn); each copy sits where
    the engine's events say it ran, relative to its step's start, so a prefetch issued during the
    previous step appears before the step line.

    Returns one dict per bar: ``lane`` (``"compute"``, ``"stall"``, ``"H2D"``, ``"D2H"``), ``layer``,
    ``start``, ``end`` (seconds from the first bar's start), ``step`` and, for compute, ``pooled``.
    """
    bars: list[dict[str, Any]] = []
    base = 0.0
    for sample in samples:
        starts = list(sample["layer_start"])
        stall = list(sample.get("layer_stall", [0.0] * len(starts)))
        pooled = set(sample.get("pooled_layers", []))
        total = float(sample.get("step_seconds", 0.0))
        step = sample.get("step")
        for layer, begin in enumerate(starts):
            end = starts[layer + 1] if layer + 1 < len(starts) else total
            wait = min(stall[layer] if layer < len(stall) else 0.0, max(end - begin, 0.0))
            if wait > 0:
                bars.append(
                    {"lane": "stall", "layer": layer, "start": base + begin, "end": base + begin + wait, "step": step}
                )
            bars.append(
                {
                    "lane": "compute",
                    "layer": layer,
                    "start": base + begin + wait,
                    "end": base + end,
                    "step": step,
                    "pooled": layer in pooled,
                }
            )
        for lane, key in (("H2D", "h2d_spans"), ("D2H", "d2h_spans")):
            for layer, span in enumerate(sample.get(key) or []):
                if span is not None:
                    bars.append(
                        {"lane": lane, "layer": layer, "start": base + span[0], "end": base + span[1], "step": step}
                    )
        base += total
    if bars:
        first = min(bar["start"] for bar in bars)
        for bar in bars:
            bar["start"] -= first
            bar["end"] -= first
    return bars


_COLORS = {
    "resident": "#4c72b0",
    "pooled": "#8172b3",
    "stall": "#c44e52",
    "H2D": "#55a868",
    "D2H": "#dd8452",
}


def timeline(
    samples: Sequence[dict[str, Any]],
    path: str | Path,
    title: str = "pie-rs step timeline",
) -> Path:
    """Draws compute per layer against H2D and D2H copies for a few steps; writes a PNG.

    ``samples`` are the engine's measured steps (``Engine.last_sample()``), laid out by
    :func:`exact_timeline`.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    bars = exact_timeline(samples)
    lanes = ["D2H", "H2D", "stall", "compute"]
    fig, ax = plt.subplots(figsize=(12, 3.4))
    span = max((bar["end"] for bar in bars), default=0.0) * 1e3 or 1.0
    for bar in bars:
        y = lanes.index(bar["lane"])
        width = (bar["end"] - bar["start"]) * 1e3
        if bar["lane"] == "compute":
            color = _COLORS["pooled" if bar.get("pooled") else "resident"]
        else:
            color = _COLORS[bar["lane"]]
        edge = 0.5 if bar["lane"] == "compute" else 0.0  # thin copies must not vanish under an edge
        ax.barh(y, width, left=bar["start"] * 1e3, height=0.7, color=color, edgecolor="white", linewidth=edge)
        if bar["lane"] in ("compute", "H2D", "D2H") and width > span * 0.012:
            ax.text(
                (bar["start"] * 1e3) + width / 2,
                y,
                str(bar["layer"]),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
                clip_on=True,
            )
    step_starts: dict[Any, float] = {}
    for bar in bars:
        if bar["lane"] in ("compute", "stall"):
            step_starts.setdefault(bar["step"], bar["start"])
    for step, start in step_starts.items():
        ax.axvline(start * 1e3, color="grey", linestyle=":", linewidth=0.8)
        ax.text(start * 1e3, len(lanes) - 0.45, f" step {step}", fontsize=7, color="grey", va="bottom")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(["D2H copy", "H2D copy", "stall", "compute (layer)"])
    ax.set_xlabel("ms")
    ax.set_ylim(-0.6, len(lanes) - 0.1 + 0.5)
    ax.set_title(title, fontsize=10)
    ax.legend(
        handles=[
            Patch(color=_COLORS["resident"], label="resident layer"),
            Patch(color=_COLORS["pooled"], label="pooled layer"),
            Patch(color=_COLORS["stall"], label="stall (waiting for a copy)"),
            Patch(color=_COLORS["H2D"], label="H2D prefetch"),
            Patch(color=_COLORS["D2H"], label="D2H write-back"),
        ],
        fontsize=7,
        loc="lower right",
        ncol=5,
        bbox_to_anchor=(1.0, -0.42),
    )
    fig.text(
        0.01,
        0.01,
        "layer starts, stalls and every copy as the engine's events measured them",
        fontsize=6,
        color="grey",
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error") and r.get("decode_tok_s") is not None]


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def bench_plots(rows: Sequence[dict[str, Any]], capacity: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Writes ``bench_throughput.png``, ``bench_latency.png``, ``bench_memory.png`` (and ``bench_capacity.png``).

    Throughput and latency are drawn against the device KV each method held (its budget, for
    pie-rs) at the largest batch x context of the grid; memory against context at the largest batch.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    ok = _ok(rows)
    paths: list[Path] = []
    if not ok:
        return paths
    batch = max(r["batch"] for r in ok)
    context = max(r["context"] for r in ok if r["batch"] == batch)
    point = [r for r in ok if r["batch"] == batch and r["context"] == context]
    title = f"batch {batch}, context {context}"

    def against_budget(key: str, ylabel: str, name: str, extra: str | None = None) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for objective, marker in (("speed", "o"), ("memory", "s")):
            pts = sorted(
                (r for r in point if r["kind"] == "pie" and r.get("objective") == objective),
                key=lambda r: _num(r["peak_device_kv_bytes"]),
            )
            if pts:
                xs = [r["peak_device_kv_bytes"] / 2**20 for r in pts]
                ax.plot(xs, [_num(r[key]) for r in pts], marker=marker, label=f"pie-rs objective {objective}")
                if extra:
                    ax.plot(
                        xs,
                        [_num(r[extra]) for r in pts],
                        marker=marker,
                        linestyle="--",
                        alpha=0.6,
                        label=f"pie-rs {objective} (p99)",
                    )
        for r in point:
            if r["kind"] != "pie":
                x = r["peak_device_kv_bytes"] / 2**20
                ax.scatter([x], [_num(r[key])], marker="D", s=40, zorder=3, label=r["method"])
                if extra:
                    ax.scatter([x], [_num(r[extra])], marker="x", s=40, zorder=3, label=f"{r['method']} (p99)")
        ax.set_xlabel("peak device KV (MiB)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} against device KV budget ({title})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    against_budget("decode_tok_s", "decode tokens/s", "bench_throughput.png")
    against_budget("step_median_ms", "ms per token (median)", "bench_latency.png", extra="step_p99_ms")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    for method in methods:
        pts = sorted((r for r in ok if r["method"] == method and r["batch"] == batch), key=lambda r: r["context"])
        if pts:
            ax.plot(
                [r["context"] for r in pts],
                [r["peak_device_kv_bytes"] / 2**20 for r in pts],
                marker="o",
                label=method,
                linestyle="-" if pts[0]["kind"] == "pie" else "--",
            )
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("peak device KV (MiB)")
    ax.set_title(f"device KV memory against context (batch {batch})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "bench_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    if capacity:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        labels, tokens, speeds = [], [], []
        for entry in capacity:
            for name, record in entry.items():
                if isinstance(record, dict):
                    labels.append(f"{name}\nctx {entry['context']}")
                    tokens.append(record["tokens"])
                    speeds.append(record.get("decode_tok_s"))
        bars = ax.bar(
            range(len(labels)), tokens, color=["#4c72b0" if "Dynamic" in lab else "#8172b3" for lab in labels]
        )
        for bar, speed in zip(bars, speeds, strict=True):
            if speed is not None:
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_height(),
                    f"{speed:.0f} tok/s",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("largest batch x context")
        budget = capacity[0]["budget_bytes"] / 2**20
        ax.set_title(f"capacity at a fixed device KV budget of {budget:.2f} MiB", fontsize=9)
        fig.tight_layout()
        path = out_dir / "bench_capacity.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
