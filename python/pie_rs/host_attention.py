"""Decode attention where the KV lives: the host kernel and the exact LSE merge.

A pooled layer's KV can stay in host memory: the layer's query goes to the host,
:func:`host_attention` computes attention over the tokens held there and returns,
per query row, the output and the log-sum-exp (natural log) of its logits; the
device computes attention over the tokens it holds; :func:`merge` combines the
two exactly. ``attach(..., host_attention=...)`` wires this into the cache and the
plan (:mod:`pie_rs._split`); this module is the kernel's Python face.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _core

__all__ = ["host_attention", "host_attention_layer", "merge", "partial_attention"]


def _ints(x: int | Sequence[int] | torch.Tensor | None, batch: int) -> list[int] | None:
    if x is None:
        return None
    if isinstance(x, int):
        return [x] * batch
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in x]


def _mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() == 2:  # [batch, keys] padding mask (1 / True: attend)
        mask = mask[:, None, None, :]
    if mask.dtype not in (torch.bool, torch.uint8):
        mask = mask.to(torch.float32)  # additive
    return mask.detach()


def _outputs(query: torch.Tensor, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q_len, _ = query.shape
    out = torch.empty(b, h, q_len, v_dim, dtype=torch.float32)
    lse = torch.empty(b, h, q_len, dtype=torch.float32)
    return out, lse


def host_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    lengths: int | Sequence[int] | torch.Tensor | None = None,
    query_positions: int | Sequence[int] | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over ``key``/``value`` on the CPU; returns ``(out, lse)``.

    ``query`` ``[batch, q_heads, q_len, k_dim]``, ``key``/``value``
    ``[batch, kv_heads, tokens, dim]`` (CPU; float32, float16 or bfloat16; read
    zero-copy, any strides with a dense last dimension). ``out`` is float32
    ``[batch, q_heads, q_len, v_dim]``, ``lse`` float32 ``[batch, q_heads, q_len]``.
    ``lengths``: valid tokens per sequence (default all). ``mask``: bool (True
    attends) or additive, ``[batch, keys]`` or ``[batch|1, heads|1, q_len|1, keys]``.
    Query row ``i`` is at position ``query_positions[b] + i`` (default
    ``lengths[b] - q_len``), used by ``causal`` and ``window``. A row that sees
    no key gets 0 and ``lse = -inf``.
    """
    return _run(
        query,
        (key.detach(), value.detach()),
        value.shape[-1],
        {},
        lengths=lengths,
        query_positions=query_positions,
        mask=mask,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        threads=threads,
    )


def host_attention_layer(
    query: torch.Tensor,
    region: object,
    *,
    offset: int,
    layer: tuple[int, int, int, int],
    capacity: int,
    kv_dtype: torch.dtype | str,
    lengths: int | Sequence[int] | torch.Tensor | None = None,
    query_positions: int | Sequence[int] | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`host_attention` over one layer held in the engine's layout.

    ``region`` is a host ``Region`` (``Engine.host_region()``) or a 1-D byte
    tensor; the layer starts ``offset`` bytes in (``Engine.host_offset(layer)``):
    K ``[batch, kv_heads, capacity, k_dim]`` then V, ``layer = (batch, kv_heads,
    k_dim, v_dim)``. ``lengths`` (default ``capacity``) says how many are valid.
    """
    return _run(
        query,
        (region, None),
        layer[3],
        {"layer": layer, "capacity": capacity, "offset": offset, "kv_dtype": str(kv_dtype)},
        lengths=lengths,
        query_positions=query_positions,
        mask=mask,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        threads=threads,
    )


def _run(
    query: torch.Tensor,
    kv: tuple[object, object],
    v_dim: int,
    source: dict[str, object],
    *,
    lengths: int | Sequence[int] | torch.Tensor | None,
    query_positions: int | Sequence[int] | torch.Tensor | None,
    mask: torch.Tensor | None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calls the kernel with K/V given by ``kv`` (tensors, or a region and ``source``'s layout)."""
    batch = query.shape[0]
    out, lse = _outputs(query, v_dim)
    _core.host_attention(
        query.detach(),
        kv[0],
        kv[1],
        out,
        lse,
        lengths=_ints(lengths, batch),
        query_positions=_ints(query_positions, batch),
        mask=_mask(mask),
        **source,
        **options,
    )
    return out, lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of two partial attention results over disjoint key sets.

    ``out_*`` ``[..., v_dim]`` with ``lse_*`` ``[...]`` (natural log-sum-exp of
    each row's logits, ``-inf`` for a side that saw no key). Returns float32
    ``(out, lse)`` as if attention had run over both key sets at once. Works on
    any device (the device-side partial and the host's, once both are on one).
    """
    la = lse_a.to(torch.float32)
    lb = lse_b.to(torch.float32)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(la - m)
    wb = torch.exp(lb - m)
    total = wa + wb
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    out = out_a.to(torch.float32) * (wa * inv)[..., None] + out_b.to(torch.float32) * (wb * inv)[..., None]
    return out, m + torch.log(total)


def partial_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp in plain torch (any device): the device side of a split.

    Shapes as :func:`host_attention` (GQA by repeating KV heads); ``mask`` bool
    (True attends) or additive, broadcastable to ``[batch, q_heads, q_len, keys]``;
    ``softcap`` caps the scaled logits as ``softcap * tanh(logit / softcap)``
    before the mask, as Gemma-2 does. Returns float32 ``(out, lse)``; rows that
    see no key give 0 and ``-inf``.
    """
    q = query.to(torch.float32)
    group = q.shape[1] // key.shape[1]
    k = key.to(torch.float32).repeat_interleave(group, dim=1)
    v = value.to(torch.float32).repeat_interleave(group, dim=1)
    s = (scale if scale is not None else q.shape[-1] ** -0.5) * (q @ k.transpose(-1, -2))
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(torch.float32)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return p @ v, lse
