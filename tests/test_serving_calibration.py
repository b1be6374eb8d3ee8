"""``benches/serving_calibration.py``: the compute fit and the comparison's plumbing.

The calibration itself needs a measured continuous-batching run; here a synthetic one,
whose throughput comes from the simulator under a known compute model, checks that the
fit recovers the model and that a run the simulation reproduces passes while one it
misses by 30% fails.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pie_rs import _core

_SPEC = importlib.util.spec_from_file_location(
    "serving_calibration", Path(__file__).resolve().parents[1] / "benches" / "serving_calibration.py"
)
assert _SPEC is not None and _SPEC.loader is not None
calibration = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(calibration)

SHAPE = {"layers": 4, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16, "elem_size": 4}
COMPUTE = {"fixed": 40e-6, "per_token": 2e-6, "per_context_token": 5e-9}
LINK = {"h2d_gbps": 8.0, "d2h_gbps": 8.0, "copy_latency_us": 5.0}


def _run(tmp_path: Path, factor: float) -> tuple[Path, Path]:
    requests = [{"arrival": 0.01 * i, "prompt": 20 + 7 * (i % 9), "output": 10 + 5 * (i % 7)} for i in range(40)]
    steps = [
        {"tokens": t, "context_tokens": c, "layer_seconds": COMPUTE["fixed"] + COMPUTE["per_token"] * t + 5e-9 * c}
        for t, c in [(1, 100), (8, 900), (30, 400), (64, 5000), (3, 2500), (100, 100)]
    ]
    truth = _core.simulate_serving(
        {
            "model_shape": SHAPE,
            "gpu_budget_mib": 0.5,
            "workload": requests,
            "compute": COMPUTE,
            "methods": ["pie"],
            "equal_performance": False,
            **LINK,
        }
    )
    measured = {
        "method": "pie",
        "model_shape": SHAPE,
        "kv_budget_mib": 0.5,
        "requests": requests,
        "throughput_tok_s": truth["methods"]["pie"]["throughput_tok_s"] * factor,
        "steps": steps,
    }
    m, link = tmp_path / "measured.json", tmp_path / "link.json"
    m.write_text(json.dumps(measured))
    link.write_text(json.dumps(LINK))
    return m, link


def test_the_fit_recovers_a_linear_compute_model() -> None:
    steps = [
        {"tokens": t, "context_tokens": c, "layer_seconds": 1e-5 + 3e-7 * t + 2e-9 * c}
        for t, c in [(1, 10), (5, 500), (40, 80), (9, 3000), (70, 7000)]
    ]
    fit = calibration.fit_compute(steps)
    assert fit == pytest.approx({"fixed": 1e-5, "per_token": 3e-7, "per_context_token": 2e-9}, rel=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        calibration.fit_compute(steps[:2])


def test_a_reproduced_run_passes_and_a_missed_one_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measured, link = _run(tmp_path, 1.0)
    assert calibration.main([str(measured), "--link", str(link), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["error"]) < 1e-6
    assert result["simulated"]["pooled_layers"] >= 0 and result["simulated"]["finished"] == 40
    measured, link = _run(tmp_path, 1.3)
    assert calibration.main([str(measured), "--link", str(link)]) == 1
    assert "(-23.1%)" in capsys.readouterr().out


def test_a_copy_cost_slows_the_prediction_and_is_reported(tmp_path: Path) -> None:
    """Copies that take compute from the processor make the predicted run slower, never faster."""
    measured, _ = _run(tmp_path, 1.0)
    # Every layer pooled through one slot: each layer's KV crosses the link every step.
    run = {
        **json.loads(measured.read_text()),
        "pie_pool": {"blocks": 64, "pooled_layers": [0, 1, 2, 3], "prefetch_depth": 1},
    }
    free = calibration.compare(run, LINK)
    assert "error_without_copy_cost" not in free
    costly = calibration.compare(run, {**LINK, "copy_compute_ns_per_byte": 2.0})
    assert costly["copy_compute_ns_per_byte"] == 2.0
    assert costly["predicted_tok_s"] < free["predicted_tok_s"]
    assert costly["error_without_copy_cost"] == pytest.approx(free["error"])
    with pytest.raises(_core.ConfigError, match="copy_compute_ns_per_byte must be a non-negative number"):
        calibration.compare(run, {**LINK, "copy_compute_ns_per_byte": -1.0})


def test_the_copy_cost_measurement_runs_on_a_cpu_model() -> None:
    import torch

    from pie_rs._copy_cost import measure_copy_compute_cost
    from pie_rs.bench import ModelShape, build_model

    shape = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=64)
    model = build_model(shape, torch.device("cpu"), torch.float32, seed=0)
    cost = measure_copy_compute_cost(model, batch=2, tokens=8, seconds=0.05, rounds=2)
    assert cost["copy_compute_ns_per_byte"] >= 0 and cost["copier_gbps"] > 0
    assert cost["forward_alone_s"] > 0 and cost["forward_with_copies_s"] > 0
    with pytest.raises(ValueError, match="host backend"):
        measure_copy_compute_cost(build_model(shape, torch.device("meta"), torch.float32, seed=0))


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert calibration.main([str(tmp_path / "missing.json")]) == 2
    assert "serving_calibration: FileNotFoundError" in capsys.readouterr().err
    measured, _ = _run(tmp_path, 1.0)
    assert calibration.main([str(measured)]) == 2
    assert "give --link" in capsys.readouterr().err


@pytest.mark.skipif(
    __import__("pie_rs.serving").serving.serving_supported() is not None, reason="needs transformers >= 5.24"
)
def test_one_command_measures_the_run_and_compares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--run`` drives ``pie-rs bench --serving --calibration-out`` and compares its measured run.

    Plumbing only: a tiny run on a shared CPU says nothing about the 10% figure (README).
    """
    link = tmp_path / "link.json"
    link.write_text(json.dumps(LINK))
    bench = "--quick --device cpu --no-progress --rates inf --requests 6 --methods pie"
    rc = calibration.main(["--run", bench, "--link", str(link), "--out", str(tmp_path / "out"), "--json"])
    assert rc in (0, 1)  # within or beyond the tolerance: both are a completed comparison
    result = json.loads(capsys.readouterr().out)  # the bench's own report goes to stderr
    measured = json.loads((tmp_path / "out" / "measured.json").read_text())
    assert measured["method"] == "pie" and measured["model_shape"]["layers"] == 4
    assert len(measured["requests"]) == 6 and measured["rate"] is None  # every request at once
    assert measured["max_batched_tokens"] == 256 and measured["kv_budget_mib"] > 0
    assert measured["pooled_layers"] == 4 and measured["num_blocks"] > 0
    # The simulation replays the pool the real run sized once, not a pool of its own.
    pool = measured["pie_pool"]
    assert pool["blocks"] == measured["num_blocks"] and pool["pooled_layers"] == [0, 1, 2, 3]
    assert pool["prefetch_depth"] >= 1
    assert result["simulated"]["pooled_layers"] == 4 and result["simulated"]["reconfigurations"] == 0
    assert result["simulated"]["pool_tokens"] == 16 * pool["blocks"]
    # On CPU the copies' cost to compute is measured apart from the runs and charged by the simulation.
    cost = measured["copy_compute"]
    assert cost["copy_compute_ns_per_byte"] == measured["copy_compute_ns_per_byte"] >= 0
    assert cost["copier_gbps"] > 0 and cost["forward_alone_s"] > 0
    assert result["copy_compute_ns_per_byte"] == measured["copy_compute_ns_per_byte"]
    assert measured["throughput_tok_s"] == result["measured_tok_s"] > 0
    # Every step of the compute run is recorded: its batches cover every prompt and output token.
    steps = measured["steps"]
    total = sum(r["prompt"] + r["output"] for r in measured["requests"])
    assert sum(s["tokens"] for s in steps) == total - len(measured["requests"])  # the last token is not fed
    assert all(s["context_tokens"] >= s["tokens"] >= 1 and s["layer_seconds"] > 0 for s in steps)
    assert sum(s["tokens"] for s in measured["pie_steps"]) == total - len(measured["requests"])
    assert result["simulated"]["finished"] == 6 and result["predicted_tok_s"] > 0
    assert len(measured["repeats"]) == 1 and measured["repeats"][0]["steps"] == steps
    assert len(result["paired"]) == 1 and result["paired"][0]["measured_tok_s"] == result["measured_tok_s"]
    assert rc == (0 if abs(result["error"]) <= 0.10 else 1)


def test_a_pie_run_is_paired_with_the_compute_runs_around_it() -> None:
    """Runs alternate pie, pie-compute, pie, ...: repeat i fits the compute runs i-1 and i."""
    from pie_rs.serve_bench import Result, _paired_repeats

    def run(method: str, i: int, ok: bool = True) -> Result:
        r = Result(method=method, rate=float("inf"), requests=1, ok=ok, tokens_per_s=100.0 + i)
        r.steps = [{"tokens": i, "context_tokens": i, "seconds": 1.0}]
        return r

    runs = {
        "pie": [run("pie", 0), run("pie", 1), run("pie", 2, ok=False), run("pie", 3)],
        "pie-compute": [
            run("pie-compute", 10),
            run("pie-compute", 11),
            run("pie-compute", 12, ok=False),
            run("pie-compute", 13),
        ],
    }
    paired = _paired_repeats(runs, lambda steps: [s["tokens"] for s in steps])
    assert [p["throughput_tok_s"] for p in paired] == [100.0, 101.0, 103.0]
    assert [p["steps"] for p in paired] == [[10], [10, 11], [13]]  # a failed neighbour is left out
