"""Shared test helpers: budgets that pool a given share of layers, generation runners."""

from __future__ import annotations

from typing import Any

import torch

import pie_rs
from pie_rs import _core
from pie_rs._engine import engine_layers, sliding_kv_bytes
from pie_rs._model import inspect_model


def layer_bytes(model: torch.nn.Module, batch: int, capacity: int) -> int:
    """Bytes of one engine slot at ``capacity`` tokens (after the cache's rounding), from ``_core``."""
    info = inspect_model(model)
    shape = engine_layers(info, batch, info.dtype.itemsize)[0]
    return int(_core.layer_geometry(*shape, _core.round_capacity(capacity))["slot_bytes"])


def sliding_bytes(model: torch.nn.Module, batch: int, capacity: int) -> int:
    """Bytes the sliding-window layers take of the budget at ``capacity`` tokens (after rounding)."""
    info = inspect_model(model)
    return sliding_kv_bytes(info, batch, _core.round_capacity(capacity), info.dtype.itemsize)


def half_pooled_budget(model: torch.nn.Module, batch: int, capacity: int) -> int:
    """A budget under which the engine must pool at least half the managed layers.

    The device bytes ``_core`` gives for ``c = ceil(M / 2)`` of ``M`` layers pooled through one
    staging slot (below ``M`` slots when ``M >= 3``), plus the sliding-window layers; checked with
    ``_core.fit_plan`` to force ``c`` pooled layers.
    """
    info = inspect_model(model)
    managed = len(info.managed)
    assert managed >= 3, "pooling saves memory only with 3 or more engine-managed layers"
    layers = engine_layers(info, batch, info.dtype.itemsize)
    cap = _core.round_capacity(capacity)
    pooled = -(-managed // 2)
    budget = _core.device_bytes(layers, cap, list(range(pooled)), 1)
    assert budget < _core.device_bytes(layers, cap, [], 0), "the budget must not hold every layer"
    assert len(_core.fit_plan(layers, cap, budget, 2)["pooled_layers"]) == pooled
    return budget + sliding_bytes(model, batch, capacity)


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


def wait_until_decoding(manager: Any, request_id: str, tokens: int = 2, timeout: float = 60.0) -> None:
    """Blocks until ``request_id`` of a running continuous-batching manager has ``tokens`` generated.

    Fails the test after ``timeout`` seconds rather than hang.
    """
    import time

    deadline = time.time() + timeout
    while True:
        out = manager.get_result(request_id=request_id, timeout=1)
        if out is not None and len(out.generated_tokens) >= tokens:
            return
        assert time.time() < deadline, f"{request_id} generated fewer than {tokens} tokens in {timeout} s"
