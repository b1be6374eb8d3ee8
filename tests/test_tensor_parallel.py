"""Tensor parallel on CPU: two gloo ranks, each with its own pool sized from its shard of the KV heads.

Each test spawns two processes running ``tests/tp_worker.py`` (a tiny Llama saved to a tmp folder,
loaded with ``tp_plan="auto"``: 2 KV heads, one per rank) and bounds them with a timeout; a run
that hangs is killed and fails the test.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pie_rs

from models import make_model

pytest.importorskip("accelerate", reason="tp_plan on CPU needs accelerate (pip install -e .[dev])")

WORKER = Path(__file__).parent / "tp_worker.py"
RUN_TIMEOUT = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(scenario: str, model_dir: Path, out_dir: Path, world: int = 2) -> tuple[list[dict[str, Any]], float]:
    """Runs ``scenario`` on ``world`` ranks; returns each rank's report and the wall time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    start = time.perf_counter()
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(model_dir), str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            remaining = max(1.0, RUN_TIMEOUT - (time.perf_counter() - start))
            logs.append(p.communicate(timeout=remaining)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {scenario} ranks did not finish within {RUN_TIMEOUT} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.perf_counter() - start
    reports = []
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report; its output:\n{logs[rank] if rank < len(logs) else ''}"
        report = json.loads(path.read_text())
        assert "crash" not in report, f"rank {rank} crashed:\n{report['crash']}"
        reports.append(report)
    return reports, elapsed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp-llama")
    make_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def identity_run(model_dir, tmp_path_factory) -> list[dict[str, Any]]:
    """Identity, bad input, continuous batching, then the injected fault, in one pair of processes."""
    reports, elapsed = run_ranks("all", model_dir, tmp_path_factory.mktemp("tp-run"))
    print(f"\ntensor-parallel run: {elapsed:.1f} s for 2 ranks")
    return reports


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_tokens_identical_to_tensor_parallel_without_pie_rs(identity_run, mode) -> None:
    for report in identity_run:
        result = report["modes"][mode]
        assert result["equal"], f"rank {report['rank']} {mode}: tokens differ from TP without pie-rs"
        stats = result["stats"]
        # Layers pooled on every rank, copies made, and the rank tagged in its stats.
        assert stats["pooled_layers"] == 2 and stats["resident_layers"] == 2
        assert stats["h2d_bytes"] > 0 and stats["d2h_bytes"] > 0
        assert stats["rank"] == report["rank"] and stats["world_size"] == 2
        assert stats["policy"] == "static"  # the deterministic budget fit every rank shares
    assert identity_run[0]["modes"][mode]["tokens"] == identity_run[1]["modes"][mode]["tokens"]


def test_host_attention_on_every_rank(identity_run) -> None:
    for report in identity_run:
        host = report["host"]
        assert host["equal"], report["rank"]
        assert host["layers"] == [0, 1, 2, 3] and host["layer_steps"] == 4 * 10  # MAX_NEW of tp_worker
        assert host["h2d_bytes"] == 0


def test_detach_gives_the_model_back_on_every_rank(identity_run) -> None:
    assert all(all(report["restored"]) for report in identity_run)


def test_stats_gathered_on_rank_zero(identity_run) -> None:
    for mode in ("greedy", "sample", "beam"):
        gathered = identity_run[0]["modes"][mode]["gathered"]
        assert [s["rank"] for s in gathered] == [0, 1]
        assert all(s["plans_agree"] for s in gathered)
        assert gathered[0]["plan"] == gathered[1]["plan"] and len(gathered[0]["plan"]) == 2
        # Each rank's pool holds its shard: 1 of the 2 KV heads, so equal bytes on both ranks.
        assert gathered[0]["host_kv_bytes"] == gathered[1]["host_kv_bytes"] > 0
        assert identity_run[1]["modes"][mode]["gathered"] is None


def test_ranks_that_disagree_are_refused_on_every_rank(identity_run) -> None:
    for report in identity_run:
        err = report["disagree"]
        assert err is not None and err["type"] == "ConfigError"
        assert "disagree on gpu_budget" in err["message"]
        assert "rank 0: 1000000" in err["message"] and "rank 1: 2000000" in err["message"]


def test_budget_too_small_on_one_rank_names_it_and_the_minimum(identity_run) -> None:
    for report in identity_run:
        assert report["small_budget_bytes"] == 4096  # the smallest of the ranks' budgets, on every rank
        err = report["small"]
        assert err is not None and err["type"] == "BudgetError", err
        assert "rank 1's gpu_budget (4096 bytes)" in err["message"]
        assert "needs at least" in err["message"]


def test_a_failed_rank_makes_every_rank_raise(identity_run) -> None:
    reports = identity_run
    print("\n" + "; ".join(f"rank {r['rank']}: {r['fault']['message']} ({r['seconds']:.2f} s)" for r in reports))
    for report in reports:
        assert report["fault"] is not None, f"rank {report['rank']} returned tokens"
        assert report["pie_error"], report["fault"]
        assert report["seconds"] < 30
    assert reports[1]["fault"]["type"] in ("BackendError", "StateError")
    assert reports[0]["fault"]["type"] == "BackendError"
    assert "rank 1" in reports[0]["fault"]["message"]


# ------------------------------------------------------------------ continuous batching under TP
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_continuous_batching_tokens_identical_to_tensor_parallel_without_pie_rs(identity_run, mode) -> None:
    for report in identity_run:
        result = report["serving"][mode]
        assert result["equal"], f"rank {report['rank']} {mode}: generate_batch tokens differ from TP without pie-rs"
        assert result["rank"] == report["rank"]
        stats = result["stats"]
        # Half of this rank's shard pooled, and the decode went through the pool both ways.
        assert stats["pooled_layers"] == 2 and stats["resident_layers"] == 2
        assert stats["h2d_bytes"] > 0 and stats["d2h_bytes"] > 0
        assert stats["forward_steps"] == 10  # one prefill step, then one per new token
    assert identity_run[0]["serving"][mode]["tokens"] == identity_run[1]["serving"][mode]["tokens"]


def test_continuous_batching_ranks_size_and_schedule_alike(identity_run) -> None:
    # Each rank runs its own scheduler: the same blocks, plan and decisions, or the collectives desynchronise.
    same = ("num_blocks", "rows_per_layer", "pooled_layers", "prefetch_depth", "forward_steps", "preemptions")
    for key in ("greedy", "sample"):
        stats = [report["serving"][key]["stats"] for report in identity_run]
        assert {k: stats[0][k] for k in same} == {k: stats[1][k] for k in same}
        # Each rank's cache holds its shard (1 of the 2 KV heads): equal bytes on both ranks.
        assert stats[0]["host_kv_bytes"] == stats[1]["host_kv_bytes"] > 0
        # pie_rs.gather_stats on rank 0: both ranks' serving plans, the same pooled layers.
        gathered = identity_run[0]["serving"][key]["gathered"]
        assert [g[0] for g in gathered] == [0, 1] and all(g[2] for g in gathered)
        assert gathered[0][1] == gathered[1][1] and len(gathered[0][1][0]) == 2
        assert identity_run[1]["serving"][key]["gathered"] is None


def test_continuous_batching_manager_runs_through_the_pool(identity_run) -> None:
    for report in identity_run:
        assert report["serving"]["manager_equal"], f"rank {report['rank']}: manager tokens differ"
        stats = report["serving"]["manager_stats"]
        assert stats["pooled_layers"] == 2 and stats["h2d_bytes"] > 0
        assert report["serving"]["restored"]


def test_continuous_batching_forks_and_preemption_decide_alike_on_every_rank(identity_run) -> None:
    serving = [report["serving"] for report in identity_run]
    for result in serving:
        # Forked children copy their parent's blocks into the host copy of pooled layers.
        assert result["forks_equal"] and result["forks_stats"]["peak_running"] == 6
        assert result["forks_stats"]["pooled_layers"] == 4
        # A cache too small for every request at once: transformers preempts, the same on both ranks.
        assert result["preempt_equal"] and result["preempt_stats"]["preemptions"] > 0
    same = ("num_blocks", "preemptions", "peak_running", "forward_steps")
    assert {k: serving[0]["preempt_stats"][k] for k in same} == {k: serving[1]["preempt_stats"][k] for k in same}


def test_continuous_batching_budget_too_small_on_one_rank_is_refused_on_every_rank(identity_run) -> None:
    for report in identity_run:
        err = report["serving"]["small"]
        assert err is not None and err["type"] == "BudgetError", err
        assert "rank 1's budget for the paged cache (4096 bytes)" in err["message"]
        assert re.search(r"needs \d+ bytes", err["message"]), err["message"]
        assert err["message"].endswith("raise gpu_budget on rank 1")
        assert report["serving"]["small_seconds"] < 30


def test_continuous_batching_failed_rank_makes_every_rank_raise(identity_run) -> None:
    serving = [report["serving"] for report in identity_run]
    print(
        "\n"
        + "; ".join(f"rank {r}: {s['fault']['message']} ({s['fault_seconds']:.2f} s)" for r, s in enumerate(serving))
    )
    for result in serving:
        assert result["fault"] is not None, "generate_batch returned despite a failed rank"
        assert result["fault"]["pie_error"] and result["fault_seconds"] < 30
        # The group stayed in step: the next run on the same group gives the right tokens.
        assert result["after_fault_equal"]
        # The manager API: every request's result carries the error, on every rank.
        assert result["manager_fault"]["all_failed"] and result["manager_fault"]["seconds"] < 30
    assert serving[1]["fault"]["type"] == "BackendError" and "injected fault" in serving[1]["fault"]["message"]
    assert "injected fault" in serving[1]["manager_fault"]["errors"][0]
    assert "stopped: rank 1: BackendError" in serving[0]["manager_fault"]["errors"][0]
    assert serving[0]["fault"]["type"] == "BackendError"
    assert "rank 1: BackendError" in serving[0]["fault"]["message"]


def test_continuous_batching_refuses_a_pool_without_the_models_group() -> None:
    # transformers runs the model over 2 ranks, but the pool found no group (or another size) at
    # attach: refused on every rank (they attached alike) before any collective.
    from types import SimpleNamespace

    from pie_rs import distributed

    assert distributed.serving_group(SimpleNamespace(rank_group=None), 1) is None
    with pytest.raises(pie_rs.ConfigError, match=r"over 2 ranks, but pie_rs\.attach found no tensor-parallel group"):
        distributed.serving_group(SimpleNamespace(rank_group=None), 2)
    four = distributed.RankGroup(group=None, rank=0, size=4)
    with pytest.raises(pie_rs.ConfigError, match="found a group of 4 ranks"):
        distributed.serving_group(SimpleNamespace(rank_group=four), 2)
    two = distributed.RankGroup(group=None, rank=1, size=2)
    assert distributed.serving_group(SimpleNamespace(rank_group=two), 2) is two


@pytest.mark.slow
def test_a_rank_that_never_attaches_is_named(model_dir, tmp_path) -> None:
    reports, _ = run_ranks("absent", model_dir, tmp_path / "absent")
    err = reports[0]["absent"]
    assert err is not None and err["type"] == "StateError", err
    assert "not every rank attached" in err["message"] and "1" in err["message"]
    assert reports[0]["seconds"] < 30 and reports[0]["untouched"]
