"""Continuous batching through a pool consults the pool's prefix store.

Every test compares the greedy tokens of ``generate_batch`` with pie-rs and its prefix store
against the same call without pie-rs, and checks from ``pool.stats()`` (the store's counters and
the serving cache's own) that the prefix was taken from the store, not computed.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GenerationConfig

import pie_rs
from pie_rs import serving

from models import make_model

try:
    from transformers import ContinuousBatchingConfig
except ImportError:  # transformers < 5.24: serving is refused (tests/test_serving.py checks how)
    ContinuousBatchingConfig = None

pytestmark = pytest.mark.skipif(
    serving.serving_supported() is not None, reason="pie-rs serving needs transformers >= 5.24"
)

PAGE = 8
BLOCK = 16  # the store's block (the default): two pages
# A 37-token system prompt: two whole store blocks, the third block partial.
SYSTEM = [10 + (5 * j) % 100 for j in range(37)]
OTHER = [11 + (3 * j) % 97 for j in range(37)]
PROMPTS = [[*SYSTEM, 3 + i, 40 + 2 * i] for i in range(3)]


def cb(**kw: object) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(**({"page_size": PAGE, "max_batch_tokens": 64, "num_blocks": 64} | kw))


def greedy(new: int = 6) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)


def tokens(model, prompts, config=None) -> list[list[int]]:
    out = model.generate_batch(
        prompts, generation_config=greedy(), continuous_batching_config=config or cb(), progress_bar=False
    )
    return [list(out[k].generated_tokens) for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]


def block_bytes(model) -> int:
    """Host bytes of one store block of the tiny float32 models (every layer's K and V)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * BLOCK * 4


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def reference(llama) -> list[list[int]]:
    return tokens(llama, PROMPTS)


@pytest.mark.parametrize("sharing", [False, True], ids=["store-alone", "with-transformers-sharing"])
def test_remembered_system_prompt_is_computed_once(llama, reference, sharing):
    with pie_rs.attach(llama) as pool:
        pool.prefix_store(remember_prompts=True)
        first = tokens(llama, PROMPTS, cb(allow_block_sharing=sharing))
        stored = pool.stats()
        second = tokens(llama, PROMPTS, cb(allow_block_sharing=sharing))
        stats = pool.stats()
    assert first == reference and second == reference
    # The first run stores the system prompt's two whole blocks (and each prompt's tail blocks: none,
    # a prompt of 39 tokens has two whole blocks, the ones of the system prompt).
    assert stored["prefix_blocks"] == 2 and stored["prefix_bytes"] == 2 * block_bytes(llama)
    serve = stats["serving"]
    assert serve["prefix_lookups"] == len(PROMPTS)
    if sharing:
        # transformers shares the first request's blocks with the others: the store fills the first.
        assert serve["prefix_hits"] == 1 and serve["prefix_tokens_reused"] == 2 * BLOCK
    else:
        assert serve["prefix_hits"] == len(PROMPTS) and serve["prefix_tokens_reused"] == len(PROMPTS) * 2 * BLOCK
    assert stats["prefix_hits"] - stored["prefix_hits"] == serve["prefix_hits"]
    assert stats["prefix_tokens_reused"] - stored["prefix_tokens_reused"] == serve["prefix_tokens_reused"]


def test_registered_prefix_serves_pooled_layers_and_mixed_batches(llama):
    prompts = [
        [*SYSTEM, 5, 6],  # hit: two blocks
        [*OTHER, 7, 8],  # miss: another prefix
        [*SYSTEM[:20], 9],  # hit: one block (the second is not whole in this prompt)
        [*SYSTEM[:16]],  # miss: a whole block, but the last prompt token is always computed
        [4, 5, 6],  # miss: shorter than a block
    ]
    expected = tokens(llama, prompts)
    # 600 rows' worth of one layer, every layer pooled: the copies land in host rows and staging.
    row = 2 * llama.config.num_key_value_heads * (llama.config.hidden_size // llama.config.num_attention_heads) * 4
    with pie_rs.attach(llama, gpu_budget=600 * row, objective="memory") as pool:
        assert pool.cache_prefix(SYSTEM) == 2 * BLOCK
        got = tokens(llama, prompts, cb(allow_block_sharing=False, num_blocks=None))
        stats = pool.stats()
    assert got == expected
    serve = stats["serving"]
    assert serve["pooled_layers"] == llama.config.num_hidden_layers and serve["h2d_bytes"] > 0
    assert serve["prefix_lookups"] == len(prompts) and serve["prefix_hits"] == 2
    assert serve["prefix_tokens_reused"] == 3 * BLOCK
    # Without remember_prompts nothing computed by serving is stored.
    assert serve["prefix_tokens_stored"] == 0 and stats["prefix_blocks"] == 2


def test_eviction_under_a_tiny_limit_never_fails_a_request(llama):
    prompts = [[*SYSTEM, 1], [*OTHER, 2], [*SYSTEM, 3], [*OTHER[:20], 4]]
    expected = tokens(llama, prompts)
    with pie_rs.attach(llama) as pool:
        store = pool.prefix_store(max_bytes=block_bytes(llama) + 100, remember_prompts=True)
        for _ in range(2):
            assert tokens(llama, prompts, cb(allow_block_sharing=False)) == expected
            assert store.bytes <= store.max_bytes
        stats = pool.stats()
        pool.prefix_store(max_bytes=0)  # nothing fits: every request computes its whole prompt
        assert tokens(llama, prompts, cb(allow_block_sharing=False)) == expected
        after = pool.stats()
    assert stats["prefix_evictions"] > 0 and stats["prefix_blocks"] == 1
    assert stats["prefix_hits"] > 0
    assert after["prefix_blocks"] == 0 and after["serving"]["prefix_hits"] == 0


def test_serving_fills_the_store_that_generate_reuses(llama):
    suffix = torch.tensor([[*SYSTEM, 21, 22, 23]])
    with pie_rs.attach(llama) as pool:
        plain = llama.generate(suffix, max_new_tokens=5, do_sample=False, pad_token_id=0)
        pool.prefix_store(remember_prompts=True)
        tokens(llama, PROMPTS[:1])
        before = pool.stats()["prefix_hits"]
        reused = llama.generate(suffix, max_new_tokens=5, do_sample=False, pad_token_id=0)
        after = pool.stats()
    assert torch.equal(reused, plain)
    assert after["prefix_hits"] == before + 1 and after["prefix_tokens_reused"] >= 2 * BLOCK


def test_sliding_window_models_serve_without_a_store():
    model = make_model("mistral_sliding")
    model.set_attn_implementation("sdpa")
    prompts = [[*SYSTEM, 1], [*SYSTEM, 2]]
    expected = tokens(model, prompts)
    with pie_rs.attach(model) as pool:
        with pytest.raises(pie_rs.ConfigError, match="sliding-window"):
            pool.prefix_store(remember_prompts=True)
        assert tokens(model, prompts) == expected
        assert pool.stats()["serving"]["prefix_lookups"] == 0


def test_forking_requests_keep_two_prompt_tokens_to_compute(llama):
    # 33 tokens: the store could cover 32 and leave one, but a request that forks computes all but its
    # last prompt token before the fork; it is left two (the match stops a block earlier).
    prompts = [[*SYSTEM[:32], 3], [*SYSTEM[:32], 4]]
    # Sampling from the top token only: forks need do_sample, the tokens must not depend on the draws.
    gen = GenerationConfig(
        max_new_tokens=4, do_sample=True, top_k=1, eos_token_id=-1, pad_token_id=0, num_return_sequences=2
    )

    def run() -> dict[str, object]:
        out = llama.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb(), progress_bar=False)
        return {k: (list(v.generated_tokens), v.error) for k, v in out.items()}

    expected = run()
    with pie_rs.attach(llama) as pool:
        pool.cache_prefix(SYSTEM[:32])
        got = run()
        serve = pool.stats()["serving"]
    assert len(got) == 4 and all(error is None for _, error in got.values())
    assert got == expected
    assert serve["prefix_hits"] >= 1 and serve["prefix_tokens_reused"] % BLOCK == 0
    assert serve["prefix_tokens_reused"] <= len(prompts) * BLOCK


def test_preempted_requests_with_stored_prefixes_stay_exact(llama, reference):
    # 10 blocks of 8 tokens: one 45-token request needs 6, so three at once preempt (soft reset
    # and re-prefill, which consults the store again).
    small = cb(num_blocks=10, allow_block_sharing=False)
    row = 2 * llama.config.num_key_value_heads * (llama.config.hidden_size // llama.config.num_attention_heads) * 4
    with pie_rs.attach(llama, gpu_budget=600 * row, objective="memory") as pool:
        pool.prefix_store(remember_prompts=True)
        assert tokens(llama, PROMPTS, small) == reference
        assert tokens(llama, PROMPTS, small) == reference
        serve = pool.stats()["serving"]
    assert serve["preemptions"] > 0 and serve["prefix_hits"] >= len(PROMPTS)


def test_a_running_manager_reuses_a_prompt_it_computed(llama, reference):
    with pie_rs.attach(llama) as pool:
        pool.prefix_store(remember_prompts=True)
        manager = llama.init_continuous_batching(
            generation_config=greedy(), continuous_batching_config=cb(allow_block_sharing=False)
        )
        manager.start()
        results = {}
        try:
            deadline = time.time() + 60
            for i, prompt in enumerate(PROMPTS):  # one after the other: each starts once the last is done
                manager.add_request(prompt, request_id=f"req_{i}")
                while f"req_{i}" not in results:
                    out = manager.get_result(request_id=f"req_{i}", timeout=1)
                    if out is not None and out.is_finished():
                        results[out.request_id] = list(out.generated_tokens)
                    assert time.time() < deadline
        finally:
            manager.stop(block=True)
        stats = pool.stats()
    assert [results[f"req_{i}"] for i in range(len(PROMPTS))] == reference
    # The first request computed the system prompt and stored it; the later ones took it.
    assert stats["prefix_hits"] == len(PROMPTS) - 1 and stats["prefix_tokens_reused"] == (len(PROMPTS) - 1) * 2 * BLOCK
    assert stats["serving"]["prefix_tokens_stored"] == 2 * BLOCK
