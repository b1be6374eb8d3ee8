"""What copies on the host cost the model's compute: the host backend's link shares the machine.

On the host backend a "link" copy is a memcpy on one of the engine's threads, on the same
processor and memory as the model's compute; on a GPU the copy engines leave the SMs alone. The
serving simulator charges every link copy ``copy_compute_ns_per_byte`` of compute
(``SimConfig::copy_compute_cost``); this module measures that figure on this machine, apart from
any serving run: the model's forward on a fixed batch, timed alone and while another thread copies
large buffers (another process: no GIL shared), in alternating rounds.
"""

from __future__ import annotations

import subprocess
import sys
import time
from statistics import median

import torch

# Large enough to stream through memory (not cache), small enough to stop within a millisecond.
_COPY_BYTES = 16 << 20


# The copier runs in a process of its own: no GIL between it and the model's Python, as the
# engine's Rust copy threads need none. It copies until a line arrives on its stdin, then prints
# the bytes it copied and the seconds it took.
_COPIER = """
import select, sys, time
import numpy
src = numpy.ones({bytes}, dtype=numpy.uint8)
dst = numpy.empty_like(src)
numpy.copyto(dst, src)
print("ready", flush=True)
n, t0 = 0, time.perf_counter()
while not select.select([sys.stdin], [], [], 0)[0]:
    numpy.copyto(dst, src)
    n += 1
print(n * {bytes}, time.perf_counter() - t0, flush=True)
"""


class _Copier:
    """A process copying one large buffer into another while the block runs; its bandwidth after."""

    def __init__(self) -> None:
        self.gbps = 0.0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> _Copier:
        code = _COPIER.format(bytes=_COPY_BYTES)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            self._proc.kill()
            self._proc.communicate()  # reaps it and closes its pipes
            raise RuntimeError("the copy process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            out, _ = proc.communicate("stop\n", timeout=30)
            copied, seconds = (float(x) for x in out.split())
            self.gbps = copied / seconds / 1e9
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _forward_seconds(model: torch.nn.Module, inputs: torch.Tensor, seconds: float) -> tuple[float, int]:
    """Forwards ``inputs`` repeatedly for about ``seconds``: (mean seconds per forward, forwards)."""
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while True:
            model(input_ids=inputs, use_cache=False)
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return elapsed / n, n


def measure_copy_compute_cost(
    model: torch.nn.Module, *, batch: int = 4, tokens: int = 64, seconds: float = 0.5, rounds: int = 3
) -> dict[str, float]:
    """Compute nanoseconds lost per byte copied beside it, on this machine (CPU models only).

    Rounds alternate a forward-only window and a window with the copier running; each pair gives
    ``(slowed - alone) x forwards / bytes copied``, and the median of the pairs is the figure
    (at least 0). Returns it with the alone and slowed forward times and the copier's bandwidth.
    """
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("copies only share the processor with compute on the host backend (a CPU model)")
    vocab = int(model.config.vocab_size)
    inputs = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    _forward_seconds(model, inputs, seconds / 4)  # warm-up
    costs, alone, slowed, rates = [], [], [], []
    for _ in range(max(1, rounds)):
        a, _ = _forward_seconds(model, inputs, seconds)
        with _Copier() as copier:
            s, n = _forward_seconds(model, inputs, seconds)
        copied = copier.gbps * 1e9 * s * n  # bytes copied while the forwards ran
        alone.append(a)
        slowed.append(s)
        rates.append(copier.gbps)
        costs.append(max(0.0, (s - a) * n / max(copied, 1.0) * 1e9))
    return {
        "copy_compute_ns_per_byte": median(costs),
        "forward_alone_s": median(alone),
        "forward_with_copies_s": median(slowed),
        "copier_gbps": median(rates),
    }
