"""Continuous batching with pooled KV: token identity against transformers' own paged cache.

Every test compares greedy (or seeded sampling) outputs of ``generate_batch`` / the manager with
pie-rs attached against the same call without it, and checks from ``pool.stats()["serving"]`` that
the decode went through the pool (pooled layers, bytes moved both ways).
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GenerationConfig

import pie_rs
from pie_rs import serving

from helpers import wait_until_decoding
from models import make_model

try:
    from transformers import ContinuousBatchingConfig
except ImportError:  # transformers < 5.24: only the refusal test runs
    ContinuousBatchingConfig = None

needs_524 = pytest.mark.skipif(
    serving.serving_supported() is not None, reason="pie-rs serving needs transformers >= 5.24"
)

# Mixed lengths, below and above a page (8 tokens), one spanning three pages.
PROMPTS = [[3 + (7 * i + j) % 120 for j in range(n)] for i, n in enumerate([3, 9, 1, 17, 6])]
PAGE = 8


def cb(**kw: object) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(**({"page_size": PAGE, "max_batch_tokens": 64} | kw))


def greedy(new: int = 10, **kw: object) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0, **kw)


def tokens(model, prompts=PROMPTS, gen=None, config=None) -> dict[str, list[int]]:
    out = model.generate_batch(
        prompts, generation_config=gen or greedy(), continuous_batching_config=config or cb(), progress_bar=False
    )
    return {k: list(v.generated_tokens) for k, v in out.items()}


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def reference(llama) -> dict[str, list[int]]:
    return tokens(llama, config=cb(num_blocks=64))


def row_bytes(model) -> int:
    """Bytes of one token of one layer (K and V) of the tiny models, float32."""
    cfg = model.config
    return 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4


@needs_524
@pytest.mark.parametrize("pooling", ["none", "some", "all"])
def test_greedy_tokens_equal_continuous_batching_alone(llama, reference, pooling):
    # 600 rows of one layer: the budget alone holds 150 rows per layer for 4 resident layers.
    budget = 600 * row_bytes(llama)
    kwargs = {
        "none": {"gpu_budget": None},
        "some": {"gpu_budget": budget},
        "all": {"gpu_budget": budget, "objective": "memory"},
    }
    with pie_rs.attach(llama, **kwargs[pooling]) as pool:
        got = tokens(llama, config=cb(num_blocks=32) if pooling == "none" else cb())
        stats = pool.stats()["serving"]
    assert got == reference
    assert stats["forward_steps"] >= 10 and stats["engine_steps"] == stats["forward_steps"]
    assert stats["peak_running"] == len(PROMPTS) and stats["preemptions"] == 0
    layers = llama.config.num_hidden_layers
    if pooling == "none":
        assert stats["pooled_layers"] == 0 and stats["h2d_bytes"] == 0 and stats["d2h_bytes"] == 0
        return
    assert stats["pooled_layers"] == (2 if pooling == "some" else layers)
    # The decode went through the pool: prefetches in, written rows back, and the device part
    # stayed within the budget while the cache holds more blocks than the budget alone would.
    assert stats["h2d_bytes"] > 0 and stats["d2h_bytes"] > 0
    assert stats["device_kv_bytes"] <= budget
    resident_rows = budget // (layers * row_bytes(llama))
    assert stats["rows_per_layer"] > resident_rows
    assert stats["pool_blocks"] > 0
    # Only rows written are written back: every token of every request, once per pooled layer.
    written = sum(len(p) for p in PROMPTS) + len(PROMPTS) * 9  # the last token's KV is never computed
    assert stats["d2h_bytes"] == written * stats["pooled_layers"] * row_bytes(llama)


@needs_524
def test_sliding_window_family():
    model = make_model("mistral_sliding")  # every layer slides (window 6): transformers' sliding allocator
    model.set_attn_implementation("sdpa")
    expected = tokens(model, config=cb(num_blocks=64))
    with pie_rs.attach(model, gpu_budget=300 * row_bytes(model), objective="memory") as pool:
        got = tokens(model)
        stats = pool.stats()["serving"]
    assert got == expected
    assert stats["pooled_layers"] == model.config.num_hidden_layers and stats["h2d_bytes"] > 0


@needs_524
def test_prefix_sharing_forks_and_preemption(llama):
    shared = [40 + j for j in range(2 * PAGE + 3)]
    prompts = [[*shared, 5 + i] for i in range(3)]
    sampling = GenerationConfig(
        max_new_tokens=8, do_sample=True, eos_token_id=-1, pad_token_id=0, num_return_sequences=2
    )
    expected = tokens(llama, prompts, sampling, cb(num_blocks=64, seed=3))
    with pie_rs.attach(llama, gpu_budget=300 * row_bytes(llama), objective="memory") as pool:
        # Forked children copy their parent's last block: into the host copy of pooled layers.
        assert tokens(llama, prompts, sampling, cb(seed=3)) == expected
        stats = pool.stats()["serving"]
        assert stats["peak_running"] == 6 and stats["pooled_layers"] == 4
        # A cache too small for every request at once: transformers preempts (soft reset), pooled
        # layers included; the tokens stay the same.
        small = cb(num_blocks=6)
        assert tokens(llama, config=small) == tokens_without(llama, small)
        stats = pool.stats()["serving"]
    assert stats["preemptions"] > 0


def tokens_without(model, config) -> dict[str, list[int]]:
    """The same run on transformers' own cache (the pool's serving hook lifted meanwhile)."""
    saved = model.__dict__.pop("init_continuous_batching")
    try:
        return tokens(model, config=config)
    finally:
        model.__dict__["init_continuous_batching"] = saved


@needs_524
def test_manager_requests_added_and_cancelled_while_others_decode(llama, reference):
    with pie_rs.attach(llama, gpu_budget=300 * row_bytes(llama), objective="memory") as pool:
        manager = llama.init_continuous_batching(generation_config=greedy(new=10), continuous_batching_config=cb())
        manager.start()
        try:
            first = manager.add_request(PROMPTS[0], request_id="req_0", streaming=True)
            # Wait until the first request decodes, then add the others and cancel one.
            wait_until_decoding(manager, first)
            deadline = time.time() + 60
            for i, prompt in enumerate(PROMPTS[1:4], start=1):
                manager.add_request(prompt, request_id=f"req_{i}")
            manager.add_request([9, 8, 7, 6], request_id="doomed", max_new_tokens=200)
            manager.cancel_request("doomed")
            results = {}
            while len(results) < 4 and time.time() < deadline:
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished() and out.request_id != "doomed":
                    results[out.request_id] = list(out.generated_tokens)
        finally:
            manager.stop(block=True)
        stats = pool.stats()["serving"]
    assert results == {k: reference[k] for k in ("req_0", "req_1", "req_2", "req_3")}
    assert stats["h2d_bytes"] > 0
    assert "init_continuous_batching" not in llama.__dict__


@needs_524
def test_a_failed_copy_ends_the_run_and_the_next_run_is_right(llama, reference):
    with pie_rs.attach(llama, gpu_budget=300 * row_bytes(llama), objective="memory") as pool:
        pool._serving_engine_options = {"faults": {"fail_copy_at": 5}, "wait_timeout": 5.0}
        start = time.time()
        out = llama.generate_batch(
            PROMPTS, generation_config=greedy(), continuous_batching_config=cb(), progress_bar=False
        )
        assert time.time() - start < 30
        assert out and all(v.error and "injected fault" in v.error for v in out.values())
        pool._serving_engine_options = None
        assert tokens(llama) == reference
    # detach() leaves the model as it was: transformers' own cache, same tokens.
    assert "init_continuous_batching" not in llama.__dict__
    assert tokens(llama, config=cb(num_blocks=64)) == reference


@needs_524
def test_bad_input_says_what_to_change(llama):
    with (
        pie_rs.attach(llama, gpu_budget=4 * row_bytes(llama), objective="memory"),
        pytest.raises(pie_rs.BudgetError, match="raise gpu_budget"),
    ):
        tokens(llama)
    gemma = make_model("gemma2")
    with pie_rs.attach(gemma, gpu_budget="1MiB"), pytest.raises(pie_rs.ConfigError, match="one attention type"):
        serving_cache_for(gemma)
    flex = make_model("llama")
    flex.config._attn_implementation = "flex_attention"
    with pie_rs.attach(flex), pytest.raises(pie_rs.ConfigError, match="attn_implementation"):
        flex.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb())


def serving_cache_for(model):
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb())
    return manager._create_batch_processor()


@needs_524
def test_generate_and_serving_share_one_budget(llama):
    budget = 300 * row_bytes(llama)
    inputs = {
        "input_ids": torch.tensor([PROMPTS[1]]),
        "attention_mask": torch.ones(1, len(PROMPTS[1]), dtype=torch.long),
    }
    with pie_rs.attach(llama, gpu_budget=budget, objective="memory") as pool:
        llama.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert pool._kept is not None  # generate's engine, kept for the next call
        manager = llama.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb())
        bp = manager._create_batch_processor()
        # The paged cache took the budget: the kept generate engine was released first.
        assert pool._kept is None
        assert bp.cache.device_kv_bytes() <= budget
        # While it lives, a generate gets what is left of the budget (nothing here): refused, clearly.
        with pytest.raises(pie_rs.BudgetError):
            llama.generate(**inputs, max_new_tokens=4, do_sample=False)
        bp.cache.close()
        assert pool._serving_device_bytes() == 0
        llama.generate(**inputs, max_new_tokens=4, do_sample=False)


@pytest.mark.skipif(serving.serving_supported() is None, reason="only where transformers is older than 5.24")
def test_serving_is_refused_clearly_on_older_transformers():  # pragma: no cover - runs in the 5.17 pass
    model = make_model("llama")
    with pie_rs.attach(model), pytest.raises(pie_rs.ConfigError, match=r"transformers >= 5\.24"):
        model.init_continuous_batching()


@needs_524
def test_block_copies_reach_resident_and_pooled_layers(llama):
    # What transformers' offloading manager and forks do: whole blocks out and back in.
    with pie_rs.attach(llama, gpu_budget=600 * row_bytes(llama)) as pool:
        manager = llama.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb())
        cache = manager._create_batch_processor().cache
        view = cache.allocator._copy_view
        stats = pool.stats()["serving"]
        assert 0 < stats["pooled_layers"] < stats["resident_layers"] + stats["pooled_layers"]
        width = cache.layers * 2 * cache.page_bytes  # a block: K and V pages of every layer
        blocks = torch.tensor([3, 7])
        data = torch.randint(0, 256, (2, width), dtype=torch.uint8)
        view.index_copy_(0, blocks, data)
        assert torch.equal(view.index_select(0, blocks), data)
        assert torch.equal(view.index_select(0, torch.tensor([7])), data[1:])
        assert not view.index_select(0, torch.tensor([5])).any()  # untouched blocks stay zero
        # A prefetch now moves the pooled layers up to the highest block written.
        assert all(cache.engine.seq_len(e) == 8 * PAGE for e in range(cache.layers))
        cache.close()
