"""The pie-rs command line."""

from __future__ import annotations

import json

import pytest

from pie_rs.cli import main

SMALL = ["--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "128", "--batch", "2"]
SHORT = ["--prompt-len", "8", "--new-tokens", "8", "--device", "cpu"]


def test_demo_prints_identity(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *SMALL, *SHORT]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to DynamicCache: yes" in out
    assert "pooled" in out


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *SMALL, *SHORT, "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True
    assert result["stats"]["pooled_layers"] >= 2
    assert result["pie_tokens_per_s"] > 0


def test_demo_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *SMALL, *SHORT, "--budget", "nonsense"]) == 1
    assert "ConfigError" in capsys.readouterr().err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert "pie-rs" in capsys.readouterr().out
    assert main([]) == 2
