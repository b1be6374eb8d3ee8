"""Token identity: generate with pie-rs equals generate with transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch

import pie_rs
from pie_rs._model import inspect_model

from helpers import expanded_batch, generate, half_pooled_budget, sliding_bytes
from models import FAMILIES, make_inputs, make_model

MAX_NEW = 10
PROMPT = 7


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("placement", ["pooled", "resident"])
def test_generate_matches_dynamic_cache(family: str, batch: int, mode: str, placement: str) -> None:
    model = make_model(family)
    inputs = make_inputs(batch, PROMPT)
    expected = generate(model, inputs, mode)
    managed = len(inspect_model(model).managed)
    budget = None
    if placement == "pooled" and managed:
        budget = half_pooled_budget(model, expanded_batch(batch, mode), PROMPT + MAX_NEW)
    elif placement == "pooled":  # every layer is sliding-window: only the budget accounting applies
        budget = 2 * sliding_bytes(model, expanded_batch(batch, mode), PROMPT + MAX_NEW)
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        got = generate(model, inputs, mode)
        stats = pool.stats()
    assert torch.equal(got, expected), (got, expected)
    assert stats["generations"] == 1
    if managed:
        assert stats["steps"] == MAX_NEW
        assert stats["batch"] == expanded_batch(batch, mode)
    if placement == "pooled":
        assert stats["pooled_layers"] >= managed / 2, stats
        assert stats["peak_device_kv_bytes"] <= budget, stats
    else:
        assert stats["pooled_layers"] == 0, stats
    # After detach the model is back to plain transformers.
    assert torch.equal(generate(model, inputs, mode), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_pinned_plan_every_layer_pooled(family: str) -> None:
    model = make_model(family, layers=6)
    inputs = make_inputs(4, PROMPT)
    expected = generate(model, inputs, "greedy")
    managed = inspect_model(model).managed
    with pie_rs.attach(model, pooled_layers=managed, prefetch_depth=1) as pool:
        got = generate(model, inputs, "greedy")
        stats = pool.stats()
    assert torch.equal(got, expected)
    assert stats["pooled_layers"] == len(managed)
    assert stats["resident_layers"] == 0


def test_generate_twice_and_longer_than_sized() -> None:
    """Two calls in a row reuse nothing stale; a cache that must grow still matches."""
    model = make_model("llama")
    inputs = make_inputs(2, PROMPT)
    exp_a = generate(model, inputs, "greedy", max_new_tokens=5)
    exp_b = generate(model, inputs, "greedy", max_new_tokens=40)
    with pie_rs.attach(model, pooled_layers=[1, 3], prefetch_depth=1) as pool:
        assert torch.equal(generate(model, inputs, "greedy", max_new_tokens=5), exp_a)
        assert torch.equal(generate(model, inputs, "greedy", max_new_tokens=40), exp_b)
        # A hand-made cache that is far too small grows on demand.
        cache = pool.new_cache(max_length=8)
        got = generate(model, inputs, "greedy", max_new_tokens=40, **{pool.info.cache_keyword: cache})
        assert torch.equal(got, exp_b)
        assert cache.max_cache_len >= PROMPT + 40 - 1
        assert pool.stats()["generations"] == 2
