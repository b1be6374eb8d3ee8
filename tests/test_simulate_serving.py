"""``pie-rs simulate --serving`` and ``--host-attention``: JSON, table, bad input (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pie_rs.cli import main

SMALL = ["simulate", "--serving", "--requests", "40", "--gpu-budget-mib", "1024", "--seed", "1"]
FIELDS = (
    "throughput_tok_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
    "peak_running",
    "preemptions",
    "device_kv_mib",
)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_serving_json_has_every_method_and_the_equal_performance_figure(capsys: pytest.CaptureFixture[str]) -> None:
    r = _json(capsys, [*SMALL, "--machine", "gh200", "--json"])
    assert set(r["methods"]) == {"no_pooling", "swap", "static_offload", "pie"}
    for name, m in r["methods"].items():
        for f in FIELDS:
            assert isinstance(m[f], (int, float)), (name, f)
        assert m["finished"] == 40 and m["emitted_tokens"] == m["output_tokens"], name
        assert m["device_kv_mib"] <= 1024 + 1e-9, name
        assert m["ttft_ms_p50"] <= m["ttft_ms_p99"]
    assert r["rate"] == "inf" and len(r["runs"]) == 1
    eq = r["equal_performance"]
    assert eq["pie_budget_mib"] <= eq["no_pooling_budget_mib"] == 1024
    assert eq["memory_ratio"] >= 1.0
    assert eq["pie_budget_mib"] <= eq["no_pooling_min_budget_mib"] * (1 + 1 / 32) + 1e-9
    assert eq["memory_ratio_vs_min"] == pytest.approx(eq["no_pooling_min_budget_mib"] / eq["pie_budget_mib"])
    assert eq["pie_throughput_tok_s"] >= 0.99 * r["methods"]["no_pooling"]["throughput_tok_s"]


def test_several_rates_give_one_run_each(capsys: pytest.CaptureFixture[str]) -> None:
    r = _json(
        capsys,
        [*SMALL, "--rates", "2,8", "--methods", "no_pooling,pie", "--no-equal-performance", "--json"],
    )
    assert [run["rate"] for run in r["runs"]] == [2.0, 8.0]
    assert all(set(run["methods"]) == {"no_pooling", "pie"} for run in r["runs"])
    assert "methods" not in r and r["equal_performance"] is None
    slow, fast = (run["methods"]["no_pooling"] for run in r["runs"])
    # A quarter of the arrival rate: the same requests take longer to arrive.
    assert slow["throughput_tok_s"] < fast["throughput_tok_s"]


def test_serving_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL, "--rate", "4", "--no-equal-performance"]) == 0
    out = capsys.readouterr().out
    assert "rate: 4 requests/s" in out
    for name in ("no_pooling", "swap", "static_offload", "pie"):
        assert f"\n{name} " in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--machine", "tpu"], 'unknown machine "tpu"'),
        (["--model", "gpt-5"], 'unknown model "gpt-5"'),
        (["--rate", "0"], "rates must be positive"),
        (["--rate=-3"], "rates must be positive"),
        (["--rates", "2,0"], "rates must be positive"),
        (["--gpu-budget-mib", "16"], "cannot hold one request's KV"),
        (["--requests", "0"], "requests must be between 1 and 100000"),
        (["--batch", "4"], "--batch do not apply to --serving"),
    ],
)
def test_bad_serving_input_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["simulate", "--serving", "--requests", "10", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unparsable_rate_and_serving_options_without_serving_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--serving", "--rate", "fast"])
    assert exc.value.code == 2
    assert "not a number of requests per second" in capsys.readouterr().err
    assert main(["simulate", "--rate", "2"]) == 2
    assert "--rate need --serving" in capsys.readouterr().err


def test_the_console_script_exits_2_without_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pie_rs.cli", "simulate", "--serving", "--gpu-budget-mib", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "gpu_budget_mib must be a positive number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_host_attention_auto_beats_copy_only_on_pcie(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["simulate", "--machine", "a100-pcie-gen4", "--context", "4096", "--steps", "8", "--json"]
    auto = _json(capsys, base)
    never = _json(capsys, [*base, "--host-attention", "never"])
    assert auto["host_attention"] == "auto" and never["host_attention"] == "never"
    assert auto["host_attended_layers"] and set(auto["host_attended_layers"]) <= set(auto["pooled_layers"])
    assert never["host_attended_layers"] == [] and never["host_ms_per_step"] == 0
    # The CPU reads KV 8x faster than the PCIe Gen4 link moves it: the 1.3x.
    assert never["simulated_step_ms"] >= 1.3 * auto["simulated_step_ms"]
    assert auto["device_kv_mib"] <= auto["gpu_budget_mib"] + 1e-9
    always = _json(capsys, [*base, "--host-attention", "always", "--cpu-cores", "8"])
    assert always["host_attended_layers"] == always["pooled_layers"] and always["prefetch_depth"] == 0
    assert always["cpu_attention_gbps"] == pytest.approx(72.0)
    assert main(base[:-1]) == 0
    table = capsys.readouterr().out
    assert "host attention" in table and "copy-only pooling" in table and "on CPU" in table


def test_serving_reports_host_attended_layers(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*SMALL, "--methods", "pie", "--no-equal-performance", "--host-attention", "never", "--json"]
    r = _json(capsys, argv)
    pie = r["runs"][0]["methods"]["pie"]
    assert pie["host_attended_layers"] == 0 and pie["host_ms"] == 0 and pie["finished"] == 40


def test_bad_host_attention_exits_2_and_the_binding_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["simulate", "--host-attention", "sometimes"], [*SMALL, "--host-attention", "Auto"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--host-attention" in err and "auto" in err and "Traceback" not in err
    from pie_rs import _core

    for call in (_core.simulate, _core.simulate_serving):
        with pytest.raises(_core.ConfigError, match='use "auto", "never" or "always"'):
            call({"host_attention": "sometimes"})


def test_list_shows_each_machines_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    profiles = _json(capsys, ["simulate", "--list", "--json"])
    a100 = profiles["machines"]["a100-pcie-gen4"]
    assert "host CPU 200 GB/s, 64 cores (host attention 200 GB/s)" in a100
    assert "(host attention 60 GB/s)" in profiles["machines"]["rtx4090-pcie-gen4"]


def test_a_fixed_pie_pool_is_replayed_and_checked() -> None:
    """``pie_pool`` (the calibration's replay of a real run's pool) runs as given, or says what is wrong."""
    from pie_rs import _core

    base = {"requests": 30, "gpu_budget_mib": 1024, "seed": 1, "methods": ["pie"], "equal_performance": False}
    # llama-3-8b: 1 GiB holds 8192 tokens in 32 layer areas; 8 pooled through 2 slots leave 26.
    pool = {"blocks": 600, "pooled_layers": list(range(0, 32, 4)), "prefetch_depth": 2}
    pie = _core.simulate_serving({**base, "pie_pool": pool})["methods"]["pie"]
    assert pie["pool_tokens"] == 16 * 600 and pie["pooled_layers"] == 8 and pie["prefetch_depth"] == 2
    assert pie["reconfigurations"] == 0 and pie["finished"] == 30
    for bad, message in (
        ({**pool, "depth": 2}, 'pie_pool has no "depth"; it takes blocks, pooled_layers, prefetch_depth'),
        ({"blocks": 10, "pooled_layers": [0]}, 'pie_pool needs "prefetch_depth"'),
        ({**pool, "blocks": 0}, "at least one block"),
    ):
        with pytest.raises(_core.ConfigError, match=message):
            _core.simulate_serving({**base, "pie_pool": bad})
    with pytest.raises(_core.BudgetError, match="raise gpu_budget or pool more layers"):
        _core.simulate_serving({**base, "pie_pool": {**pool, "blocks": 700}})


def test_memory_slowdown_is_the_allowance_and_bad_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    one = ["simulate", "--machine", "h200-pcie-gen5", "--model", "qwen2-7b", "--batch", "1", "--context", "4096"]
    one += ["--objective", "memory", "--json"]
    tight = _json(capsys, one)
    loose = _json(capsys, [*one, "--memory-slowdown", "1.1"])
    assert loose["offloaded_share"] > tight["offloaded_share"]
    assert loose["simulated_step_ms"] <= 1.1 * loose["all_gpu_step_ms"] + 1e-9
    assert main([*one, "--memory-slowdown", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "slowdown must be a finite factor of at least 1" in err and "Traceback" not in err
    assert main([*SMALL, "--memory-slowdown", "1.1"]) == 2
    assert "--memory-slowdown do not apply to --serving" in capsys.readouterr().err
