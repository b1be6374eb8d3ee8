"""The host decode-attention kernel against torch's scaled_dot_product_attention on the CPU.

Tolerances: float32 KV, and bfloat16 KV against SDPA over the same bf16 values in
float32, agree to 1e-5 absolute + 1e-4 relative (the kernel computes in f32 from the
stored values); against SDPA computed in bfloat16 itself (what a bf16 model does),
within 2e-2 absolute + 2e-2 relative, bf16's own rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pie_rs
from pie_rs import _core
from pie_rs.host_attention import host_attention, host_attention_layer, merge, partial_attention

TIGHT = {"atol": 1e-5, "rtol": 1e-4}


def _sdpa(q, k, v, mask=None, scale=None):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _visible(batch, q_len, n, *, lengths=None, positions=None, causal=False, window=None, pad=None):
    """Bool mask [batch, 1, q_len, n] of the kernel's stated semantics."""
    j = torch.arange(n)
    rows = []
    for b in range(batch):
        length = n if lengths is None else lengths[b]
        start = length - q_len if positions is None else positions[b]
        per = []
        for i in range(q_len):
            pos = start + i
            ok = j < length
            if causal:
                ok &= j <= pos
            if window is not None:
                ok &= j > pos - window
            if pad is not None:
                ok &= pad[b]
            per.append(ok)
        rows.append(torch.stack(per))
    return torch.stack(rows)[:, None]


def _qkv(batch, q_heads, kv_heads, q_len, n, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    ("batch", "q_heads", "kv_heads", "q_len", "n", "dim"),
    [(1, 4, 4, 1, 1, 16), (2, 8, 2, 1, 300, 64), (3, 6, 3, 1, 33, 40), (2, 32, 8, 1, 1100, 128), (1, 4, 1, 1, 5, 8)],
)
def test_decode_matches_sdpa_fp32(batch, q_heads, kv_heads, q_len, n, dim):
    q, k, v = _qkv(batch, q_heads, kv_heads, q_len, n, dim)
    out, lse = host_attention(q, k, v)
    torch.testing.assert_close(out, _sdpa(q, k, v), **TIGHT)
    group = q_heads // kv_heads
    logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * dim**-0.5
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), **TIGHT)


def test_prefill_causal_offset_padding_and_window_fp32():
    batch, q_len, n = 3, 5, 40
    q, k, v = _qkv(batch, 8, 2, q_len, n, 32, seed=1)
    lengths = [40, 31, 12]
    pad = torch.ones(batch, n, dtype=torch.bool)
    pad[1, :4] = False  # left padding
    pad[2, :2] = False
    for window in (None, 7):
        out, _ = host_attention(q, k, v, lengths=lengths, mask=pad, causal=True, window=window)
        mask = _visible(batch, q_len, n, lengths=lengths, causal=True, window=window, pad=pad)
        torch.testing.assert_close(out, _sdpa(q, k, v, mask=mask), **TIGHT)


def test_explicit_positions_additive_mask_and_scale():
    batch, q_len, n = 2, 3, 50
    q, k, v = _qkv(batch, 4, 2, q_len, n, 16, seed=2)
    add = torch.randn(batch, 1, q_len, n)
    add[0, 0, :, 10:20] = float("-inf")
    out, _ = host_attention(q, k, v, mask=add, query_positions=[60, 45], causal=True, window=30, scale=0.3)
    vis = _visible(batch, q_len, n, positions=[60, 45], causal=True, window=30)
    ref = _sdpa(q, k, v, mask=add.masked_fill(~vis, float("-inf")), scale=0.3)
    torch.testing.assert_close(out, ref, **TIGHT)


def test_strided_views_are_read_in_place():
    """A query transposed as HF makes it, KV as a capacity buffer cut to its valid length."""
    batch, heads, n, cap, dim = 2, 4, 70, 128, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, 3, heads, dim, generator=g).transpose(1, 2)
    k_buf = torch.randn(batch, 2, cap, dim, generator=g)
    v_buf = torch.randn(batch, 2, cap, dim, generator=g)
    k, v = k_buf[:, :, :n], v_buf[:, :, :n]
    assert not q.is_contiguous() and not k.is_contiguous()
    mask = torch.ones(batch, n, dtype=torch.bool)[:, None, None, :].expand(batch, heads, 3, n)
    out, _ = host_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, _sdpa(q.contiguous(), k.contiguous(), v.contiguous()), **TIGHT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_kv_against_sdpa(dtype):
    batch, n = 4, 700
    q, k, v = _qkv(batch, 32, 8, 1, n, 128, dtype=dtype, seed=4)
    pad = torch.ones(batch, n, dtype=torch.bool)
    pad[2, :100] = False
    out, _ = host_attention(q, k, v, mask=pad)
    mask = pad[:, None, None, :]
    exact = _sdpa(q.float(), k.float(), v.float(), mask=mask)
    torch.testing.assert_close(out, exact, **TIGHT)
    in_dtype = _sdpa(q, k, v, mask=mask).float()
    torch.testing.assert_close(out, in_dtype, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("split", [0, 1, 37, 99, 100])
def test_merge_of_host_and_device_partials_is_exact(split):
    """Host over the oldest tokens, torch over the newest, merged == attention over all."""
    batch, n = 2, 100
    q, k, v = _qkv(batch, 8, 2, 1, n, 64, seed=5)
    host_out, host_lse = host_attention(q, k[:, :, :split], v[:, :, :split], query_positions=[n, n], causal=True)
    dev_out, dev_lse = partial_attention(q, k[:, :, split:], v[:, :, split:])
    out, lse = merge(host_out, host_lse, dev_out, dev_lse)
    torch.testing.assert_close(out, _sdpa(q, k, v), **TIGHT)
    _, full_lse = host_attention(q, k, v)
    torch.testing.assert_close(lse, full_lse, **TIGHT)
    # The Rust merge agrees with the torch one.
    _core.merge_attention(host_out, host_lse, dev_out.contiguous(), dev_lse.contiguous())
    torch.testing.assert_close(host_out, out, **TIGHT)
    torch.testing.assert_close(host_lse, lse, **TIGHT)


def test_empty_rows_give_zero_and_neg_inf_and_merge_keeps_the_other_side():
    q, k, v = _qkv(2, 4, 2, 1, 10, 16, seed=6)
    out, lse = host_attention(q, k, v, lengths=[0, 10])
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    other, other_lse = host_attention(q, k, v)
    merged, merged_lse = merge(out, lse, other, other_lse)
    assert torch.equal(merged[0], other[0]) and torch.equal(merged_lse[0], other_lse[0])
    both, both_lse = merge(out[:1], lse[:1], out[:1], lse[:1])
    assert torch.all(both == 0) and torch.all(torch.isneginf(both_lse))


def test_engine_host_region_layer_layout():
    """KV written into an engine's host arena, read in place through the Region."""
    batch, kv_heads, dim, cap, n = 2, 2, 16, 32, 20
    engine = _core.Engine("host", [(batch, kv_heads, dim, dim, 2)] * 2, cap, pooled_layers=[1], prefetch_depth=1)
    try:
        offset = engine.host_offset(1)
        assert offset is not None
        region = engine.host_region()
        arena = torch.from_dlpack(region)
        q, k, v = _qkv(batch, 4, kv_heads, 1, n, dim, dtype=torch.bfloat16, seed=7)
        kv_bytes = batch * kv_heads * cap * dim * 2
        layer = arena[offset : offset + 2 * kv_bytes].view(torch.bfloat16)
        layer[: kv_bytes // 2].view(batch, kv_heads, cap, dim)[:, :, :n] = k
        layer[kv_bytes // 2 :].view(batch, kv_heads, cap, dim)[:, :, :n] = v
        out, _ = host_attention_layer(
            q,
            region,
            offset=offset,
            layer=(batch, kv_heads, dim, dim),
            capacity=cap,
            kv_dtype=torch.bfloat16,
            lengths=n,
        )
        torch.testing.assert_close(out, _sdpa(q.float(), k.float(), v.float()), **TIGHT)
    finally:
        engine.close()


def test_threads_agree():
    q, k, v = _qkv(1, 8, 2, 1, 5000, 64, seed=8)
    one, _ = host_attention(q, k, v, threads=1)
    two, _ = host_attention(q, k, v, threads=2)
    torch.testing.assert_close(one, two, **TIGHT)


def test_bad_input_raises_config_error():
    q, k, v = _qkv(2, 6, 2, 1, 10, 16)
    out = torch.empty(2, 6, 1, 16)
    lse = torch.empty(2, 6, 1)
    bad = [
        lambda: host_attention(q, k[:, :, :, :8], v),  # head dims differ
        lambda: host_attention(q[:, :5], k, v),  # 5 heads over 2 KV heads
        lambda: host_attention(q, k[:1], v[:1]),  # batch
        lambda: host_attention(q, k, v, lengths=[11, 3]),
        lambda: host_attention(q, k, v, window=0),
        lambda: host_attention(q, k, v, mask=torch.ones(2, 5, dtype=torch.bool)),
        lambda: host_attention(q.to(torch.int32), k, v),
        lambda: host_attention(q, k, v.to(torch.float16)),
        lambda: host_attention(q, k[..., ::2], v),  # last dimension not dense
        lambda: _core.host_attention(q, k, v, out[:, :, :, :8], lse),
        lambda: _core.host_attention(q, k, v, out.transpose(0, 1), lse),
        lambda: _core.host_attention(q, k, v, q.reshape(2, 6, 1, 16), lse),  # out aliases the query
        lambda: _core.host_attention(q, k, None, out, lse),  # no value and no layer
        lambda: _core.host_attention(  # the layer does not fit the region
            q,
            torch.zeros(100, dtype=torch.uint8),
            None,
            out,
            lse,
            layer=(2, 2, 16, 16),
            capacity=10,
            kv_dtype="bfloat16",
        ),
        lambda: _core.host_attention(q, k, v, out, lse, kv_dtype="int8"),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(pie_rs.ConfigError):
            call()
            pytest.fail(f"case {i} did not raise")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_tensors_are_refused():
    q, k, v = (t.cuda() for t in _qkv(1, 2, 2, 1, 4, 8))
    with pytest.raises(pie_rs.ConfigError, match="host memory"):
        host_attention(q, k, v)


def test_stream_triad_reports_a_bandwidth():
    t = _core.stream_triad(threads=1, elements=1 << 18, passes=2)
    assert t["bytes"] == 24 << 18 and t["bytes_per_second"] > 1e8


def test_gil_is_released_while_the_kernel_runs():
    """Python code on another thread makes progress while a long kernel call is inside Rust."""
    import threading
    import time

    q, k, v = _qkv(2, 32, 8, 1, 16384, 128, dtype=torch.bfloat16, seed=9)
    span: list[float] = []

    def call():
        t0 = time.perf_counter()
        host_attention(q, k, v, threads=1)
        span.extend([t0, time.perf_counter()])

    ticks: list[float] = []
    worker = threading.Thread(target=call)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    t0, t1 = span
    inside = [t for t in ticks if t0 + 0.002 < t < t1 - 0.002]
    assert t1 - t0 > 0.005, "the call was too short to tell"
    assert len(inside) > 100, f"{len(inside)} ticks during a {1e3 * (t1 - t0):.1f} ms call: the GIL was held"
