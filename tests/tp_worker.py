"""One rank of a two-process tensor-parallel run (gloo, CPU), started by ``tests/test_tensor_parallel.py``.

``python tp_worker.py SCENARIO MODEL_DIR OUT_DIR`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` set. Writes ``OUT_DIR/rank<r>.json``: what this rank saw, for the test to check.

Scenarios:
- ``identity``: bad input first (ranks that disagree on the arguments; a budget too small on one
  rank), then for greedy, sampling with a fixed seed and beam search: tensor parallel without
  pie-rs, then with pie-rs at a budget that pools half the layers of this rank's shard; tokens,
  stats and the stats gathered on rank 0.
- ``fault``: rank 1's engines fail their third copy; every rank must raise (the failed rank
  tears the process group down, so it comes last).
- ``absent``: rank 1 never attaches; rank 0's attach must raise, naming it.
- ``serving``: continuous batching (``generate_batch`` and the manager) with and without pie-rs:
  greedy and seeded sampling at a budget that pools half of this rank's shard; a serving budget
  too small on rank 1 only; rank 1's engine failing mid-run, then a run without the fault.
- ``all``: ``identity``, ``serving`` then ``fault`` in one pair of processes (one start-up).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

import pie_rs
from pie_rs import _core, distributed
from pie_rs import pool as pool_module

from helpers import generate
from models import make_inputs

PROMPT, MAX_NEW = 7, 10


def expanded(mode: str, batch: int) -> int:
    return batch * 4 if mode == "beam" else batch


def half_pooled_shard_budget(model: Any, batch: int) -> int:
    """Device bytes of this rank's shard with half its layers pooled through one staging slot."""
    cfg = model.config
    heads = cfg.num_key_value_heads // dist.get_world_size()
    dim = cfg.hidden_size // cfg.num_attention_heads
    layers = [(batch, heads, dim, dim, 4)] * cfg.num_hidden_layers
    cap = _core.round_capacity(PROMPT + MAX_NEW)
    return int(_core.device_bytes(layers, cap, list(range(0, cfg.num_hidden_layers, 2)), 1))


def error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def identity(model: Any, rank: int, out: dict[str, Any]) -> None:
    inputs = make_inputs(2, PROMPT)
    # Ranks that disagree on an argument: refused on every rank.
    try:
        pie_rs.attach(model, gpu_budget=10**6 * (rank + 1))
        out["disagree"] = None
    except pie_rs.PieError as exc:
        out["disagree"] = error(exc)
    # A fraction of free memory that resolves small on rank 1 only: every rank fails alike at the
    # first generate, naming rank 1 and the minimum.
    real = pool_module._available_memory
    if rank == 1:
        pool_module._available_memory = lambda backend, device: 8192
    try:
        pool = pie_rs.attach(model, gpu_budget=0.5)
        out["small_budget_bytes"] = pool.budget_bytes
        try:
            generate(model, inputs, "greedy", max_new_tokens=MAX_NEW)
            out["small"] = None
        except pie_rs.PieError as exc:
            out["small"] = error(exc)
        pool.detach()
    finally:
        pool_module._available_memory = real
    out["modes"] = {}
    for mode in ("greedy", "sample", "beam"):
        expected = generate(model, inputs, mode, max_new_tokens=MAX_NEW)
        budget = half_pooled_shard_budget(model, expanded(mode, 2))
        with pie_rs.attach(model, gpu_budget=budget) as pool:
            got = generate(model, inputs, mode, max_new_tokens=MAX_NEW)
            gathered = distributed.gather_stats(pool)
            stats = pool.stats()
        out.setdefault("restored", []).append("forward" not in model.__dict__ and "generate" not in model.__dict__)
        out["modes"][mode] = {
            "equal": bool(torch.equal(got, expected)),
            "tokens": got.tolist(),
            "stats": {k: v for k, v in stats.items() if isinstance(v, int | float | str | list | type(None))},
            "gathered": gathered,
        }
    # Host attention on every rank: each rank's shard of heads attended on the host, split exactly.
    expected = generate(model, inputs, "greedy", max_new_tokens=MAX_NEW)
    with pie_rs.attach(model, pooled_layers=[0, 1, 2, 3], prefetch_depth=1, host_attention="always") as pool:
        got = generate(model, inputs, "greedy", max_new_tokens=MAX_NEW)
        stats = pool.stats()
    out["host"] = {
        "equal": bool(torch.equal(got, expected)),
        "layers": stats["host_attended_layers"],
        "layer_steps": stats["host_attended_layer_steps"],
        "h2d_bytes": stats["h2d_bytes"],
    }


def fault(model: Any, rank: int, out: dict[str, Any]) -> None:
    inputs = make_inputs(2, PROMPT)
    if rank == 1:
        real = _core.Engine

        def faulty(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("faults", {"fail_copy_at": 3})
            kwargs.setdefault("wait_timeout", 0.5)
            return real(*args, **kwargs)

        _core.Engine = faulty  # type: ignore[misc]
    pool = pie_rs.attach(model, pooled_layers=[0, 2], prefetch_depth=1)
    start = time.perf_counter()
    try:
        generate(model, inputs, "greedy", max_new_tokens=MAX_NEW)
        out["fault"] = None
    except Exception as exc:  # every rank must get here
        out["fault"] = error(exc)
        out["pie_error"] = isinstance(exc, pie_rs.PieError)
    out["seconds"] = time.perf_counter() - start
    pool.detach()


# Mixed lengths, below and above a page (8 tokens), one spanning three pages (as tests/test_serving.py).
CB_PROMPTS = [[3 + (7 * i + j) % 120 for j in range(n)] for i, n in enumerate([3, 9, 1, 17, 6])]
PAGE = 8


def cb_config(**kw: Any) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(**({"page_size": PAGE, "max_batch_tokens": 64, "seed": 1234} | kw))


def cb_generation(mode: str) -> GenerationConfig:
    sample = {"do_sample": True, "temperature": 0.9, "top_k": 50} if mode == "sample" else {"do_sample": False}
    return GenerationConfig(max_new_tokens=MAX_NEW, eos_token_id=-1, pad_token_id=0, **sample)


def cb_tokens(
    model: Any, mode: str, prompts: list[list[int]] = CB_PROMPTS, gen: Any = None, **config: Any
) -> dict[str, list[int]]:
    out = model.generate_batch(
        prompts,
        generation_config=gen or cb_generation(mode),
        continuous_batching_config=cb_config(**config),
        progress_bar=False,
    )
    assert all(v.error is None for v in out.values()), [v.error for v in out.values()]
    return {k: list(v.generated_tokens) for k, v in out.items()}


def manager_tokens(model: Any) -> dict[str, Any]:
    """The same greedy requests through the manager API (every rank adds them; the driver's are served).

    A request that failed gives ``{"error": ...}``.
    """
    manager = model.init_continuous_batching(
        generation_config=cb_generation("greedy"), continuous_batching_config=cb_config()
    )
    manager.start()
    try:
        for i, prompt in enumerate(CB_PROMPTS):
            manager.add_request(prompt, request_id=f"req_{i}", max_new_tokens=MAX_NEW)
        results: dict[str, list[int]] = {}
        deadline = time.time() + 60
        while len(results) < len(CB_PROMPTS) and time.time() < deadline:
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                results[out.request_id] = {"error": out.error} if out.error else list(out.generated_tokens)
    finally:
        manager.stop(block=True)
    return results


def shard_row_bytes(model: Any) -> int:
    """Bytes of one token of one layer (K and V) of this rank's shard, float32."""
    cfg = model.config
    return 2 * (cfg.num_key_value_heads // dist.get_world_size()) * (cfg.hidden_size // cfg.num_attention_heads) * 4


def serving(model: Any, rank: int, out: dict[str, Any]) -> None:
    result: dict[str, Any] = out.setdefault("serving", {})
    # 600 rows of one layer of the shard: pie-rs pools 2 of the 4 layers (as tests/test_serving.py).
    budget = 600 * shard_row_bytes(model)
    for mode in ("greedy", "sample"):
        expected = cb_tokens(model, mode, num_blocks=64)
        with pie_rs.attach(model, gpu_budget=budget) as pool:
            got = cb_tokens(model, mode)
            stats = pool.stats()
            gathered = distributed.gather_stats(pool)
        result[mode] = {
            "equal": got == expected,
            "tokens": got,
            "stats": stats["serving"],
            "rank": stats["rank"],
            "gathered": None
            if gathered is None
            else [(s["rank"], s["serving_plan"], s["plans_agree"]) for s in gathered],
        }
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        result["manager_equal"] = manager_tokens(model) == result["greedy"]["tokens"]
        result["manager_stats"] = pool.stats()["serving"]
    # Forks (block copies into pooled layers' host copy) and preemption under memory pressure: each
    # rank's scheduler must decide alike, token for token against TP without pie-rs.
    shared = [40 + j for j in range(2 * PAGE + 3)]
    prompts = [[*shared, 5 + i] for i in range(3)]
    forks = GenerationConfig(max_new_tokens=8, do_sample=True, eos_token_id=-1, pad_token_id=0, num_return_sequences=2)
    expected_forks = cb_tokens(model, "sample", prompts, forks, num_blocks=64)
    expected_small = cb_tokens(model, "greedy", num_blocks=6)
    with pie_rs.attach(model, gpu_budget=budget, objective="memory") as pool:
        result["forks_equal"] = cb_tokens(model, "sample", prompts, forks) == expected_forks
        result["forks_stats"] = pool.stats()["serving"]
        result["preempt_equal"] = cb_tokens(model, "greedy", num_blocks=6) == expected_small
        result["preempt_stats"] = pool.stats()["serving"]
    # A serving budget too small on rank 1 only: every rank refuses, naming rank 1 and the minimum.
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        if rank == 1:
            pool._serving_budget = lambda: 4096  # type: ignore[method-assign]
        start = time.perf_counter()
        try:
            cb_tokens(model, "greedy")
            result["small"] = None
        except pie_rs.PieError as exc:
            result["small"] = error(exc)
        result["small_seconds"] = time.perf_counter() - start
    # Rank 1's engine fails its third copy mid-run: every rank raises, then the next run is right.
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        if rank == 1:
            pool._serving_engine_options = {"faults": {"fail_copy_at": 3}, "wait_timeout": 0.5}
        start = time.perf_counter()
        try:
            cb_tokens(model, "greedy")
            result["fault"] = None
        except Exception as exc:  # every rank must get here
            result["fault"] = error(exc) | {"pie_error": isinstance(exc, pie_rs.PieError)}
        result["fault_seconds"] = time.perf_counter() - start
        # The manager API: each request's result carries the error, on every rank, and nothing hangs.
        start = time.perf_counter()
        failed = manager_tokens(model)
        result["manager_fault"] = {
            "all_failed": len(failed) == len(CB_PROMPTS) and all(isinstance(v, dict) for v in failed.values()),
            "errors": sorted({v["error"] for v in failed.values() if isinstance(v, dict)}),
            "seconds": time.perf_counter() - start,
        }
        pool._serving_engine_options = None
        result["after_fault_equal"] = cb_tokens(model, "greedy") == result["greedy"]["tokens"]
    result["restored"] = "generate_batch" not in model.__dict__ and "init_continuous_batching" not in model.__dict__


def absent(model: Any, rank: int, out: dict[str, Any]) -> None:
    """Rank 1 never attaches: rank 0's attach names it after the (shortened) attach timeout."""
    distributed.ATTACH_TIMEOUT = 3.0
    if rank == 1:
        time.sleep(8)
        out["absent"] = None
        return
    start = time.perf_counter()
    try:
        pie_rs.attach(model)
        out["absent"] = None
    except pie_rs.PieError as exc:
        out["absent"] = error(exc)
    out["seconds"] = time.perf_counter() - start
    out["untouched"] = "generate" not in model.__dict__ and "forward" not in model.__dict__


def main() -> None:
    scenario, model_dir, out_dir = sys.argv[1:4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    out: dict[str, Any] = {"rank": rank}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
        steps = {
            "identity": [identity],
            "fault": [fault],
            "serving": [serving],
            "all": [identity, serving, fault],
            "absent": [absent],
        }
        for step in steps[scenario]:
            step(model, rank, out)
    except BaseException as exc:
        out["crash"] = "".join(traceback.format_exception(exc))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    if scenario in ("identity", "serving") and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
