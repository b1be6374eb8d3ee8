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
    ) -> None:
        """Creates the engine and its threads.

        ``faults`` (host backend only) injects ``fail_copy_at``/``hang_copy_at`` (n-th copy)
        or ``alloc_limit`` (bytes) for reliability tests; ``wait_timeout`` bounds every wait.
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
        """The latest per-step measurement (per-layer compute and stall, copy times)."""
    @property
    def generation(self) -> int:
        """Bumped whenever arenas are reallocated: views taken before must be dropped."""
    def layer_begin(self, layer: int, stream: int) -> None:
        """Forward pre-hook of a decoder layer; layer 0 of a step begins the step."""
    def layer_ready(self, layer: int, stream: int) -> int:
        """Makes ``stream`` wait for the layer's KV and returns its device-arena byte offset."""
    def layer_written(self, layer: int, n_new: int, stream: int) -> int:
        """Records that ``n_new`` tokens were written after the valid ones; returns the new length."""
    def layer_done(self, layer: int, stream: int) -> None:
        """Forward post-hook of a decoder layer; the last layer ends the step."""
    def seq_len(self, layer: int) -> int: ...
    def set_seq_len(self, layer: int, tokens: int) -> None:
        """Crop a layer to ``tokens`` tokens (only shrinking)."""
    def ensure_capacity(self, tokens: int) -> bool:
        """Grows every layer to hold ``tokens``; True if arenas were reallocated."""
    def quiesce(self) -> None:
        """Waits for all copies; afterwards host copies of pooled layers are authoritative."""
    def resume(self) -> None:
        """Ends a quiesce: device copies of pooled layers are refetched on demand."""
    def is_pooled(self, layer: int) -> bool: ...
    def device_offset(self, layer: int) -> int | None:
        """Byte offset of a resident layer's slot in the device arena (None if pooled)."""
    def host_offset(self, layer: int) -> int | None:
        """Byte offset of a pooled layer's buffer in the host arena (None if resident)."""
    def reset(self) -> None:
        """Empties every layer for a new sequence, keeping arenas and what the policy learned."""
    def device_region(self) -> Region: ...
    def host_region(self) -> Region: ...
    def set_plan(self, pooled_layers: list[int], prefetch_depth: int) -> None:
        """Pins a plan; it takes effect at the next step boundary."""
    def plan(self) -> dict[str, Any]: ...
    def predicted_h2d_bytes_per_step(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None:
        """Joins the engine's threads and frees its memory; further use raises StateError."""

def simulate(request: dict[str, Any]) -> dict[str, Any]:
    """Runs the engine's policy on the sim backend for a described machine and model."""

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
) -> dict[str, Any]:
    """Sizes a paged cache of ``layers`` layers under ``budget_bytes`` of device memory.

    Rows are ``(k_dim, v_dim, elem_size)``; sizes are whole ``quantum``s, at least ``min_rows``.
    Give exactly one target: ``pooled_layers`` (this plan) or ``pooled_count`` (that many layers
    pooled, spread across the depth): as many rows as the budget holds; or ``rows``: the plan
    pooling the fewest layers that holds them. Returns ``rows``, ``pooled_layers``,
    ``prefetch_depth``, ``device_bytes``, ``host_bytes``. Raises ``BudgetError`` saying what to
    change when not even ``min_rows`` fit.
    """
