"""``attach``: pool CPU memory into the KV cache of a transformers model, and the ``Pool`` handle."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import _core, _split, distributed, serving
from ._budget import _parse_size, parse_budget, total_host_memory
from ._engine import EngineSettings, config_kv_shapes, engine_layers, query_group
from ._errors import BackendError, ConfigError, StateError
from ._model import MANAGED, ModelInfo, inspect_model
from .cache import PieCache, empty_stats
from .prefix import DEFAULT_BLOCK_TOKENS, PrefixStore

__all__ = ["Pool", "attach"]

_BACKENDS = ("auto", "cuda", "host")
_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")
_ATTR = "_pie_rs_pool"
#: The prefix store's byte limit when ``cache_prefix`` is called before ``prefix_store``: 1 GiB or
#: a tenth of the machine's memory, whichever is smaller.
DEFAULT_PREFIX_BYTES = 1 << 30


def _find_cache(args: Sequence[Any], kwargs: dict[str, Any]) -> PieCache | None:
    for value in args:
        if isinstance(value, PieCache):
            return value
    for value in kwargs.values():
        if isinstance(value, PieCache):
            return value
    return None


class Pool:
    """The handle :func:`attach` returns: the model's pie-rs state.

    Use :meth:`new_cache` for hand-written forward loops, :meth:`stats` for what the engine did,
    :meth:`detach` (or a ``with`` block) to give the model back exactly as it was.
    """

    def __init__(
        self, model: nn.Module, info: ModelInfo, settings: EngineSettings, pooled_layers: list[int] | None = None
    ) -> None:
        self._model: nn.Module | None = model
        self.info = info
        #: How this pool's engines are built (fixed at :func:`attach`).
        self.settings = settings
        self._pooled_layers = pooled_layers
        self._closed = False
        self._caches: weakref.WeakSet[PieCache] = weakref.WeakSet()
        self._last: PieCache | None = None
        # The engine of the last finished generate, kept for the next cache: (engine, batch, dtype,
        # sliding-window estimate its budget was made with).
        self._kept: tuple[_core.Engine, int, torch.dtype, int] | None = None
        self._handles: list[Any] = []
        self._had_generate_attr = "generate" in model.__dict__
        # Per full-attention layer: (kv_heads, k_dim, v_dim) the next cache starts from: the config
        # (or a tensor-parallel shard of it) until a cache's layers hand over their real shapes.
        self._kv_shapes = config_kv_shapes(info)
        #: Extra keys every ``stats()`` carries (the rank under tensor parallel, ...).
        self.stats_tags: dict[str, Any] = {}
        self._old_generate = model.__dict__.get("generate")
        self.generations = 0
        # Continuous batching: the live paged cache (one per pool) and the undo of its install.
        self._serving: Any = None
        self._undo_serving: Callable[[], None] = lambda: None
        self._store: PrefixStore | None = None
        self._remember_prompts = False
        # The splitting attention installed for host attention (None with host_attention="never").
        self._split: _split.Installed | None = None

    # ------------------------------------------------------------------------- public
    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``."""
        return self.settings.backend

    @property
    def budget_bytes(self) -> int | None:
        """The device budget of the KV cache in bytes (``None``: no limit)."""
        return self.settings.budget_bytes

    @property
    def policy(self) -> str:
        """``"adaptive"`` or ``"static"``."""
        return self.settings.policy

    @property
    def objective(self) -> str:
        """What the adaptive policy optimises: ``"speed"`` or ``"memory"``."""
        return self.settings.objective

    @property
    def pooled_layers(self) -> list[int] | None:
        """The pinned pooled layers (model layer indices), if the plan was pinned."""
        return None if self._pooled_layers is None else list(self._pooled_layers)

    @property
    def prefetch_depth(self) -> int | None:
        """The prefetch depth given at attach: a static plan's staging slots, or where the adaptive policy starts."""
        return self.settings.prefetch_depth

    @property
    def kept_engine(self) -> _core.Engine | None:
        """The engine kept, emptied, for the next cache (``None`` when none is kept)."""
        return None if self._kept is None else self._kept[0]

    @property
    def closed(self) -> bool:
        """Whether :meth:`detach` was called."""
        return self._closed

    @property
    def model(self) -> nn.Module:
        """The attached model."""
        self._check()
        assert self._model is not None
        return self._model

    def new_cache(self, max_length: int | None = None, batch_size: int | None = None) -> PieCache:
        """A fresh :class:`PieCache` for this model.

        Args:
            max_length: tokens per sequence to size the cache for (prompt plus new tokens); it
                grows if exceeded. ``None``: the first update's length plus some headroom.
            batch_size: the batch the cache must serve; ``None`` takes it from the first update.
        """
        self._check()
        cache = PieCache(self, self.info, max_length=max_length, batch_size=batch_size)
        self._caches.add(cache)
        self._last = cache
        return cache

    def adopt(self, cache: PieCache) -> None:
        """Tracks a cache made outside :meth:`new_cache` (a copy), so :meth:`detach` closes it too."""
        self._check()
        self._caches.add(cache)

    # ----------------------------------------------------------------------- prefix store
    def prefix_store(
        self,
        max_bytes: int | str | None = None,
        block_tokens: int | None = None,
        remember_prompts: bool | None = None,
    ) -> PrefixStore:
        """Configures (or returns) the prompt-prefix store in host memory.

        Once it holds a prefix, every ``generate`` whose prompt rows start with stored whole blocks
        (and carry no padding there) starts from that KV and computes only the rest; so does every
        request continuous batching admits (``generate_batch``, the manager), beyond what
        transformers' own prefix sharing already lends it.

        Args:
            max_bytes: host bytes the store may hold (an int or ``"2GiB"``); least recently used
                blocks are evicted beyond it (at once when the limit shrinks). ``None``: keep the
                current limit (1 GiB or a tenth of the machine's memory for a new store).
            block_tokens: tokens per block (default 16); prefixes match in whole blocks. Changing
                it empties the store.
            remember_prompts: also store the prompt of every ``generate`` served (its unpadded
                rows) and of every continuous-batching request once prefilled, so repeated
                prompts are computed once without :meth:`cache_prefix`.
                ``None``: keep the current setting (off for a new store).

        Raises:
            ConfigError: an invalid limit or block size, or a model with sliding-window layers
                (their KV is not kept per block; copies of a prefix cache work for them).
        """
        self._check()
        if self.info.managed != [li.index for li in self.info.layers]:
            raise ConfigError(
                "the prefix store serves models whose every layer is full attention; this model has "
                "sliding-window layers (copy.deepcopy of a prefix cache works for it)"
            )
        if remember_prompts is not None:
            self._remember_prompts = bool(remember_prompts)
        try:
            limit = _parse_size(max_bytes) if isinstance(max_bytes, str) else max_bytes
        except ConfigError:
            raise ConfigError(
                f"max_bytes {max_bytes!r} is not a size; give bytes as an int or a string such as '2GiB'"
            ) from None
        store = self._store
        if store is None or (block_tokens is not None and block_tokens != store.block_tokens):
            if limit is None:
                limit = store.max_bytes if store is not None else _default_prefix_bytes()
            pin = self.info.device.type == "cuda"
            self._store = PrefixStore(limit, DEFAULT_BLOCK_TOKENS if block_tokens is None else block_tokens, pin)
            if store is not None:
                store.clear()
        elif limit is not None:
            store.resize(limit)
        assert self._store is not None
        return self._store

    def cache_prefix(self, input_ids: Any, attention_mask: Any = None) -> int:
        """Computes the KV of ``input_ids`` once and keeps it in the prefix store.

        ``input_ids``: one prompt (a 1-D tensor or list of ints) or a batch ``[rows, tokens]`` of
        unpadded rows. The whole blocks of each row are stored (a part already stored is not
        computed again). A later ``generate`` whose prompt starts with them reuses them.
        Returns the tokens now held for the first row (a multiple of the block size).
        """
        self._check()
        store = self.prefix_store()
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ConfigError(f"input_ids must be [tokens] or [rows, tokens], got shape {tuple(ids.shape)}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ConfigError("cache_prefix takes unpadded prompts: register each row alone, without padding")
        key = self._store_key()
        bt = store.block_tokens
        held = 0
        for r, row in enumerate(ids.tolist()):
            whole = len(row) // bt * bt
            done = store.matched_tokens(key, row)
            if done < whole:
                cache = PieCache(self, self.info, max_length=whole, batch_size=1)
                self.adopt(cache)
                try:
                    part = store.match(key, [row], done, count=False) if done else None
                    if part is not None:
                        cache.load_snapshot(part)
                    tail = torch.tensor([row[done:whole]], dtype=torch.long, device=self.info.device)
                    with torch.no_grad():
                        self._forward(tail, cache)
                    snap = cache.snapshot(tokens=whole)
                    if snap is not None:
                        store.insert(key, row[:whole], snap)
                except BaseException:
                    cache.close()  # a failed forward may have left a step half done: no reuse
                    raise
                cache.release()
            if r == 0:
                held = store.matched_tokens(key, row)
        return held

    def _forward(self, ids: torch.Tensor, cache: PieCache) -> None:
        model = self.model
        kwargs: dict[str, Any] = {"input_ids": ids, self.info.cache_keyword: cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # only the KV is wanted: skip the LM head over the prefix
        model(**kwargs)

    def _store_key(self) -> Any:
        return str(self.info.dtype)

    def _reuse_prefix(self, cache: PieCache, prompt: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Parks the longest stored prefix the prompt rows share in ``cache`` (exact reuse only)."""
        store = self._store
        if store is None or store.blocks == 0:
            return
        ids, mask = prompt
        limit = int(ids.shape[1]) - 1  # the last prompt token is always computed (its logits)
        if mask is not None:
            # Reuse only where no row is padded: a padded row's KV sits at other positions.
            zero = (mask == 0).any(dim=0).nonzero()
            if zero.numel():
                limit = min(limit, int(zero[0, 0]))
        snap = store.match(self._store_key(), ids[:, : max(limit, 0)].tolist(), limit)
        if snap is not None:
            cache.load_snapshot(snap)

    def _remember(self, cache: PieCache, prompt: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Stores the prompt rows' KV (unpadded rows only) from the cache of a finished generate."""
        store = self._store
        if store is None or cache.closed or cache.engine is None:
            return
        ids, mask = prompt
        rows = int(ids.shape[0])
        batch = max(cache.max_batch_size, 0)
        if rows == 0 or batch % rows:
            return
        bt = store.block_tokens
        whole = int(ids.shape[1]) // bt * bt
        key = self._store_key()
        todo = [
            r
            for r, row in enumerate(ids.tolist())
            if (mask is None or bool(mask[r].bool().all())) and store.matched_tokens(key, row) < whole
        ]
        if not todo or whole == 0:
            return
        snap = cache.snapshot(tokens=whole)
        if snap is None:
            return
        for r in todo:
            store.insert(key, ids[r, :whole].tolist(), snap, row=r * (batch // rows))

    def stats(self) -> dict[str, Any]:
        """What the engine of the most recent cache did.

        Keys include ``resident_layers``, ``pooled_layers`` (engine-managed layers on the device /
        in host memory), ``device_kv_bytes`` and ``peak_device_kv_bytes`` (engine arena plus
        sliding-window layers), ``host_kv_bytes``, ``h2d_bytes``, ``d2h_bytes``,
        ``stall_seconds``, ``steps``, ``sliding_layers``, ``sliding_kv_bytes``, ``parked`` and
        ``parked_kv_bytes`` (a parked cache's KV in host memory), plus ``generations`` (generate
        calls served), ``budget_bytes`` and the prefix store's ``prefix_lookups``,
        ``prefix_hits``, ``prefix_tokens_reused`` (summed over rows), ``prefix_bytes`` (host bytes
        held), ``prefix_max_bytes``, ``prefix_blocks``, ``prefix_block_tokens`` and
        ``prefix_evictions`` (all 0 while no store is configured), and for host attention
        ``host_attended_layers`` (model layer indices attended on the host under the current plan),
        ``host_attended_layer_steps`` (layer-steps that ran there) and ``host_attention_seconds``
        (time in the host kernel). After continuous batching,
        ``serving`` holds its cache's figures: ``num_blocks``, ``device_blocks`` / ``pool_blocks``
        (blocks' worth held by resident / pooled layers), ``blocks_in_use``, ``requests_running``,
        ``peak_running``, ``preemptions``, ``pooled`` (model layer indices of the pooled layers),
        ``prefetch_depth``, ``device_kv_bytes``, ``h2d_bytes``, ``d2h_bytes``, and
        its prefix store figures ``prefix_lookups``, ``prefix_hits``, ``prefix_tokens_reused``
        (tokens copied from the store) and ``prefix_tokens_stored``, ...
        """
        self._check()
        if self._last is not None:
            stats = self._last.stats()
        else:
            stats = empty_stats()
            stats["sliding_layers"] = len(self.info.layers) - len(self.info.managed)
            stats["sliding_kv_bytes"] = 0
        stats["generations"] = self.generations
        stats |= (self._store or PrefixStore(0)).stats()
        if self._serving is not None:
            stats["serving"] = self._serving.serving_stats()
        stats["budget_bytes"] = self.budget_bytes
        stats["backend"] = self.backend
        stats["num_layers"] = len(self.info.layers)
        stats.update(self.stats_tags)
        return stats

    def detach(self) -> None:
        """Gives the model back exactly as it was: hooks removed, ``generate`` restored, engines closed.

        Any later use of this pool or its caches raises :class:`pie_rs.StateError`.
        Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model
        if model is not None:
            if self._had_generate_attr:
                model.__dict__["generate"] = self._old_generate
            else:
                model.__dict__.pop("generate", None)
            if model.__dict__.get(_ATTR) is self:
                del model.__dict__[_ATTR]
        self._undo_serving()
        if self._split is not None:
            self._split.restore()
            self._split = None
        self._close_serving()
        for cache in list(self._caches):
            cache.close()
        self.release()
        if self._store is not None:
            self._store.clear()
        self._model = None

    def release(self) -> None:
        """Frees the engine kept for reuse (its device and host memory) now.

        After a ``generate`` call the pool keeps that call's engine, emptied, for the next call
        with the same batch and dtype (no new allocation, and the adaptive policy keeps what it
        learned). Call this to give the memory back between calls; the next call makes a new
        engine. :meth:`detach` does it too.
        """
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[0].close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "detached" if self._closed else f"backend={self.backend!r}, budget_bytes={self.budget_bytes}"
        return f"Pool({state}, layers={len(self.info.layers)}, managed={len(self.info.managed)})"

    def kv_shapes(self) -> list[tuple[int, int, int]]:
        """``(kv_heads, k_dim, v_dim)`` per full-attention layer that a new cache starts from."""
        return list(self._kv_shapes)

    def learn_kv_shapes(self, shapes: list[tuple[int, int, int]]) -> None:
        """A cache's layers handed over these shapes: later caches start from them."""
        self._kv_shapes = list(shapes)

    def _serving_budget(self) -> int | None:
        """Device bytes a new continuous-batching cache may use: the budget less live ``generate`` caches."""
        self.release()  # the kept generate engine gives its memory back first
        if self.budget_bytes is None:
            return None
        live = sum(int(c._shared.engine_stats().get("device_kv_bytes", 0)) for c in self._caches if c._shared.engine)
        return max(1, self.budget_bytes - live)

    def _serving_device_bytes(self) -> int:
        """Device bytes the live continuous-batching cache holds (a ``generate`` gets the rest of the budget)."""
        return 0 if self._serving is None else self._serving.device_kv_bytes()

    def _close_serving(self) -> None:
        """Closes the continuous-batching cache's engine (its statistics are kept)."""
        cache = self._serving
        if cache is not None:
            cache.close()

    def keep_engine(self, engine: _core.Engine, batch: int, dtype: torch.dtype, sliding_estimate: int) -> None:
        """Keeps ``engine`` (whose cache is closed) for the next cache; closes the one kept before.

        ``sliding_estimate`` is what the sliding-window layers were given of the budget when the
        engine was made (the engine's budget is the pool's less that).
        """
        if self._closed:
            engine.close()
            return
        self.release()
        self._kept = (engine, batch, dtype, sliding_estimate)

    def take_engine(
        self, batch: int, dtype: torch.dtype, capacity: int, sliding_estimate: int
    ) -> tuple[_core.Engine, int] | None:
        """The kept engine, emptied, if it serves ``batch``/``dtype`` at ``capacity`` tokens.

        Returns ``(engine, sliding-window estimate its budget holds)``. An engine that does not
        fit is closed first, so its memory is free for the new one.
        """
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        engine, kept_batch, kept_dtype, kept_sliding = kept
        try:
            # Growing keeps the budget honest only while the sliding-window layers fit in what the
            # engine's budget left them.
            fits = (
                kept_batch == batch
                and kept_dtype == dtype
                and not engine.closed
                and (engine.capacity >= capacity or sliding_estimate <= kept_sliding)
            )
            if fits:
                engine.reset()  # every token dropped; memory, plan and policy state kept
                if engine.capacity < capacity:
                    engine.ensure_capacity(capacity)
                return engine, kept_sliding
        except Exception:
            fits = False
        engine.close()
        return None

    # ------------------------------------------------------------------------ private
    def _check(self) -> None:
        if self._closed:
            raise StateError("this pie-rs pool was detached; call pie_rs.attach(model) again")

    def _ends_run(self, idx: int) -> bool:
        """Whether managed layer ``idx`` is the last of a run of its engine's layers (it gets a post-hook)."""
        return idx + 1 not in self.info.managed

    def _install(self, model: nn.Module) -> None:
        # The per-layer path stays out of the hooks: each layer's first update begins it (and ends
        # the layer before), so the only hook is a post-hook on a managed layer that no managed
        # layer follows at once (the last one ends the step; one before a sliding-window layer
        # hands back its staging slot without waiting for the next managed layer).
        managed = set(self.info.managed)
        keyword = self.info.cache_keyword
        for idx, module in enumerate(self.info.decoder_layers):
            if idx in managed and self._ends_run(idx):
                self._handles.append(module.register_forward_hook(_post_hook(idx, keyword), with_kwargs=True))
        pool_ref = weakref.ref(self)
        if self.info.managed:
            # Once per forward: a PieCache made by another model's pool is refused before
            # any of its layers is touched.
            first = self.info.decoder_layers[self.info.managed[0]]
            self._handles.append(first.register_forward_pre_hook(_owner_check(pool_ref, keyword), with_kwargs=True))
        original = model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            pool = pool_ref()
            if pool is None or pool._closed:
                return original(*args, **kwargs)
            return pool._generate(original, args, kwargs)

        model.__dict__["generate"] = generate
        model.__dict__[_ATTR] = self
        self._undo_serving = serving.install(self, model)

    def _generate(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self._should_inject(kwargs):
            return original(*args, **kwargs)
        cache = self.new_cache(max_length=self._capacity_hint(args, kwargs))
        prompt = _prompt(args, kwargs) if self._store is not None else None
        if prompt is not None:
            self._reuse_prefix(cache, prompt)
        kwargs = dict(kwargs)
        kwargs[self.info.cache_keyword] = cache
        out = None
        try:
            out = original(*args, **kwargs)
        finally:
            self.generations += 1
            if out is not None and prompt is not None and self._remember_prompts:
                self._remember(cache, prompt)
            # The cache outlives generate only if the output carries it (return_dict_in_generate).
            # Otherwise its engine is kept for the next call, unless generate failed.
            if out is None:
                cache.close()
            elif not _holds(out, cache):
                cache.release()
        return out

    def _should_inject(self, kwargs: dict[str, Any]) -> bool:
        if any(kwargs.get(name) is not None for name in _CACHE_KWARGS):
            return False  # the caller brought their own cache
        if kwargs.get("custom_generate") is not None:
            return False
        config = kwargs.get("generation_config")
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", None))
        if use_cache is False:
            return False
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if implementation is None:
            implementation = getattr(getattr(self._model, "generation_config", None), "cache_implementation", None)
            if implementation == "hybrid":  # generate unsets this legacy default itself
                implementation = None
        if implementation is not None:
            warnings.warn(
                f"pie-rs is not used for this generate call: cache_implementation={implementation!r} asks "
                "transformers for its own cache",
                UserWarning,
                stacklevel=4,
            )
            return False
        return True

    def _capacity_hint(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        prompt = None
        for candidate in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids")):
            if isinstance(candidate, torch.Tensor):
                prompt = candidate
                break
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        prompt_len = int(prompt.shape[1]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
        configs = [kwargs, kwargs.get("generation_config"), getattr(self._model, "generation_config", None)]

        def first(name: str) -> Any:
            for source in configs:
                value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
                if value is not None:
                    return value
            return None

        max_new = first("max_new_tokens")
        if prompt_len is None:
            return None
        if max_new is not None:
            return prompt_len + int(max_new)
        max_length = first("max_length") or 20
        return max(int(max_length), prompt_len + 1)


def _default_prefix_bytes() -> int:
    total = total_host_memory()
    return min(DEFAULT_PREFIX_BYTES, total // 10) if total else DEFAULT_PREFIX_BYTES


def _prompt(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The prompt token ids ``[rows, tokens]`` and attention mask of a generate call, if given as ids."""
    ids = None
    for candidate in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids")):
        if isinstance(candidate, torch.Tensor):
            ids = candidate
            break
    if ids is None or ids.dim() != 2 or ids.is_floating_point() or kwargs.get("inputs_embeds") is not None:
        return None
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        mask = None
    return ids.cpu(), None if mask is None else mask.cpu()


def _holds(out: Any, cache: PieCache) -> bool:
    if isinstance(out, torch.Tensor):
        return False
    for name in ("cache", "past_key_values"):
        try:
            if getattr(out, name, None) is cache:
                return True
        except Exception:
            continue
    return False


def _owner_check(pool_ref: weakref.ref[Pool], keyword: str) -> Callable[..., None]:
    """A pre-hook on the first managed decoder layer: the cache must come from this model's pool."""

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get(keyword)
        if cache.__class__ is not PieCache:
            cache = _find_cache(args, kwargs)
            if cache is None:
                return
        if cache.pool is not pool_ref():
            raise ConfigError(
                "this PieCache was made by the pool of another model; make one with this model's pool.new_cache()"
            )

    return pre_hook


def _post_hook(layer_idx: int, keyword: str) -> Callable[..., None]:
    """The forward hook of decoder layer ``layer_idx`` (engine-managed): the layer is done."""

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        cache = kwargs.get(keyword)
        if cache.__class__ is not PieCache:
            cache = _find_cache(args, kwargs)
            if cache is None:
                return
        cache.end_layer(layer_idx)

    return post_hook


def _resolve_backend(backend: object, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" else "host"
    if backend == "cuda":
        if device.type != "cuda":
            raise ConfigError(
                f"backend='cuda' needs the model on a CUDA device, but it is on {device}; move it with "
                "model.to('cuda') or use backend='host'"
            )
        if not _core.cuda_available():
            raise BackendError(f"backend='cuda' is not usable here: {_core.cuda_probe()}")
    elif device.type != "cpu":
        raise ConfigError(f"backend='host' serves models on the CPU, but the model is on {device}; use backend='cuda'")
    return str(backend)


def _device_total(backend: str, device: torch.device) -> int:
    if backend == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        return int(total)
    return total_host_memory()


def _available_memory(backend: str, device: torch.device) -> int:
    if backend == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return total_host_memory()


def _check_plan(info: ModelInfo, pooled_layers: object, prefetch_depth: object) -> list[int] | None:
    """Checks the Python types of a pinned plan and that its layers are ones the engine manages.

    Returns the model-layer indices as given; pie-core's ``policy_config`` orders them and refuses
    duplicates (the one set of plan rules).
    """
    if prefetch_depth is not None and (
        isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1
    ):
        raise ConfigError(f"prefetch_depth must be a positive int or None, got {prefetch_depth!r}")
    if pooled_layers is None:
        return None
    if isinstance(pooled_layers, (str, bytes)) or not isinstance(pooled_layers, Sequence | set | frozenset):
        raise ConfigError(f"pooled_layers must be a list of layer indices, got {pooled_layers!r}")
    out = []
    for idx in pooled_layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ConfigError(f"pooled_layers must hold ints, got {idx!r}")
        if not 0 <= idx < len(info.layers):
            raise ConfigError(f"pooled layer {idx} does not exist; the model has {len(info.layers)} layers")
        if info.layers[idx].kind != MANAGED:
            raise ConfigError(
                f"layer {idx} is a sliding-window layer, which pie-rs keeps on the device; it cannot be pooled"
            )
        out.append(idx)
    return out


def _check_host_attention(model: nn.Module, info: ModelInfo, choice: str) -> str:
    """The placement the engines get: ``choice`` (parsed by pie-core), or ``"never"`` where it cannot split.

    Under ``"auto"`` a model whose attention cannot be split gets ``"never"``.

    Raises ConfigError for ``"always"`` on a model whose full-attention layers the split path
    cannot serve (saying why).
    """
    if choice == "never" or not info.managed:
        return choice
    reason = _split.unsupported_reason(model, info.decoder_layers, info.managed)
    if reason is None:
        return choice
    if choice == "always":
        raise ConfigError(f"host_attention='always' cannot serve this model: {reason}")
    return "never"


def attach(
    model: nn.Module,
    gpu_budget: int | float | str | None = None,
    backend: str = "auto",
    policy: str = "adaptive",
    objective: str = "speed",
    pooled_layers: Sequence[int] | None = None,
    prefetch_depth: int | None = None,
    process_group: Any = None,
    host_attention: str = "auto",
    memory_slowdown: float | None = None,
) -> Pool:
    """Makes the model's KV cache pooled by pie-rs; ``model.generate(...)`` uses it unchanged.

    Args:
        model: a transformers decoder-only model (``PreTrainedModel``) on one device, CPU or CUDA.
        gpu_budget: device memory the KV cache may use: bytes (``int``), a size (``"6GiB"``,
            ``"512MiB"``, ``"1.5GB"``), a fraction in ``(0, 1]`` of the device memory free now (of
            total RAM for the host backend), or ``None`` (everything resident if it fits).
        backend: ``"auto"`` (``"cuda"`` for a model on a CUDA device, else ``"host"``), ``"cuda"`` or
            ``"host"`` (the CPU stands in for the device; real copies by threads).
        policy: ``"adaptive"`` (grow or shrink the pooled share from measurements) or ``"static"``.
        objective: what the adaptive policy optimises: ``"speed"`` or ``"memory"``.
        pooled_layers: pin the plan: these layer indices (full-attention layers) live in host
            memory. Pinning makes the policy ``"static"``.
        prefetch_depth: pin how many device staging slots pooled layers share (how far ahead
            the engine prefetches). Pinning makes the policy ``"static"``.
        process_group: under tensor parallel, the ``torch.distributed`` group the model's shards
            run over; ``None`` finds the group of a model loaded with ``tp_plan``. Each rank gets
            its own pool sized from its shard, every rank must attach with the same arguments,
            and all ranks plan alike (see :mod:`pie_rs.distributed`).
        host_attention: where a pooled layer's decode attention runs. ``"never"``: its KV is
            copied to a device staging slot first. ``"always"``: it stays in host memory and the
            layer's attention is split, the host kernel over the past tokens and the device over
            the new ones, merged exactly. ``"auto"`` (default): the policy chooses per layer
            from its cost model on a GPU, and copies on the host backend (no link to save);
            a model whose attention cannot be split gets ``"never"``. Continuous batching
            follows the same choice where it can split the attention (``"always"`` elsewhere
            raises ConfigError saying why).
        memory_slowdown: under ``objective="memory"``, how much slower than all-resident a step
            may be for the KV it frees: a factor of at least 1 (``None``: 1.02, 2% slower). The
            adaptive policy pools the most layers whose predicted step stays within it.

    Returns:
        The :class:`Pool` handle: ``new_cache``, ``stats``, ``detach``; also a context manager.

    Raises:
        ConfigError: an invalid argument, or a model pie-rs cannot serve (not a transformers
            model, no decoder layers, several devices, meta tensors, linear or other unsupported
            attention layers).
        BudgetError: the budget cannot hold even the smallest plan.
        BackendError: the backend cannot run here (no CUDA driver or device).
        StateError: the model is already attached (detach the other pool first).
    """
    existing = getattr(model, "__dict__", {}).get(_ATTR)
    if existing is not None and not existing.closed:
        raise StateError("this model is already attached to pie-rs; call pool.detach() before attaching again")
    info = inspect_model(model)
    rank_group = distributed.resolve_group(model, process_group)
    if rank_group is not None:
        info = distributed.shard_info(info, rank_group)
    resolved = _resolve_backend(backend, info.device)
    for name, value in (("policy", policy), ("objective", objective)):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    if not isinstance(host_attention, str):
        raise ConfigError(f'host_attention must be one of "auto", "never" or "always", got {host_attention!r}')
    pinned = _check_plan(info, pooled_layers, prefetch_depth)
    # pie-core parses the options once, as every engine of this pool will.
    config = _core.policy_config(
        policy,
        objective,
        None if pinned is None else [info.managed.index(i) for i in pinned],
        prefetch_depth,
        max(1, len(info.managed)),
        host_attention,
        memory_slowdown,
    )
    placement = _check_host_attention(model, info, config["host_attention"])
    available = None
    if isinstance(gpu_budget, float):
        available = _available_memory(resolved, info.device)
    budget_bytes = parse_budget(gpu_budget, available, device_total=_device_total(resolved, info.device))
    budget_rank: int | None = None
    budgets: list[int | None] = []
    if rank_group is not None:
        arguments = dict(
            gpu_budget=gpu_budget,
            backend=resolved,
            policy=policy,
            objective=objective,
            pooled_layers=pinned,
            prefetch_depth=prefetch_depth,
            host_attention=placement,
            memory_slowdown=config["memory_slowdown"],
        )
        budget_bytes, budget_rank, budgets = distributed.agree(
            rank_group, distributed.fingerprint(info, model, arguments), budget_bytes
        )
    device_index = 0
    if info.device.type == "cuda":
        device_index = torch.cuda.current_device() if info.device.index is None else info.device.index
    settings = EngineSettings(
        backend=resolved,
        device_index=device_index,
        budget_bytes=budget_bytes,
        policy=config["policy"],
        objective=config["objective"],
        pooled_layers=None if config["pooled_layers"] is None else tuple(config["pooled_layers"]),
        prefetch_depth=config["prefetch_depth"],
        host_attention=placement,
        query_group=query_group(info),
        memory_slowdown=config["memory_slowdown"],
    )
    if rank_group is not None:
        settings = distributed.settings_for(rank_group, settings, budget_rank, budgets)  # type: ignore[assignment]
    pinned_model = None if config["pooled_layers"] is None else [info.managed[e] for e in config["pooled_layers"]]
    from . import multidevice

    groups = multidevice.device_groups(info)
    pool: Pool
    if len(groups) > 1:
        if rank_group is not None:
            raise ConfigError(
                "a tensor-parallel model whose layers are also split across devices is not supported; "
                "give each rank one device"
            )
        if placement == "always":
            raise ConfigError(
                "host_attention='always' is not supported for a model split across devices by layers yet; "
                "pass host_attention='auto' or 'never'"
            )
        # Each device group's engines copy their pooled layers (no split is installed for them).
        placement = "never"
        settings = dataclasses.replace(settings, host_attention="never")
        # gpu_budget is per device: a fraction resolves against each device's own free memory.
        budgets = [
            parse_budget(
                gpu_budget,
                _available_memory(resolved, device) if isinstance(gpu_budget, float) else None,
                device_total=_device_total(resolved, device),
            )
            for device, _ in groups
        ]
        pool = multidevice.MultiDevicePool(model, info, settings, pinned_model, groups, budgets)
        pool.probe()
    else:
        pool = Pool(model, info, settings, pinned_model)
        if info.managed:
            # A small probe engine checks the options against the engine itself (plan, policy,
            # backend availability) now rather than at the first generate.
            settings.build(engine_layers(info, 1, 1), 1, budget_bytes).close()
    pool._install(model)
    if placement != "never" and info.managed:
        # Host-attended layers need the splitting attention; every other layer passes through it.
        pool._split = _split.install(model)
    if rank_group is not None:
        distributed.install(pool, model, rank_group)
    return pool
