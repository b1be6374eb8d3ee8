"""PieCache in hand-written forward loops: logits, zero-copy views, cache operations."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import pie_rs
from pie_rs import PieCache

from helpers import generate, half_pooled_budget
from models import VOCAB, make_inputs, make_model


def _forward(model, ids, cache, kw, mask=None):
    return model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})


def _run_loop(model, ids, cache, kw, steps=8):
    """Prefill then greedy decode; returns the list of last-token logits."""
    logits = []
    out = _forward(model, ids, cache, kw)
    logits.append(out.logits[:, -1])
    mask = torch.ones(ids.shape[0], ids.shape[1], dtype=torch.long)
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = _forward(model, nxt, cache, kw, mask)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma3"])
@pytest.mark.parametrize("pooled", [False, True])
def test_logits_match_dynamic_cache(family: str, pooled: bool) -> None:
    model = make_model(family)
    ids = make_inputs(3, 9)["input_ids"]
    with torch.no_grad():
        ref = _run_loop(model, ids, DynamicCache(config=model.config), kw := _kw(model))
        with pie_rs.attach(model) as pool:
            managed = pool.info.managed
            pins = managed[::2] if pooled else []
        with pie_rs.attach(model, pooled_layers=pins or None, prefetch_depth=1 if pins else None) as pool:
            cache = pool.new_cache(max_length=9 + 8)
            got = _run_loop(model, ids, cache, kw)
            assert pool.stats()["pooled_layers"] == len(pins)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, b)  # a preallocated buffer gives bitwise-equal logits on CPU


def _kw(model) -> str:
    from pie_rs._model import cache_keyword

    return cache_keyword(model)


@pytest.mark.parametrize("pinned", [[], [1, 3]])
def test_views_are_zero_copy(pinned: list[int]) -> None:
    model = make_model("llama")
    with pie_rs.attach(model, pooled_layers=pinned or None, prefetch_depth=1 if pinned else None) as pool:
        cache = pool.new_cache(max_length=32)
        seen = []
        layer0 = cache.layers[0]
        original = layer0.update

        def spy(k, v, *a, **kw):
            keys, values = original(k, v, *a, **kw)
            seen.append((keys, values))
            return keys, values

        layer0.update = spy
        for li in (1, 3):
            orig = cache.layers[li].update

            def spy_n(k, v, *a, _orig=orig, **kw):
                keys, values = _orig(k, v, *a, **kw)
                seen.append((keys, values))
                return keys, values

            cache.layers[li].update = spy_n
        ids = make_inputs(2, 5)["input_ids"]
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{_kw(model): cache})
        engine = cache.engine
        region = engine.device_region()
        lo, hi = region.addr, region.addr + region.nbytes
        assert seen
        for keys, values in seen:
            for t in (keys, values):
                extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
                assert lo <= t.data_ptr() and t.data_ptr() + extent * t.element_size() <= hi
            # K and V of one layer lie back to back in one slot.
            assert values.data_ptr() == keys.data_ptr() + keys.shape[0] * keys.stride(0) * keys.element_size()
        assert keys.shape[2] == 5


def _filled_pair(pins):
    """A PieCache and a DynamicCache holding the same 6 tokens of batch 3."""
    model = make_model("llama")
    ids = make_inputs(3, 6)["input_ids"]
    pool = pie_rs.attach(model, pooled_layers=pins or None, prefetch_depth=1 if pins else None)
    cache = pool.new_cache(max_length=24)
    ref = DynamicCache(config=model.config)
    kw = _kw(model)
    with torch.no_grad():
        _forward(model, ids, cache, kw)
        _forward(model, ids, ref, kw)
    return model, pool, cache, ref, kw


def _assert_same(cache: PieCache, ref: DynamicCache) -> None:
    assert cache.get_seq_length() == ref.get_seq_length()
    for mine, theirs in zip(cache.layers, ref.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)


def _continue_equal(model, cache, ref, kw) -> None:
    nxt = torch.randint(3, VOCAB, (ref.layers[0].keys.shape[0], 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = _forward(model, nxt, cache, kw).logits
        b = _forward(model, nxt, ref, kw).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("pins", [[], [0, 2, 3]])
def test_reorder_crop_reset(pins) -> None:
    model, pool, cache, ref, kw = _filled_pair(pins)
    with pool:
        _assert_same(cache, ref)
        beam_idx = torch.tensor([2, 0, 0])
        cache.reorder_cache(beam_idx)
        ref.reorder_cache(beam_idx)
        _assert_same(cache, ref)
        _continue_equal(model, cache, ref, kw)
        cache.crop(-3)
        ref.crop(-3)
        _assert_same(cache, ref)
        assert cache.get_seq_length() == 4
        _continue_equal(model, cache, ref, kw)
        with pytest.raises(ValueError):
            cache.crop(2)
        cache.reset()
        assert cache.get_seq_length() == 0
        assert cache.get_mask_sizes(5, 0) == (5, 0)


@pytest.mark.parametrize("pins", [[], [1, 3]])
def test_batch_repeat_and_select(pins) -> None:
    model, pool, cache, ref, kw = _filled_pair(pins)
    with pool:
        cache.batch_repeat_interleave(2)
        ref.batch_repeat_interleave(2)
        _assert_same(cache, ref)
        assert cache.max_batch_size == 6
        _continue_equal(model, cache, ref, kw)
        keep = torch.tensor([5, 1, 2])
        cache.batch_select_indices(keep)
        ref.batch_select_indices(keep)
        _assert_same(cache, ref)
        _continue_equal(model, cache, ref, kw)
        assert pool.stats()["pooled_layers"] == len(pins)


def test_cache_api_surface() -> None:
    model = make_model("gemma3")
    with pie_rs.attach(model) as pool:
        cache = pool.new_cache(max_length=40)
        assert isinstance(cache, PieCache)
        assert cache.is_compileable is False
        assert cache.is_sliding == [li.kind == "sliding" for li in pool.info.layers]
        assert cache.get_seq_length() == 0
        assert cache.max_batch_size == -1
        assert cache.max_cache_len == 40
        assert cache.is_initialized is False
        cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))
        assert cache.is_initialized
        assert cache.max_batch_size == 2
        assert cache.max_cache_len >= 40
        ids = make_inputs(2, 5)["input_ids"]
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{_kw(model): cache})
        assert cache.get_seq_length() == 5
        if hasattr(cache, "get_query_offset"):
            assert cache.get_query_offset() == 5
        stats = cache.stats()
        assert stats["sliding_kv_bytes"] > 0
        cache.close()
        assert cache.closed
        with pytest.raises(pie_rs.StateError), torch.no_grad():
            model(input_ids=ids, use_cache=True, **{_kw(model): cache})


# --------------------------------------------------------------------------- engine reuse
def _engine_spy(model):
    """Records the PieCache and its engine of every forward call of ``model``."""
    seen = []
    kw = _kw(model)

    def hook(module, args, kwargs, output):
        cache = kwargs.get(kw)
        if isinstance(cache, pie_rs.PieCache):
            seen.append((cache, cache.engine))

    return seen, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("pooled", [False, True])
def test_engine_reused_across_generates(family, pooled) -> None:
    model = make_model(family)
    prompts = [make_inputs(2, length, seed=length) for length in (5, 11, 3, 7)]
    expected = [generate(model, inputs, "greedy") for inputs in prompts]
    budget = half_pooled_budget(model, 2, 11 + 10) if pooled else None
    seen, handle = _engine_spy(model)
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        engines, caches = [], []
        for i, (inputs, want) in enumerate(zip(prompts, expected, strict=True)):
            seen.clear()
            got = generate(model, inputs, "greedy")
            assert torch.equal(got, want), (i, got, want)
            caches.append(seen[-1][0])
            engines.append(seen[-1][1])
            stats = pool.stats()
            assert stats["steps"] == 10 * (i + 1), stats  # the engine's counters go on
            assert stats["generations"] == i + 1
            if pooled and i >= 1:  # from the longest prompt on, the engine holds 32 tokens a layer
                assert stats["pooled_layers"] >= 1, stats
                assert stats["peak_device_kv_bytes"] <= budget, stats
        kept = pool.kept_engine
    handle.remove()
    # Same batch and dtype: one engine served every call (growing for the longer prompt).
    assert all(engine is engines[0] for engine in engines)
    assert all(cache.closed for cache in caches)
    assert len({id(cache) for cache in caches}) == len(caches)
    assert kept is engines[0] and kept.closed  # detach closed the kept engine


def test_old_cache_unusable_after_its_engine_moved_on() -> None:
    model = make_model("llama")
    inputs = make_inputs(1, 6)
    seen, handle = _engine_spy(model)
    with pie_rs.attach(model) as pool:
        generate(model, inputs, "greedy")
        old, engine = seen[-1]
        old_stats = old.stats()
        generate(model, inputs, "greedy")
        new, new_engine = seen[-1]
        assert new is not old and new_engine is engine
        assert old.closed and old.engine is None
        k = torch.zeros(1, 2, 1, 16)
        with pytest.raises(pie_rs.StateError, match="handed on"):
            old.update(k, k, 0)
        with pytest.raises(pie_rs.StateError):
            old.crop(-1)
        with pytest.raises(pie_rs.StateError):
            old.reset()
        assert old.stats()["steps"] == old_stats["steps"] == 10  # what it did stays readable
        assert pool.stats()["steps"] == 20
    handle.remove()


def test_engine_replaced_when_batch_or_dtype_changes() -> None:
    model = make_model("llama")
    seen, handle = _engine_spy(model)
    with pie_rs.attach(model) as pool:
        generate(model, make_inputs(2, 6), "greedy")
        first = seen[-1][1]
        want = generate(model, make_inputs(3, 6), "greedy")  # batch 3: a new engine, the old one closed
        second = seen[-1][1]
        assert second is not first and first.closed and not second.closed
        assert pool.kept_engine is second
        assert pool.stats()["steps"] == 10  # a new engine counts afresh
        # A hand-made cache of the same batch takes the kept engine too.
        cache = pool.new_cache(max_length=32)
        ids = make_inputs(3, 6)["input_ids"]
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{_kw(model): cache})
        assert cache.engine is second and cache.get_seq_length() == 6
        cache.close()
        assert second.closed and pool.kept_engine is None  # close() frees, it does not keep
        assert torch.equal(generate(model, make_inputs(3, 6), "greedy"), want)
        pool.release()
        assert pool.kept_engine is None and seen[-1][1].closed
    handle.remove()


def test_failed_generate_does_not_keep_its_engine() -> None:
    model = make_model("llama")
    inputs = make_inputs(2, 6)
    expected = generate(model, inputs, "greedy")
    seen, handle = _engine_spy(model)

    class Boom:
        calls = 0

        def __call__(self, input_ids, scores):
            Boom.calls += 1
            if Boom.calls == 3:
                raise RuntimeError("boom")
            return scores

    with pie_rs.attach(model) as pool:
        generate(model, inputs, "greedy")
        kept = pool.kept_engine
        with pytest.raises(RuntimeError, match="boom"):
            generate(model, inputs, "greedy", logits_processor=[Boom()])
        failed = seen[-1][1]
        assert failed is kept and failed.closed and pool.kept_engine is None
        assert torch.equal(generate(model, inputs, "greedy"), expected)
        assert seen[-1][1] is not failed
    handle.remove()


def test_returned_cache_keeps_its_engine() -> None:
    model = make_model("llama")
    inputs = make_inputs(1, 6)
    with pie_rs.attach(model) as pool:
        out = generate(model, inputs, "greedy", return_dict_in_generate=True)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        assert isinstance(cache, pie_rs.PieCache) and not cache.closed
        assert pool.kept_engine is None
        generate(model, inputs, "greedy")  # a new engine; the returned cache stays usable
        assert not cache.closed and cache.get_seq_length() == 6 + 9
