"""The geometry and fit answers of ``_core`` agree with where the engine puts data and what it fits."""

from __future__ import annotations

import itertools

import pytest
import torch

import pie_rs
from pie_rs import _core
from pie_rs._views import Geometry, geometry

BATCH, HEADS, K_DIM, V_DIM, ELEM = 2, 3, 4, 5, 4
SPEC = (BATCH, HEADS, K_DIM, V_DIM, ELEM)


def _kv(region: _core.Region, offset: int, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the slot at ``offset`` of an arena region, placed by ``g`` alone."""
    typed = torch.from_dlpack(region)
    typed = typed[: typed.numel() // ELEM * ELEM].view(torch.float32)
    base = offset // ELEM
    return (
        typed.as_strided(g.k_shape, g.k_strides, base + g.k_offset // ELEM),
        typed.as_strided(g.v_shape, g.v_strides, base + g.v_offset // ELEM),
    )


def _step(engine: _core.Engine, states: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
    """One step writing ``states[l]`` after ``n`` tokens of every layer, through geometry views."""
    g = geometry(*SPEC, engine.capacity)
    for layer, (k, v) in enumerate(states):
        engine.layer_begin(layer, 0)
        offset = engine.layer_ready(layer, 0)
        kv, vv = _kv(engine.device_region(), offset, g)
        new = k.shape[2]
        kv[:, :, n : n + new].copy_(k)
        vv[:, :, n : n + new].copy_(v)
        engine.layer_written(layer, new, 0)
        engine.layer_done(layer, 0)


def _read(engine: _core.Engine, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s first ``n`` tokens where the engine keeps them, read back by ``layer_view``."""
    view = engine.layer_view(layer)
    g = Geometry.of(view)
    if view["device_offset"] is not None:
        k, v = _kv(engine.device_region(), view["device_offset"], g)
    else:
        k, v = _kv(engine.host_region(), view["host_offset"], g)
    return k[:, :, :n].clone(), v[:, :, :n].clone()


def _states(layers: int, tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, tokens)
    return [
        (torch.randn(*shape, K_DIM, generator=gen), torch.randn(*shape, V_DIM, generator=gen)) for _ in range(layers)
    ]


def test_layer_geometry_is_k_then_v_contiguous_and_aligned() -> None:
    g = _core.layer_geometry(*SPEC, 16)
    k_bytes = BATCH * HEADS * 16 * K_DIM * ELEM
    assert g["k_offset"] == 0 and g["v_offset"] == k_bytes
    assert g["k_shape"] == [BATCH, HEADS, 16, K_DIM] and g["v_shape"] == [BATCH, HEADS, 16, V_DIM]
    assert g["k_strides"] == [HEADS * 16 * K_DIM, 16 * K_DIM, K_DIM, 1]
    assert g["bytes"] == k_bytes + BATCH * HEADS * 16 * V_DIM * ELEM
    assert g["slot_bytes"] % _core.SLOT_ALIGN == 0 and 0 <= g["slot_bytes"] - g["bytes"] < _core.SLOT_ALIGN
    assert g["capacity"] == 16


def test_resident_slots_lie_slot_bytes_apart() -> None:
    engine = _core.Engine("host", [SPEC] * 3, 16, policy="static")
    try:
        slot = geometry(*SPEC, 16).slot_bytes
        offsets = [engine.device_offset(layer) for layer in range(3)]
        assert [b - a for a, b in itertools.pairwise(offsets)] == [slot, slot]
        assert engine.stats()["device_kv_bytes"] == 3 * slot
    finally:
        engine.close()


@pytest.mark.parametrize("pooled", [[], [0, 2], [0, 1, 2]])
def test_views_from_geometry_write_where_the_engine_keeps_the_data(pooled: list[int]) -> None:
    """Written through views placed by ``layer_geometry``, read back where ``layer_view`` says:
    pooled layers come back through the engine's own write-back copies into the host arena,
    and after growth through its relayout copies."""
    engine = _core.Engine("host", [SPEC] * 3, 16, pooled_layers=pooled or None, prefetch_depth=1)
    try:
        prefill, decode = _states(3, 5, seed=1), _states(3, 1, seed=2)
        _step(engine, prefill, 0)
        _step(engine, decode, 5)
        engine.quiesce()
        for layer in range(3):
            k, v = _read(engine, layer, 6)
            assert torch.equal(k, torch.cat([prefill[layer][0], decode[layer][0]], dim=2))
            assert torch.equal(v, torch.cat([prefill[layer][1], decode[layer][1]], dim=2))
            assert (engine.layer_view(layer)["host_offset"] is not None) == (layer in pooled)
        engine.resume()
        assert engine.ensure_capacity(17)
        assert engine.capacity == 32
        engine.quiesce()
        for layer in range(3):
            k, _ = _read(engine, layer, 6)
            assert engine.layer_view(layer)["k_shape"][2] == 32
            assert torch.equal(k, torch.cat([prefill[layer][0], decode[layer][0]], dim=2))
        engine.resume()
    finally:
        engine.close()


@pytest.mark.parametrize("pooled", [[], [1], [0, 1, 2]])
@pytest.mark.parametrize("indices", [[1, 1], [1, 0], [0, 0]])
def test_engine_reorder_gathers_the_batch(pooled: list[int], indices: list[int]) -> None:
    engine = _core.Engine("host", [SPEC] * 3, 16, pooled_layers=pooled or None, prefetch_depth=1)
    try:
        states = _states(3, 7, seed=3)
        _step(engine, states, 0)
        engine.reorder(indices, 0)
        engine.quiesce()
        idx = torch.tensor(indices)
        for layer, (k, v) in enumerate(states):
            got_k, got_v = _read(engine, layer, 7)
            assert torch.equal(got_k, k[idx]) and torch.equal(got_v, v[idx])
        engine.resume()
        for bad in ([0], [0, 2], [-1, 0]):
            with pytest.raises(pie_rs.ConfigError, match="reorder indices"):
                engine.reorder(bad, 0)
    finally:
        engine.close()


def test_growth_is_the_engines_rule() -> None:
    engine = _core.Engine("host", [SPEC] * 2, 16)
    try:
        assert not engine.ensure_capacity(16)
        assert engine.ensure_capacity(17) and engine.capacity == 32  # doubles
        assert engine.ensure_capacity(100) and engine.capacity == _core.round_capacity(100) == 112
    finally:
        engine.close()


def test_round_capacity() -> None:
    q = _core.CAPACITY_QUANTUM
    assert [_core.round_capacity(t) for t in (0, 1, q, q + 1)] == [q, q, q, 2 * q]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fit_plan_is_what_a_static_engine_chooses(depth: int) -> None:
    layers = [SPEC] * 6
    slot = geometry(*SPEC, 32).slot_bytes
    for budget in [None, *range(slot // 2, 7 * slot, slot // 3)]:
        try:
            fit = _core.fit_plan(layers, 32, budget, depth)
        except pie_rs.BudgetError as exc:
            assert budget is not None and budget < slot
            assert str(slot) in str(exc)  # the message states the minimum
            with pytest.raises(pie_rs.BudgetError):
                _core.Engine("host", layers, 32, budget_bytes=budget, policy="static", prefetch_depth=depth)
            continue
        engine = _core.Engine("host", layers, 32, budget_bytes=budget, policy="static", prefetch_depth=depth)
        try:
            plan = engine.plan()
            assert fit["pooled_layers"] == plan["pooled_layers"], budget
            assert fit["prefetch_depth"] == plan["prefetch_depth"], budget
            assert fit["device_bytes"] == engine.stats()["device_kv_bytes"], budget
            assert budget is None or fit["device_bytes"] <= budget
            assert fit["device_bytes"] == _core.device_bytes(layers, 32, fit["pooled_layers"], fit["prefetch_depth"])
        finally:
            engine.close()


def test_an_adaptive_engine_fits_where_fit_plan_does() -> None:
    """The adaptive policy picks its own plan (it may pool more for a deeper prefetch), but it is
    refused exactly where ``fit_plan`` finds no plan, and what it takes is ``device_bytes`` of it."""
    layers = [SPEC] * 6
    slot = geometry(*SPEC, 32).slot_bytes
    for budget in [slot - 1, slot, *range(2 * slot, 7 * slot, slot)]:
        try:
            _core.fit_plan(layers, 32, budget, 1)
        except pie_rs.BudgetError:
            with pytest.raises(pie_rs.BudgetError):
                _core.Engine("host", layers, 32, budget_bytes=budget)
            continue
        engine = _core.Engine("host", layers, 32, budget_bytes=budget)
        try:
            plan = engine.plan()
            need = _core.device_bytes(layers, 32, plan["pooled_layers"], plan["prefetch_depth"])
            assert need == engine.stats()["device_kv_bytes"] <= budget
        finally:
            engine.close()


def test_device_bytes_of_a_pinned_plan_is_what_the_engine_takes() -> None:
    layers = [SPEC, (BATCH, HEADS, 8, 8, ELEM), SPEC, SPEC]
    engine = _core.Engine("host", layers, 48, pooled_layers=[1, 3], prefetch_depth=2)
    try:
        assert _core.device_bytes(layers, 48, [1, 3], 2) == engine.stats()["device_kv_bytes"]
    finally:
        engine.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda: _core.layer_geometry(0, HEADS, K_DIM, V_DIM, ELEM, 16),
        lambda: _core.layer_geometry(-1, HEADS, K_DIM, V_DIM, ELEM, 16),
        lambda: _core.layer_geometry(True, HEADS, K_DIM, V_DIM, ELEM, 16),
        lambda: _core.layer_geometry(BATCH, HEADS, K_DIM, V_DIM, 3, 16),
        lambda: _core.layer_geometry(BATCH, HEADS, K_DIM, V_DIM, ELEM, 2**62),
        lambda: _core.layer_geometry(BATCH, HEADS, K_DIM, V_DIM, ELEM, 1.5),
        lambda: _core.round_capacity(-1),
        lambda: _core.fit_plan([], 16, None, 1),
        lambda: _core.fit_plan([SPEC], 0, None, 1),
        lambda: _core.fit_plan([SPEC], 16, None, 0),
        lambda: _core.fit_plan([SPEC], 16, -5, 1),
        lambda: _core.fit_plan([(1, 2, 3)], 16, None, 1),
        lambda: _core.fit_plan("layers", 16, None, 1),
        lambda: _core.fit_plan([SPEC] * 2, 2**60, 10, 1),
        lambda: _core.device_bytes([SPEC] * 2, 16, [1, 0], 1),
        lambda: _core.device_bytes([SPEC] * 2, 16, [2], 1),
        lambda: _core.device_bytes([SPEC] * 2, 16, [0], 0),
        lambda: _core.device_bytes([SPEC] * 2, 16, None, 1),
    ],
)
def test_bad_inputs_are_config_errors(call) -> None:
    with pytest.raises(pie_rs.ConfigError):
        call()
