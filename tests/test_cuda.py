"""CUDA variants of the identity and zero-copy checks (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

import pie_rs
from pie_rs._model import cache_keyword

from helpers import expanded_batch, generate, half_pooled_budget
from models import make_inputs, make_model

pytestmark = pytest.mark.cuda

MAX_NEW, PROMPT = 10, 7


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2", "mistral_sliding"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("placement", ["pooled", "resident"])
def test_cuda_generate_matches_dynamic_cache(family: str, mode: str, placement: str) -> None:
    model = make_model(family, device="cuda")
    inputs = make_inputs(4, PROMPT, device="cuda")
    expected = generate(model, inputs, mode)
    with pie_rs.attach(model) as probe:
        managed = len(probe.info.managed)
    budget = None
    if placement == "pooled" and managed >= 3:
        budget = half_pooled_budget(model, expanded_batch(4, mode), PROMPT + MAX_NEW)
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        assert pool.backend == "cuda"
        got = generate(model, inputs, mode)
        stats = pool.stats()
    assert torch.equal(got, expected)
    if budget is not None:
        assert stats["pooled_layers"] >= managed / 2
        assert stats["peak_device_kv_bytes"] <= budget


@pytest.mark.parametrize("pinned", [None, [1, 3]])
def test_cuda_views_are_zero_copy(pinned) -> None:
    model = make_model("llama", device="cuda")
    with pie_rs.attach(model, pooled_layers=pinned, prefetch_depth=1 if pinned else None) as pool:
        cache = pool.new_cache(max_length=32)
        captured = []
        layer = cache.layers[3]
        original = layer.update

        def spy(k, v, *a, **kw):
            out = original(k, v, *a, **kw)
            captured.append(out)
            return out

        layer.update = spy
        with torch.no_grad():
            model(**make_inputs(2, 5, device="cuda"), use_cache=True, **{cache_keyword(model): cache})
        region = cache.engine.device_region()
        keys, values = captured[0]
        assert keys.is_cuda and values.is_cuda
        assert region.addr <= keys.data_ptr() < region.addr + region.nbytes
        assert region.addr <= values.data_ptr() < region.addr + region.nbytes


def test_cuda_gpu_budget_fraction() -> None:
    model = make_model("llama", device="cuda")
    with pie_rs.attach(model, gpu_budget=0.01) as pool:
        assert pool.budget_bytes is not None and pool.budget_bytes > 0
        inputs = make_inputs(2, device="cuda")
        assert generate(model, inputs, "greedy").shape == (2, PROMPT + MAX_NEW)


def test_cuda_host_backend_refused() -> None:
    model = make_model("llama", device="cuda")
    with pytest.raises(pie_rs.ConfigError):
        pie_rs.attach(model, backend="host")
