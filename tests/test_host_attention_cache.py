"""Host attention through the cache: ``attach(host_attention=...)`` against transformers' DynamicCache.

A host-attended layer's KV never leaves host memory: its attention is the host kernel's partial
over the past tokens merged (log-sum-exp) with the device's partial over the new ones. These tests
hold it to token identity with ``DynamicCache`` (fp32) and to a stated logits tolerance (bf16).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, GenerationConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import pie_rs
from pie_rs import serving
from pie_rs._host_io import HostWrites
from pie_rs._model import cache_keyword, inspect_model

from helpers import expanded_batch, generate, half_pooled_budget
from models import make_inputs, make_model

MAX_NEW = 10
PROMPT = 7
#: Families with GQA (4 query heads over 2 KV heads), a sliding window on every layer
#: (mistral_sliding: nothing engine-managed), and sliding/full mixes (gemma2 soft-caps its logits).
FAMILIES = ["llama", "qwen2", "mistral_sliding", "gemma2", "gemma3", "phi3"]
#: Largest |logit difference| allowed for bf16 against DynamicCache in bf16 (logits of order 1;
#: bf16 keeps 8 bits of mantissa, and the split computes in float32 where sdpa rounds to bf16).
BF16_LOGITS_TOL = 0.02
#: The same for fp32 (the split sums in another order than sdpa).
FP32_LOGITS_TOL = 1e-5


def _pinned(managed: list[int], share: str) -> list[int]:
    return managed if share == "all" else managed[1::2] or managed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("share", ["half", "all"])
def test_generate_matches_dynamic_cache(family: str, mode: str, share: str) -> None:
    model = make_model(family)
    inputs = make_inputs(4, PROMPT)  # left padding of 1..3 tokens on rows 1..3
    expected = generate(model, inputs, mode)
    managed = inspect_model(model).managed
    pinned = _pinned(managed, share)
    with pie_rs.attach(model, pooled_layers=pinned or None, prefetch_depth=1, host_attention="always") as pool:
        got = generate(model, inputs, mode)
        stats = pool.stats()
    assert torch.equal(got, expected), (got, expected)
    assert stats["host_attended_layers"] == pinned
    # Every host-attended layer ran on the host at every step, and nothing was copied for it.
    assert stats["host_attended_layer_steps"] == len(pinned) * MAX_NEW
    assert stats["h2d_bytes"] == 0
    if pinned:
        assert stats["host_attention_seconds"] > 0
        assert stats["pooled_layers"] == len(pinned)
    assert torch.equal(generate(model, inputs, mode), expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_budget_pooled_layers_are_host_attended(family: str) -> None:
    model = make_model(family)
    inputs = make_inputs(2, PROMPT)
    expected = generate(model, inputs, "greedy")
    budget = half_pooled_budget(model, expanded_batch(2, "greedy"), PROMPT + MAX_NEW)
    with pie_rs.attach(model, gpu_budget=budget, host_attention="always") as pool:
        got = generate(model, inputs, "greedy")
        stats = pool.stats()
        # The policy thread's per-step samples carry the placement too.
        engine = pool.kept_engine
        assert engine is not None
        engine.flush_telemetry()
        sample = engine.last_sample()
        assert sample is not None and sample["host_attended"] == sample["pooled_layers"] != []
    assert torch.equal(got, expected)
    managed = inspect_model(model).managed
    # The budget pools half the layers when copied; attended on the host they need no staging
    # slots, so the policy's host-sized fit pools fewer (at least one).
    assert 1 <= stats["pooled_layers"] <= len(managed) / 2
    # Every pooled layer (``pooled`` counts engine layers) is host-attended (model layer indices).
    assert stats["host_attended_layers"] == [managed[e] for e in stats["pooled"]]
    assert stats["host_attended_layers"]
    assert stats["peak_device_kv_bytes"] <= budget


def _logits(
    model: torch.nn.Module, cache: Any, chunks: list[torch.Tensor], mask: torch.Tensor, seen: int = 0
) -> list[torch.Tensor]:
    """Logits of a hand-written forward loop feeding ``chunks`` in turn (prefill, prefill with past, decode).

    ``seen``: tokens the cache already holds (``mask`` covers the prompt, later tokens attend).
    """
    out = []
    with torch.no_grad():
        for ids in chunks:
            seen += ids.shape[1]
            pad = torch.ones(mask.shape[0], seen - mask.shape[1], dtype=mask.dtype)
            kwargs = {cache_keyword(model): cache}
            res = model(input_ids=ids, attention_mask=torch.cat([mask, pad], dim=1), use_cache=True, **kwargs)
            out.append(res.logits.float())
    return out


def _chunks(batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    inputs = make_inputs(batch, PROMPT)
    gen = torch.Generator().manual_seed(5)
    rest = [torch.randint(3, 100, (batch, n), generator=gen) for n in (3, 1, 1, 2, 1, 1)]
    return [inputs["input_ids"], *rest], inputs["attention_mask"]


@pytest.mark.parametrize(
    ("family", "dtype", "tol"),
    [
        ("llama", torch.float32, FP32_LOGITS_TOL),
        ("gemma2", torch.float32, FP32_LOGITS_TOL),
        ("llama", torch.bfloat16, BF16_LOGITS_TOL),
    ],
)
def test_logits_within_tolerance_with_prefill_on_a_past(family: str, dtype: torch.dtype, tol: float) -> None:
    model = make_model(family).to(dtype)
    chunks, mask = _chunks(3)
    expected = _logits(model, DynamicCache(config=model.config), chunks, mask)
    managed = inspect_model(model).managed
    with pie_rs.attach(model, pooled_layers=managed, prefetch_depth=1, host_attention="always") as pool:
        cache = pool.new_cache()
        got = _logits(model, cache, chunks, mask)
        stats = cache.stats()
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        diff = (g - e).abs().max().item()
        assert diff <= tol, f"step {step}: logits differ by {diff} (tolerance {tol})"
    assert stats["host_attended_layer_steps"] == len(managed) * len(chunks)


def test_plans_moving_layers_between_host_and_copy_keep_the_tokens() -> None:
    """Any subset of the pooled layers host-attended, changing between steps: no data moves."""
    model = make_model("llama", layers=6)
    chunks, mask = _chunks(2)
    chunks = chunks + [torch.full((2, 1), 7 + i) for i in range(6)]
    expected = _logits(model, DynamicCache(config=model.config), chunks, mask)
    pooled = [0, 2, 3, 5]
    subsets = [[0, 2, 3, 5], [], [3], [0, 5], [2, 3, 5], [0], [], [0, 2, 3, 5]]
    with pie_rs.attach(model, pooled_layers=pooled, prefetch_depth=2, host_attention="always") as pool:
        cache = pool.new_cache()
        got = []
        seen = 0
        with torch.no_grad():
            for i, ids in enumerate(chunks):
                if cache.engine is not None:
                    cache.engine.set_plan(pooled, 2, host_attended=subsets[i % len(subsets)])
                seen += ids.shape[1]
                pad = torch.ones(2, seen - mask.shape[1], dtype=mask.dtype)
                res = model(input_ids=ids, attention_mask=torch.cat([mask, pad], 1), **{cache_keyword(model): cache})
                got.append(res.logits)
                assert cache.engine.plan()["host_attended"] == subsets[i % len(subsets)] or i == 0
        stats = cache.stats()
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max().item() <= FP32_LOGITS_TOL
    assert stats["plan_changes"] >= 5
    assert 0 < stats["host_attended_layer_steps"] < len(pooled) * len(chunks)


def test_unknown_host_attention_is_refused_at_attach() -> None:
    model = make_model("llama")
    for bad in ("sometimes", "Always", "", None, 1):
        with pytest.raises(pie_rs.ConfigError, match='"auto", "never" or "always"'):
            pie_rs.attach(model, host_attention=bad)  # type: ignore[arg-type]
    # Nothing was attached: the model attaches normally afterwards.
    with pie_rs.attach(model, host_attention="never") as pool:
        assert pool.stats()["host_attended_layers"] == []


def test_auto_on_the_host_backend_copies_and_query_group_is_checked() -> None:
    """On the host backend the "device" is this CPU (no link to save): "auto" plans within the budget and copies."""
    from pie_rs import _core

    layers = [(2, 2, 64, 64, 4)] * 4
    layer_bytes = _core.layer_geometry(2, 2, 64, 64, 4, 256)["bytes"]
    engine = _core.Engine("host", layers, 256, budget_bytes=3 * layer_bytes, host_attention="auto", query_group=4)
    try:
        plan = engine.plan()
        assert plan["host_attention"] == "auto"
        assert plan["pooled_layers"], plan  # 3 of 4 layers fit: something is pooled
        assert plan["host_attended"] == []
    finally:
        engine.close()
    with pytest.raises(pie_rs.ConfigError, match="query_group must be at least 1"):
        _core.Engine("host", layers, 256, host_attention="auto", query_group=0)


def test_default_attach_on_the_host_backend_is_bit_exact_and_copies(llama, inputs) -> None:
    """The default ("auto") pools by the budget and copies on the host backend, decode after decode."""
    budget = half_pooled_budget(llama, inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 24)
    with pie_rs.attach(llama, gpu_budget=budget) as pool:
        out = llama.generate(**inputs, max_new_tokens=24, do_sample=False)
        stats = pool.stats()
    assert stats["host_attended_layers"] == [] and stats["host_attended_layer_steps"] == 0
    assert stats["pooled_layers"] >= 1 and stats["h2d_bytes"] > 0  # pooled, and copied
    plain = llama.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, plain)


def test_always_on_attention_it_cannot_split_is_refused_at_attach() -> None:
    model = make_model("llama")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(pie_rs.ConfigError, match=r"host_attention='always' cannot serve this model.*flex_attention"):
        pie_rs.attach(model, host_attention="always")
    # "auto" serves it with copies only, and the model is unchanged.
    with pie_rs.attach(model, host_attention="auto") as pool:
        assert pool.stats()["host_attended_layers"] == []
    assert model.config._attn_implementation == "flex_attention"


def test_detach_restores_attention() -> None:
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    llama, gemma = make_model("llama"), make_model("gemma2")
    with pie_rs.attach(llama, host_attention="always"), pie_rs.attach(gemma, host_attention="always"):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa
        assert gemma.config._attn_implementation != "eager"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    assert gemma.config._attn_implementation == "eager"
    with pie_rs.attach(llama, host_attention="never"):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa


@pytest.mark.skipif(serving.serving_supported() is not None, reason="pie-rs serving needs transformers >= 5.24")
def test_continuous_batching_refuses_always_on_eager_and_serves_under_auto() -> None:
    """Host attention in continuous batching splits 'sdpa' (tests/test_serving_host_attention.py)."""
    model = make_model("llama")
    model.set_attn_implementation("eager")  # the split switches an eager config; serving needs it back
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompts = [[3, 4, 5, 6], [7, 8]]

    def run() -> dict[str, list[int]]:
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False)
        return {k: list(v.generated_tokens) for k, v in out.items()}

    expected = run()
    with (
        pie_rs.attach(model, host_attention="always"),
        pytest.raises(pie_rs.ConfigError, match="attends on the host through 'sdpa'"),
    ):
        model.init_continuous_batching(generation_config=config)._create_batch_processor()
    with pie_rs.attach(model, host_attention="auto"):
        assert run() == expected


def test_parked_and_copied_caches_come_back_into_host_buffers() -> None:
    """A parked cache (or a copy) is loaded back through the engine: host-attended layers into host memory."""
    model = make_model("qwen2")
    chunks, mask = _chunks(2)
    expected = _logits(model, DynamicCache(config=model.config), chunks, mask)
    managed = inspect_model(model).managed
    with pie_rs.attach(model, pooled_layers=managed[::2], prefetch_depth=1, host_attention="always") as pool:
        cache = pool.new_cache()
        first = _logits(model, cache, chunks[:3], mask)
        twin = cache.copy()
        cache.park()
        assert cache.parked
        seen = sum(c.shape[1] for c in chunks[:3])
        tail = _logits(model, cache, chunks[3:], mask, seen)
        assert not cache.parked
        twin_tail = _logits(model, twin, chunks[3:], mask, seen)
        stats = cache.stats()
    for g, e in zip(first + tail, expected, strict=True):
        assert (g - e).abs().max().item() <= FP32_LOGITS_TOL
    for g, e in zip(twin_tail, expected[3:], strict=True):
        assert (g - e).abs().max().item() <= FP32_LOGITS_TOL
    assert stats["host_attended_layers"] == managed[::2]


def test_staged_host_writes_land_in_order_before_they_are_read() -> None:
    """The bookkeeping shared with CUDA (where staging is a non-blocking copy and an event)."""
    arena = torch.zeros(3, 2)
    placed: list[int] = []

    def at(row: int):
        def place(key: torch.Tensor, value: torch.Tensor) -> None:
            arena[row].copy_(key + value)
            placed.append(row)

        return place

    writes = HostWrites()
    writes.stage(0, torch.ones(2), torch.ones(2), at(0))
    writes.stage(1, torch.full((2,), 3.0), torch.zeros(2), at(1))
    assert bool(writes) and not arena.any()  # nothing lands until flushed
    writes.flush(1)
    assert arena[1].tolist() == [3.0, 3.0] and not arena[0].any()
    # A layer's next step places its earlier rows first.
    writes.stage(0, torch.full((2,), 5.0), torch.zeros(2), at(2))
    assert arena[0].tolist() == [2.0, 2.0] and not arena[2].any()
    writes.flush()
    assert arena[2].tolist() == [5.0, 5.0] and placed == [1, 0, 2] and not writes
    writes.stage(0, torch.ones(2), torch.ones(2), at(0))
    writes.drop()  # the arena is gone: nothing lands
    writes.flush()
    assert placed == [1, 0, 2]


def test_no_host_write_outlives_its_layer_call() -> None:
    """Only the open layer may have rows in flight: each lands before the engine hears the layer is done."""
    model = make_model("llama")
    chunks, mask = _chunks(2)
    managed = inspect_model(model).managed
    with pie_rs.attach(model, pooled_layers=managed, prefetch_depth=1, host_attention="always") as pool:
        cache = pool.new_cache()
        shared = cache._shared
        in_flight: list[set[int]] = []
        opened: list[int | None] = []
        original = shared.begin

        def begin(e: int) -> None:
            in_flight.append(set(shared.host_writes._pending))
            opened.append(shared.open)
            original(e)

        shared.begin = begin  # type: ignore[method-assign]
        _logits(model, cache, chunks[:3], mask)
        shared.finish_step()
        assert not shared.host_writes
    # Rows were staged, not copied at once: a first prefill (no split to place them) keeps its
    # rows in flight until the layer is done.
    assert any(in_flight)
    assert all(pending <= {layer} for pending, layer in zip(in_flight, opened, strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_cuda_host_attention_matches_dynamic_cache(family: str, mode: str) -> None:
    """On CUDA: the staged non-blocking K/V copies, the query's round trip and the merge on the device."""
    model = make_model(family, device="cuda")
    inputs = make_inputs(4, PROMPT, device="cuda")
    expected = generate(model, inputs, mode)
    managed = inspect_model(model).managed
    with pie_rs.attach(model, pooled_layers=managed, prefetch_depth=1, host_attention="always") as pool:
        assert pool.backend == "cuda"
        got = generate(model, inputs, mode)
        stats = pool.stats()
    assert torch.equal(got, expected)
    assert stats["host_attended_layer_steps"] == len(managed) * MAX_NEW and stats["h2d_bytes"] == 0
