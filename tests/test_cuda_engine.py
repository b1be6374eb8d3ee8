"""The engine on CUDA, below the transformers layer (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from pie_rs import _core

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not _core.cuda_available(), reason="needs CUDA"),
]


def _layer_view(region_tensor: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    return region_tensor[offset : offset + nbytes]


def test_foreign_stream_wait_orders_torch_after_the_prefetch() -> None:
    # Four 64 MiB layers, all pooled through ONE staging slot: each layer's
    # prefetch overwrites the previous layer's bytes. A torch kernel launched
    # right after layer_ready must see the new layer, never the old one.
    batch, heads, dim, tokens = 1, 8, 128, 16384
    nbytes = batch * heads * tokens * (dim + dim) * 2
    eng = _core.Engine("cuda", [(batch, heads, dim, dim, 2)] * 4, tokens, pooled_layers=[0, 1, 2, 3], prefetch_depth=1)
    stream = torch.cuda.current_stream().cuda_stream
    region = torch.from_dlpack(eng.device_region())
    assert region.data_ptr() == eng.device_region().addr
    for layer in range(4):
        eng.layer_begin(layer, stream)
        off = eng.layer_ready(layer, stream)
        _layer_view(region, off, nbytes).fill_(layer + 1)
        eng.layer_written(layer, tokens, stream)
        eng.layer_done(layer, stream)
    for step in range(3):
        seen = []
        for layer in range(4):
            eng.layer_begin(layer, stream)
            off = eng.layer_ready(layer, stream)
            view = _layer_view(region, off, nbytes)
            seen.append((view.min(), view.max()))
            eng.layer_done(layer, stream)
        torch.cuda.synchronize()
        for layer, (lo, hi) in enumerate(seen):
            assert int(lo) == int(hi) == layer + 1, f"step {step}: layer {layer} read stale bytes {int(lo)}..{int(hi)}"
    stats = eng.stats()
    assert stats["h2d_bytes"] >= 3 * 4 * nbytes
    eng.close()


def test_cuda_round_trip_through_host_is_bit_exact() -> None:
    # Random bytes written into a pooled layer survive write-back and prefetch.
    spec = (2, 4, 64, 64, 2)
    eng = _core.Engine("cuda", [spec] * 3, 64, pooled_layers=[0, 1, 2], prefetch_depth=1)
    stream = torch.cuda.current_stream().cuda_stream
    region = torch.from_dlpack(eng.device_region())
    kv_bytes = 2 * 4 * 64 * (64 + 64) * 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    written = {}
    for layer in range(3):
        eng.layer_begin(layer, stream)
        off = eng.layer_ready(layer, stream)
        data = torch.randint(0, 256, (kv_bytes,), dtype=torch.uint8, device="cuda", generator=gen)
        region[off : off + kv_bytes].copy_(data)
        written[layer] = data
        eng.layer_written(layer, 64, stream)
        eng.layer_done(layer, stream)
    for layer in range(3):
        eng.layer_begin(layer, stream)
        off = eng.layer_ready(layer, stream)
        assert torch.equal(region[off : off + kv_bytes], written[layer])
        eng.layer_done(layer, stream)
    host = torch.from_dlpack(eng.host_region())
    eng.quiesce()
    for layer in range(3):
        h = eng.host_offset(layer)
        assert torch.equal(host[h : h + kv_bytes].cuda(), written[layer])
    eng.close()


def test_cuda_errors_are_pie_errors() -> None:
    with pytest.raises(_core.BudgetError):
        _core.Engine("cuda", [(1, 2, 8, 8, 2)] * 2, 16, budget_bytes=10)
    with pytest.raises(_core.PieError):
        _core.Engine("cuda", [(1, 2, 8, 8, 2)] * 2, 16, device_index=99)
