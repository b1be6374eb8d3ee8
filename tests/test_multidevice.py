"""A model split across devices by layers: an engine per device behind one Pool.

On CPU the split is faked (``device_groups`` returns two groups of layers, both on ``cpu``), which
runs the same facade logic as two GPUs: two host-backend engines, each holding only its own
layers' KV, each with its own budget and plan. ``tests/test_cuda.py`` style checks on real GPUs
run from ``benches/gpu/run.sh`` on machines with more than one GPU (``benches/gpu/multi_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch

import pie_rs
from pie_rs import _core, multidevice
from pie_rs._model import inspect_model

from helpers import generate
from models import make_inputs, make_model

PROMPT, MAX_NEW = 7, 10


@pytest.fixture
def split(monkeypatch):
    """Layers 0-2 on one "device", 3-5 on the other (both the CPU)."""

    def groups(info):
        cpu = torch.device("cpu")
        return [(cpu, [0, 1, 2]), (cpu, [3, 4, 5])]

    monkeypatch.setattr(multidevice, "device_groups", groups)


def llama6() -> torch.nn.Module:
    return make_model("llama", layers=6)


def two_pooled_per_device_budget(model, batch: int) -> int:
    """Device bytes of one device's three layers with two of them pooled (one staging slot)."""
    info = inspect_model(model)
    layers = [(batch, info.layers[0].kv_heads, info.layers[0].k_dim, info.layers[0].v_dim, 4)] * 3
    cap = _core.round_capacity(PROMPT + MAX_NEW)
    budget = _core.device_bytes(layers, cap, [0, 2], 1)
    assert budget < _core.device_bytes(layers, cap, [], 0)
    return int(budget)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_tokens_identical_with_an_engine_per_device(split, mode) -> None:
    model = llama6()
    inputs = make_inputs(2, PROMPT)
    expected = generate(model, inputs, mode)
    batch = 8 if mode == "beam" else 2
    with pie_rs.attach(model, gpu_budget=two_pooled_per_device_budget(model, batch)) as pool:
        assert isinstance(pool, multidevice.MultiDevicePool)
        assert torch.equal(generate(model, inputs, mode), expected)
        stats = pool.stats()
        assert len(stats["devices"]) == 2
        for dev in stats["devices"]:
            # Each device's engine holds its own three layers, at least two of them pooled (the
            # adaptive policy may trade the resident one for a second staging slot), within its budget.
            assert dev["resident_layers"] + dev["pooled_layers"] == 3 and dev["pooled_layers"] >= 2
            assert dev["h2d_bytes"] > 0 and dev["peak_device_kv_bytes"] <= dev["budget_bytes"]
        assert stats["pooled_layers"] >= 4 and stats["h2d_bytes"] == sum(d["h2d_bytes"] for d in stats["devices"])
        # The next generate reuses each device's kept engine.
        kept = [g.kept_engine for g in pool.device_pools]
        assert all(e is not None for e in kept) and kept[0] is not kept[1]
        assert torch.equal(generate(model, inputs, mode), expected)
        assert [g.kept_engine for g in pool.device_pools] == kept


def test_each_layer_lives_in_its_own_devices_arena(split) -> None:
    model = llama6()
    with pie_rs.attach(model) as pool, torch.no_grad():
        cache = pool.new_cache(max_length=32)
        assert isinstance(cache, multidevice.MultiDeviceCache)
        ks = [torch.randn(1, 2, 3, 16) for _ in range(6)]
        outs = [cache.update(k, k + 1, i) for i, k in enumerate(ks)]
        engines = cache.engines
        assert len(engines) == 2 and engines[0] is not engines[1]
        assert [engines[0].num_layers, engines[1].num_layers] == [3, 3]
        for i, (keys, values) in enumerate(outs):
            region = engines[i // 3].device_region()
            for t in (keys, values):
                assert region.addr <= t.data_ptr() < region.addr + region.nbytes, f"layer {i} outside its arena"
            assert torch.equal(keys, ks[i]) and torch.equal(values, ks[i] + 1)
        # Cache-wide operations reach every device's engine.
        cache.crop(-1)
        assert [cache.get_seq_length(i) for i in range(6)] == [2] * 6
        cache.batch_repeat_interleave(2)
        assert [e.num_layers for e in cache.engines] == [3, 3] and cache.max_batch_size == 2
        for i in range(6):
            assert torch.equal(cache.layers[i].keys, ks[i][:, :, :2].repeat_interleave(2, dim=0))
        cache.reorder_cache(torch.tensor([1, 0]))
        cache.reset()
        assert all(cache.get_seq_length(i) == 0 for i in range(6))


def test_budget_is_per_device(split) -> None:
    model = llama6()
    budget = two_pooled_per_device_budget(model, 2)
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        assert [g.budget_bytes for g in pool.device_pools] == [budget, budget]
    # A budget too small for a device's layers names the device, the budget and what it needs.
    match = r"device 0 \(cpu, layers \[0, 1, 2\]\): .*1000 bytes.*slot of 16384 bytes"
    with pie_rs.attach(model, gpu_budget=1000), pytest.raises(pie_rs.BudgetError, match=match):
        generate(model, make_inputs(2, PROMPT), "greedy")


def test_pinned_plan_maps_to_each_devices_engine(split) -> None:
    model = llama6()
    inputs = make_inputs(2, PROMPT)
    expected = generate(model, inputs, "greedy")
    with pie_rs.attach(model, pooled_layers=[1, 4], prefetch_depth=1) as pool:
        assert [g.settings.pooled_layers for g in pool.device_pools] == [(1,), (1,)]
        assert torch.equal(generate(model, inputs, "greedy"), expected)
        assert [d["pooled_layers"] for d in pool.stats()["devices"]] == [1, 1]


def test_one_device_is_the_ordinary_pool() -> None:
    model = make_model("llama")
    with pie_rs.attach(model) as pool:
        assert type(pool) is pie_rs.Pool


def test_host_attention_always_is_refused_for_a_split_model(split) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = llama6()
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(pie_rs.ConfigError, match="split across devices"):
        pie_rs.attach(model, host_attention="always")
    # Nothing was installed; "auto" copies on every device.
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    with pie_rs.attach(model, host_attention="auto") as pool:
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
        assert all(g.settings.host_attention == "never" for g in pool.device_pools)
