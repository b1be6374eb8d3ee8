"""Split attention for host-attended layers: the host kernel over the past, the device over the new.

A pooled layer the plan marks host-attended is never copied to the device. Its cache update
appends the step's new K/V to the layer's host buffer (through the engine) and hands attention only
the new tokens; this module's attention function, installed in place of the model's own at
:func:`pie_rs.attach`, then computes

* the host kernel's partial result over the past tokens, read in place from the host arena
  (:func:`pie_rs.host_attention.host_attention_layer`: GQA, the padding mask's past columns,
  scale and softcap from the module), and
* the device's partial result over the new tokens (causal among them, the mask's new columns),

and merges the two exactly by their log-sum-exp (:func:`pie_rs.host_attention.merge`). Every other
layer (resident, copied, sliding-window, or a host-attended layer's first prefill, which has no
past) goes to the model's original attention implementation unchanged.

The cache marks a split by the identity of the key tensor its ``update`` returned
(:func:`mark`), so the attention function knows which call to split without any model-specific
plumbing.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import ConfigError, StateError
from ._host_io import to_device, to_host, wait
from .host_attention import host_attention, host_attention_layer, merge, partial_attention

__all__ = [
    "Installed",
    "PagedSplitTarget",
    "SplitTarget",
    "install",
    "mark",
    "unsupported_reason",
]

#: The original implementations the split wraps (their masks are bool or additive, which the host
#: kernel and the device partial both take).
_WRAPPABLE = ("sdpa", "eager")
_PREFIX = "pie_rs_host_"


@dataclass
class SplitTarget:
    """What the attention of one host-attended layer needs: where its past lives and how long it is."""

    #: A 1-D byte view of the engine's host arena.
    region: torch.Tensor
    offset: int
    #: ``(batch, kv_heads, k_dim, v_dim)`` as the engine lays the layer out.
    layer: tuple[int, int, int, int]
    capacity: int
    kv_dtype: torch.dtype
    #: Past tokens (those before this step's new ones), all attended on the host.
    past: int
    #: Adds the host kernel's seconds to the cache's statistics.
    add_seconds: Callable[[float], None]
    #: Places this layer's staged new tokens into the host buffer (see ``_host_io.HostWrites``).
    flush: Callable[[], None] = lambda: None


# Keyed by ``id`` of the key tensor a host-attended update returned; the tensor is kept with the
# target so the id cannot be reused while the entry lives, and compared by identity on lookup.
_PENDING: dict[int, tuple[torch.Tensor, SplitTarget | PagedSplitTarget]] = {}


def mark(key: torch.Tensor, target: SplitTarget | PagedSplitTarget, previous: int | None) -> int:
    """Marks ``key`` (what a host-attended update returned) for a split; drops the layer's ``previous`` mark."""
    if previous is not None:
        _PENDING.pop(previous, None)
    _PENDING[id(key)] = (key, target)
    return id(key)


def _take(key: torch.Tensor) -> SplitTarget | PagedSplitTarget | None:
    entry = _PENDING.get(id(key))
    if entry is None or entry[0] is not key:
        return None
    del _PENDING[id(key)]
    return entry[1]


def _eager_of(module: nn.Module) -> Callable[..., Any] | None:
    """The eager attention function of ``module``'s modeling file (Gemma-2's soft-caps its logits)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _split(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target: SplitTarget,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Host partial over the past merged with the device partial over the new tokens."""
    past, new = target.past, int(key.shape[2])
    q_len = int(query.shape[2])
    scale = kwargs.get("scaling")
    softcap = kwargs.get("softcap")
    if attention_mask is None:
        # No mask: causal without padding. Every past token is visible to every query row; among
        # the new tokens row i sees keys up to past + i.
        host_mask = None
        dev_mask = None
        if q_len > 1 and getattr(module, "is_causal", True):
            rows = torch.arange(q_len, device=query.device)[:, None] + (new - q_len)
            dev_mask = torch.arange(new, device=query.device)[None, :] <= rows
    else:
        host_mask = attention_mask[..., :past]
        dev_mask = attention_mask[..., past : past + new]
    # The device's partial is queued first, so the device computes it while the host waits for the
    # query and runs the kernel; the query's copy is ordered after this layer's staged K/V rows.
    q_host, q_ready = to_host(query)
    m_host, m_ready = (None, None) if host_mask is None else to_host(host_mask.contiguous())
    dev_out, dev_lse = partial_attention(query, key, value, mask=dev_mask, scale=scale, softcap=softcap)
    start = time.perf_counter()
    wait(q_ready)
    wait(m_ready)
    target.flush()
    host_out, host_lse = host_attention_layer(
        q_host,
        target.region,
        offset=target.offset,
        layer=target.layer,
        capacity=target.capacity,
        kv_dtype=target.kv_dtype,
        lengths=past,
        query_positions=past + new - q_len,
        mask=m_host,
        scale=scale,
        softcap=softcap,
    )
    target.add_seconds(time.perf_counter() - start)
    out, _ = merge(to_device(host_out, query.device), to_device(host_lse, query.device), dev_out, dev_lse)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@dataclass
class PagedSplitTarget:
    """One host-attended layer of a continuous-batching step (transformers' flattened varlen batch).

    The step's requests are laid end to end along the query dimension; request ``i``'s past rows
    are scattered over its blocks in the layer's host area, given as runs of consecutive rows, so
    the kernel reads each run in place (a strided view of the area): no gather, and no
    batch-by-batch product on the host.
    """

    #: The layer's host area, K and V ``[rows, kv_heads, head_dim]``.
    k_area: torch.Tensor
    v_area: torch.Tensor
    #: Per request in batch order: (first query row, query rows, runs ``(start, n)`` of its past rows).
    requests: list[tuple[int, int, list[tuple[int, int]]]]
    #: Key columns of the step's new tokens in transformers' mask (on the mask's device).
    new_columns: torch.Tensor
    #: Places this layer's staged new rows into the host area (see ``_host_io.HostWrites``).
    flush: Callable[[], None]
    #: Adds the host kernel's seconds to the cache's statistics.
    add_seconds: Callable[[float], None]


def _host_partial_paged(
    query: torch.Tensor, target: PagedSplitTarget, v_dim: int, scale: float | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The host kernel over every request's past rows: ``(out, lse)`` for all query rows (host)."""
    _, heads, total, _ = query.shape
    out = torch.zeros(1, heads, total, v_dim, dtype=torch.float32)
    lse = torch.full((1, heads, total), float("-inf"), dtype=torch.float32)
    for first, rows, runs in target.requests:
        if not runs:
            continue  # a request without past: the device side alone
        q = query[:, :, first : first + rows].contiguous()
        acc: tuple[torch.Tensor, torch.Tensor] | None = None
        for start, n in runs:
            # [n, kv_heads, dim] rows -> [1, kv_heads, n, dim], read in place by the kernel.
            k = target.k_area[start : start + n].permute(1, 0, 2).unsqueeze(0)
            v = target.v_area[start : start + n].permute(1, 0, 2).unsqueeze(0)
            part = host_attention(q, k, v, scale=scale, softcap=softcap)
            acc = part if acc is None else merge(acc[0], acc[1], part[0], part[1])
        assert acc is not None
        out[:, :, first : first + rows] = acc[0]
        lse[:, :, first : first + rows] = acc[1]
    return out, lse


def _split_paged(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target: PagedSplitTarget,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """A continuous-batching step of a host-attended layer: host over the past, device over the new rows.

    transformers' mask (block-diagonal, causal within each request) restricted to the new tokens'
    columns is exactly what the device side needs; every past row of a request is visible to all of
    its query rows, so the host side needs no mask.
    """
    if attention_mask is None:
        raise StateError(
            "continuous batching gave a host-attended layer no attention mask; host attention serves "
            "attn_implementation='sdpa' (or 'paged|sdpa') only"
        )
    scale = kwargs.get("scaling")
    softcap = kwargs.get("softcap")
    dev_mask = attention_mask.index_select(-1, target.new_columns.to(attention_mask.device))
    q_host, q_ready = to_host(query)
    dev_out, dev_lse = partial_attention(query, key, value, mask=dev_mask, scale=scale, softcap=softcap)
    start = time.perf_counter()
    wait(q_ready)
    target.flush()
    host_out, host_lse = _host_partial_paged(q_host, target, int(value.shape[-1]), scale, softcap)
    target.add_seconds(time.perf_counter() - start)
    out, _ = merge(to_device(host_out, query.device), to_device(host_lse, query.device), dev_out, dev_lse)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _attention_for(name: str, original: Callable[..., Any] | None) -> Callable[..., Any]:
    """The splitting wrapper of implementation ``name``; ``original`` (or the module's eager) otherwise."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        target = _take(key) if _PENDING else None
        if isinstance(target, PagedSplitTarget):
            return _split_paged(module, query, key, value, attention_mask, target, kwargs)
        if target is not None:
            return _split(module, query, key, value, attention_mask, target, kwargs)
        fn = original if original is not None else _eager_of(module)
        if fn is None:
            raise ConfigError(f"{type(module).__name__} has no eager attention function to delegate to")
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{_PREFIX}{name}"
    attention.__doc__ = f"pie-rs: {name} attention, split between host and device for host-attended layers."
    return attention


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object of the model's modules that names an attention implementation."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen.setdefault(id(config), config)
            for sub in ("text_config", "decoder"):
                inner = getattr(config, sub, None)
                if inner is not None and hasattr(inner, "_attn_implementation_internal"):
                    seen.setdefault(id(inner), inner)
    return list(seen.values())


def _attention_module(layer: nn.Module) -> nn.Module | None:
    for name in ("self_attn", "attention", "attn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def unsupported_reason(model: nn.Module, decoder_layers: list[nn.Module], managed: list[int]) -> str | None:
    """Why the split path cannot serve this model's full-attention layers, or ``None`` if it can."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in _WRAPPABLE:
        return (
            f"host attention splits 'sdpa' or 'eager' attention, and this model runs {impl!r}; load it with "
            "attn_implementation='sdpa' or 'eager', or pass host_attention='never'"
        )
    for idx in managed:
        attn = _attention_module(decoder_layers[idx])
        kind = type(attn).__name__ if attn is not None else type(decoder_layers[idx]).__name__
        if attn is None:
            return f"decoder layer {idx} has no attention module pie-rs recognises; pass host_attention='never'"
        if impl == "eager" and _eager_of(attn) is None:
            return f"{kind} (layer {idx}) has no eager attention function to delegate to; pass host_attention='never'"
        if any(hasattr(attn, a) for a in ("sinks", "s_aux")):
            return (
                f"{kind} (layer {idx}) uses attention sinks, which the host split does not compute; "
                "pass host_attention='never'"
            )
        try:
            source = inspect.getsource(type(attn).forward)
        except (OSError, TypeError):
            source = ""
        if "attention_interface" not in source or ".update(" not in source:
            return (
                f"{kind} (layer {idx}) does not attend through transformers' attention interface right after its "
                "cache update, which the host split needs; pass host_attention='never'"
            )
    return None


# The global "sdpa" entry is wrapped once for every pool that uses host attention (the wrapper is
# the original function for every call not marked for a split): (pools using it, original).
_SDPA: list[Any] = [0, None]


@dataclass
class Installed:
    """An installed split for one model: undo it with :meth:`restore` (idempotent)."""

    #: Configs switched to the eager wrapper, with their original implementation.
    saved: list[tuple[Any, Any]]
    sdpa: bool

    @property
    def active(self) -> bool:
        """Whether a marked update of this model reaches the splitting wrapper."""
        return self.sdpa or bool(self.saved)

    def restore_configs(self) -> None:
        """Gives switched (eager) configs their implementation back: continuous batching needs the name."""
        for config, impl in self.saved:
            config._attn_implementation_internal = impl
        self.saved = []

    def restore(self) -> None:
        """Gives every config its implementation back and unwraps ``sdpa`` when no pool needs it."""
        from transformers.modeling_utils import AttentionInterface

        self.restore_configs()
        if self.sdpa:
            self.sdpa = False
            _SDPA[0] -= 1
            if _SDPA[0] == 0:
                if getattr(AttentionInterface._global_mapping.get("sdpa"), "__name__", "") == f"{_PREFIX}sdpa":
                    AttentionInterface._global_mapping["sdpa"] = _SDPA[1]
                _SDPA[1] = None


def install(model: nn.Module) -> Installed:
    """Routes the model's attention through the splitting wrapper of its own implementation.

    ``sdpa`` is looked up by name on every call, so its global entry is wrapped (transparent for
    calls that are not marked, so other models and continuous batching see no change); an
    ``eager`` model's configs are switched to a registered wrapper that delegates to the
    modeling file's own eager function, with the same mask as eager.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    saved = []
    sdpa = False
    for config in _configs(model):
        impl = config._attn_implementation_internal
        if impl == "sdpa" and not sdpa:
            sdpa = True
            if _SDPA[0] == 0:
                _SDPA[1] = AttentionInterface._global_mapping["sdpa"]
                AttentionInterface._global_mapping["sdpa"] = _attention_for("sdpa", _SDPA[1])
            _SDPA[0] += 1
        elif impl == "eager":
            name = f"{_PREFIX}eager"
            AttentionInterface.register(name, _attention_for("eager", None))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["eager"])
            saved.append((config, impl))
            config._attn_implementation_internal = name
    return Installed(saved, sdpa)
