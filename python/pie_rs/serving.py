"""Pooled KV inside transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``).

transformers' :class:`PagedAttentionCache` keeps the KV of a group of layers in one flat tensor cut
into sectors and blocks; a block holds one page (``page_size`` tokens, K then V) of every layer of
the group. With a pool attached, :class:`PagedPieCache` takes its place: every layer of the group
gets its own area of rows (K ``[rows, kv_heads, head_dim]`` then V), held by a pie-rs engine, so a
layer is the unit the engine swaps exactly as in ``generate``. Resident layers keep their area in
the engine's device arena; pooled layers live in pinned host memory and borrow a device staging
slot while they run, prefetched ahead through the same FIFO, swapper, schedule and policy.

The block and sector bookkeeping stays transformers' own (allocators, prefix sharing, forking,
the scheduler and its CPU offloading); only the physical layout changes: block ``b`` of a layer is
rows ``[b * page_size, (b + 1) * page_size)`` of that layer's area. Rows written in a step are
recorded when the batch is prepared; a pooled layer writes back exactly those rows; a prefetch
moves the layer's rows up to the highest ever written (sectors are handed out lowest first).

With a prefix store on the pool, admission (``search_prefix_match``) extends transformers' own
prefix match with whole store blocks copied into the request's blocks, and with
``remember_prompts`` a prefilled request's prompt goes to the store (``mark_complete_blocks``).

The budget given to ``attach`` sizes the cache: pie-core (``_core.paged_fit``) answers how many
rows per layer fit when the resident layers' areas plus the staging slots must fit the budget, so
pooling buys blocks. One budget covers ``generate`` and continuous batching: a paged cache gets the
budget less the device KV of live ``generate`` caches (and the pool's kept engine is released), and
a ``generate`` while a paged cache lives gets the budget less the paged cache's device bytes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import ceil
from typing import TYPE_CHECKING, Any

import torch

from . import _core, distributed
from ._errors import BudgetError, ConfigError, PieError, StateError
from ._host_io import HostWrites
from ._split import PagedSplitTarget, mark
from .prefix import HostKV

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["PagedPieCache", "serving_supported"]

#: transformers versions whose paged cache layout this module knows.
MIN_TRANSFORMERS = (5, 24)
_CB_ATTENTION = ("paged|sdpa", "paged|eager", "sdpa", "paged|flash_attention_2", "paged|flash_attention_3")
_FACTORY_LOCK = threading.Lock()


def _version() -> tuple[int, int]:
    import transformers

    parts = transformers.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return (0, 0)


def serving_supported() -> str | None:
    """``None`` when continuous batching can run with pooled KV here, else why not."""
    if _version() < MIN_TRANSFORMERS:
        import transformers

        return (
            f"pie-rs serving needs transformers >= {MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]} (its paged cache "
            f"layout); this is {transformers.__version__}. Upgrade transformers, or detach pie-rs to run continuous "
            "batching on its own"
        )
    return None


def _modules() -> Any:
    from transformers.generation.continuous_batching import cache as cb_cache
    from transformers.generation.continuous_batching import continuous_api

    return cb_cache, continuous_api


def coalesce(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted ``(start, n)`` runs covering ``rows`` (any order, duplicates allowed)."""
    if not rows:
        return []
    rows = sorted(set(rows))
    out = []
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            out.append((start, prev - start + 1))
            start = r
        prev = r
    out.append((start, prev - start + 1))
    return out


class _BlockBytes:
    """Stands in for an allocator's ``_copy_view`` (the cache as ``[num_blocks, bytes_per_block]``).

    transformers copies whole blocks through it when a request forks and when its offloading
    manager swaps a request to CPU memory and back. A block is the concatenation of its page in
    every layer (K then V per layer); pages of pooled layers are read from and written to their
    host copy (the engine quiesced), so block copies reach the pooled layers too.
    """

    def __init__(self, cache: PagedPieCache) -> None:
        self._cache = weakref.ref(cache)

    @property
    def device(self) -> torch.device:
        return self._owner().device_t

    def _owner(self) -> PagedPieCache:
        cache = self._cache()
        if cache is None:
            raise StateError("this paged cache was released")
        return cache

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        cache = self._owner()
        ids = index.to("cpu", torch.long)
        parts = []
        with cache.quiesced():
            for e in range(cache.layers):
                for area in cache.data_pages(e):
                    parts.append(area.index_select(0, ids.to(area.device)).to(cache.device_t))
        return torch.cat(parts, dim=1) if parts else torch.empty(0, dtype=torch.uint8, device=cache.device_t)

    def index_copy_(self, dim: int, index: torch.Tensor, source: torch.Tensor) -> _BlockBytes:
        assert dim == 0
        cache = self._owner()
        ids = index.to("cpu", torch.long)
        if ids.numel() == 0:
            return self
        page = cache.page_bytes
        with cache.quiesced():
            col = 0
            for e in range(cache.layers):
                for area in cache.data_pages(e):
                    area.index_copy_(0, ids.to(area.device), source[:, col : col + page].to(area.device))
                    col += page
            top = (int(ids.max()) + 1) * cache.page_size
            for e in range(cache.layers):
                if cache.engine.seq_len(e) < top:
                    _core.paged_set_extent(cache.engine, e, top)
        return self


class PagedPieCache:
    """transformers' ``PagedAttentionCache`` with every layer's pages held by a pie-rs engine.

    transformers' allocators, sectors, blocks, prefix sharing, forks and preemption run unchanged;
    each layer of the (single) attention group owns an area of rows in the engine (resident, or
    pooled in host memory and staged per step). Made by continuous batching when a pool is attached
    (the class itself is built on first use, as a subclass of the installed transformers' cache);
    ``isinstance(cache, PagedPieCache)`` recognises it.
    """

    # Attributes set by the subclass' __init__ (declared for type checkers).
    engine: Any
    layers: int
    page_size: int
    page_bytes: int
    device_t: torch.device

    def quiesced(self) -> contextlib.AbstractContextManager[None]:  # pragma: no cover - replaced
        raise NotImplementedError

    def data_pages(self, e: int) -> list[torch.Tensor]:  # pragma: no cover - replaced
        raise NotImplementedError


@functools.cache
def _cache_class() -> type:
    """The subclass of transformers' ``PagedAttentionCache`` (made once, on first use)."""
    cb_cache, _ = _modules()
    base = cb_cache.PagedAttentionCache

    class _PagedPieCache(base, PagedPieCache):  # type: ignore[misc, valid-type]
        __doc__ = PagedPieCache.__doc__

        def __init__(
            self,
            pool: Pool,
            config: Any,
            continuous_batching_config: Any,
            device: Any,
            distributed_helper: Any,
            dtype: torch.dtype = torch.float16,
            model_supports_logits_to_keep: bool = False,
            *,
            user_num_blocks: int | None = None,
            min_tokens: int = 1,
            engine_options: dict[str, Any] | None = None,
            host_attention: str = "never",
        ) -> None:
            self.engine = None
            self._closed = False
            groups = cb_cache.group_layers_by_attn_type(config)
            if len(groups) != 1:
                raise ConfigError(
                    f"pie-rs serving pools models whose layers all share one attention type; this one mixes "
                    f"{' and '.join(groups)} layers (transformers shares one sector space between the groups). "
                    "Run continuous batching without pie-rs (pool.detach()) or use generate()"
                )
            # Tensor parallel: this rank's pool (refused on every rank when the pool has no such group).
            self.rank_group = distributed.serving_group(pool, distributed_helper.tp_size)
            self.tp_failures: distributed.StepFailures | None = None
            self._scratch_kv: Any = None
            # Let transformers build its allocators and sizing on a one-sector cache, then lay the
            # real cache out in the engine.
            tiny = _copy_config(continuous_batching_config)
            tiny.num_blocks = 1
            super().__init__(config, tiny, device, distributed_helper, dtype, model_supports_logits_to_keep)
            ((self.group_name, allocator),) = self.cache_allocators.items()
            self.host_attention = _host_placement(host_attention, self.group_name, self.rank_group is not None)
            self.allocator = allocator
            self.cache_tensor = None  # the one-sector tensor: nothing refers to it any more
            self.pool_ref = weakref.ref(pool)
            self.device_t = torch.device(device)
            self.dtype_t = dtype
            self.layer_indices = list(allocator.layer_indices)
            self.layers = len(self.layer_indices)
            self._eidx = {li: e for e, li in enumerate(self.layer_indices)}
            self.page_size = page = allocator.tokens_per_page
            heads, dim = allocator.num_key_value_heads, allocator.head_dim
            self.heads, self.head_dim = heads, dim
            elem = dtype.itemsize
            self.page_bytes = page * heads * dim * elem  # one K (or V) page of one layer
            bps = self.bytes_per_sector
            quantum = allocator.blocks_per_sector * page  # rows per sector per layer
            self.quantum = quantum
            min_sectors = ceil(max(1, min_tokens) / quantum)
            budget = pool._serving_budget()
            budget_rank, self._tp_run = None, ""
            if self.rank_group is not None:
                # Every rank sizes its cache from the same inputs (see pie_rs.distributed).
                budget, budget_rank, self._tp_run = distributed.agree_serving(
                    self.rank_group, budget, getattr(pool.settings, "budget_rank", None)
                )
            row = (heads * dim, heads * dim, elem)
            min_rows = (2 + min_sectors) * quantum
            if user_num_blocks is not None:
                per_block = self.layers * 2 * self.page_bytes  # transformers' whole-model block
                sectors = max(1, ceil(user_num_blocks * per_block / bps))
                target: dict[str, Any] = {"rows": (2 + sectors) * quantum}
            elif pool.pooled_layers is not None and pool.info.managed == self.layer_indices:
                target = {"pooled_layers": list(pool.settings.pooled_layers or ())}
            elif budget is None:
                target = {"rows": (2 + self._default_sectors(config, continuous_batching_config, dtype)) * quantum}
            else:
                count = self.layers if pool.objective == "memory" else ceil(self.layers / 2)
                target = {"pooled_count": count}
            # Staging slots: enough to prefetch a few pooled layers ahead, few enough that pooling
            # buys rows (W slots cost W layers' areas): a quarter of the pooled layers, 1 to 4.
            pooled_guess = int(target.get("pooled_count", len(target.get("pooled_layers", ()))) or self.layers)
            depth = pool.prefetch_depth or max(1, min(4, pooled_guess // 4))
            # Under "always" every pooled layer is host-attended (never copied): no staging slot
            # takes the budget, which buys rows instead.
            host_attended = self.host_attention == "always"
            try:
                fit = _core.paged_fit(
                    row,
                    self.layers,
                    budget,
                    quantum,
                    min_rows,
                    prefetch_depth=depth,
                    host_attended=host_attended,
                    **target,
                )
            except BudgetError as e:
                why = (
                    f"{e} (continuous batching with page_size={page}: {self.layers} layers, one request of "
                    f"{min_tokens} tokens needs {min_sectors} sector(s) besides the 2 trash sectors)"
                )
                if self.rank_group is not None:
                    raise distributed.serving_budget_error(self.rank_group, budget_rank, budget, why) from None
                raise BudgetError(why) from None
            rows = int(fit["rows"])
            self.plan = (list(fit["pooled_layers"]), max(1, int(fit["prefetch_depth"])))  # pooled areas, slots
            self.num_sectors = rows // quantum - 2
            options = dict(engine_options or {})
            self.engine = _core.Engine(
                pool.backend,
                [(1, 1, heads * dim, heads * dim, elem)] * self.layers,
                rows,
                device_index=pool.settings.device_index,
                budget_bytes=budget,
                policy="static",
                pooled_layers=list(fit["pooled_layers"]),
                prefetch_depth=max(1, int(fit["prefetch_depth"])),
                host_attention=self.host_attention,
                **options,
            )
            self.rows = rows
            # transformers' bookkeeping at the real size (what __init__ derives from num_sectors).
            non_trash = self.num_sectors * bps
            self.pool = _AscendingPool(self.num_sectors, len(self.cache_allocators))
            allocator.pool = self.pool
            self.pool.set_blocks_per_sector(allocator.index, allocator.blocks_per_sector)
            allocator.num_pages = non_trash // allocator.bytes_per_page
            allocator.num_blocks = allocator.num_pages // allocator.pages_per_block
            allocator.block_physical_stride = page  # block b of a layer: rows [b * page, (b + 1) * page)
            allocator.write_trash_index = page * allocator.blocks_per_sector
            allocator.cache_tensor = None
            allocator._copy_view = _BlockBytes(self)
            allocator._kv_token_views = {}
            allocator._kv_page_views = {}
            per_block = config.num_hidden_layers * 2 * self.page_bytes
            self.num_blocks = non_trash // per_block
            self.read_cache_limit = self._infer_read_cache_limit()
            self.max_decode_fast_path_length = self._infer_max_decode_fast_path_length()
            self.max_tokens_read = allocator.tokens_per_page * allocator.num_blocks
            # Per step: rows written (recorded while the batch is prepared), then frozen at layer 0.
            self._writes: list[int] = []
            self._ranges: list[tuple[int, int]] = []
            self._open: int | None = None
            self._stream = 0
            self._cuda = self.device_t.type == "cuda"
            self._generation = -1
            self._views: dict[tuple[int, int], Any] = {}
            self._typed: torch.Tensor | None = None
            self._host: torch.Tensor | None = None
            self.stats_running = 0
            self.peak_running = 0
            self.preemptions = 0
            self.steps = 0
            self._runs = 0
            self._new_run()
            # The pool's prefix store, seen from continuous batching (see search_prefix_match).
            self.prefix_lookups = 0
            self.prefix_hits = 0
            self.prefix_tokens_reused = 0
            self.prefix_tokens_stored = 0
            self._remembered: set[str] = set()  # requests whose prompt went to the store (or needs not)
            # Host attention: per request of the batch being prepared (past, new, past rows, write
            # rows), frozen at layer 0 into the step's split (``_paged_step``); staged host writes.
            self._requests: list[tuple[int, int, list[int], list[int]]] = []
            self._step_requests: list[tuple[int, int, list[int], list[int]]] = []
            self._step_split: _PagedStep | None = None
            self.host_writes = HostWrites()
            self._marks: dict[int, int] = {}
            self.host_seconds = 0.0
            self._zero()

        # ----------------------------------------------------------------- sizing
        def _default_sectors(self, config: Any, cb_config: Any, dtype: torch.dtype) -> int:
            """Sectors transformers' own sizing would give (no budget: everything resident)."""
            sizing = cb_cache.PagedAttentionMemoryHandler(
                config=config,
                cb_config=_copy_config(cb_config, num_blocks=None),
                dtype=dtype,
                bytes_per_sector=self.bytes_per_sector,
                tokens_per_sector=self.tokens_per_sector,
                bytes_per_block=config.num_hidden_layers * 2 * self.page_bytes,
                attn_types=list(self.cache_allocators.keys()),
            )
            return int(sizing.infer_max_batch_tokens_and_num_sectors()[1])

        # ------------------------------------------------------------------ views
        def _refresh(self) -> None:
            engine = self.engine
            if engine.generation != self._generation:
                self._views.clear()
                raw = torch.from_dlpack(engine.device_region())
                elem = self.dtype_t.itemsize
                self._typed = raw[: raw.numel() - raw.numel() % elem].view(self.dtype_t)
                self._host = None
                self._generation = engine.generation

        def _area(self, e: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
            """K and V ``[rows, heads, head_dim]`` of the device slot at byte ``offset``."""
            self._refresh()
            key = (e, offset)
            views = self._views.get(key)
            if views is None:
                assert self._typed is not None
                elem = self.dtype_t.itemsize
                n = self.rows * self.heads * self.head_dim
                base = offset // elem
                if offset % elem or base + 2 * n > self._typed.numel():
                    raise StateError(f"engine offset {offset} of layer {e} lies outside its arena")
                k = self._typed[base : base + n].view(self.rows, self.heads, self.head_dim)
                v = self._typed[base + n : base + 2 * n].view(self.rows, self.heads, self.head_dim)
                pages = (-1, self.page_size, self.heads, self.head_dim)
                views = self._views[key] = (k, v, k.view(*pages), v.view(*pages))
            return views[0], views[1]

        def authoritative(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Layer ``e``'s authoritative K and V ``[rows, heads, head_dim]`` (quiesced).

            A resident layer's area in the device arena; a pooled layer's copy in host memory (what
            its next prefetch moves up, up to the extent set by ``paged_set_extent``).
            """
            offset = self.engine.device_offset(e)
            if offset is not None:
                return self._area(e, offset)
            return self._host_area(self.engine.host_offset(e))

        def _host_area(self, at: int) -> tuple[torch.Tensor, torch.Tensor]:
            """K and V ``[rows, heads, head_dim]`` of the pooled layer at host byte offset ``at``."""
            self._refresh()
            if self._host is None:
                self._host = torch.from_dlpack(self.engine.host_region())
            elem = self.dtype_t.itemsize
            n = self.rows * self.heads * self.head_dim * elem
            shape = (self.rows, self.heads, self.head_dim)
            k = self._host[at : at + n].view(self.dtype_t).view(shape)
            v = self._host[at + n : at + 2 * n].view(self.dtype_t).view(shape)
            return k, v

        def data_pages(self, e: int) -> list[torch.Tensor]:
            """Layer ``e``'s authoritative K and V as ``[blocks, page bytes]`` (quiesced)."""
            return [x.reshape(-1).view(torch.uint8).view(-1, self.page_bytes) for x in self.authoritative(e)]

        def _zero(self) -> None:
            """Zeroes every area, as transformers' ``torch.zeros`` cache is (the read trash must read zeros)."""
            with self.quiesced():
                for e in range(self.layers):
                    for area in self.data_pages(e):
                        area.zero_()

        @contextlib.contextmanager
        def quiesced(self) -> Iterator[None]:
            self.check_usable()
            self.finish_step()
            self.engine.quiesce()
            try:
                yield
            finally:
                self.engine.resume()

        # ------------------------------------------------------------------ state
        def check_usable(self) -> None:
            pool = self.pool_ref()
            if pool is None or pool.closed:
                raise StateError("the pie-rs pool of this continuous batching cache was detached; attach again")
            if self._closed or self.engine is None:
                raise StateError("this continuous batching cache was closed; start a new generation")

        def close(self) -> None:
            if not self._closed:
                self._closed = True
                self._views.clear()
                self.allocator._kv_token_views.clear()
                self.allocator._kv_page_views.clear()
                self._typed = self._host = None
                self.host_writes.drop()
                engine, self.engine = self.engine, None
                if engine is not None:
                    with contextlib.suppress(Exception):
                        self.last_stats = dict(engine.stats())
                    # The serving thread may be inside an engine call ("Already borrowed"): it sees the
                    # cache closed at its next layer; the engine then closes when it is dropped.
                    for _ in range(200):
                        try:
                            engine.close()
                            break
                        except RuntimeError:
                            time.sleep(0.005)

        def __del__(self) -> None:
            with contextlib.suppress(Exception):
                self.close()

        def device_kv_bytes(self) -> int:
            if self.engine is None or self._closed:
                return 0
            return int(self._engine_stats().get("device_kv_bytes", 0))

        # ------------------------------------------------------------- batch prep
        def extend_read_and_write_indices(
            self,
            request_id: str,
            past_length: int,
            query_length: int,
            read_index: Any,
            write_index: list[list[int]],
        ) -> None:
            group = write_index[0]
            before = len(group)
            reads = None if read_index is None else read_index[0]
            read_before = 0 if reads is None else len(reads)
            super().extend_read_and_write_indices(request_id, past_length, query_length, read_index, write_index)
            written = group[before:]
            self._record(written)
            if self.host_attention != "never":
                # A full-attention request reads its past rows then its new ones, in token order.
                past = [] if reads is None or not past_length else reads[read_before : read_before + past_length]
                self._requests.append((past_length, query_length, past, written))

        def fill_block_table(
            self, request_id: str, past_length: int, query_length: int, block_table: torch.Tensor
        ) -> None:
            super().fill_block_table(request_id, past_length, query_length, block_table)
            self._record(self.allocator.get_write_indices(request_id, past_length, query_length))

        def _record(self, rows: list[int]) -> None:
            trash_end = 2 * self.quantum  # rows of the two trash sectors are never read back
            self._writes.extend(r for r in rows if r >= trash_end)

        # ------------------------------------------------------------ prefix store
        # transformers' prefix sharing hashes a request's full pages once computed and lends them to
        # later requests of the same session (``search_prefix_match`` at admission, then the scheduler
        # computes only the rest). The pool's prefix store extends that match: the scheduler asks the
        # cache, transformers' own sharing answers first (its blocks cost no copy), and whole store
        # blocks beyond it are copied into fresh blocks of the request. The scheduler only asks while
        # ``use_prefix_sharing`` is true, so a configured store turns it on; transformers' own sharing
        # (hashing, de-duplication, sharing forks) still follows ``allow_block_sharing``.
        @property
        def use_prefix_sharing(self) -> bool:
            return self._tf_sharing or self._prefix_store() is not None

        @use_prefix_sharing.setter
        def use_prefix_sharing(self, value: bool) -> None:
            self._tf_sharing = bool(value)

        def _prefix_store(self) -> Any:
            ref = getattr(self, "pool_ref", None)
            pool = ref() if ref is not None else None
            return None if pool is None or pool.closed else pool._store

        def _store_key(self) -> str:
            return str(self.dtype_t)  # the key generate uses (the model's dtype): one trie per dtype

        def search_prefix_match(self, request_id: str, prompt_ids: list[int]) -> int:
            """Tokens of the prompt whose KV the request gets without computing them.

            transformers' shared blocks first, then whole blocks of the pool's prefix store copied
            into blocks allocated to the request. The last prompt token is always computed (its
            logits); a store match that the cache has no room for is not used (the request then
            computes those tokens, it never fails for it).
            """
            shared = super().search_prefix_match(request_id, prompt_ids) if self._tf_sharing else 0
            store = self._prefix_store()
            if store is None or self._closed:
                return shared
            # A request that forks (num_return_sequences) computes all but its last prompt token before
            # the fork, so it must be left two of them (one would schedule an empty forward).
            limit = len(prompt_ids) - (2 if self._will_fork(request_id) else 1)
            kv = store.match(self._store_key(), [list(prompt_ids[:limit])], limit, count=False)
            end = self._usable(kv)
            if end <= shared or not self._allocate(request_id, shared, end):
                store.count(0)
                self.prefix_lookups += 1
                return shared
            alloc = self.allocator
            rows = alloc.get_write_indices(request_id, shared, end - shared)
            self._write_rows(rows, kv, shared, end)
            if self.allow_block_sharing:
                # The copied full pages become transformers' shareable blocks, as if computed here.
                new_pages = end // self.page_size - shared // self.page_size
                alloc.mark_complete_blocks(request_id, list(prompt_ids[:end]), new_pages)
            store.count(end - shared)
            self.prefix_lookups += 1
            self.prefix_hits += 1
            self.prefix_tokens_reused += end - shared
            return end

        def _will_fork(self, request_id: str) -> bool:
            ref = getattr(self, "scheduler_ref", None)
            scheduler = ref() if ref is not None else None
            state = None if scheduler is None else scheduler.waiting_requests.get(request_id)
            return state is None or int(getattr(state, "num_children", 0) or 0) > 0  # unknown: the safe side

        def _usable(self, kv: Any) -> int:
            """Tokens of a store match this cache can take (0 for none, or KV of another layout)."""
            if kv is None or len(kv.layers) != self.layers or kv.dtype != self.dtype_t:
                return 0
            shape = tuple(kv.layers[0][0].shape)
            if shape[1] != self.heads or shape[3] != self.head_dim:
                return 0
            return int(shape[2])

        def _allocate(self, request_id: str, start: int, end: int) -> bool:
            """Gives the request blocks for tokens ``[start, end)``, if the cache has room for them."""
            alloc = self.allocator
            need = alloc.needs_new_blocks(request_id, start, end - start)
            missing = need - self.pool.count_free_blocks(alloc.index)
            sectors = max(0, ceil(missing / alloc.blocks_per_sector))
            if sectors > self.pool.num_free_sectors:
                return False
            for _ in range(sectors):
                self.pool.allocate_sector(alloc.index)
            alloc.allocate_cache_to_request(request_id, start, end - start)
            return True

        def _write_rows(self, rows: list[int], kv: Any, start: int, end: int) -> None:
            """Writes tokens ``[start, end)`` of ``kv`` (batch 1) to ``rows`` of every layer."""
            index = torch.tensor(rows, dtype=torch.long)
            with self.quiesced():
                for e in range(self.layers):
                    k_area, v_area = self.authoritative(e)
                    at = index.to(k_area.device)
                    for area, src in zip((k_area, v_area), kv.layers[e], strict=True):
                        area.index_copy_(0, at, src[0, :, start:end].transpose(0, 1).to(area.device, area.dtype))
                top = max(rows) + 1
                for e in range(self.layers):
                    if self.engine.seq_len(e) < top:
                        _core.paged_set_extent(self.engine, e, top)  # the engine's view: rows up to top are valid

        def mark_complete_blocks(self, state: Any, complete_blocks: dict[str, int]) -> None:
            """Runs transformers' hashing after a forward; then, once a prompt is computed, stores its KV.

            Only with ``remember_prompts`` on the pool's store, once per request; the prompt's whole
            store blocks are read from the request's blocks before it can free them.
            """
            super().mark_complete_blocks(state, complete_blocks)
            rid = state.request_id
            if rid in self._remembered or state.remaining_prefill_tokens:
                return
            self._remembered.add(rid)
            pool = self.pool_ref()
            store = self._prefix_store()
            if store is None or not pool._remember_prompts or self._closed:
                return
            tokens = [int(t) for t in state.initial_tokens]
            whole = len(tokens) // store.block_tokens * store.block_tokens
            key = self._store_key()
            if whole == 0 or store.matched_tokens(key, tokens) >= whole:
                return
            table = self.allocator.block_table.get(rid)
            if table is None or len(table) * self.page_size < whole:
                return
            index = torch.tensor(self.allocator.get_read_indices(rid, 0, whole), dtype=torch.long)
            layers = []
            with self.quiesced():
                for e in range(self.layers):
                    pair = []
                    for area in self.authoritative(e):
                        # [whole, heads, dim] -> [1, heads, whole, dim], the store's layout
                        pair.append(area.index_select(0, index.to(area.device)).transpose(0, 1).unsqueeze(0).cpu())
                    layers.append((pair[0], pair[1]))
            added = store.insert(key, tokens[:whole], HostKV(tuple(layers), 1, self.dtype_t))
            self.prefix_tokens_stored += added * store.block_tokens

        # ---------------------------------------------------------------- forward
        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict[str, Any]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            e = self._eidx[layer_idx]
            try:
                k, v, pages = self._layer_views(e)
            except PieError as exc:
                if self.tp_failures is None:
                    raise
                # The peers wait in this layer's collective: finish the forward on scratch KV and
                # raise after it, on every rank (end_step).
                self.tp_failures.record(exc)
                k, v, pages = self._scratch()
            if pages is None:
                return self._update_host(e, k, v, key_states, value_states, layer_idx, kwargs)
            self.allocator._kv_token_views[layer_idx] = (k, v)
            self.allocator._kv_page_views[layer_idx] = pages
            return super().update(key_states, value_states, layer_idx, kwargs)

        def _layer_views(self, e: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
            """Layer ``e``'s K and V (rows and pages) in the engine, once it is ready for this step.

            A host-attended layer gives its host area and no pages.
            """
            if self.tp_failures is not None and self.tp_failures.failure is not None:
                raise self.tp_failures.failure  # this step already failed: the engine is not called again
            if self._closed or self.engine is None:
                self.check_usable()
            engine = self.engine
            if self._open != e:
                if e == 0:
                    self._ranges = coalesce(self._writes)
                    self._writes = []
                    self._step_requests, self._requests = self._requests, []
                    self._step_split = None
                    self._stream = torch.cuda.current_stream(self.device_t).cuda_stream if self._cuda else 0
                    self.steps += 1
                self._close_layer()
                engine.layer_begin(e, self._stream)
                self._open = e
            offset, on_host = engine.layer_ready_at(e, self._stream)
            if on_host:
                k, v = self._host_area(offset)
                return k, v, None
            k, v = self._area(e, offset)
            views = self._views[(e, offset)]
            return k, v, (views[2], views[3])

        def _update_host(
            self,
            e: int,
            k_area: torch.Tensor,
            v_area: torch.Tensor,
            key_states: torch.Tensor,
            value_states: torch.Tensor,
            layer_idx: int,
            kwargs: dict[str, Any],
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """A host-attended layer: its new rows go to its host area, attention gets only the new tokens.

            The rows are staged (``HostWrites``) and land before the layer is done; the returned key
            tensor is marked, so the installed attention splits the call (``_split._split_paged``):
            the host kernel over each request's past rows, read in place, and the device over the new.
            """
            if self._host_split_inactive():
                raise StateError(
                    f"layer {layer_idx} is attended on the host, but the model's attention is not split (it "
                    "does not run 'sdpa'); attach with host_attention='never' to serve it"
                )
            allocator = self.layer_to_allocator[layer_idx]
            # What transformers' update does to the kwargs for every layer (read by the attention).
            kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
            kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
            step = self._paged_step()

            def place(key: torch.Tensor, value: torch.Tensor) -> None:
                # [1, kv_heads, new, dim] -> the new rows of the layer's area, scattered over blocks
                k_area.index_copy_(0, step.write_rows, key[0].transpose(0, 1))
                v_area.index_copy_(0, step.write_rows, value[0].transpose(0, 1))

            self.host_writes.stage(e, key_states, value_states, place)
            if step.has_past:
                target = PagedSplitTarget(
                    k_area=k_area,
                    v_area=v_area,
                    requests=step.requests,
                    new_columns=step.new_columns,
                    flush=functools.partial(self.host_writes.flush, e),
                    add_seconds=self._add_host_seconds,
                )
                self._marks[e] = mark(key_states, target, self._marks.get(e))
            return key_states, value_states

        def _host_split_inactive(self) -> bool:
            pool = self.pool_ref()
            split = None if pool is None else pool._split
            return split is None or not split.sdpa

        def _add_host_seconds(self, seconds: float) -> None:
            self.host_seconds += seconds

        def _paged_step(self) -> _PagedStep:
            """The step's requests as the split reads them (built at its first host-attended layer)."""
            if self._step_split is None:
                self._step_split = _PagedStep.build(self._step_requests, self.device_t)
            return self._step_split

        def _scratch(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            """Throwaway K and V of one layer, for the rest of a tensor-parallel step that failed."""
            if self._scratch_kv is None:
                shape = (self.rows, self.heads, self.head_dim)
                k, v = (torch.zeros(shape, dtype=self.dtype_t, device=self.device_t) for _ in range(2))
                pages = (-1, self.page_size, self.heads, self.head_dim)
                self._scratch_kv = (k, v, (k.view(*pages), v.view(*pages)))
            return self._scratch_kv

        def _close_layer(self) -> None:
            """Ends the open layer: its written rows go back, then its staging slot is released.

            Both wait for the attention that wrote the rows (the flash block-table kernel writes inside it).
            """
            open_layer, self._open = self._open, None
            if open_layer is not None and self.engine is not None:
                self.host_writes.flush(open_layer)  # a host-attended layer's rows land before it is done
                if self._ranges:
                    _core.paged_written(self.engine, open_layer, self._ranges, self._stream)
                self.engine.layer_done(open_layer, self._stream)

        def finish_step(self) -> None:
            """After the forward: the last layer is done."""
            if self._open is not None:
                self._close_layer()
            self.host_writes.flush()

        def end_step(self) -> None:
            """After the forward: the last layer is done; under tensor parallel, any rank's failure raises here."""
            if self.tp_failures is None:
                self.finish_step()
                return
            try:
                if self.tp_failures.failure is None:
                    self.finish_step()
            except PieError as exc:
                self.tp_failures.record(exc)
            self.tp_failures.check()

        def _new_run(self) -> None:
            """A new run of this cache (made, or reset for the next session): its own failure record."""
            if self.rank_group is not None:
                self._runs += 1
                self.tp_failures = distributed.StepFailures(self.rank_group, f"{self._tp_run}/{self._runs}")

        # ------------------------------------------------------------- lifecycle
        def reset(self) -> None:
            super().reset()
            self._new_run()
            self._remembered.clear()
            self._requests = []  # a batch prepared but never run (a failed step) is not the next one's
            if self.engine is not None and not self._closed:
                self.finish_step()
                self.engine.reset()  # nothing is held: prefetches move nothing until rows are written again

        def _engine_stats(self) -> dict[str, Any]:
            """The engine's counters; the last ones read while the serving thread holds the engine."""
            for _ in range(50):
                engine = self.engine
                if engine is None:
                    break
                try:
                    self.last_stats = dict(engine.stats())
                    break
                except RuntimeError:  # "Already borrowed": a layer call is in flight on the serving thread
                    time.sleep(0.001)
            return dict(getattr(self, "last_stats", {}))

        def serving_stats(self) -> dict[str, Any]:
            stats = self._engine_stats()
            layers = self.layers
            pooled = len(stats.get("pooled", []))
            free = self.pool.num_free_sectors * self.allocator.blocks_per_sector + self.pool.count_free_blocks(
                self.allocator.index
            )
            total = self.num_sectors * self.allocator.blocks_per_sector
            return {
                "num_blocks": total,
                "blocks_in_use": total - free,
                "device_blocks": total * (layers - pooled) / layers,
                "pool_blocks": total * pooled / layers,
                "page_size": self.page_size,
                "rows_per_layer": self.rows,
                "requests_running": self.stats_running,
                "peak_running": self.peak_running,
                "preemptions": self.preemptions,
                "forward_steps": self.steps,
                "resident_layers": layers - pooled,
                "pooled_layers": pooled,
                "pooled": [self.layer_indices[i] for i in stats.get("pooled", [])],
                "prefetch_depth": stats.get("prefetch_depth", 0),
                "device_kv_bytes": stats.get("device_kv_bytes", 0),
                "host_kv_bytes": stats.get("host_kv_bytes", 0),
                "h2d_bytes": stats.get("h2d_bytes", 0),
                "d2h_bytes": stats.get("d2h_bytes", 0),
                "stall_seconds": stats.get("stall_seconds", 0.0),
                "engine_steps": stats.get("steps", 0),
                "host_attention": self.host_attention,
                "host_attended_layers": [self.layer_indices[e] for e in stats.get("host_attended", [])],
                "host_attended_layer_steps": stats.get("host_attended_layer_steps", 0),
                "host_attention_seconds": self.host_seconds,
                "prefix_lookups": self.prefix_lookups,
                "prefix_hits": self.prefix_hits,
                "prefix_tokens_reused": self.prefix_tokens_reused,
                "prefix_tokens_stored": self.prefix_tokens_stored,
            }

    _PagedPieCache.__name__ = _PagedPieCache.__qualname__ = "PagedPieCache"
    return _PagedPieCache


@dataclass
class _PagedStep:
    """One step's batch, as host-attended layers read it (the same for every layer of the step)."""

    #: Per request: first query row, query rows, runs ``(start, n)`` of its past rows.
    requests: list[tuple[int, int, list[tuple[int, int]]]]
    #: Key columns of the new tokens in transformers' mask (its columns: each request's past, then new).
    new_columns: torch.Tensor
    #: Rows the step's new tokens go to, in query order (host).
    write_rows: torch.Tensor
    has_past: bool

    @staticmethod
    def build(requests: list[tuple[int, int, list[int], list[int]]], device: torch.device) -> _PagedStep:
        out = []
        columns: list[int] = []
        writes: list[int] = []
        first = key_col = 0
        for past, new, past_rows, written in requests:
            # Attention over a request's past needs no order among its rows: consecutive rows
            # coalesce into runs the kernel reads in place.
            out.append((first, new, coalesce(past_rows)))
            columns.extend(range(key_col + past, key_col + past + new))
            writes.extend(written)
            first += new
            key_col += past + new
        return _PagedStep(
            requests=out,
            new_columns=torch.tensor(columns, dtype=torch.long, device=device),
            write_rows=torch.tensor(writes, dtype=torch.long),
            has_past=any(runs for _, _, runs in out),
        )


def _host_placement(choice: str, group: str, tensor_parallel: bool) -> str:
    """The engine's ``host_attention`` for a paged cache: ``choice``, where continuous batching can split it.

    Host attention in continuous batching serves full-attention layers on one device; ``"always"``
    elsewhere is refused (saying why), ``"auto"`` falls back to copies.
    """
    if choice == "never":
        return choice
    why = None
    if group != "full_attention":
        why = f"its layers are {group!r} (host attention in continuous batching serves full attention)"
    elif tensor_parallel:
        why = "it is tensor parallel (host attention in continuous batching runs on one device)"
    if why is None:
        return choice
    if choice == "always":
        raise ConfigError(
            f"continuous batching cannot attend on the host for this model: {why}; attach with "
            "host_attention='auto' or 'never' to serve it"
        )
    return "never"


@functools.cache
def _ascending_pool_class() -> type:
    from transformers.generation.continuous_batching.cache_allocators import CachePool

    class AscendingPool(CachePool):  # type: ignore[misc, valid-type]
        """transformers' sector pool, handing out the lowest free sector first.

        The rows a prefetch must move (up to the highest written) then grow with the load, not at once.
        """

        def reset(self) -> None:
            super().reset()
            self.free_sectors.reverse()

    return AscendingPool


def _AscendingPool(num_sectors: int, num_allocators: int) -> Any:
    return _ascending_pool_class()(num_sectors, num_allocators)


def _copy_config(cfg: Any, **changes: Any) -> Any:
    import copy

    out = copy.copy(cfg)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


# ------------------------------------------------------------------------------ installation
class Instrument:
    """Counts what a continuous-batching run did: peak running requests, preemptions, steps.

    Installed on every batch processor pie-rs builds, and usable on a plain one (the benchmark's
    baselines) through :func:`instrument_processor`.
    """

    def __init__(self) -> None:
        self.running = 0
        self.peak_running = 0
        self.preemptions = 0
        self.steps = 0


def instrument_processor(bp: Any, counters: Any, after_forward: Callable[[], None] | None = None) -> None:
    """Wraps a ``ContinuousBatchProcessor``'s forward and offloading to count what it does.

    ``counters`` is an :class:`Instrument` or a :class:`PagedPieCache` (``peak_running``, ``preemptions``, ...).
    """
    if getattr(bp, "_pie_instrumented", None) is counters:
        return
    runner = bp.model_runner
    compute = type(runner).compute_batch.__get__(runner)
    scheduler = bp.scheduler

    def compute_batch(*args: Any, **kwargs: Any) -> Any:
        running = len(scheduler.active_requests)
        if hasattr(counters, "stats_running"):
            counters.stats_running = running
        else:
            counters.running = running
        counters.peak_running = max(counters.peak_running, running)
        if not hasattr(counters, "stats_running"):
            counters.steps += 1
        try:
            result = compute(*args, **kwargs)
        except BaseException:
            if after_forward is not None:
                with contextlib.suppress(Exception):  # the forward's own error is the one to report
                    after_forward()
            raise
        if after_forward is not None:
            after_forward()
        return result

    runner.compute_batch = compute_batch
    offloader = bp.offloading_manager
    offload = type(offloader).offload_requests.__get__(offloader)

    def offload_requests() -> bool:
        before = set(scheduler.active_requests)
        try:
            return offload()
        finally:
            counters.preemptions += len(before - set(scheduler.active_requests))

    offloader.offload_requests = offload_requests
    bp._pie_instrumented = counters


@contextlib.contextmanager
def _paged_factory(make: Callable[..., Any]) -> Iterator[None]:
    """Makes transformers' continuous batching build its paged cache with ``make`` meanwhile."""
    _, continuous_api = _modules()
    with _FACTORY_LOCK:
        original = continuous_api.PagedAttentionCache
        continuous_api.PagedAttentionCache = make
        try:
            yield
        finally:
            continuous_api.PagedAttentionCache = original


def install(pool: Pool, model: Any) -> Callable[[], None]:
    """Routes the model's continuous batching through pooled KV; returns the undo function."""
    if not hasattr(type(model), "init_continuous_batching"):
        return lambda: None
    had = "init_continuous_batching" in model.__dict__
    old = model.__dict__.get("init_continuous_batching")
    original = model.init_continuous_batching
    pool_ref = weakref.ref(pool)

    @functools.wraps(original)
    def init_continuous_batching(*args: Any, **kwargs: Any) -> Any:
        pool = pool_ref()
        if pool is None or pool.closed:
            return original(*args, **kwargs)
        reason = serving_supported()
        if reason is not None:
            raise ConfigError(reason)
        if pool._split is not None:
            # Continuous batching picks its paged implementation by the model's own name (eager).
            pool._split.restore_configs()
        try:
            manager = original(*args, **kwargs)
        except ValueError as e:
            if "not supported for continuous batching" in str(e):
                raise ConfigError(
                    f"{e}. pie-rs serves continuous batching through a paged attention implementation: load the "
                    "model with attn_implementation='paged|sdpa' (or 'paged|eager', 'sdpa', a flash one)"
                ) from e
            raise
        _patch_manager(pool, manager)
        return manager

    model.__dict__["init_continuous_batching"] = init_continuous_batching

    def undo() -> None:
        if had:
            model.__dict__["init_continuous_batching"] = old
        else:
            model.__dict__.pop("init_continuous_batching", None)
        cached = model.__dict__.get("_cached_continuous_batching_manager")
        if cached is not None and getattr(cached, "_pie_pool", None) is not None:
            # A manager kept across calls holds a cache whose memory is gone: drop it.
            with contextlib.suppress(Exception):
                model.destroy_cached_continuous_batching_manager()

    return undo


def _serving_host_attention(pool: Pool, impl: str) -> str:
    """The pool's host attention for continuous batching running ``impl`` (refusing "always" where it cannot).

    The split wraps transformers' global ``sdpa`` entry, which ``sdpa`` and ``paged|sdpa`` reach; the
    paged eager and flash paths (block tables) are served by copies.
    """
    choice = str(getattr(pool.settings, "host_attention", "never"))
    if choice == "never":
        return choice
    if impl.removeprefix("paged|") != "sdpa":
        if choice == "always":
            raise ConfigError(
                f"continuous batching attends on the host through 'sdpa' attention, and this model runs {impl!r}; "
                "load it with attn_implementation='sdpa' (or 'paged|sdpa'), or attach with host_attention='auto' "
                "or 'never'"
            )
        return "never"
    split = pool._split
    if split is None or not split.sdpa:
        # Nothing split at attach (no full-attention layer pie-rs manages): "always" goes on to the
        # paged cache, which says why its layer group cannot be host-attended.
        return choice if choice == "always" else "never"
    return choice


def _patch_manager(pool: Pool, manager: Any) -> None:
    if getattr(manager, "_pie_pool", None) is pool:
        return
    cfg = manager.continuous_batching_config
    manager._pie_pool = pool
    manager._pie_user_num_blocks = cfg.num_blocks
    bp = getattr(manager, "batch_processor", None)
    if bp is not None and not isinstance(getattr(bp, "cache", None), PagedPieCache):
        manager.batch_processor = None  # built before attach: rebuild it with pooled KV
    original_create = type(manager)._create_batch_processor.__get__(manager)
    original_add = type(manager).add_request.__get__(manager)
    pool_ref = weakref.ref(pool)

    def create() -> Any:
        pool = pool_ref()
        if pool is None or pool.closed:
            raise StateError("the pie-rs pool of this continuous batching manager was detached; attach again")
        bp = getattr(manager, "batch_processor", None)
        if bp is not None and isinstance(getattr(bp, "cache", None), PagedPieCache) and not bp.cache._closed:
            bp.cache._new_run()
            return original_create()  # reset and reuse
        impl = str(manager.model.config._attn_implementation)
        if impl not in _CB_ATTENTION and not impl.startswith("paged|") and "flash" not in impl:
            raise ConfigError(
                f"continuous batching with pie-rs needs a paged attention implementation, the model runs {impl!r}; "
                "load it with attn_implementation='paged|sdpa' (or set model.set_attn_implementation('paged|sdpa'))"
            )
        # Per-layer engine calls run in Python: no CUDA graphs, no compile, no double-buffered batches.
        cfg.use_cuda_graph = (False, False)
        cfg.use_async_batching = False
        cfg.varlen_compile_config = None
        cfg.decode_compile_config = None
        cfg.default_compile_level = 0
        gen = manager.generation_config
        min_tokens = int(getattr(gen, "max_new_tokens", None) or 1) + 1
        host_attention = _serving_host_attention(pool, impl)

        def make(**kwargs: Any) -> Any:
            pool._close_serving()  # one paged cache per pool: the previous one's memory goes first
            cache = _cache_class()(
                pool,
                user_num_blocks=manager._pie_user_num_blocks,
                min_tokens=min_tokens,
                engine_options=getattr(pool, "_serving_engine_options", None),
                host_attention=host_attention,
                **kwargs,
            )
            pool._serving = cache
            return cache

        with _paged_factory(make):
            bp = original_create()
        cache = bp.cache
        cache.scheduler_ref = weakref.ref(bp.scheduler)  # the store's match asks whether a request forks
        instrument_processor(bp, cache, after_forward=cache.end_step)
        return bp

    def add_request(input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        bp = getattr(manager, "batch_processor", None)
        cache = getattr(bp, "cache", None)
        if isinstance(cache, PagedPieCache) and not cache._closed:
            gen = kwargs.get("max_new_tokens") or getattr(manager.generation_config, "max_new_tokens", None) or 0
            need = len(input_ids) + int(gen)
            have = cache.num_sectors * cache.allocator.blocks_per_sector * cache.page_size
            if cache.read_cache_limit is None and need > have:
                raise BudgetError(
                    f"a request of {len(input_ids)} prompt + {gen} new tokens needs {need} tokens of KV but the "
                    f"pooled paged cache holds {have} per layer; raise gpu_budget, pool more layers "
                    "(objective='memory') or shorten the request"
                )
        return original_add(input_ids, *args, **kwargs)

    original_stop = type(manager).stop.__get__(manager)

    def stop(*args: Any, **kwargs: Any) -> Any:
        bp = getattr(manager, "batch_processor", None)
        try:
            return original_stop(*args, **kwargs)
        finally:
            # A manager not kept for the next session gives its device KV back to the budget now.
            cache = getattr(bp, "cache", None)
            stopped = manager._generation_thread is None and manager.batch_processor is None
            if stopped and isinstance(cache, PagedPieCache):
                cache.close()

    manager._create_batch_processor = create
    manager.add_request = add_request
    manager.stop = stop
