"""``PieCache``: a transformers ``Cache`` whose full-attention layers live in a pie-rs engine.

Each full-attention layer is a :class:`PieLayer`; its K ``[batch, kv_heads, capacity, k_dim]``
and V ``[batch, kv_heads, capacity, v_dim]`` sit back to back in one slot of the engine's device
arena (resident layers) or in host memory plus a borrowed device staging slot (pooled layers).
``update`` writes the new tokens into the slot and hands attention zero-copy views of the valid
part, so attention reads engine memory directly. Sliding-window layers keep transformers' own
``DynamicSlidingWindowLayer`` on the device (they are small) and are counted in the statistics.

The engine is created lazily, on the first ``update`` (or ``early_initialization``), from the
batch size and dtype of the first key states, so one cache serves whatever batch ``generate``
expands the inputs to (beams, returned sequences).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _core
from ._engine import LayerKV, engine_layers, rescale_shapes, sliding_kv_bytes
from ._errors import BudgetError, ConfigError, StateError
from ._host_io import HostWrites
from ._model import MANAGED, SLIDING, ModelInfo, reference_layers
from ._split import SplitTarget, mark
from ._views import ArenaViews
from .prefix import HostKV, host_copy

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["PieCache", "PieLayer", "empty_stats"]

#: Tokens of room a cache gets beyond its first update when no ``max_length`` was given.
DEFAULT_HEADROOM = 256

_STAT_KEYS = (
    "resident_layers",
    "pooled_layers",
    "device_kv_bytes",
    "peak_device_kv_bytes",
    "host_kv_bytes",
    "h2d_bytes",
    "d2h_bytes",
    "stall_seconds",
    "steps",
    "host_attended_layer_steps",
)


def empty_stats() -> dict[str, Any]:
    """The engine statistics of a cache whose engine has done nothing (all zero)."""
    return {key: 0 for key in _STAT_KEYS} | {
        "stall_seconds": 0.0,
        "host_attention_seconds": 0.0,
        "host_attended_layers": [],
    }


class _Shared:
    """State shared by the layers of one :class:`PieCache`: the engine, its lifecycle and the step.

    The per-layer path (``begin``, ``update``, ``done``) runs once per decoder layer per step on
    the caller's thread, so it does as little as it can: the stream is looked up once per step,
    shapes are checked only when they change, and the views come from :class:`ArenaViews`. The
    engine is made through the pool's settings, or taken from the pool when it kept one.
    """

    def __init__(self, pool: Pool, info: ModelInfo, max_length: int | None, batch_size: int | None) -> None:
        self.pool = pool
        self.info = info
        self.device = info.device
        self.engine: _core.Engine | None = None
        self.closed = False
        self.closed_reason = "this PieCache was closed; make a new one with pool.new_cache()"
        self.batch = batch_size
        self.max_length = max_length
        self.capacity = 0
        self.dtype: torch.dtype | None = None
        # Per engine layer: (kv_heads, k_dim, v_dim) and the number of valid tokens. The shapes are
        # the pool's best guess (the config, or what an earlier cache's layers handed over); each
        # layer's first update corrects its own (see ``adopt_shape``).
        self.eidx = {model_idx: e for e, model_idx in enumerate(info.managed)}
        self.shapes = pool.kv_shapes()
        self.settled = [False] * len(info.managed)
        self.views = ArenaViews(self.shapes)
        self.lens = [0] * len(info.managed)
        self.open: int | None = None
        self.quiesce_depth = 0
        self._cuda = self.device.type == "cuda"
        # The compute stream of the current step (looked up when a step begins).
        self._stream: int | None = None
        # Per engine layer: the (key, value) shapes, dtypes and devices last checked.
        self._checked: list[Any] = [None] * len(info.managed)
        self.last_stats: dict[str, Any] | None = None
        self.sliding_estimate = 0
        # A parked cache holds its KV in host memory (immutable, shared by copies) and no engine;
        # the next update restores it into an engine. ``lens`` keep the parked lengths.
        self.parked: HostKV | None = None
        # Bumped by every change other than appending (crop, reorder, rebatch, reset), so a
        # snapshot taken at the same lengths and count is still the cache's content.
        self.mutations = 0
        self._snapshot: tuple[Any, HostKV] | None = None
        # Host attention: seconds the host kernel ran for this cache, and per engine layer the id
        # of the key tensor its last host-attended update marked for a split (see ``_split``).
        self.host_seconds = 0.0
        self._marks: dict[int, int] = {}
        self.host_writes = HostWrites()

    # ----------------------------------------------------------------------------- engine
    def check_usable(self) -> None:
        if self.pool.closed:
            raise StateError("the pie-rs pool of this cache was detached; attach again and make a new cache")
        if self.closed:
            raise StateError(self.closed_reason)

    def stream(self) -> int:
        if self._cuda:
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0

    def make_engine(self, batch: int, capacity: int, dtype: torch.dtype) -> _core.Engine:
        """A new engine; its budget is the pool's less what the sliding-window layers take."""
        elem = dtype.itemsize
        self.sliding_estimate = sliding_kv_bytes(self.info, batch, capacity, elem)
        settings = self.pool.settings
        budget = settings.budget_bytes
        if budget is not None:
            serving = self.pool._serving_device_bytes()
            budget -= self.sliding_estimate + serving
            if budget <= 0:
                raise BudgetError(
                    f"gpu_budget of {settings.budget_bytes} bytes does not even hold the sliding-window layers "
                    f"({self.sliding_estimate} bytes at batch {batch}, {capacity} tokens)"
                    + (f" besides the {serving} bytes of a live continuous-batching cache" if serving else "")
                    + "; raise the budget"
                )
        return settings.build(engine_layers(self.info, batch, elem, self.shapes), capacity, budget)

    def acquire_engine(self, batch: int, capacity: int, dtype: torch.dtype) -> _core.Engine:
        """The pool's kept engine if it fits ``batch``/``dtype``/``capacity`` (emptied), else a new one."""
        sliding = sliding_kv_bytes(self.info, batch, capacity, dtype.itemsize)
        kept = self.pool.take_engine(batch, dtype, capacity, sliding)
        if kept is not None:
            engine, self.sliding_estimate = kept
            if _engine_shapes(engine) == self.shapes:
                return engine
            engine.close()  # made for other head shapes (a cache that learned them is still open)
        return self.make_engine(batch, capacity, dtype)

    def _reset_state(self, batch: int, dtype: torch.dtype) -> None:
        """Bookkeeping for a fresh (or freshly emptied) engine."""
        assert self.engine is not None
        self.dtype = dtype
        self.batch = batch
        self.capacity = self.engine.capacity
        self.lens = [0] * len(self.shapes)
        self.mutations += 1
        self.open = None
        self._stream = None
        self._checked = [None] * len(self.shapes)
        self.views.bind(self.engine, batch, dtype)

    def initialize(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None) -> None:
        """Creates the engine from the first key/value states (lazy initialization).

        The layer that hands them over (``layer_idx``, else the first managed layer) fixes its own
        head count and head sizes, and, by :func:`pie_rs._engine.rescale_shapes`, the guess for
        every other layer (a tensor-parallel shard divides every layer's heads alike). Each later
        layer checks its guess at its own first update (``adopt_shape``).
        """
        self.check_usable()
        if self.engine is not None or not self.shapes or self.parked is not None:
            return
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ConfigError(
                f"key/value states of shapes {tuple(key_states.shape)}/{tuple(value_states.shape)} are not "
                "[batch, heads, seq, dim]"
            )
        batch = int(key_states.shape[0])
        if self.batch is not None and self.batch != batch:
            raise ConfigError(
                f"this PieCache was made for batch {self.batch}, but the model runs batch {batch}; "
                "make the cache with batch_size=None (any batch) or the right batch"
            )
        if key_states.device != self.device and not (
            key_states.device.type == self.device.type == "cuda" and self.device.index is None
        ):
            raise ConfigError(f"key states are on {key_states.device}, the model's cache lives on {self.device}")
        e = self.eidx.get(layer_idx, 0) if layer_idx is not None else 0
        seen = _states_shape(key_states, value_states)
        if seen is not None and seen != self.shapes[e]:
            self.shapes = rescale_shapes(self.shapes, e, seen)
            self.views = ArenaViews(self.shapes)
            self.pool.learn_kv_shapes(self.shapes)
        self.settled[e] = True
        first = int(key_states.shape[-2])
        want = self.max_length if self.max_length is not None else first + DEFAULT_HEADROOM
        self.engine = self.acquire_engine(batch, _core.round_capacity(max(want, first, 1)), key_states.dtype)
        self._reset_state(batch, key_states.dtype)

    def grow(self, tokens: int) -> None:
        """Makes room for ``tokens`` tokens a layer; the engine decides how much (``ensure_capacity``)."""
        assert self.engine is not None
        self.engine.ensure_capacity(tokens)
        self.capacity = self.engine.capacity
        self.views.resized()

    def _detach_engine(self) -> _core.Engine | None:
        """Takes the engine out of this cache (statistics kept) and drops every view of it."""
        engine = self.engine
        if engine is None:
            return None
        try:
            self.last_stats = self.engine_stats()
        finally:
            self.views.unbind()
            self.engine = None
            self.open = None
            self._stream = None
        return engine

    def close(self) -> None:
        engine = self._detach_engine()
        self.closed = True
        self.parked = None
        self._snapshot = None
        if engine is not None:
            engine.close()

    def release(self) -> None:
        """Closes this cache and gives its engine to the pool for the next cache to reuse.

        Falls back to :meth:`close` when the engine cannot be reused (pool detached, a step or
        quiesce still open).
        """
        if self.engine is None or self.pool.closed or self.quiesce_depth or self.closed:
            self.close()
            return
        try:
            self.finish_step()
        except Exception:
            self.close()
            raise
        batch, dtype, sliding = self.batch, self.dtype, self.sliding_estimate
        engine = self._detach_engine()
        self.closed = True
        self.closed_reason = (
            "this PieCache was closed and its engine handed on for reuse by a later cache; "
            "make a new one with pool.new_cache()"
        )
        assert engine is not None and batch is not None and dtype is not None
        self.pool.keep_engine(engine, batch, dtype, sliding)

    def engine_stats(self) -> dict[str, Any]:
        if self.engine is not None:
            stats = dict(self.engine.stats())
            stats["host_attended_layers"] = [self.info.managed[e] for e in stats.pop("host_attended", [])]
        elif self.last_stats is not None:
            stats = dict(self.last_stats)
        else:
            stats = empty_stats()
        stats["host_attention_seconds"] = self.host_seconds
        return stats

    # ------------------------------------------------------------------------------- step
    def begin(self, e: int) -> None:
        """Layer ``e`` starts (its first update of the step)."""
        engine = self.engine
        assert engine is not None
        if e == 0 or self._stream is None:
            self._stream = self.stream() if self._cuda else 0
        stream = self._stream
        open_layer = self.open
        if open_layer is not None and open_layer != e:
            self.open = None
            self.host_writes.flush(open_layer)  # before the engine may plan to copy the layer
            engine.layer_done(open_layer, stream)
        self.open = None
        engine.layer_begin(e, stream)
        self.open = e

    def done(self, e: int) -> None:
        if self.open == e and self.engine is not None:
            self.open = None
            self.host_writes.flush(e)  # before the engine may plan to copy the layer
            stream = self._stream
            self.engine.layer_done(e, self.stream() if stream is None else stream)

    def finish_step(self) -> None:
        if self.open is not None and self.engine is not None:
            self.done(self.open)
        self.host_writes.flush()

    def check_states(self, e: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for states in (key_states, value_states):
            device = states.device
            if device.type != self.device.type or (
                self.device.index is not None and device.index is not None and device.index != self.device.index
            ):
                raise ConfigError(
                    f"layer {self.info.managed[e]} gave states on {device}; this cache lives on {self.device} "
                    "(move the model, or make the cache with the pool of the model on that device)"
                )
        heads, k_dim, v_dim = self.shapes[e]
        kshape, vshape = key_states.shape, value_states.shape
        if (
            key_states.dim() != 4
            or value_states.dim() != 4
            or kshape[0] != self.batch
            or kshape[1] != heads
            or kshape[3] != k_dim
            or tuple(vshape[:3]) != tuple(kshape[:3])
            or vshape[3] != v_dim
        ):
            raise ConfigError(
                f"layer {self.info.managed[e]} gave key/value states of shapes {tuple(kshape)}/{tuple(vshape)}; "
                f"this cache holds [batch={self.batch}, kv_heads={heads}, seq, {k_dim}/{v_dim}] "
                "(a batch change needs batch_repeat_interleave/batch_select_indices or a new cache)"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ConfigError(
                f"layer {self.info.managed[e]} gave {key_states.dtype}/{value_states.dtype} states; "
                f"this cache holds {self.dtype}"
            )

    def update(self, e: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.closed or self.pool.closed:
            self.check_usable()
        if self.quiesce_depth:
            raise StateError("update called while the cache is being reordered or cropped")
        engine = self.engine
        if engine is None:
            if self.parked is not None:
                self.restore(key_states)
            else:
                self.initialize(key_states, value_states, self.info.managed[e])
            engine = self.engine
            assert engine is not None
        kshape, vshape = key_states.shape, value_states.shape
        signature = (kshape, vshape, key_states.dtype, value_states.dtype, key_states.device, value_states.device)
        if signature != self._checked[e]:
            if not self.settled[e]:
                self.adopt_shape(e, key_states, value_states)
                engine = self.engine
                assert engine is not None
            self.check_states(e, key_states, value_states)
            self._checked[e] = signature
        n = self.lens[e]
        new = kshape[2]
        if n + new > self.capacity:
            self.grow(n + new)
        if self.open != e:
            self.begin(e)
        stream = self._stream
        offset, on_host = engine.layer_ready_at(e, stream)
        if on_host:
            return self.update_host(e, offset, n, key_states, value_states)
        out = self.views.write(e, offset, n, key_states, value_states)
        self.lens[e] = engine.layer_written(e, new, stream)
        return out

    def update_host(
        self, e: int, offset: int, n: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A host-attended layer's update: the new tokens go to its host buffer, attention gets only them.

        The new tokens' copy into the host arena is staged (``_host_io.HostWrites``: on CUDA a
        ``non_blocking`` copy into pinned memory with an event) and placed before anything reads the
        buffer: by the split after it has waited for the query, else when the layer is done. The
        returned key tensor is marked, so the attention function installed at attach splits this
        layer's attention (``_split``); with no past there is nothing to split.
        """
        engine = self.engine
        assert engine is not None and self.dtype is not None and self.batch is not None
        split = getattr(self.pool, "_split", None)
        if split is None or not split.active:
            raise StateError(
                f"layer {self.info.managed[e]} is attended on the host under the engine's plan, but this model's "
                "attention is not split (continuous batching restored it, or host_attention='never'); attach "
                "again with host_attention='always' or 'never'"
            )
        new = int(key_states.shape[2])
        k, v = self.views.host(e, offset)

        def place(key: torch.Tensor, value: torch.Tensor) -> None:
            k[:, :, n : n + new].copy_(key)
            v[:, :, n : n + new].copy_(value)

        # Staged, not waited for: the split places the rows once it has waited for the query anyway,
        # and the layer's end places them at the latest (``done``).
        self.host_writes.stage(e, key_states, value_states, place)
        self.lens[e] = engine.layer_written(e, new, self._stream)
        if n:
            heads, k_dim, v_dim = self.shapes[e]
            target = SplitTarget(
                region=self.views.host_bytes(),
                offset=offset,
                layer=(self.batch, heads, k_dim, v_dim),
                capacity=self.capacity,
                kv_dtype=self.dtype,
                past=n,
                add_seconds=self._add_host_seconds,
                flush=functools.partial(self.host_writes.flush, e),
            )
            self._marks[e] = mark(key_states, target, self._marks.get(e))
        return key_states, value_states

    def _add_host_seconds(self, seconds: float) -> None:
        self.host_seconds += seconds

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """Waits for every copy so data can be changed in place through views; nests."""
        if self.engine is None or self.quiesce_depth:
            self.quiesce_depth += 1
            try:
                yield
            finally:
                self.quiesce_depth -= 1
            return
        self.finish_step()
        self.engine.quiesce()
        self.quiesce_depth += 1
        try:
            yield
        finally:
            self.quiesce_depth -= 1
            if self.engine is not None:
                self.engine.resume()

    def data_views(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-capacity K and V where layer ``e``'s data is while quiesced (device slot or host buffer)."""
        assert self.engine is not None and self.quiesce_depth > 0
        return self.views.data(e)

    # ---------------------------------------------------------------------- data changes
    def set_len(self, e: int, tokens: int) -> None:
        self.mutations += 1
        if self.engine is None:
            if self.parked is not None:
                lens = list(self.lens)
                lens[e] = min(tokens, lens[e])
                self.parked = self.parked.crop(lens) if any(lens) else None  # emptied: nothing parked
                self.lens = lens
            return
        self.engine.set_seq_len(e, tokens)
        self.lens[e] = tokens

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search's reorder of every engine layer, by the engine (``Engine.reorder``).

        ``tolist`` waits for the compute that chose ``beam_idx``; the engine's copies follow it on
        the compute stream and are done when this returns.
        """
        if self.engine is None and self.parked is not None:
            self.mutations += 1
            index = beam_idx.to("cpu") if isinstance(beam_idx, torch.Tensor) else torch.tensor(list(beam_idx))
            self.parked = self.parked.map_batch(lambda t: t.index_select(0, index))
            return
        if self.engine is None or not any(self.lens):
            return
        self.mutations += 1
        self.finish_step()
        indices = beam_idx.tolist() if isinstance(beam_idx, torch.Tensor) else list(beam_idx)
        self.engine.reorder(indices, self.stream())

    def rebatch(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies a batch-changing ``transform`` to every layer: a new engine with the new batch."""
        self.check_usable()
        self.mutations += 1
        if self.engine is None and self.parked is not None:
            self.parked = self.parked.map_batch(lambda t: transform(t).to("cpu"))
            self.batch = self.parked.batch
            return
        if self.engine is None:
            self.batch = None
            return
        if not any(self.lens):
            self.close()
            self.closed = False
            self.batch = None
            return
        assert self.dtype is not None
        with self.quiesced():
            data = []
            for e, n in enumerate(self.lens):
                k, v = self.data_views(e)
                data.append((transform(k[:, :, :n]).to(self.device), transform(v[:, :, :n]).to(self.device), n))
        self._rebuild(int(data[0][0].shape[0]), data)

    def _rebuild(self, batch: int, data: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Replaces the engine by a new one (batch ``batch``, ``self.shapes``) holding ``data``.

        ``data`` gives the first ``len(data)`` layers' valid K, V and length, replayed into the new
        engine in execution order; with fewer than every layer the step stays open after the last
        one, so the layer that asked for the rebuild continues that step.
        """
        assert self.dtype is not None
        capacity, dtype, stats = self.capacity, self.dtype, self.engine_stats()
        old = self._detach_engine()
        assert old is not None
        old.close()
        self.views = ArenaViews(self.shapes)
        self.engine = self.make_engine(batch, capacity, dtype)
        self._reset_state(batch, dtype)
        self.last_stats = stats
        self.load([(k, v) for k, v, _ in data])

    def load(self, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Writes ``data[e]`` (K, V of ``n_e`` tokens, on the device or in host memory) into empty layer ``e``.

        One step through the engine's own path: each layer begins, its slot is written, its length
        recorded (a pooled layer's tokens go back to host memory after the copy), and it is done.
        """
        engine = self.engine
        assert engine is not None
        for e, (k_new, v_new) in enumerate(data):
            n = int(k_new.shape[2])
            self.begin(e)
            offset, on_host = engine.layer_ready_at(e, self._stream)
            k, v = self.views.host(e, offset) if on_host else self.views.device(e, offset)
            if n:
                # A host buffer is read by the host kernel right after: that copy completes here.
                k[:, :, :n].copy_(k_new, non_blocking=not on_host)
                v[:, :, :n].copy_(v_new, non_blocking=not on_host)
            self.lens[e] = engine.layer_written(e, n, self._stream)
            self.done(e)

    # ------------------------------------------------------------------- park and copy
    def snapshot(self, tokens: int | None = None) -> HostKV | None:
        """A host copy of the KV (the first ``tokens`` of each layer if given); ``None`` if empty.

        A parked cache returns its own (immutable) snapshot; a live one is copied out while the
        engine is quiesced, and the copy is remembered until the cache changes, so copies of an
        unchanged cache share one snapshot.
        """
        self.check_usable()
        if self.engine is None:
            if self.parked is None or tokens is None:
                return self.parked
            return self.parked.crop([min(n, tokens) for n in self.lens])
        assert self.dtype is not None and self.batch is not None
        lens = [n if tokens is None else min(n, tokens) for n in self.lens]
        key = (self.mutations, tuple(lens))
        if self._snapshot is not None and self._snapshot[0] == key:
            return self._snapshot[1]
        pin = self._cuda
        with self.quiesced():
            layers = []
            for e, n in enumerate(lens):
                k, v = self.data_views(e)
                layers.append((host_copy(k[:, :, :n], pin), host_copy(v[:, :, :n], pin)))
        snap = HostKV(tuple(layers), self.batch, self.dtype)
        if tokens is None:
            self._snapshot = (key, snap)
        return snap

    def park_snapshot(self, snap: HostKV) -> None:
        """Makes this (engine-less) cache hold ``snap``; the next update restores it into an engine."""
        assert self.engine is None
        if len(snap.layers) != len(self.shapes):
            raise ConfigError(
                f"a snapshot of {len(snap.layers)} layers cannot be parked in a cache of {len(self.shapes)} layers"
            )
        self.parked = snap
        self.lens = snap.lens
        self.batch = snap.batch if not snap.expandable else self.batch
        self.dtype = snap.dtype
        self.mutations += 1

    def park(self) -> None:
        """Moves the KV to host memory and hands the engine to the pool (kept for the next cache)."""
        self.check_usable()
        if self.engine is None or self.quiesce_depth:
            return
        self.finish_step()
        snap = self.snapshot()
        batch, dtype, sliding = self.batch, self.dtype, self.sliding_estimate
        engine = self._detach_engine()
        assert engine is not None and batch is not None and dtype is not None
        self.pool.keep_engine(engine, batch, dtype, sliding)
        self._snapshot = None
        if snap is not None and any(snap.lens):
            self.park_snapshot(snap)
        else:
            self.lens = [0] * len(self.shapes)

    def restore(self, key_states: torch.Tensor) -> None:
        """Gives a parked cache an engine again, loaded from its snapshot (batch of ``key_states``)."""
        self.check_usable()
        snap = self.parked
        assert snap is not None
        batch = int(key_states.shape[0]) if key_states.dim() == 4 else -1
        if batch != snap.batch:
            if not (snap.expandable and batch > 0 and batch % snap.batch == 0):
                raise ConfigError(
                    f"this PieCache holds KV of batch {snap.batch}, but the model runs batch {batch}; "
                    "use batch_repeat_interleave on the cache, or a cache of the right batch"
                )
            repeats = batch // snap.batch
            snap = snap.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        if key_states.dtype != snap.dtype:
            raise ConfigError(f"this PieCache holds {snap.dtype} KV; the model gave {key_states.dtype} states")
        if key_states.device.type != self.device.type:
            raise ConfigError(f"key states are on {key_states.device}, the model's cache lives on {self.device}")
        tokens = max(snap.lens) + int(key_states.shape[2])
        want = max(self.max_length or 0, tokens if self.max_length is not None else tokens + DEFAULT_HEADROOM)
        self.engine = self.acquire_engine(batch, _core.round_capacity(want), key_states.dtype)
        self._reset_state(batch, key_states.dtype)
        self.parked = None
        self.load(
            [(k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)) for k, v in snap.layers]
        )

    def adopt_shape(self, e: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Layer ``e``'s first update: keeps its guessed shape, or rebuilds the engine for the real one.

        Nothing is lost: layer ``e`` holds no token yet, and the layers before it (in execution
        order) are copied into the new engine. A layer that already holds tokens and changes shape
        is refused by ``check_states``.
        """
        self.settled[e] = True
        seen = _states_shape(key_states, value_states)
        if seen is None or seen == self.shapes[e] or self.lens[e] or int(key_states.shape[0]) != self.batch:
            return
        if any(self.lens[e:]):
            return  # a later layer already holds tokens: not a first step; check_states refuses it
        shapes = list(self.shapes)
        shapes[e] = seen
        with self.quiesced():
            data = []
            for j in range(e):
                k, v = self.data_views(j)
                n = self.lens[j]
                data.append((k[:, :, :n].to(self.device, copy=True), v[:, :, :n].to(self.device, copy=True), n))
        self.shapes = shapes
        assert self.batch is not None
        self._rebuild(self.batch, data)
        self.pool.learn_kv_shapes(self.shapes)


def _states_shape(key_states: torch.Tensor, value_states: torch.Tensor) -> LayerKV | None:
    """``(kv_heads, k_dim, v_dim)`` of 4-D key/value states that agree on batch, heads and length."""
    if key_states.dim() != 4 or value_states.dim() != 4 or tuple(key_states.shape[:3]) != tuple(value_states.shape[:3]):
        return None
    return int(key_states.shape[1]), int(key_states.shape[3]), int(value_states.shape[3])


def _engine_shapes(engine: _core.Engine) -> list[LayerKV]:
    """``(kv_heads, k_dim, v_dim)`` of every layer of ``engine``, from its own geometry."""
    out = []
    for e in range(engine.num_layers):
        view = engine.layer_view(e)
        out.append((int(view["k_shape"][1]), int(view["k_shape"][3]), int(view["v_shape"][3])))
    return out


class PieLayer(CacheLayerMixin):
    """One full-attention cache layer whose KV the pie-rs engine manages.

    Made by :class:`PieCache`; do not build it directly.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = True

    def __init__(self, shared: _Shared, layer_idx: int) -> None:
        self._shared = shared
        self.layer_idx = layer_idx
        self._e = shared.eidx[layer_idx]
        self.device = shared.device

    def __repr__(self) -> str:
        return f"PieLayer(layer_idx={self.layer_idx}, seq_len={self.get_seq_length()})"

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        """Whether the cache holds KV: an engine exists (created by the first update) or it is parked."""
        return self._shared.engine is not None or self._shared.parked is not None

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:
        pass  # owned by the shared engine state

    def _valid(self, which: int) -> torch.Tensor | None:
        sh = self._shared
        if sh.engine is None:
            if sh.parked is None:
                return None
            return sh.parked.layers[self._e][which].to(sh.device, copy=True)
        n = sh.lens[self._e]
        with sh.quiesced():
            buf = sh.data_views(self._e)[which][:, :, :n]
            return buf if sh.engine.device_offset(self._e) is not None else buf.to(sh.device, copy=True)

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        """The valid keys ``[batch, kv_heads, seq_len, k_dim]`` (a view if resident, a copy if pooled)."""
        return self._valid(0)

    @keys.setter
    def keys(self, value: Any) -> None:
        raise StateError("PieLayer keys are managed by the pie-rs engine and cannot be assigned")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        """The valid values ``[batch, kv_heads, seq_len, v_dim]`` (a view if resident, a copy if pooled)."""
        return self._valid(1)

    @values.setter
    def values(self, value: Any) -> None:
        raise StateError("PieLayer values are managed by the pie-rs engine and cannot be assigned")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Creates the shared engine from the states' batch, dtype and device if needed."""
        self._shared.initialize(key_states, value_states, self.layer_idx)
        if self._shared.engine is not None and self._shared.settled[self._e]:
            self._shared.check_states(self._e, key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new states and returns zero-copy views of all valid keys and values."""
        return self._shared.update(self._e, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the attention mask."""
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens held."""
        sh = self._shared
        return sh.lens[self._e] if sh.engine is not None or sh.parked is not None else 0

    def get_max_length(self) -> int:
        """``-1``: the layer grows on demand (its capacity is sized up front by ``generate``)."""
        return -1

    def offload(self) -> None:
        """No-op: the engine decides placement."""

    def prefetch(self) -> None:
        """No-op: the engine prefetches in execution order."""

    def reset(self) -> None:
        """Drops every token (the memory stays with the engine)."""
        sh = self._shared
        if sh.engine is not None:
            with sh.quiesced():
                sh.set_len(self._e, 0)
        elif sh.parked is not None:
            sh.set_len(self._e, 0)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last ``-tokens_to_remove`` tokens (a negative int, as in ``DynamicLayer``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        sh = self._shared
        if tokens_to_remove == 0 or (sh.engine is None and sh.parked is None):
            return
        with sh.quiesced():
            sh.set_len(self._e, max(0, sh.lens[self._e] + tokens_to_remove))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Call it on the :class:`PieCache` (the engine reorders every layer at once)."""
        raise StateError("reorder_cache reorders every layer at once: call it on the PieCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Call it on the :class:`PieCache` (the batch of every layer changes at once)."""
        raise StateError("batch_repeat_interleave changes every layer: call it on the PieCache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Call it on the :class:`PieCache` (the batch of every layer changes at once)."""
        raise StateError("batch_select_indices changes every layer: call it on the PieCache")


class PieCache(Cache):
    """A transformers ``Cache`` whose full-attention KV is pooled by the pie-rs engine.

    Make it with :meth:`pie_rs.Pool.new_cache`; pass it to ``model(...)`` or ``model.generate(...)``
    as ``cache=`` (transformers >= 5.24) or ``past_key_values=``. Sliding-window layers are
    transformers' own ``DynamicSlidingWindowLayer``.

    ``copy.deepcopy``/``copy.copy`` give independent parked copies (:meth:`copy`); :meth:`park`
    and :meth:`resume` keep a chat's KV in host memory between turns; pickling is refused (use
    :meth:`to_dynamic`).
    """

    def __init__(self, pool: Pool, info: ModelInfo, max_length: int | None = None, batch_size: int | None = None):
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
        self._pool = pool
        self._shared = _Shared(pool, info, max_length, batch_size)
        reference = reference_layers(info.text_config)
        layers: list[Any] = [
            PieLayer(self._shared, li.index) if li.kind == MANAGED else reference[li.index] for li in info.layers
        ]
        self._sliding = [layer for li, layer in zip(info.layers, layers, strict=True) if li.kind == SLIDING]
        self._sliding_peak = 0
        super().__init__(layers=layers)

    # transformers' Cache API ---------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new states of layer ``layer_idx`` and returns all its valid keys and values."""
        if not 0 <= layer_idx < len(self.layers):
            raise ConfigError(
                f"layer {layer_idx} does not exist in this PieCache of {len(self.layers)} layers; it was made "
                "for another model: make the cache with this model's pool.new_cache()"
            )
        layer = self.layers[layer_idx]
        if layer.__class__ is PieLayer:
            return layer.update(key_states, value_states)
        self._shared.check_usable()
        out = layer.update(key_states, value_states, *args, **kwargs)
        held = self.sliding_kv_bytes()
        if held > self._sliding_peak:
            self._sliding_peak = held
        return out

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders the batch of every layer (beam search): sequence ``b`` takes what ``beam_idx[b]`` held.

        The engine moves the full-attention layers' KV in place (``Engine.reorder``: only the valid
        tokens of the sequences that change); sliding-window layers reorder as transformers' do.
        """
        self._shared.check_usable()
        self._shared.reorder(beam_idx)
        for layer in self._sliding:
            layer.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last ``-tokens_to_remove`` tokens of every layer."""
        self._shared.check_usable()
        with self._shared.quiesced():
            super().crop(tokens_to_remove)

    def reset(self) -> None:
        """Drops every token of every layer; the engine keeps its memory for reuse."""
        self._shared.check_usable()
        with self._shared.quiesced():
            super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats every batch entry ``repeats`` times (a new engine with the larger batch)."""
        self._shared.rebatch(lambda t: t.repeat_interleave(repeats, dim=0))
        for layer in self._sliding:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the batch entries ``indices`` (a new engine with the smaller batch)."""
        self._shared.rebatch(lambda t: t[indices.to(t.device)])
        for layer in self._sliding:
            layer.batch_select_indices(indices)

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        """Always ``False``: the engine's hooks run Python and cannot be traced."""
        return False

    @property
    def max_batch_size(self) -> int:
        """The batch the engine was made for (``-1`` before the first update)."""
        return self._shared.batch if self._shared.batch is not None else -1

    @property
    def max_cache_len(self) -> int:
        """Tokens each layer can hold before the engine grows (``-1`` before the first update)."""
        if self._shared.engine is None:
            return self._shared.max_length if self._shared.max_length is not None else -1
        return self._shared.capacity

    # pie-rs API ---------------------------------------------------------------------------
    @property
    def engine(self) -> _core.Engine | None:
        """The engine (``None`` before the first update, after :meth:`close`, or with no full-attention layer)."""
        return self._shared.engine

    def sliding_kv_bytes(self) -> int:
        """Bytes the sliding-window layers hold now."""
        total = 0
        for layer in self._sliding:
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def stats(self) -> dict[str, Any]:
        """The engine's statistics plus the sliding-window layers' bytes (see :meth:`pie_rs.Pool.stats`)."""
        stats = self._shared.engine_stats()
        if self._shared.parked is not None:
            # Parked: the engine went back to the pool; the KV is in ``parked_kv_bytes``.
            stats["device_kv_bytes"] = stats["host_kv_bytes"] = 0
        sliding = self.sliding_kv_bytes()
        stats["sliding_layers"] = len(self._sliding)
        stats["sliding_kv_bytes"] = sliding
        stats["device_kv_bytes"] = int(stats.get("device_kv_bytes", 0)) + sliding
        stats["peak_device_kv_bytes"] = int(stats.get("peak_device_kv_bytes", 0)) + self._sliding_peak
        if not self._shared.info.managed:
            stats["resident_layers"] = stats["pooled_layers"] = 0
        stats["capacity"] = self._shared.capacity
        stats["batch"] = self._shared.batch or 0
        parked = self._shared.parked
        stats["parked"] = parked is not None
        stats["parked_kv_bytes"] = parked.nbytes if parked is not None else 0
        return stats

    # reuse: copies, parking, conversion --------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> PieCache:
        """An independent cache with the same content and pool (see :meth:`copy`)."""
        return self.copy(memo)

    def __copy__(self) -> PieCache:
        """Same as ``copy.deepcopy``: a cache whose layers were shared would not be a cache of its own."""
        return self.copy()

    def copy(self, memo: dict[int, Any] | None = None) -> PieCache:
        """An independent cache with the same content, made by the same pool.

        The copy is parked: its engine-managed KV is a snapshot in host memory, shared by every
        copy of this cache taken while it does not change (copy-on-write: the snapshot is never
        written; a copy that is updated first gets an engine of its own, loaded from it). Until
        then a copy takes no device memory; after, as much as any cache of the pool's budget.
        Later updates to this cache or to a copy never change the other. Sliding-window layers
        (small, on the device) are copied. Raises :class:`StateError` once the pool is detached.
        """
        sh = self._shared
        sh.check_usable()
        new = PieCache(self._pool, sh.info, max_length=sh.max_length, batch_size=sh.batch)
        snap = sh.snapshot()
        if snap is not None and any(snap.lens):
            new.load_snapshot(snap)
        memo = {} if memo is None else memo
        memo[id(self)] = new
        for i, layer in enumerate(self.layers):
            if layer.__class__ is not PieLayer:
                new.layers[i] = copy.deepcopy(layer, memo)
        new._sliding = [new.layers[i] for i, li in enumerate(sh.info.layers) if li.kind == SLIDING]
        new._sliding_peak = self._sliding_peak
        self._pool.adopt(new)
        return new

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(
            "a pie_rs.PieCache cannot be pickled: its KV lives in a pie-rs engine's device and host memory, "
            "which belongs to this process. Convert it first with cache.to_dynamic() (a transformers "
            "DynamicCache with the same content) and pickle that; for a copy in this process use "
            "copy.deepcopy(cache)."
        )

    def snapshot(self, tokens: int | None = None) -> HostKV | None:
        """An immutable host copy of the engine-managed layers' KV (the first ``tokens`` of each if given).

        ``None`` for a cache that never held anything. Sliding-window layers are not included.
        """
        return self._shared.snapshot(tokens)

    def load_snapshot(self, snap: HostKV) -> None:
        """Makes this empty cache hold ``snap``, parked (the next update loads it into an engine).

        A snapshot from the prefix store (``expandable``) also serves a batch that is a multiple of
        its own (``generate`` expanding prompts for beams or returned sequences).
        """
        sh = self._shared
        sh.check_usable()
        if sh.engine is not None or sh.parked is not None or any(sh.lens):
            raise StateError("load_snapshot needs an empty cache: make one with pool.new_cache()")
        sh.park_snapshot(snap)

    def park(self) -> None:
        """Moves the KV to host memory between uses (a chat between turns) and frees the engine.

        The engine goes back to the pool for the next cache to reuse (its device memory with it);
        the next update (the next ``generate`` with this cache) loads the KV into an engine again,
        or call :meth:`resume`. Parking an empty or already parked cache does nothing.
        """
        self._shared.park()

    def resume(self) -> None:
        """Loads a parked cache back into an engine now (the next update does it otherwise)."""
        sh = self._shared
        sh.check_usable()
        if sh.parked is None:
            return
        k = sh.parked.layers[0][0]
        dtype = sh.parked.dtype
        probe = torch.empty((sh.parked.batch, k.shape[1], 0, k.shape[3]), dtype=dtype, device=sh.device)
        sh.restore(probe)

    @property
    def parked(self) -> bool:
        """Whether the KV is parked in host memory (after :meth:`park`, or a copy not yet used)."""
        return self._shared.parked is not None

    def to_dynamic(self) -> Any:
        """A transformers ``DynamicCache`` with the same content (on the model's device).

        For pickling, or for handing the KV to code that wants transformers' own cache.
        """
        from transformers import DynamicCache

        self._shared.check_usable()
        out = DynamicCache(config=self._shared.info.text_config)
        for i, layer in enumerate(self.layers):
            if layer.__class__ is not PieLayer:
                out.layers[i] = copy.deepcopy(layer)  # transformers' own layer (sliding window)
                continue
            keys, values = layer.keys, layer.values
            if keys is not None and values is not None:
                out.layers[i].update(keys.clone(), values.clone())
        return out

    def close(self) -> None:
        """Frees the engine's memory now; the cache cannot be used afterwards."""
        self._shared.close()
        for layer in self._sliding:
            layer.reset()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the pool was detached)."""
        return self._shared.closed

    @property
    def pool(self) -> Pool:
        """The pool that made this cache."""
        return self._pool

    def release(self) -> None:
        """Closes this cache and hands its engine, emptied, to the pool for the next cache to reuse.

        ``generate`` does this when it finishes; if the engine cannot be reused (a step still open,
        the pool detached) it is closed instead, as :meth:`close` does.
        """
        self._shared.release()

    def end_layer(self, layer_idx: int) -> None:
        """Marks decoder layer ``layer_idx`` done for this step (the pool's forward hook calls it)."""
        e = self._shared.eidx.get(layer_idx)
        if e is not None and self._shared.engine is not None:
            self._shared.done(e)
