"""Moving a host-attended layer's tensors between the device and pinned host memory without needless stalls.

A host-attended layer's step moves three things: its new K/V rows into the host arena, its query
to the host, and the host kernel's partial result back. On CUDA each plain ``.to("cpu")`` would
synchronise the compute stream on its own; here

* the new K/V rows are copied ``non_blocking`` into pinned staging buffers on the current stream
  and an event is recorded (:meth:`HostWrites.stage`); the rows are placed into the arena (a CPU
  copy) only once that event has passed (:meth:`HostWrites.flush`): right after the query's copy
  has been waited for, which the same stream ordered after them, so the step waits once, not twice;
* the query goes to the host the same way (:func:`to_host`), and the caller launches the device's
  own partial before waiting, so the device computes while the host kernel runs;
* the host result goes back ``non_blocking`` from pinned memory (:func:`to_device`).

On the CPU the same code runs with no staging and no events (the tensors are already host
memory), so CPU tests cover the bookkeeping: a layer's rows are placed before its attention reads
the arena and never later than the end of its layer call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HostWrites", "to_device", "to_host", "wait"]


def _pinned_copy(src: torch.Tensor) -> torch.Tensor:
    """``src`` (a CUDA tensor) copied without blocking into fresh pinned host memory."""
    out = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    out.copy_(src, non_blocking=True)
    return out


def to_host(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``x`` on the host and the event its copy completes at (``None`` when nothing is in flight).

    A CPU tensor is returned as is. A CUDA tensor is copied ``non_blocking`` into pinned memory on
    the current stream; read the result only after :func:`wait` on the returned event.
    """
    if x.device.type != "cuda":
        return x.detach(), None
    host = _pinned_copy(x.detach())
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(x.device))
    return host, event


def wait(event: Any) -> None:
    """Blocks the host until ``event`` (from :func:`to_host` or :meth:`HostWrites.stage`) has passed."""
    if event is not None:
        event.synchronize()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host result onto ``device``: ``non_blocking`` from pinned memory (ordered on the current stream)."""
    if device.type != "cuda":
        return x
    if not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


@dataclass
class _Pending:
    key: torch.Tensor
    value: torch.Tensor
    place: Callable[[torch.Tensor, torch.Tensor], None]
    event: Any


class HostWrites:
    """New K/V rows of host-attended layers, on their way into the host arena (one entry per layer).

    :meth:`stage` starts the copy and remembers how to place the rows (``place(key, value)``, a CPU
    copy into the arena: a slice for ``generate``, scattered rows for continuous batching);
    :meth:`flush` waits for the copy and places them. A layer's rows must be placed before anything
    reads its arena: its own attention (after waiting for its query, see the module docstring), the
    end of its layer call (before the engine hears ``layer_done``: a later plan may copy the layer),
    and any quiesce.
    """

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def stage(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        place: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> None:
        """Starts moving ``key``/``value`` (any device) to the host; ``place`` puts them into the arena."""
        self.flush(layer)  # an earlier step's rows of this layer go first
        event = None
        if key.device.type == "cuda":
            device = key.device
            key, value = _pinned_copy(key.detach()), _pinned_copy(value.detach())
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        self._pending[layer] = _Pending(key.detach(), value.detach(), place, event)

    def flush(self, layer: int | None = None) -> None:
        """Places the staged rows of ``layer`` (of every layer when ``None``) into the arena."""
        layers = list(self._pending) if layer is None else [layer]
        for e in layers:
            pending = self._pending.pop(e, None)
            if pending is not None:
                wait(pending.event)
                pending.place(pending.key, pending.value)

    def drop(self) -> None:
        """Forgets every staged write (the arena they were bound for is gone)."""
        self._pending.clear()
