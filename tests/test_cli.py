"""The pie-rs command line: ``demo`` and ``bench`` in their reduced (``--quick``) modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pie_rs.serve
from pie_rs.bench import StepClock, percentile
from pie_rs.cli import main
from pie_rs.plots import exact_timeline

QUICK = ["--quick", "--device", "cpu", "--no-progress"]


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *QUICK, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to DynamicCache: yes" in out
    for label in ("decode tokens/s", "peak device KV", "bytes host->device", "stall", "plan"):
        assert label in out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["identical"] is True
    pie = result["pie"]
    assert pie["pooled_layers"] >= 1
    assert pie["peak_device_kv_bytes"] < result["baseline"]["peak_device_kv_bytes"]
    assert pie["h2d_bytes"] > 0 and pie["decode_tok_s"] > 0
    assert len(pie["step_ms"]) == result["new_tokens"] - 1
    assert result["timeline_samples"], "the engine's per-step samples feed the timeline"
    assert _png(tmp_path / "demo_timeline.png")


def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *QUICK, "--out", str(tmp_path), "--batches", "2", "--contexts", "16,48"]) == 0
    out = capsys.readouterr().out
    assert "| DynamicCache |" in out and "| pie-rs speed 50% |" in out
    assert "needs CUDA: skipped on CPU" in out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["all_identical"] is True
    kinds = {r["kind"] for r in result["rows"]}
    assert {"dynamic", "static", "pie"} <= kinds
    assert {r["objective"] for r in result["rows"] if r["kind"] == "pie"} == {"speed", "memory"}
    for row in result["rows"]:
        assert row["error"] is None, row
        assert row["step_median_ms"] > 0 and row["step_p99_ms"] >= row["step_median_ms"]
    half = next(r for r in result["rows"] if r["method"] == "pie-rs speed 50%")
    assert half["kv_ratio"] < 1.0 and half["pooled_layers"] >= 1
    (cap,) = result["capacity"]
    assert cap["capacity_ratio"] >= 1.5
    assert (tmp_path / "bench.md").is_file()
    for name in ("bench_throughput.png", "bench_latency.png", "bench_memory.png", "bench_capacity.png"):
        assert _png(tmp_path / name), name


def test_demo_bad_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *QUICK, "--out", str(tmp_path), "--budget", "nonsense"]) == 1
    assert "ConfigError" in capsys.readouterr().err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert "pie-rs" in capsys.readouterr().out
    assert main([]) == 2


def test_step_clock_and_percentile() -> None:
    import torch

    clock = StepClock(torch.device("cpu"))
    clock.begin()
    scores = torch.zeros(1, 4)
    for _ in range(3):
        assert clock(torch.zeros(1, 1, dtype=torch.long), scores) is scores
    assert len(clock.step_seconds) == 2 and clock.prefill_seconds >= 0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert percentile([1.0, 2.0], 100) == 2.0


def test_timeline_places_measured_stalls_and_copies() -> None:
    sample = {
        "step": 5,
        "layer_start": [0.0, 1.0, 2.0, 3.0],
        "layer_stall": [0.0, 0.5, 0.0, 0.0],
        "step_seconds": 4.0,
        "pooled_layers": [1, 3],
        "h2d_spans": [None, (-0.4, -0.1), None, (1.2, 1.8)],
        "d2h_spans": [None, (2.0, 2.1), None, None],
    }
    bars = exact_timeline([sample])
    compute = [b for b in bars if b["lane"] == "compute"]
    assert [b["layer"] for b in compute] == [0, 1, 2, 3]
    assert [b["pooled"] for b in compute] == [False, True, False, True]
    # Times start at the first bar: the prefetch of layer 1 issued before the step.
    assert compute[1]["start"] == pytest.approx(1.9) and compute[1]["end"] == pytest.approx(2.4)
    stall = [b for b in bars if b["lane"] == "stall"]
    assert [(b["layer"], b["end"] - b["start"]) for b in stall] == [(1, pytest.approx(0.5))]
    h2d = {b["layer"]: b for b in bars if b["lane"] == "H2D"}
    assert h2d[1]["start"] == pytest.approx(0.0) and h2d[3]["end"] == pytest.approx(2.2)
    d2h = [b for b in bars if b["lane"] == "D2H"]
    assert [b["layer"] for b in d2h] == [1]


@pytest.mark.skipif(
    __import__("pie_rs.serving").serving.serving_supported() is not None, reason="needs transformers >= 5.24"
)
def test_bench_serving_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--rates", "inf", "--requests", "6", "--methods", "cb,cb+offload,pie", "--resident-check"]
    assert main(["bench", "--serving", *QUICK, "--out", str(tmp_path), *args]) == 0
    out = capsys.readouterr().out
    assert "budget B =" in out and "pie vs cb" in out
    result = json.loads((tmp_path / "serving.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"cb", "cb+offload", "pie", "pie-resident"}
    assert not rows["cb+offload"]["ok"] and "CUDA" in rows["cb+offload"]["note"]
    for method in ("cb", "pie", "pie-resident"):
        r = rows[method]
        assert r["ok"], r
        assert r["output_tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_running"] >= 1
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
    assert rows["pie"]["tokens_match"] is True and rows["pie-resident"]["tokens_match"] is True
    # At a third of the workload's KV, pooling buys blocks: more than cb's at the same budget.
    assert rows["pie"]["pooled_layers"] > 0 and rows["pie"]["num_blocks"] > rows["cb"]["num_blocks"]
    assert rows["pie"]["device_kv_bytes"] <= result["budget_bytes"]
    for name in ("serving_throughput.png", "serving_latency_cdf.png"):
        assert _png(tmp_path / name), name


def test_serve_without_the_extras_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pie_rs.serve, "missing_extras", lambda: ["fastapi", "uvicorn"])
    assert main(["serve", "some/model"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pie-rs[serve]'" in err and "fastapi" in err
