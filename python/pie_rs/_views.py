"""Torch views of a pie-rs engine's arenas, placed where ``_core`` says the KV lies.

The engine exports its device arena (and its host arena) as 1-D byte regions through DLPack, and
``_core.layer_geometry`` (or ``Engine.layer_view``) says where a layer's K and V lie inside its slot:
byte offsets, shapes and element strides. :class:`ArenaViews` turns the two into K/V tensors with
``as_strided`` and caches them per arena generation. It adds the engine's slot offsets to the
geometry's offsets and computes no layout of its own.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from . import _core
from ._errors import StateError

__all__ = ["ArenaViews", "Geometry", "geometry"]


class Geometry(NamedTuple):
    """Where one layer's K and V lie inside its slot (``_core.layer_geometry``)."""

    k_offset: int
    v_offset: int
    k_shape: tuple[int, int, int, int]
    v_shape: tuple[int, int, int, int]
    k_strides: tuple[int, int, int, int]
    v_strides: tuple[int, int, int, int]
    bytes: int
    slot_bytes: int

    @classmethod
    def of(cls, d: dict[str, Any]) -> Geometry:
        """From the dict ``_core.layer_geometry`` or ``Engine.layer_view`` returns."""
        return cls(
            d["k_offset"],
            d["v_offset"],
            tuple(d["k_shape"]),  # type: ignore[arg-type]
            tuple(d["v_shape"]),  # type: ignore[arg-type]
            tuple(d["k_strides"]),  # type: ignore[arg-type]
            tuple(d["v_strides"]),  # type: ignore[arg-type]
            d["bytes"],
            d["slot_bytes"],
        )


@functools.lru_cache(maxsize=256)
def geometry(batch: int, kv_heads: int, k_dim: int, v_dim: int, elem_size: int, capacity: int) -> Geometry:
    """``_core.layer_geometry`` as a :class:`Geometry` (cached: shapes repeat across layers and steps)."""
    return Geometry.of(_core.layer_geometry(batch, kv_heads, k_dim, v_dim, elem_size, capacity))


def _typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D byte tensor seen as ``dtype`` elements (a trailing partial element dropped)."""
    elem = dtype.itemsize
    return raw[: raw.numel() - raw.numel() % elem].view(dtype)


def _kv(typed: torch.Tensor, offset: int, g: Geometry, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-capacity K and V of the slot at byte ``offset`` of the typed arena ``typed``."""
    elem = typed.element_size()
    if offset < 0 or offset % elem or offset + g.bytes > typed.numel() * elem:
        raise StateError(f"engine offset {offset} of {what} lies outside its arena ({typed.numel() * elem} bytes)")
    base = typed.storage_offset() + offset // elem
    return (
        typed.as_strided(g.k_shape, g.k_strides, base + g.k_offset // elem),
        typed.as_strided(g.v_shape, g.v_strides, base + g.v_offset // elem),
    )


class ArenaViews:
    """K/V views of one engine's layers, made from ``_core``'s geometry and cached per generation.

    The per-layer path (:meth:`write`) makes the views of every layer for a step at once with
    four ``as_strided`` + ``unbind`` calls when all slots lie at a fixed stride (everything
    resident), and otherwise one layer at a time from a per-layer layout computed once per slot.
    """

    def __init__(self, shapes: list[tuple[int, int, int]]) -> None:
        #: Per engine layer: ``(kv_heads, k_dim, v_dim)``.
        self.shapes = shapes
        self._engine: Any = None
        self._dtype: torch.dtype | None = None
        self._batch = 0
        self._geom: list[Geometry] = []
        self._generation = -1
        self._typed: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._host_generation = -1
        # The host arena as bytes, for host-attended layers (the host kernel reads it in place).
        self._host_raw: torch.Tensor | None = None
        self._host_raw_generation = -1
        # Per layer: (offset, K base, V base, batch, heads, k_dim, v_dim, K strides, V strides) of
        # its slot now, in elements of the typed device arena.
        self._layout: list[Any] = [None] * len(shapes)
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # Views of every layer for the current step: (n, new, offsets, K/V write views, K/V result
        # views); ``_stride`` is (first offset, stride, offsets) or None, looked for per generation.
        self._step: tuple[Any, ...] | None = None
        self._stride: tuple[int, int, list[int]] | None = None
        self._stride_generation = -1

    # ------------------------------------------------------------------------ lifecycle
    def bind(self, engine: _core.Engine, batch: int, dtype: torch.dtype) -> None:
        """Serves ``engine`` (of ``batch`` sequences of ``dtype``) from now on, at its capacity."""
        self._engine = engine
        self._dtype = dtype
        self._batch = batch
        self.resized()
        self.clear()

    def resized(self) -> None:
        """The engine's capacity changed: geometry is asked for again, views made afresh."""
        capacity = self._engine.capacity
        elem = self._dtype.itemsize  # type: ignore[union-attr]
        self._geom = [geometry(self._batch, h, kd, vd, elem, capacity) for h, kd, vd in self.shapes]
        self.drop()

    def drop(self) -> None:
        """Forgets every view (the arenas stay mapped)."""
        self._views.clear()
        self._layout = [None] * len(self.shapes)
        self._step = None
        self._stride_generation = -1

    def clear(self) -> None:
        """Forgets every view and the arenas themselves."""
        self.drop()
        self._typed = self._host = self._host_raw = None
        self._generation = -1

    def unbind(self) -> None:
        """Lets go of the engine (it closes, or goes back to the pool) and of every view of it."""
        self.clear()
        self._engine = None

    def _refresh(self) -> None:
        generation = self._engine.generation
        if generation != self._generation:
            self.drop()
            self._typed = _typed(torch.from_dlpack(self._engine.device_region()), self._dtype)  # type: ignore[arg-type]
            self._host = None
            self._generation = generation

    # ---------------------------------------------------------------------------- views
    def _slot(self, e: int, offset: int) -> tuple[Any, ...]:
        """Where layer ``e``'s K and V lie in the typed device arena when its slot is at ``offset``."""
        arena = self._typed
        assert arena is not None
        g = self._geom[e]
        elem = arena.element_size()
        if offset < 0 or offset % elem or offset + g.bytes > arena.numel() * elem:
            raise StateError(
                f"engine offset {offset} of layer {e} lies outside its arena ({arena.numel() * elem} bytes)"
            )
        base = arena.storage_offset() + offset // elem
        b, h, _, kd = g.k_shape
        layout = (
            offset,
            base + g.k_offset // elem,
            base + g.v_offset // elem,
            b,
            h,
            kd,
            g.v_shape[3],
            g.k_strides,
            g.v_strides,
        )
        self._layout[e] = layout
        return layout

    def _find_stride(self) -> tuple[int, int, list[int]] | None:
        """``(first offset, stride, offsets)`` in bytes if every layer's slot lies at a fixed stride now."""
        assert self._typed is not None
        self._stride_generation = self._generation
        self._stride = None
        geom = self._geom
        if not geom or any(g != geom[0] for g in geom):
            return None
        offsets = [self._engine.device_offset(e) for e in range(len(geom))]
        if any(o is None for o in offsets):
            return None
        first = offsets[0]
        stride = offsets[1] - first if len(offsets) > 1 else 0
        elem = self._typed.element_size()
        if (
            any(o != first + e * stride for e, o in enumerate(offsets))
            or first < 0
            or first % elem
            or stride % elem
            or (len(offsets) > 1 and stride < geom[0].bytes)
            or offsets[-1] + geom[0].bytes > self._typed.numel() * elem
        ):
            return None
        self._stride = (first, stride, offsets)
        return self._stride

    def _step_views(self, n: int, new: int) -> tuple[Any, ...] | None:
        """Write and result views of every layer for a step that adds ``new`` tokens after ``n``."""
        if self._stride_generation != self._generation:
            self._find_stride()
        if self._stride is None:
            self._step = None
            return None
        arena = self._typed
        assert arena is not None
        first, stride, offsets = self._stride
        elem = arena.element_size()
        g = self._geom[0]
        layers = len(self._geom)
        k_base = arena.storage_offset() + (first + g.k_offset) // elem
        v_base = arena.storage_offset() + (first + g.v_offset) // elem
        b, h, _, kd = g.k_shape
        vd = g.v_shape[3]
        k_stride = (stride // elem, *g.k_strides)
        v_stride = (stride // elem, *g.v_strides)
        k_tok, v_tok = g.k_strides[2], g.v_strides[2]
        end = n + new
        self._step = views = (
            n,
            new,
            offsets,
            arena.as_strided((layers, b, h, new, kd), k_stride, k_base + n * k_tok).unbind(0),
            arena.as_strided((layers, b, h, new, vd), v_stride, v_base + n * v_tok).unbind(0),
            arena.as_strided((layers, b, h, end, kd), k_stride, k_base).unbind(0),
            arena.as_strided((layers, b, h, end, vd), v_stride, v_base).unbind(0),
        )
        return views

    def write(
        self, e: int, offset: int, n: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new states after ``n`` valid tokens of layer ``e``'s slot at ``offset``.

        Returns views of all ``n + new`` valid keys and values. The hot path: once per layer per step.
        """
        if self._engine.generation != self._generation:
            self._refresh()
        new = key_states.shape[2]
        step = self._step
        if step is None or step[0] != n or step[1] != new:
            # The first layer of a step makes the views of all layers; a layer out of step
            # with the others (a crop of one layer, a hand-made update) takes the slow path.
            step = self._step_views(n, new) if e == 0 else None
        if step is not None:
            if step[2][e] == offset:
                step[3][e].copy_(key_states)
                step[4][e].copy_(value_states)
                return step[5][e], step[6][e]
            self._stride_generation = -1  # the slots moved: look again at the next step
        layout = self._layout[e]
        if layout is None or layout[0] != offset:
            layout = self._slot(e, offset)
        _, k_base, v_base, b, h, kd, vd, k_stride, v_stride = layout
        arena = self._typed
        assert arena is not None
        end = n + new
        arena.as_strided((b, h, new, kd), k_stride, k_base + n * k_stride[2]).copy_(key_states)
        arena.as_strided((b, h, new, vd), v_stride, v_base + n * v_stride[2]).copy_(value_states)
        return (
            arena.as_strided((b, h, end, kd), k_stride, k_base),
            arena.as_strided((b, h, end, vd), v_stride, v_base),
        )

    def device(self, e: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-capacity K and V of layer ``e``'s device slot at ``offset``, cached per generation."""
        self._refresh()
        views = self._views.get((e, offset))
        if views is None:
            assert self._typed is not None
            views = self._views[(e, offset)] = _kv(self._typed, offset, self._geom[e], f"layer {e}")
        return views

    def host_bytes(self) -> torch.Tensor:
        """The engine's host arena as a 1-D byte tensor, cached per generation."""
        self._refresh()
        if self._host_raw is None or self._host_raw_generation != self._generation:
            self._host_raw = torch.from_dlpack(self._engine.host_region())
            self._host_raw_generation = self._generation
        return self._host_raw

    def host(self, e: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-capacity K and V of layer ``e``'s host buffer at ``offset`` (a host-attended layer)."""
        raw = self.host_bytes()
        views = self._views.get((e, -1 - offset))
        if views is None:
            typed = _typed(raw, self._dtype)  # type: ignore[arg-type]
            views = self._views[(e, -1 - offset)] = _kv(typed, offset, self._geom[e], f"layer {e} (host)")
        return views

    def data(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where layer ``e``'s authoritative data is while the engine is quiesced.

        Its device slot if resident, its host buffer if pooled, as the engine's ``layer_view`` says.
        """
        self._refresh()
        where = self._engine.layer_view(e)
        if where["device_offset"] is not None:
            return self.device(e, where["device_offset"])
        if self._host is None or self._host_generation != self._generation:
            self._host = _typed(torch.from_dlpack(self._engine.host_region()), self._dtype)  # type: ignore[arg-type]
            self._host_generation = self._generation
        return _kv(self._host, where["host_offset"], Geometry.of(where), f"layer {e} (host)")
