"""KV kept in host memory for reuse: cache snapshots and the prompt-prefix store.

:class:`HostKV` is an immutable host copy of the KV of a cache's engine-managed layers. A parked
:class:`~pie_rs.PieCache`, and every copy made by ``copy.deepcopy``/``copy.copy``, holds one; copies
of an unchanged cache share it (copy-on-write: the snapshot itself is never written, a cache that
changes first gets its own engine, loaded from it).

:class:`PrefixStore` keeps the KV of prompt prefixes in host memory, block by block, in a trie
whose edges are the tokens of one block (the radix cache of SGLang with vLLM's fixed blocks).
Matching is exact (tokens compared, not hashes). It is bounded in bytes and evicts the least
recently used blocks, leaves first: a block is always at least as recent as every block below it,
so the oldest block has no child and every stored block stays reachable.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import ConfigError

__all__ = ["DEFAULT_BLOCK_TOKENS", "HostKV", "PrefixStore", "host_copy"]

#: Tokens per block of the prefix store (prefixes match in whole blocks).
DEFAULT_BLOCK_TOKENS = 16

#: A layer's (keys, values), each ``[batch, kv_heads, tokens, dim]``.
LayerKV = tuple[torch.Tensor, torch.Tensor]


def host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A contiguous copy of ``t`` in host memory (pinned when ``pin``, so it loads asynchronously)."""
    out = torch.empty(tuple(t.shape), dtype=t.dtype, pin_memory=pin)
    out.copy_(t)
    return out


@dataclass(frozen=True)
class HostKV:
    """An immutable host copy of the KV of engine-managed layers.

    ``layers[e]`` is layer ``e``'s ``(K, V)``, ``[batch, kv_heads, lens[e], dim]``. Never written in
    place: every transformation returns a new object (slicing shares storage, which is safe because
    nobody writes it).
    """

    layers: tuple[LayerKV, ...]
    batch: int
    dtype: torch.dtype
    #: Whether a cache restored from it may serve a batch that is a multiple of ``batch`` (each
    #: sequence repeated, as ``generate`` expands prompts for beams and returned sequences).
    expandable: bool = False

    @property
    def lens(self) -> list[int]:
        """Tokens held per layer."""
        return [int(k.shape[2]) for k, _ in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held (keys and values of every layer)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def crop(self, lens: Sequence[int]) -> HostKV:
        """The first ``lens[e]`` tokens of each layer (views: no copy)."""
        layers = tuple((k[:, :, :n], v[:, :, :n]) for (k, v), n in zip(self.layers, lens, strict=True))
        return HostKV(layers, self.batch, self.dtype, self.expandable)

    def map_batch(self, transform: Any) -> HostKV:
        """A new snapshot whose batch is ``transform`` of this one's (reorder, select, repeat)."""
        layers = tuple((transform(k).contiguous(), transform(v).contiguous()) for k, v in self.layers)
        batch = int(layers[0][0].shape[0]) if layers else self.batch
        return HostKV(layers, batch, self.dtype, self.expandable)


@dataclass(eq=False)
class _Block:
    """One block of a stored prefix: its tokens and every layer's KV for them (batch 1)."""

    parent: _Block | None
    tokens: tuple[int, ...]
    kv: tuple[LayerKV, ...]
    nbytes: int
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)


class PrefixStore:
    """Prompt-prefix KV in host memory: block-aligned, exact, bounded in bytes, LRU.

    One trie per ``(dtype, layer shapes)``; a block's key is its tokens, its KV is per layer
    ``[1, kv_heads, block_tokens, dim]`` in host memory (pinned for CUDA models). Safe to use from
    several threads (one lock around each call).
    """

    def __init__(self, max_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS, pin: bool = False) -> None:
        _check_limit(max_bytes)
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ConfigError(f"block_tokens must be a positive int, got {block_tokens!r}")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.pin = pin
        self._roots: dict[Any, dict[tuple[int, ...], _Block]] = {}
        # Every block, least recently used first.
        self._lru: OrderedDict[_Block, None] = OrderedDict()
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_reused = 0
        self.evictions = 0
        self.inserted_blocks = 0
        self._lock = threading.RLock()

    def resize(self, max_bytes: int) -> None:
        """Sets the byte limit, evicting least recently used blocks until the store fits it."""
        _check_limit(max_bytes)
        with self._lock:
            self.max_bytes = max_bytes
            while self.bytes > max_bytes:
                self._evict(next(b for b in self._lru if not b.children))

    # ------------------------------------------------------------------------ queries
    @property
    def blocks(self) -> int:
        """Blocks held."""
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        """``prefix_*`` counters for :meth:`pie_rs.Pool.stats`."""
        return {
            "prefix_lookups": self.lookups,
            "prefix_hits": self.hits,
            "prefix_tokens_reused": self.tokens_reused,
            "prefix_bytes": self.bytes,
            "prefix_max_bytes": self.max_bytes,
            "prefix_blocks": self.blocks,
            "prefix_block_tokens": self.block_tokens,
            "prefix_evictions": self.evictions,
        }

    def _path(self, key: Any, tokens: Sequence[int], limit: int) -> list[_Block]:
        """The stored blocks that match ``tokens`` from the start, at most ``limit`` tokens' worth."""
        children = self._roots.get(key)
        path: list[_Block] = []
        bt = self.block_tokens
        for start in range(0, limit - bt + 1, bt):
            if children is None:
                break
            block = children.get(tuple(tokens[start : start + bt]))
            if block is None:
                break
            path.append(block)
            children = block.children
        return path

    def _touch(self, path: list[_Block]) -> None:
        # Deepest first, so a block is always at least as recent as the blocks below it.
        for block in reversed(path):
            self._lru.move_to_end(block)

    def match(self, key: Any, rows: Sequence[Sequence[int]], limit: int, count: bool = True) -> HostKV | None:
        """The KV of the longest block-aligned prefix (at most ``limit`` tokens) that every row has stored.

        Rows may hold different prefixes; they share the matched length (the shortest row match).
        Counts a lookup, and a hit with the tokens reused when something matched (unless not ``count``).
        """
        with self._lock:
            return self._match(key, rows, limit, count)

    def _match(self, key: Any, rows: Sequence[Sequence[int]], limit: int, count: bool) -> HostKV | None:
        self.lookups += count
        if limit < self.block_tokens or not rows:
            return None
        paths = [self._path(key, row, limit) for row in rows]
        blocks = min(len(p) for p in paths)
        if blocks == 0:
            return None
        for path in paths:
            self._touch(path[:blocks])
        layers = tuple(
            (self._gather(paths, blocks, e, 0), self._gather(paths, blocks, e, 1)) for e in range(len(paths[0][0].kv))
        )
        self.hits += count
        self.tokens_reused += count * blocks * self.block_tokens * len(rows)
        first = paths[0][0].kv[0][0]
        return HostKV(layers, len(rows), first.dtype, expandable=True)

    def _gather(self, paths: list[list[_Block]], blocks: int, e: int, which: int) -> torch.Tensor:
        """Layer ``e``'s keys (0) or values (1) of the first ``blocks`` blocks of each path, one row per path."""
        first = paths[0][0].kv[e][which]
        _, heads, _, dim = first.shape
        shape = (len(paths), heads, blocks * self.block_tokens, dim)
        out = torch.empty(shape, dtype=first.dtype, pin_memory=self.pin)
        for r, path in enumerate(paths):
            torch.cat([b.kv[e][which] for b in path[:blocks]], dim=2, out=out[r : r + 1])
        return out

    def count(self, tokens_reused: int) -> None:
        """Counts a lookup made with ``count=False`` and, when ``tokens_reused`` > 0, a hit reusing them.

        For callers that reuse only part of a match (continuous batching, where transformers' own
        prefix sharing may already cover the first blocks).
        """
        with self._lock:
            self.lookups += 1
            if tokens_reused > 0:
                self.hits += 1
                self.tokens_reused += tokens_reused

    def matched_tokens(self, key: Any, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` are stored (a multiple of the block size); no counting."""
        with self._lock:
            return len(self._path(key, tokens, len(tokens))) * self.block_tokens

    # ---------------------------------------------------------------------- insertion
    def insert(self, key: Any, tokens: Sequence[int], kv: HostKV, row: int = 0) -> int:
        """Stores the whole blocks of ``tokens`` whose KV is row ``row`` of ``kv``; returns blocks added.

        Blocks already stored are kept (and refreshed); new ones are copied out of ``kv``. When the
        byte limit is reached, least recently used blocks are evicted first; a block that cannot fit
        even then (larger than the limit) is not stored, and neither are the ones after it.
        """
        with self._lock:
            return self._insert(key, tokens, kv, row)

    def _insert(self, key: Any, tokens: Sequence[int], kv: HostKV, row: int) -> int:
        n = min(len(tokens), min(kv.lens) if kv.layers else 0)
        bt = self.block_tokens
        children = self._roots.setdefault(key, {})
        parent: _Block | None = None
        path: list[_Block] = []
        added = 0
        for start in range(0, n - bt + 1, bt):
            block_tokens = tuple(int(t) for t in tokens[start : start + bt])
            block = children.get(block_tokens)
            if block is None:
                data = tuple(
                    (
                        host_copy(k[row : row + 1, :, start : start + bt], self.pin),
                        host_copy(v[row : row + 1, :, start : start + bt], self.pin),
                    )
                    for k, v in kv.layers
                )
                nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in data)
                # Keep this path's blocks out of the eviction: refresh them before making room.
                self._touch(path)
                if not self._make_room(nbytes, keep=path):
                    break
                block = _Block(parent, block_tokens, data, nbytes)
                children[block_tokens] = block
                self._lru[block] = None
                self.bytes += nbytes
                added += 1
                self.inserted_blocks += 1
            path.append(block)
            parent = block
            children = block.children
        self._touch(path)
        return added

    def _make_room(self, nbytes: int, keep: list[_Block]) -> bool:
        if nbytes > self.max_bytes:
            return False
        protected = set(keep)
        while self.bytes + nbytes > self.max_bytes:
            victim = next((b for b in self._lru if b not in protected and not b.children), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, block: _Block) -> None:
        del self._lru[block]
        self.bytes -= block.nbytes
        self.evictions += 1
        siblings = block.parent.children if block.parent is not None else None
        if siblings is None:
            for root in self._roots.values():
                if root.get(block.tokens) is block:
                    siblings = root
                    break
        if siblings is not None and siblings.get(block.tokens) is block:
            del siblings[block.tokens]

    def clear(self) -> None:
        """Drops every block (counters kept)."""
        with self._lock:
            self._roots.clear()
            self._lru.clear()
            self.bytes = 0


def _check_limit(max_bytes: object) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ConfigError(
            f"the prefix store's max_bytes must be a non-negative int or a size string, got {max_bytes!r}"
        )
