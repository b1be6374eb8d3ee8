"""How a pool's engines are made.

The settings fixed at ``attach``, the layer shapes an engine is given, and the share of the budget
the sliding-window layers (transformers' own) take. Sizes come from ``_core``; nothing here
computes a byte layout or a fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _core
from ._model import MANAGED, SLIDING, ModelInfo

__all__ = [
    "EngineSettings",
    "LayerKV",
    "config_kv_shapes",
    "engine_layers",
    "query_group",
    "rescale_shapes",
    "sliding_kv_bytes",
]

#: ``(batch, kv_heads, k_dim, v_dim, elem_size)`` of one engine-managed layer, as ``_core`` takes it.
LayerShape = tuple[int, int, int, int, int]
#: ``(kv_heads, k_dim, v_dim)`` of one engine-managed layer: what its states are, batch aside.
LayerKV = tuple[int, int, int]


@dataclass(frozen=True)
class EngineSettings:
    """How every engine of one pool is built; made once by :func:`pie_rs.attach`.

    ``pooled_layers`` holds engine-layer indices (positions among the full-attention layers).
    """

    backend: str
    device_index: int = 0
    budget_bytes: int | None = None
    policy: str = "adaptive"
    objective: str = "speed"
    pooled_layers: tuple[int, ...] | None = None
    prefetch_depth: int | None = None
    #: Where pooled layers' attention runs: ``"auto"``, ``"never"`` or ``"always"`` (the engine's
    #: placement; ``"never"`` where the model's attention cannot be split, see ``_split``).
    host_attention: str = "never"
    #: Query heads per KV head (GQA group): sizes the query and result a host-attended layer
    #: exchanges, which the ``"auto"`` placement's cost model counts.
    query_group: int = 1
    #: The memory objective's allowance: a step at most this factor x all-resident (``None``:
    #: pie-core's default, 1.02).
    memory_slowdown: float | None = None

    def build(self, layers: list[LayerShape], capacity: int, budget_bytes: int | None) -> _core.Engine:
        """A new engine for ``layers`` at ``capacity`` tokens under ``budget_bytes`` of device memory.

        ``budget_bytes`` is what the engine may use: the pool's budget less what the sliding-window
        layers take (see :func:`sliding_kv_bytes`).
        """
        return _core.Engine(
            self.backend,
            layers,
            capacity,
            device_index=self.device_index,
            budget_bytes=budget_bytes,
            policy=self.policy,
            objective=self.objective,
            pooled_layers=None if self.pooled_layers is None else list(self.pooled_layers),
            prefetch_depth=self.prefetch_depth,
            host_attention=self.host_attention,
            query_group=self.query_group,
            memory_slowdown=self.memory_slowdown,
        )


def config_kv_shapes(info: ModelInfo) -> list[LayerKV]:
    """``(kv_heads, k_dim, v_dim)`` of each full-attention layer as the config (or a TP shard) says."""
    return [(li.kv_heads, li.k_dim, li.v_dim) for li in info.layers if li.kind == MANAGED]


def engine_layers(info: ModelInfo, batch: int, elem_size: int, shapes: list[LayerKV] | None = None) -> list[LayerShape]:
    """The shapes of the model's full-attention layers, as an engine takes them.

    ``shapes`` (per full-attention layer) overrides the config's head counts and sizes with what
    the layers actually handed over.
    """
    kv = config_kv_shapes(info) if shapes is None else shapes
    return [(batch, heads, k_dim, v_dim, elem_size) for heads, k_dim, v_dim in kv]


def rescale_shapes(shapes: list[LayerKV], e: int, seen: LayerKV) -> list[LayerKV]:
    """Every layer's guess corrected by what layer ``e`` handed over (``seen``) instead of ``shapes[e]``.

    Head counts scale by the same factor where it divides exactly (a tensor-parallel rank holds
    ``1/tp`` of every layer's heads); a head size that equals layer ``e``'s guessed one becomes
    layer ``e``'s real one. Layers whose guess stays wrong are corrected at their own first update.
    """
    guess_heads, guess_k, guess_v = shapes[e]
    heads, k_dim, v_dim = seen
    out = []
    for j, (h, k, v) in enumerate(shapes):
        if j == e:
            out.append(seen)
            continue
        scaled = h * heads // guess_heads if (h * heads) % guess_heads == 0 and h * heads else h
        out.append((scaled, k_dim if k == guess_k else k, v_dim if v == guess_v else v))
    return out


def sliding_kv_bytes(info: ModelInfo, batch: int, capacity: int, elem_size: int) -> int:
    """Bytes the sliding-window layers hold at most when sequences reach ``capacity`` tokens.

    Each holds its window (or fewer tokens); counted against the device budget.
    """
    total = 0
    for li in info.layers:
        if li.kind == SLIDING:
            window = min(capacity, int(li.sliding_window or capacity))
            total += _core.layer_geometry(batch, li.kv_heads, li.k_dim, li.v_dim, elem_size, window)["bytes"]
    return total


def query_group(info: ModelInfo) -> int:
    """Query heads per KV head of the model's config (1 where the config does not say)."""
    config = info.text_config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or kv_heads <= 0:
        return 1
    return max(1, heads // kv_heads)
