"""Token identity: generate with pie-rs equals generate with transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import pie_rs
from pie_rs._model import cache_keyword, inspect_model

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
    # Copy-only pooling: under "auto" the policy may attend pooled layers on the host (fewer of
    # them, needing no staging slots), which tests/test_host_attention_cache.py covers.
    with pie_rs.attach(model, gpu_budget=budget, host_attention="never") as pool:
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


def test_prompt_lookup_crops_through_the_engine() -> None:
    """Prompt-lookup decoding crops the cache after rejected drafts; tokens still match."""
    model = make_model("llama")
    inputs = make_inputs(1, 12)
    inputs["input_ids"][0, 6:12] = inputs["input_ids"][0, 0:6]
    expected = generate(model, inputs, "greedy", prompt_lookup_num_tokens=3, max_new_tokens=20)
    with pie_rs.attach(model, pooled_layers=[0, 2], prefetch_depth=1):
        got = generate(model, inputs, "greedy", prompt_lookup_num_tokens=3, max_new_tokens=20)
    assert torch.equal(got, expected)


def test_continue_from_returned_cache() -> None:
    """A cache returned by generate (return_dict_in_generate) stays open and continues identically."""
    model = make_model("qwen2")
    inputs = make_inputs(2, PROMPT)
    kw = cache_keyword(model)
    ref = DynamicCache(config=model.config)
    first = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, **{kw: ref})
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    expected = model.generate(first.sequences, attention_mask=mask, max_new_tokens=5, do_sample=False, **{kw: ref})
    with pie_rs.attach(model, pooled_layers=[1, 2, 3], prefetch_depth=1):
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert isinstance(cache, pie_rs.PieCache) and not cache.closed
        got = model.generate(out.sequences, attention_mask=mask, max_new_tokens=5, do_sample=False, **{kw: cache})
    assert torch.equal(got, expected)
