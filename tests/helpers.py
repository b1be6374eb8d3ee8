"""Shared test helpers: budgets that pool a given share of layers, generation runners."""

from __future__ import annotations

from typing import Any

import torch

import pie_rs
from pie_rs._model import MANAGED, SLIDING, inspect_model
from pie_rs.cache import _round_capacity

SLOT_ALIGN = 256


def _align(n: int) -> int:
    return (n + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


def layer_bytes(model: torch.nn.Module, batch: int, capacity: int, elem: int = 4) -> int:
    """Bytes of one engine slot at ``capacity`` tokens (after the cache's rounding)."""
    info = inspect_model(model)
    li = next(li for li in info.layers if li.kind == MANAGED)
    return _align(batch * li.kv_heads * _round_capacity(capacity) * (li.k_dim + li.v_dim) * elem)


def sliding_bytes(model: torch.nn.Module, batch: int, capacity: int, elem: int = 4) -> int:
    info = inspect_model(model)
    cap = _round_capacity(capacity)
    return sum(
        batch * li.kv_heads * min(cap, li.sliding_window or cap) * (li.k_dim + li.v_dim) * elem
        for li in info.layers
        if li.kind == SLIDING
    )


def half_pooled_budget(model: torch.nn.Module, batch: int, capacity: int) -> int:
    """A budget under which the engine must pool at least half the managed layers.

    Pooling ``c`` of ``M`` layers with one staging slot needs ``M - c + 1`` slots, so the budget
    holds exactly that for ``c = ceil(M / 2)`` (below ``M`` slots when ``M >= 3``).
    """
    managed = len(inspect_model(model).managed)
    assert managed >= 3, "pooling saves memory only with 3 or more engine-managed layers"
    slot = layer_bytes(model, batch, capacity)
    pooled = -(-managed // 2)
    return (managed - pooled + 1) * slot + sliding_bytes(model, batch, capacity)


def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, **kwargs: Any) -> torch.Tensor:
    """One generate call in a given decoding ``mode`` (greedy, sample, beam)."""
    args: dict[str, Any] = dict(max_new_tokens=10, pad_token_id=0)
    if mode == "greedy":
        args.update(do_sample=False)
    elif mode == "sample":
        args.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    elif mode == "beam":
        args.update(do_sample=False, num_beams=4, num_return_sequences=2, early_stopping=False)
    else:  # pragma: no cover
        raise ValueError(mode)
    args.update(kwargs)
    torch.manual_seed(1234)
    return model.generate(**inputs, **args)


def expanded_batch(batch: int, mode: str) -> int:
    return batch * 4 if mode == "beam" else batch


def assert_pool_ok(pool: pie_rs.Pool, *, min_pooled: int = 0, budget: int | None = None) -> dict[str, Any]:
    stats = pool.stats()
    assert stats["pooled_layers"] >= min_pooled, stats
    if budget is not None:
        assert stats["peak_device_kv_bytes"] <= budget, stats
    assert stats["steps"] > 0, stats
    return stats
