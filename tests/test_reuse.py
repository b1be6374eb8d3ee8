"""Reusing KV: cache copies, parking, the prompt-prefix store, multi-turn chats."""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
from transformers import DynamicCache

import pie_rs
from pie_rs._model import cache_keyword

from helpers import generate
from models import VOCAB, make_model

GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _ids(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def _fill(model, cache, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _same(a, b) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True))


def _pins(model, pooled: bool) -> dict:
    from pie_rs._model import inspect_model

    managed = inspect_model(model).managed
    return dict(pooled_layers=managed[::2], prefetch_depth=1) if pooled else {}


# ----------------------------------------------------------------------------- copies
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_prompt_reuse_pattern_matches_dynamic_cache(family, pooled, mode) -> None:
    """transformers' documented pattern: a prefix run once, ``copy.deepcopy`` per follow-up prompt."""
    model = make_model(family)
    kw = cache_keyword(model)
    prefix = _ids(24, 0)
    suffixes = [_ids(5, 1), _ids(3, 2), _ids(7, 3)]
    extra = dict(num_beams=4, num_return_sequences=2, early_stopping=False) if mode == "beam" else {}

    def run(prefix_cache):
        _fill(model, prefix_cache, prefix)
        before = _kv(prefix_cache)
        outs = []
        for suffix in suffixes:
            ids = torch.cat([prefix, suffix], dim=1)
            past = copy.deepcopy(prefix_cache)
            if mode == "beam":  # generate expands the prompt, not a cache it is given
                past.batch_repeat_interleave(4)
            outs.append(
                generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, mode, **extra, **{kw: past})
            )
        assert _same(before, _kv(prefix_cache)), "a copy changed the prefix cache"
        assert prefix_cache.get_seq_length() == prefix.shape[1]
        return outs

    expected = run(DynamicCache(config=model.config))
    with pie_rs.attach(model, **_pins(model, pooled)) as pool:
        prefix_cache = pool.new_cache()
        got = run(prefix_cache)
        if pooled:
            assert prefix_cache.stats()["pooled_layers"] > 0
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copies_are_isolated_under_random_updates(seed) -> None:
    """Property test: random appends, crops, reorders, copies, parks and resumes of a family of
    caches (copies of copies included) always hold what DynamicCache twins hold."""
    rng = random.Random(seed)
    model = make_model("llama", layers=4)
    batch = 2
    with pie_rs.attach(model, pooled_layers=[1, 3], prefetch_depth=1) as pool:
        first, twin = pool.new_cache(), DynamicCache(config=model.config)
        ids = _ids(rng.randint(1, 9), seed, rows=batch)
        _fill(model, first, ids)
        _fill(model, twin, ids)
        family = [(first, twin)]
        for step in range(40):
            i = rng.randrange(len(family))
            cache, ref = family[i]
            op = rng.choice(["append", "append", "copy", "copy", "crop", "reorder", "park", "resume"])
            if op == "append":
                new = _ids(rng.randint(1, 6), 1000 * seed + step, rows=batch)
                assert torch.equal(_fill(model, cache, new), _fill(model, ref, new))
            elif op == "copy":
                family.append((rng.choice([copy.copy, copy.deepcopy])(cache), copy.deepcopy(ref)))
            elif op == "crop" and ref.get_seq_length() > 1:
                drop = -rng.randint(1, ref.get_seq_length() - 1)
                cache.crop(drop)
                ref.crop(drop)
            elif op == "reorder":
                idx = torch.tensor([rng.randrange(batch) for _ in range(batch)])
                cache.reorder_cache(idx)
                ref.reorder_cache(idx)
            elif op == "park":
                cache.park()
                assert cache.parked and cache.stats()["parked_kv_bytes"] > 0
            elif op == "resume":
                cache.resume()
                assert not cache.parked
            for mine, theirs in family:
                assert mine.get_seq_length() == theirs.get_seq_length()
                assert _same(_kv(mine), _kv(theirs)), f"step {step}: {op} on cache {i} broke isolation"
        assert len(family) > 3


def test_copies_share_one_host_snapshot_and_take_no_device_memory() -> None:
    model = make_model("llama")
    with pie_rs.attach(model) as pool:
        cache = pool.new_cache()
        _fill(model, cache, _ids(40, 0))
        copies = [copy.deepcopy(cache) for _ in range(4)]
        assert all(c.parked and c.stats()["device_kv_bytes"] == 0 for c in copies)
        snaps = {id(c._shared.parked) for c in copies}
        assert len(snaps) == 1, "copies of an unchanged cache share one snapshot"
        _fill(model, cache, _ids(1, 1))
        assert copy.deepcopy(cache)._shared.parked is not copies[0]._shared.parked
        # A copy of a copy shares it too, until one of them is used.
        assert copy.deepcopy(copies[0])._shared.parked is copies[0]._shared.parked
        # A parked copy that is reset holds nothing and starts afresh.
        copies[1].reset()
        assert not copies[1].parked and copies[1].get_seq_length() == 0
        ids = _ids(5, 2)
        assert torch.equal(_fill(model, copies[1], ids), _fill(model, DynamicCache(config=model.config), ids))


def test_copy_after_detach_raises_a_pie_rs_error() -> None:
    model = make_model("llama")
    pool = pie_rs.attach(model)
    cache = pool.new_cache()
    _fill(model, cache, _ids(10, 0))
    dup = copy.deepcopy(cache)
    pool.detach()
    with pytest.raises(pie_rs.StateError, match="detached"):
        _fill(model, dup, _ids(1, 1))
    with pytest.raises(pie_rs.StateError, match="detached"):
        copy.deepcopy(cache)
    with pytest.raises(pie_rs.StateError, match="detached"):
        dup.resume()
    with pytest.raises(pie_rs.StateError, match="detached"):
        pool.cache_prefix(_ids(20, 0))


def test_pickling_refused_with_what_to_do_and_to_dynamic_pickles() -> None:
    model = make_model("gemma3")
    with pie_rs.attach(model) as pool:
        cache = pool.new_cache()
        _fill(model, cache, _ids(12, 0))
        with pytest.raises(TypeError, match="to_dynamic"):
            pickle.dumps(cache)
        dyn = pickle.loads(pickle.dumps(cache.to_dynamic()))
        assert _same(_kv(dyn), _kv(cache))
        nxt = _ids(1, 3)
        assert torch.equal(_fill(model, dyn, nxt), _fill(model, cache, nxt))


# ---------------------------------------------------------------------- multi-turn chat
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("park", [False, True])
def test_multi_turn_chat_continues_and_parks(pooled, park) -> None:
    model = make_model("llama")
    kw = cache_keyword(model)
    turns = [_ids(9, 10), _ids(4, 11), _ids(6, 12)]

    def chat(make_cache, park_between=False):
        history = torch.empty(1, 0, dtype=torch.long)
        cache = make_cache()
        outs = []
        for user in turns:
            history = torch.cat([history, user], dim=1)
            out = model.generate(input_ids=history, attention_mask=torch.ones_like(history), **GREEDY, **{kw: cache})
            outs.append(out)
            history = out
            if park_between:
                cache.park()
                assert cache.parked and cache.stats()["device_kv_bytes"] == 0
        return outs

    expected = chat(lambda: DynamicCache(config=model.config))
    with pie_rs.attach(model, **_pins(model, pooled)) as pool:
        got = chat(pool.new_cache, park)
        if park:
            assert pool.kept_engine is not None, "a parked chat hands its engine to the pool"
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_returned_cache_continues_and_branches_by_copy() -> None:
    model = make_model("qwen2")
    kw = cache_keyword(model)
    prompt = _ids(11, 4)
    branches = [_ids(3, 5), _ids(5, 6)]

    def run(pooled_model):
        first = model.generate(
            input_ids=prompt,
            return_dict_in_generate=True,
            **GREEDY,
            **({} if pooled_model else {kw: DynamicCache(config=model.config)}),
        )
        cache = getattr(first, "cache", None) or first.past_key_values
        outs = []
        for branch in branches:
            ids = torch.cat([first.sequences, branch], dim=1)
            outs.append(
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY, **{kw: copy.deepcopy(cache)}
                )
            )
        return first.sequences, outs

    expected = run(False)
    with pie_rs.attach(model):
        got = run(True)
    assert torch.equal(expected[0], got[0])
    for a, b in zip(expected[1], got[1], strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- prefix store
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_store_reuse_is_exact_and_counted(pooled, mode) -> None:
    model = make_model("llama")
    shared = _ids(40, 0)
    prompts = [torch.cat([shared, _ids(n, n)], dim=1) for n in (1, 5, 9)]
    expected = [generate(model, {"input_ids": p}, mode) for p in prompts]
    with pie_rs.attach(model, **_pins(model, pooled)) as pool:
        assert pool.cache_prefix(shared[0]) == 32  # whole blocks of 16
        got = [generate(model, {"input_ids": p}, mode) for p in prompts]
        stats = pool.stats()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert stats["prefix_hits"] == 3 and stats["prefix_lookups"] == 3
    assert stats["prefix_tokens_reused"] == 3 * 32
    assert stats["prefix_bytes"] == 32 * 4 * 2 * 2 * 16 * 4  # tokens x layers x K,V x heads x dim x f32


def test_store_batches_and_padding() -> None:
    """Unpadded rows with different stored prefixes are reused; a padded batch is computed in full."""
    model = make_model("llama")
    a, b = _ids(35, 1), _ids(35, 2)
    rows = torch.cat([torch.cat([a, _ids(4, 3)], 1), torch.cat([b, _ids(4, 4)], 1)])
    padded = rows.clone()
    mask = torch.ones_like(padded)
    padded[1, :3], mask[1, :3] = 0, 0
    expected = [
        generate(model, {"input_ids": rows}, "greedy"),
        generate(model, {"input_ids": padded, "attention_mask": mask}, "greedy"),
    ]
    with pie_rs.attach(model) as pool:
        pool.cache_prefix(torch.cat([a, b]))
        got = [generate(model, {"input_ids": rows}, "greedy")]
        assert pool.stats()["prefix_tokens_reused"] == 2 * 32
        got.append(generate(model, {"input_ids": padded, "attention_mask": mask}, "greedy"))
        stats = pool.stats()
    assert stats["prefix_hits"] == 1 and stats["prefix_lookups"] == 2
    for x, y in zip(expected, got, strict=True):
        assert torch.equal(x, y)


def test_store_eviction_under_a_byte_limit_never_fails_a_generate() -> None:
    model = make_model("llama")
    rng = random.Random(0)
    stems = [_ids(16 * rng.randint(1, 3), 100 + i) for i in range(4)]
    prompts = [torch.cat([rng.choice(stems), _ids(rng.randint(1, 40), 200 + i)], dim=1) for i in range(16)]
    expected = [model.generate(input_ids=p, **GREEDY) for p in prompts]
    block_bytes = 16 * 4 * 2 * 2 * 16 * 4
    with pie_rs.attach(model) as pool:
        store = pool.prefix_store(max_bytes=5 * block_bytes, remember_prompts=True)
        for p, want in zip(prompts, expected, strict=True):
            assert torch.equal(model.generate(input_ids=p, **GREEDY), want)
            assert store.bytes <= 5 * block_bytes
        pool.cache_prefix(_ids(16 * 9, 7))  # larger than the limit: stores what fits, never raises
        assert store.bytes <= 5 * block_bytes
        stats = pool.stats()
    assert stats["prefix_evictions"] > 0 and stats["prefix_hits"] > 0, stats


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_remembered_prompts_are_reused(mode) -> None:
    """``remember_prompts``: each unpadded row of a served prompt is stored (beams: from its group)."""
    model = make_model("llama")
    prompts = torch.cat([_ids(50, 9), _ids(50, 10)])
    expected = generate(model, {"input_ids": prompts}, mode)
    with pie_rs.attach(model) as pool:
        pool.prefix_store(max_bytes="8MiB", remember_prompts=True)
        first = generate(model, {"input_ids": prompts}, mode)
        again = generate(model, {"input_ids": prompts}, mode)
        alone = generate(model, {"input_ids": prompts[1:]}, mode)
        stats = pool.stats()
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert torch.equal(alone, generate(model, {"input_ids": prompts[1:]}, mode))
    assert stats["prefix_hits"] == 2 and stats["prefix_tokens_reused"] == 3 * 48


def test_store_refused_for_sliding_window_models() -> None:
    model = make_model("gemma2")
    with pie_rs.attach(model) as pool, pytest.raises(pie_rs.ConfigError, match="sliding-window"):
        pool.cache_prefix(_ids(20, 0))


def test_store_settings_resize_and_bad_input() -> None:
    model = make_model("llama")
    with pie_rs.attach(model) as pool:
        assert pool.stats()["prefix_bytes"] == 0
        store = pool.prefix_store(max_bytes="1MiB", remember_prompts=True)
        pool.cache_prefix([5] * 20 + list(range(3, 63)))
        assert pool.prefix_store() is store and pool._remember_prompts, "settings kept by later calls"
        assert store.blocks == 5 and store.bytes == 5 * 16384
        pool.prefix_store(max_bytes=2 * 16384)  # shrinking evicts the least recently used blocks, leaves first
        assert store.blocks == 2 and store.bytes <= 2 * 16384 and store.evictions == 3
        assert store.matched_tokens(pool._store_key(), [5] * 20 + list(range(3, 63))) == 32
        for bad in (-1, "lots", 1.5):
            with pytest.raises(pie_rs.ConfigError):
                pool.prefix_store(max_bytes=bad)
        with pytest.raises(pie_rs.ConfigError):
            pool.prefix_store(block_tokens=0)
        with pytest.raises(pie_rs.ConfigError, match="unpadded"):
            pool.cache_prefix(torch.ones(2, 20, dtype=torch.long), attention_mask=torch.tensor([[0] + [1] * 19] * 2))
        assert pool.prefix_store(block_tokens=8).blocks == 0  # a new block size starts empty


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("pooled", [False, True])
def test_cuda_copies_park_and_store(pooled) -> None:
    """On CUDA: snapshots are pinned, copies and the store give DynamicCache's tokens."""
    model = make_model("llama", device="cuda")
    kw = cache_keyword(model)
    prefix = _ids(40, 0).cuda()
    prompts = [torch.cat([prefix, _ids(n, n).cuda()], dim=1) for n in (2, 7)]
    modes = ["greedy", "sample", "beam"]
    expected = [generate(model, {"input_ids": p}, m) for p in prompts for m in modes]
    ref = DynamicCache(config=model.config)
    _fill(model, ref, prefix)
    expected_copy = [model.generate(input_ids=p, **GREEDY, **{kw: copy.deepcopy(ref)}) for p in prompts]
    with pie_rs.attach(model, **_pins(model, pooled)) as pool:
        source = pool.new_cache()
        _fill(model, source, prefix)
        dup = copy.deepcopy(source)
        assert dup.parked and dup._shared.parked.layers[0][0].is_pinned()
        got_copy = [model.generate(input_ids=p, **GREEDY, **{kw: copy.deepcopy(source)}) for p in prompts]
        dup.park()
        pool.cache_prefix(prefix[0])
        got = [generate(model, {"input_ids": p}, m) for p in prompts for m in modes]
        assert pool.stats()["prefix_hits"] == len(got)
    for a, b in zip(expected + expected_copy, got + got_copy, strict=True):
        assert torch.equal(a, b)
