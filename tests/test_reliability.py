"""Reliability: injected faults surface as pie-rs errors in bounded time and never as wrong data,
an interrupt between layers leaves the pool usable, attach/detach cycles leak neither memory nor
threads, and two threads on one pool either work or fail clearly.

Faults come from the host backend (``_core.Engine(..., faults={...}, wait_timeout=...)``):
``fail_copy_at``/``hang_copy_at`` (the n-th copy fails / never completes) and ``alloc_limit``.
Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

import pytest
import torch

import pie_rs
from pie_rs import _core
from pie_rs._model import cache_keyword

from helpers import generate
from models import make_inputs

LAYERS = 4
HEADS, DIM = 2, 4
SPEC = [(1, HEADS, DIM, DIM, 4)] * LAYERS  # batch 1, fp32
POOLED = [1, 3]
TIMEOUT = 0.5


# ------------------------------------------------------------------------- engine-level faults
class Driver:
    """Drives an engine as the decoder-layer hooks do, writing a known value per token and
    checking every valid token of every layer it reads."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokens: list[list[float]] = [[] for _ in range(LAYERS)]
        self.steps = 0
        self.checked = 0

    def kv(self, offset: int) -> torch.Tensor:
        arena = torch.from_dlpack(self.engine.device_region())
        cap = self.engine.capacity
        nbytes = HEADS * cap * DIM * 4
        return arena[offset : offset + nbytes].view(torch.float32).view(1, HEADS, cap, DIM)

    def layer(self, layer: int) -> None:
        e = self.engine
        e.layer_begin(layer, 0)
        k = self.kv(e.layer_ready(layer, 0))
        n = len(self.tokens[layer])
        got = k[0, :, :n, :].reshape(HEADS, n, DIM)
        want = torch.tensor(self.tokens[layer]).view(1, n, 1).expand(HEADS, n, DIM)
        assert torch.equal(got, want), f"layer {layer} read wrong KV at step {self.steps}"
        self.checked += n
        value = float(self.steps * 100 + layer + 1)
        k[:, :, n] = value
        self.tokens[layer].append(value)
        e.layer_written(layer, 1, 0)
        e.layer_done(layer, 0)

    def step(self) -> None:
        for layer in range(LAYERS):
            self.layer(layer)
        self.steps += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def faulty_engine(**faults: int) -> Any:
    return _core.Engine("host", SPEC, 64, pooled_layers=POOLED, prefetch_depth=1, faults=faults, wait_timeout=TIMEOUT)


def assert_refuses(driver: Driver) -> None:
    """After a failure every further use raises a pie-rs error; reads that still succeed (a
    resident layer) return right data, which ``Driver.layer`` checks."""
    for _ in range(2):
        with pytest.raises((pie_rs.BackendError, pie_rs.StateError)) as info:
            driver.run(1)
        assert "failed" in str(info.value) or "stuck" in str(info.value) or "stopped" in str(info.value)
    with pytest.raises((pie_rs.BackendError, pie_rs.StateError)):
        driver.engine.quiesce()


@pytest.mark.parametrize("fault", ["fail_copy_at", "hang_copy_at"])
def test_engine_copy_fault_surfaces_in_bounded_time(fault) -> None:
    clean = Driver(_core.Engine("host", SPEC, 64, pooled_layers=POOLED, prefetch_depth=1))
    clean.run(4)
    clean_copies = clean.engine.stats()["prefetches"]
    clean.engine.close()
    assert clean_copies > 3

    driver = Driver(faulty_engine(**{fault: 9}))
    start = time.perf_counter()
    with pytest.raises((pie_rs.BackendError, pie_rs.StateError), match="injected fault: copy #9") as info:
        driver.run(20)
    elapsed = time.perf_counter() - start
    print(f"\n{fault}=9: {type(info.value).__name__} after {elapsed * 1e3:.1f} ms: {info.value}")
    assert driver.checked > 0, "some data was read back (and checked) before the fault"
    limit = 3 * TIMEOUT + 1.0
    assert elapsed < limit, f"{fault} took {elapsed:.2f}s to surface"
    if fault == "hang_copy_at":
        # A hung copy is noticed by a bounded wait: at least part of wait_timeout.
        print(f"{fault}: surfaced after {elapsed:.3f}s with wait_timeout={TIMEOUT}s")
    start = time.perf_counter()
    assert_refuses(driver)
    close_start = time.perf_counter()
    driver.engine.close()
    print(f"{fault}: refusals took {close_start - start:.3f}s, close {time.perf_counter() - close_start:.3f}s")
    assert time.perf_counter() - start < 4 * TIMEOUT + 2.0
    assert driver.engine.closed
    with pytest.raises(pie_rs.StateError, match="closed"):
        driver.engine.layer_begin(0, 0)


def test_engine_hang_waits_for_wait_timeout() -> None:
    """The hang is noticed where the caller waits for the copy: within wait_timeout, not forever."""
    for timeout in (0.2, 0.6):
        engine = _core.Engine(
            "host",
            SPEC,
            64,
            pooled_layers=POOLED,
            prefetch_depth=1,
            faults={"hang_copy_at": 5},
            wait_timeout=timeout,
        )
        driver = Driver(engine)
        start = time.perf_counter()
        with pytest.raises((pie_rs.BackendError, pie_rs.StateError), match="never completes"):
            driver.run(20)
        elapsed = time.perf_counter() - start
        print(f"\nhang_copy_at=5, wait_timeout={timeout}s: surfaced after {elapsed:.3f}s")
        assert elapsed < timeout + 1.0
        engine.close()


def test_engine_allocation_failure_names_the_numbers() -> None:
    with pytest.raises(pie_rs.BackendError, match=r"cannot allocate \d+ bytes \(limit 1000\)"):
        faulty_engine(alloc_limit=1000)
    # Enough for the first arenas, not for growth: the growth fails with the numbers ...
    engine = faulty_engine(alloc_limit=20_000)
    driver = Driver(engine)
    driver.run(3)
    capacity = engine.capacity
    with pytest.raises(pie_rs.BackendError, match=r"cannot allocate \d+ bytes \(limit 20000\)"):
        engine.ensure_capacity(1000)
    # ... and the engine keeps its old arenas: nothing is lost, it runs on at the old capacity
    # (the driver checks every valid token it reads back).
    assert engine.capacity == capacity
    checked = driver.checked
    driver.run(3)
    assert driver.checked > checked
    engine.close()


# -------------------------------------------------------------------------- model-level faults
def _inject(monkeypatch: pytest.MonkeyPatch, **faults: int) -> list[Any]:
    """Makes every engine pie-rs creates a fault-injecting one; returns the engines made."""
    real = _core.Engine
    made: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("faults", faults)
        kwargs.setdefault("wait_timeout", TIMEOUT)
        engine = real(*args, **kwargs)
        made.append(engine)
        return engine

    monkeypatch.setattr(_core, "Engine", factory)  # pool.py and cache.py call _core.Engine
    return made


@pytest.mark.parametrize(
    "faults",
    [{"fail_copy_at": 3}, {"fail_copy_at": 12}, {"hang_copy_at": 12}, {"alloc_limit": 3000}],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_generate_raises_rather_than_returning_wrong_tokens(monkeypatch, llama, inputs, expected, faults) -> None:
    made = _inject(monkeypatch, **faults)
    pool = pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1)
    start = time.perf_counter()
    try:
        with pytest.raises(pie_rs.PieError) as info:
            generate(llama, inputs, "greedy")
        elapsed = time.perf_counter() - start
        print(f"\n{faults}: generate raised {type(info.value).__name__} after {elapsed:.3f}s: {info.value}")
        assert isinstance(info.value, pie_rs.BackendError | pie_rs.StateError)
        # Known bug: HostBackend::set_timeout does not reach the copy threads, which were spawned
        # with the 30 s default; a queue blocked in an event wait behind the hung copy then holds
        # close() (run by generate's cleanup) for up to 30 s instead of wait_timeout.
        assert elapsed < 30 + 10 * TIMEOUT + 5
    finally:
        pool.detach()
    assert all(e.closed for e in made), "every engine is closed after detach"
    monkeypatch.undo()
    with pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1):
        assert torch.equal(generate(llama, inputs, "greedy"), expected)


@pytest.mark.parametrize("at", [1, 7, 20, 40, 10_000])
def test_a_failed_copy_anywhere_is_never_silent(monkeypatch, llama, inputs, expected, at) -> None:
    """Wherever the fault lands (10_000: never), generate raises or returns the right tokens."""
    _inject(monkeypatch, fail_copy_at=at)
    with pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1):
        try:
            out = generate(llama, inputs, "greedy")
        except pie_rs.PieError:
            assert at < 10_000
        else:
            assert torch.equal(out, expected)


# -------------------------------------------------------------------------------- interrupts
class InterruptOnce:
    def __init__(self, at_call: int) -> None:
        self.calls = 0
        self.at_call = at_call

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt


@pytest.mark.parametrize("at_call", [1, 5])  # in the prefill, in a decode step
def test_keyboard_interrupt_between_layers_leaves_the_pool_usable(llama, inputs, expected, at_call) -> None:
    kw = cache_keyword(llama)
    with pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1) as pool:
        hook = llama.model.layers[2].register_forward_hook(InterruptOnce(at_call))
        try:
            with pytest.raises(KeyboardInterrupt):
                generate(llama, inputs, "greedy")
        finally:
            hook.remove()
        assert torch.equal(generate(llama, inputs, "greedy"), expected)
        # A hand-made cache interrupted the same way is closed by nobody: a fresh one works.
        cache = pool.new_cache(max_length=32)
        hook = llama.model.layers[2].register_forward_hook(InterruptOnce(at_call))
        try:
            with pytest.raises(KeyboardInterrupt):
                generate(llama, inputs, "greedy", **{kw: cache})
        finally:
            hook.remove()
        assert torch.equal(generate(llama, inputs, "greedy", **{kw: pool.new_cache(max_length=32)}), expected)
        assert torch.equal(generate(llama, inputs, "greedy"), expected)


# --------------------------------------------------------------------------------- resources
def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _cycles(model: torch.nn.Module, inputs: dict[str, torch.Tensor], n: int, warmup: int) -> None:
    expected = generate(model, inputs, "greedy", max_new_tokens=2)
    gc.collect()  # pools other tests dropped without detach close their engines now
    before = _threads()  # torch's own pools are up after a first generate
    baseline_threads = None
    rss_after_warmup = 0
    marks = []
    start = time.perf_counter()
    for i in range(n):
        pool = pie_rs.attach(model, pooled_layers=POOLED, prefetch_depth=1)
        out = generate(model, inputs, "greedy", max_new_tokens=2)
        pool.detach()
        if i == 0 or i % 10 == 0 or i == n - 1:
            assert torch.equal(out, expected), f"cycle {i}"
        if i == warmup - 1:
            gc.collect()
            rss_after_warmup = _rss()
            baseline_threads = _threads()
        if i >= warmup and (i % max(1, n // 10) == 0 or i == n - 1):
            gc.collect()
            marks.append((i, _rss()))
            assert _threads() == baseline_threads, f"threads after detach at cycle {i}: {_threads()}"
    growth = marks[-1][1] - rss_after_warmup
    figures = ", ".join(f"{i}: {r / 2**20:.1f}" for i, r in marks)
    print(
        f"\n{n} attach/generate/detach cycles in {time.perf_counter() - start:.1f}s; VmRSS after "
        f"{warmup} warm-up cycles {rss_after_warmup / 2**20:.1f} MiB; by cycle (MiB) {figures}; "
        f"growth {growth / 2**20:+.2f} MiB; threads {baseline_threads}"
    )
    assert growth < 8 * 2**20 + n * 8 * 1024, f"VmRSS grew by {growth} bytes over {n} cycles"
    assert _threads() == baseline_threads <= before, "every engine thread is joined after detach"


def test_attach_detach_cycles_leak_nothing(llama) -> None:
    _cycles(llama, make_inputs(1, 5), 50, 10)


@pytest.mark.slow
def test_attach_detach_cycles_leak_nothing_1000(llama) -> None:
    _cycles(llama, make_inputs(1, 5), 1000, 50)


def test_engine_threads_are_joined(llama, inputs) -> None:
    base = _threads()
    pool = pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1)
    cache = pool.new_cache(max_length=32)
    with torch.no_grad():
        llama(**inputs, use_cache=True, **{cache_keyword(llama): cache})
    assert _threads() > base, "an engine runs threads while a cache is open"
    pool.detach()
    assert cache.closed
    assert _threads() == base


# --------------------------------------------------------------------------------- threading
def _run_threads(fn: Any, n: int = 2) -> list[Any]:
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # reported to the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a generate thread hung"
    return results


def test_two_threads_generate_on_one_pool(llama, inputs, expected) -> None:
    """Each generate call gets its own cache and engine: both threads run at once and both are right."""
    with pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1) as pool:
        results = _run_threads(lambda i: generate(llama, inputs, "greedy"))
        for r in results:
            assert isinstance(r, torch.Tensor), f"{type(r).__name__}: {r}"
            assert torch.equal(r, expected)
        assert pool.stats()["generations"] == 2


def test_two_threads_sharing_one_cache(llama, inputs, expected) -> None:
    """Two generate calls on the same explicit cache at once: misuse, as with a DynamicCache
    (both threads append to the same layers). pie-rs does not detect it; it must not crash the
    process or hang, and the pool must work afterwards."""
    kw = cache_keyword(llama)
    with pie_rs.attach(llama, pooled_layers=POOLED, prefetch_depth=1) as pool:
        cache = pool.new_cache(max_length=64)
        results = _run_threads(lambda i: generate(llama, inputs, "greedy", **{kw: cache}))
        outcomes = []
        for r in results:
            if isinstance(r, torch.Tensor):
                outcomes.append("tokens (right)" if torch.equal(r, expected) else "tokens (mixed)")
            else:
                assert isinstance(r, Exception), f"{type(r).__name__}: {r}"
                outcomes.append(f"{type(r).__name__}: {r}")
        print("\nshared cache:", outcomes)
        assert torch.equal(generate(llama, inputs, "greedy"), expected)
