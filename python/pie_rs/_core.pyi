"""Type stubs for the compiled extension ``pie_rs._core`` (crates/pie-py)."""

from typing import Any

__version__: str

class PieError(Exception):
    """Root of every pie-rs error."""

class BudgetError(PieError):
    """The device budget cannot hold what was asked; raise the budget or pool more."""

class ConfigError(PieError, ValueError):
    """An argument, shape, plan or option is invalid."""

class BackendError(PieError, RuntimeError):
    """The backend (CUDA driver, allocation, copy engine) failed."""

class StateError(PieError, RuntimeError):
    """The engine's state does not allow the operation (closed, poisoned, misuse)."""

class InternalError(PieError, RuntimeError):
    """An engine invariant broke: a bug in pie-rs, not in the calling code; please report it."""

def policy_config(
    policy: str,
    objective: str,
    pooled_layers: list[int] | None,
    prefetch_depth: int | None,
    num_layers: int,
    host_attention: str = "never",
    memory_slowdown: float | None = None,
) -> dict[str, Any]:
    """A pool's policy options parsed once by pie-core, as every engine of the pool will parse them.

    Returns ``{"policy", "objective", "pooled_layers", "prefetch_depth", "host_attention",
    "memory_slowdown"}``: pinned layers make the policy ``"static"`` and come back sorted; unknown
    names (including a ``host_attention`` other than ``"auto"``, ``"never"``, ``"always"``),
    duplicate or out-of-range layers, a zero depth and a ``memory_slowdown`` below 1 (``None``:
    1.02) raise ``ConfigError``.
    """

def cuda_available() -> bool:
    """Whether a CUDA driver and at least one device can be used (never raises)."""

def cuda_probe() -> str:
    """A human-readable reason why CUDA is or is not available."""

class Region:
    """A byte range of engine memory exported zero-copy through DLPack as 1-D uint8."""

    @property
    def addr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

class Engine:
    """The pie-rs engine for one cache: page table, swap FIFO, swapper and policy.

    ``layers`` gives, per engine-managed layer, ``(batch, kv_heads, k_dim, v_dim, elem_size)``.
    """

    def __init__(
        self,
        backend: str,
        layers: list[tuple[int, int, int, int, int]],
        capacity: int,
        *,
        device_index: int = 0,
        budget_bytes: int | None = None,
        policy: str = "adaptive",
        objective: str = "speed",
        pooled_layers: list[int] | None = None,
        prefetch_depth: int | None = None,
        faults: dict[str, int] | None = None,
        wait_timeout: float | None = None,
        host_attention: str = "never",
        query_group: int = 1,
        memory_slowdown: float | None = None,
    ) -> None:
        """Creates the engine and its threads.

        ``faults`` (host backend only) injects ``fail_copy_at``/``hang_copy_at`` (n-th copy)
        or ``alloc_limit`` (bytes) for reliability tests; ``wait_timeout`` bounds every wait.
        ``host_attention`` (``"auto"``, ``"never"``, ``"always"``) places pooled layers: copied to
        the device, or attended on the host where their KV lives. Under ``"auto"`` the adaptive
        policy chooses per pooled layer with this machine's CPU figures (a short STREAM triad,
        measured once per process, and the host kernel's threads); ``query_group`` (query heads
        per KV head) sizes the query and result each host-attended layer exchanges.
        ``memory_slowdown`` is the memory objective's allowance (a step at most that factor x
        all-resident; ``None``: 1.02).
        """
    @property
    def backend(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def will_rebuild(self) -> bool:
        """Whether the next step begins with an arena rebuild (drop views first)."""
    def flush_telemetry(self) -> None:
        """Waits until the policy thread measured every finished step."""
    def last_sample(self) -> dict[str, Any] | None:
        """The latest per-step measurement.

        Per-layer compute and stall, copy times, and the plan's ``pooled_layers`` and
        ``host_attended`` layers.
        """
    @property
    def generation(self) -> int:
        """Bumped whenever arenas are reallocated: views taken before must be dropped."""
    def layer_begin(self, layer: int, stream: int) -> None:
        """Forward pre-hook of a decoder layer; layer 0 of a step begins the step."""
    def layer_ready(self, layer: int, stream: int) -> int:
        """Makes ``stream`` wait for the layer's KV and returns its device-arena byte offset."""
    def layer_ready_at(self, layer: int, stream: int) -> tuple[int, bool]:
        """Where the layer's KV is for this step: ``(offset, on_host)``.

        An offset in the device arena, or for a host-attended layer in the host arena (the caller
        appends and attends there).
        """
    def layer_written(self, layer: int, n_new: int, stream: int) -> int:
        """Records that ``n_new`` tokens were written after the valid ones; returns the new length."""
    def layer_done(self, layer: int, stream: int) -> None:
        """Forward post-hook of a decoder layer; the last layer ends the step."""
    def seq_len(self, layer: int) -> int: ...
    def set_seq_len(self, layer: int, tokens: int) -> None:
        """Crop a layer to ``tokens`` tokens (only shrinking)."""
    def ensure_capacity(self, tokens: int) -> bool:
        """Grows every layer to hold at least ``tokens``; True if arenas were reallocated.

        The engine picks the new capacity (the one growth rule): at least double the current one
        and at least ``tokens``, rounded up to :data:`CAPACITY_QUANTUM`. Read :attr:`capacity`.
        """
    def quiesce(self) -> None:
        """Waits for all copies; afterwards host copies of pooled layers are authoritative."""
    def resume(self) -> None:
        """Ends a quiesce: device copies of pooled layers are refetched on demand."""
    def is_pooled(self, layer: int) -> bool: ...
    def device_offset(self, layer: int) -> int | None:
        """Byte offset of a resident layer's slot in the device arena (None if pooled)."""
    def host_offset(self, layer: int) -> int | None:
        """Byte offset of a pooled layer's buffer in the host arena (None if resident)."""
    def layer_view(self, layer: int) -> dict[str, Any]:
        """Where a layer's KV is now and how it lies in its slot.

        ``device_offset`` (its device-arena byte offset if resident, else None), ``host_offset``
        (its host-arena byte offset if pooled, else None), and the keys of :func:`layer_geometry`
        at the engine's capacity.
        """
    def reorder(self, indices: list[int], stream: int) -> None:
        """Beam search's reorder of every layer: sequence ``b`` takes what ``indices[b]`` held.

        Moves only the valid tokens of the sequences that change, in place (device slot or host
        buffer), on ``stream`` after the work already queued there; returns when they are done.
        Raises ConfigError unless ``indices`` holds one index in ``0..batch`` per sequence.
        """
    def reset(self) -> None:
        """Empties every layer for a new sequence, keeping arenas and what the policy learned."""
    def device_region(self) -> Region: ...
    def host_region(self) -> Region: ...
    def set_plan(self, pooled_layers: list[int], prefetch_depth: int, host_attended: list[int] | None = None) -> None:
        """Pins a plan; it takes effect at the next step boundary.

        ``host_attended`` (a subset of ``pooled_layers``) are attended on the host, the rest copied.
        """
    def plan(self) -> dict[str, Any]: ...
    def predicted_h2d_bytes_per_step(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None:
        """Joins the engine's threads and frees its memory; further use raises StateError."""

def simulate(request: dict[str, Any]) -> dict[str, Any]:
    """Runs the engine's policy on the sim backend for a described machine and model.

    ``host_attention`` ("auto", the default, "never" or "always") says where pooled layers'
    attention may run; ``cpu_memory_gbps`` and ``cpu_cores`` override the profile's CPU.
    """

def simulate_serving(request: dict[str, Any]) -> dict[str, Any]:
    """Continuous batching in virtual time: four ways of holding the KV on a described machine.

    ``host_attention`` ("auto", the default, "never" or "always") applies to ``pie``. ``pie_pool``
    (``{"blocks", "pooled_layers", "prefetch_depth"}``) replays a pool sized once, as pie-rs's
    continuous batching sizes it, instead of ``pie``'s adaptive expansion.
    """

def list_profiles() -> dict[str, dict[str, str]]:
    """Named machine profiles and model shapes for ``simulate``."""

def cuda_copy_bench(sizes: list[int], iters: int = 10, device_index: int = 0) -> list[dict[str, Any]]:
    """The engine's own H2D, D2H and simultaneous copy bandwidth (GB/s) per size."""

def paged_written(engine: Engine, layer: int, ranges: list[tuple[int, int]], stream: int) -> int:
    """Paged caches: token rows ``ranges`` (``(start, n)``, any order) of ``layer`` were written.

    A pooled layer writes back exactly those rows, after the work queued on ``stream``. Returns the
    layer's new length, its high-water mark (what a prefetch moves).
    """

def paged_set_extent(engine: Engine, layer: int, rows: int) -> None:
    """Paged caches: between steps, sets how many rows of ``layer`` a prefetch moves.

    For data written straight into the layer's authoritative copy while quiesced.
    """

def paged_fit(
    row: tuple[int, int, int],
    layers: int,
    budget_bytes: int | None,
    quantum: int,
    min_rows: int,
    *,
    pooled_layers: list[int] | None = None,
    pooled_count: int | None = None,
    rows: int | None = None,
    prefetch_depth: int = 2,
    host_attended: bool = False,
) -> dict[str, Any]:
    """Sizes a paged cache of ``layers`` layers under ``budget_bytes`` of device memory.

    Rows are ``(k_dim, v_dim, elem_size)``; sizes are whole ``quantum``s, at least ``min_rows``.
    Give exactly one target: ``pooled_layers`` (this plan) or ``pooled_count`` (that many layers
    pooled, spread across the depth): as many rows as the budget holds; or ``rows``: the plan
    pooling the fewest layers that holds them. ``host_attended``: the pooled layers of a
    ``pooled_layers`` or ``pooled_count`` target are attended on the host, so take no staging
    slot (with every layer pooled, or a ``rows`` target, the cache is sized with staging slots:
    the device then bounds no rows). Returns ``rows``, ``pooled_layers``,
    ``prefetch_depth`` (staging slots; 0 when every pooled layer is host-attended),
    ``device_bytes``, ``host_bytes``. Raises ``BudgetError`` saying what to
    change when not even ``min_rows`` fit.
    """

#: Byte alignment of every slot in the engine's arenas (slots lie ``slot_bytes`` apart).
SLOT_ALIGN: int
#: Capacities are rounded up to a multiple of this many tokens (:func:`round_capacity`).
CAPACITY_QUANTUM: int

def layer_geometry(batch: int, kv_heads: int, k_dim: int, v_dim: int, elem_size: int, capacity: int) -> dict[str, Any]:
    """Where K and V of a layer of this shape lie inside its slot at ``capacity`` tokens.

    Keys: ``capacity``; ``k_offset`` and ``v_offset`` (bytes from the slot's start); ``k_shape``
    ``[batch, kv_heads, capacity, k_dim]`` and ``v_shape``; ``k_strides`` and ``v_strides``
    (elements); ``bytes`` (K and V) and ``slot_bytes`` (rounded up to :data:`SLOT_ALIGN`).
    Raises ConfigError for a zero or negative dimension, an unsupported element size, or a
    size that overflows.
    """

def round_capacity(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of :data:`CAPACITY_QUANTUM` (at least one quantum)."""

def device_bytes(
    layers: list[tuple[int, int, int, int, int]], capacity: int, pooled_layers: list[int], prefetch_depth: int
) -> int:
    """Device bytes an engine for ``layers`` at ``capacity`` tokens takes under this plan.

    Resident slots plus ``prefetch_depth`` staging slots (clamped to the pooled layers), each
    aligned. Raises ConfigError for invalid shapes, capacity or plan (unsorted, out of range,
    depth 0 with layers pooled).
    """

def fit_plan(
    layers: list[tuple[int, int, int, int, int]], capacity: int, budget_bytes: int | None, prefetch_depth: int
) -> dict[str, Any]:
    """The plan an engine fits into ``budget_bytes`` (None: no limit), without building one.

    The fewest pooled layers, spread across the depth, with up to ``prefetch_depth`` staging
    slots: ``{"pooled_layers", "prefetch_depth", "device_bytes"}``. The plan a ``policy="static"``
    engine built with these arguments starts from. Raises BudgetError (stating the minimum)
    when not even every layer pooled through one staging slot fits, ConfigError for bad inputs.
    """

def host_attention(
    query: Any,
    key: Any,
    value: Any | None,
    out: Any,
    lse: Any,
    *,
    layer: tuple[int, int, int, int] | None = None,
    capacity: int | None = None,
    offset: int = 0,
    kv_dtype: str | None = None,
    lengths: list[int] | None = None,
    query_positions: list[int] | None = None,
    mask: Any | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    threads: int | None = None,
) -> None:
    """Decode attention over KV in host memory, written into ``out`` and ``lse``.

    ``query`` ``[batch, q_heads, q_len, k_dim]`` and KV are CPU tensors read
    zero-copy through DLPack (any strides with a dense last dimension): either
    ``key`` ``[batch, kv_heads, tokens, k_dim]`` and ``value``
    ``[batch, kv_heads, tokens, v_dim]``, or ``key`` a 1-D byte tensor or
    ``Region`` holding a layer in the engine's layout (K then V) at ``offset``
    bytes, with ``value=None``, ``layer=(batch, kv_heads, k_dim, v_dim)``,
    ``capacity`` and ``kv_dtype``. float32, float16 or bfloat16; ``q_heads`` a
    multiple of ``kv_heads``. ``out`` ``[batch, q_heads, q_len, v_dim]`` and
    ``lse`` ``[batch, q_heads, q_len]`` are dense float32 tensors sharing no
    memory with the inputs; ``lse`` is the natural log-sum-exp of each row's
    scaled logits (``-inf``, with ``out`` 0, where no key is visible).
    ``mask`` ``[batch|1, q_heads|1, q_len|1, >=keys]``: bool (True attends)
    or float32 (added). Query row ``i`` sits at ``query_positions[b] + i``
    (default ``lengths[b] - q_len``) for ``causal`` and ``window``. Runs on
    ``threads`` threads (default: all cores) with the GIL released; do not
    write these tensors from another thread meanwhile. Bad shapes or options
    raise ``ConfigError``.
    """

def merge_attention(out: Any, lse: Any, other_out: Any, other_lse: Any) -> None:
    """Merges a partial attention result into ``(out, lse)`` in place (exact LSE merge), float32 CPU tensors."""

def stream_triad(threads: int | None = None, elements: int = 16777216, passes: int = 5) -> dict[str, Any]:
    """This machine's memory bandwidth by a STREAM triad (best pass; 24 bytes per element)."""
