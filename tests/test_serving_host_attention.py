"""Host attention inside continuous batching: token identity against transformers' own paged cache.

With ``host_attention="always"`` every pooled layer of the paged cache stays in host memory: its
new rows are written into its host area, and its attention is the host kernel over each request's
past rows (read in place, block runs) merged with the device over the step's new tokens. Batches
mix prefills and decodes (transformers' flattened varlen layout); requests join while others
decode; forks copy blocks into host areas. Every output must equal continuous batching without
pie-rs (greedy, and seeded sampling with forks), and the stats must show the layers ran on the host.
"""

from __future__ import annotations

import time

import pytest
from transformers import GenerationConfig

import pie_rs
from pie_rs import serving
from test_serving import PROMPTS, cb, greedy, row_bytes, tokens

from helpers import wait_until_decoding
from models import make_model

needs_524 = pytest.mark.skipif(
    serving.serving_supported() is not None, reason="pie-rs serving needs transformers >= 5.24"
)


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")  # GQA: 4 query heads over 2 KV heads
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def reference(llama) -> dict[str, list[int]]:
    return plain(llama, config=cb(num_blocks=64))


def plain(model, prompts=PROMPTS, gen=None, config=None) -> dict[str, list[int]]:
    """Continuous batching on transformers' own cache (no pool attached, or its hook lifted)."""
    saved = model.__dict__.pop("init_continuous_batching", None)
    try:
        return tokens(model, prompts, gen, config)
    finally:
        if saved is not None:
            model.__dict__["init_continuous_batching"] = saved


def record_steps(monkeypatch) -> list:
    """Keeps every step's batch as host-attended layers read it (``serving._PagedStep``)."""
    steps = []
    build = serving._PagedStep.build

    def record(requests, device):
        step = build(requests, device)
        steps.append(step)
        return step

    monkeypatch.setattr(serving._PagedStep, "build", staticmethod(record))
    return steps


def _check_host_attended(stats: dict, pooled: int) -> None:
    assert stats["host_attention"] == "always"
    assert stats["pooled_layers"] == pooled and len(stats["host_attended_layers"]) == pooled
    # Every pooled layer ran on the host at every step, and none was copied to the device.
    assert stats["host_attended_layer_steps"] == pooled * stats["forward_steps"]
    assert stats["h2d_bytes"] == 0 and stats["d2h_bytes"] == 0
    assert stats["host_attention_seconds"] > 0


@needs_524
@pytest.mark.parametrize("pooling", ["some", "all"])
def test_greedy_tokens_equal_continuous_batching_alone(llama, reference, pooling, monkeypatch):
    budget = 600 * row_bytes(llama)
    kwargs = {"some": {}, "all": {"objective": "memory"}}[pooling]
    steps = record_steps(monkeypatch)
    with pie_rs.attach(llama, gpu_budget=budget, host_attention="always", **kwargs) as pool:
        got = tokens(llama)
        stats = pool.stats()["serving"]
    assert got == reference
    # Some request's past lay in blocks apart (several runs, merged on the host).
    assert max(len(runs) for s in steps for *_, runs in s.requests) > 1
    layers = llama.config.num_hidden_layers
    _check_host_attended(stats, 2 if pooling == "some" else layers)
    assert stats["peak_running"] == len(PROMPTS) and stats["device_kv_bytes"] <= budget


@needs_524
def test_host_attended_layers_take_no_staging_slot_so_the_budget_buys_more_blocks(llama, reference):
    budget = 600 * row_bytes(llama)
    stats = {}
    for choice in ("never", "always"):
        with pie_rs.attach(llama, gpu_budget=budget, host_attention=choice) as pool:
            got = tokens(llama)
            stats[choice] = pool.stats()["serving"]
        assert got == reference
        assert stats[choice]["device_kv_bytes"] <= budget
    never, always = stats["never"], stats["always"]
    assert never["pooled_layers"] == always["pooled_layers"] == 2
    # The copied plan's staging slots are blocks under "always".
    assert always["num_blocks"] > never["num_blocks"]


@needs_524
def test_chunked_prefills_mix_with_decodes(llama, monkeypatch):
    # A small token budget per batch: long prompts prefill in chunks on top of their own past,
    # in the same batches as other requests' decodes.
    prompts = [[5 + (3 * i + j) % 90 for j in range(n)] for i, n in enumerate([30, 2, 19, 5])]
    config = cb(max_batch_tokens=12)
    expected = plain(llama, prompts, config=cb(num_blocks=64, max_batch_tokens=12))
    steps = record_steps(monkeypatch)
    with pie_rs.attach(llama, gpu_budget=600 * row_bytes(llama), objective="memory", host_attention="always") as pool:
        got = tokens(llama, prompts, config=config)
        stats = pool.stats()["serving"]
    assert got == expected
    _check_host_attended(stats, llama.config.num_hidden_layers)
    # One batch held a prefill chunk on a past (several query rows, past rows) beside decodes.
    assert any(
        any(rows > 1 and runs for _, rows, runs in s.requests) and any(rows == 1 for _, rows, _ in s.requests)
        for s in steps
    )


@needs_524
def test_forks_and_sampling(llama):
    shared = [40 + j for j in range(19)]
    prompts = [[*shared, 5 + i] for i in range(3)]
    sampling = GenerationConfig(
        max_new_tokens=8, do_sample=True, eos_token_id=-1, pad_token_id=0, num_return_sequences=2
    )
    expected = plain(llama, prompts, sampling, cb(num_blocks=64, seed=3))
    with pie_rs.attach(llama, gpu_budget=300 * row_bytes(llama), objective="memory", host_attention="always") as pool:
        # Forked children copy their parent's last block: into the host areas of host-attended layers.
        assert tokens(llama, prompts, sampling, cb(seed=3)) == expected
        stats = pool.stats()["serving"]
    assert stats["peak_running"] == 6
    _check_host_attended(stats, llama.config.num_hidden_layers)


@needs_524
def test_preemption_in_a_full_cache(llama, reference):
    # A budget of 60 rows of one layer cannot hold every request at once (all layers pooled):
    # transformers preempts (soft reset) and recomputes; the host areas are rewritten through the
    # same path, the tokens unchanged.
    with pie_rs.attach(llama, gpu_budget=60 * row_bytes(llama), objective="memory", host_attention="always") as pool:
        got = tokens(llama)
        stats = pool.stats()["serving"]
    assert got == reference
    assert stats["preemptions"] > 0
    _check_host_attended(stats, llama.config.num_hidden_layers)


@needs_524
def test_manager_requests_added_while_others_decode(llama, reference, monkeypatch):
    steps = record_steps(monkeypatch)
    with pie_rs.attach(llama, gpu_budget=300 * row_bytes(llama), objective="memory", host_attention="always") as pool:
        manager = llama.init_continuous_batching(generation_config=greedy(new=10), continuous_batching_config=cb())
        manager.start()
        try:
            # req_0 decodes far longer than the others, so they surely join while it decodes; greedy,
            # its first 10 tokens are the reference's.
            first = manager.add_request(PROMPTS[0], request_id="req_0", streaming=True, max_new_tokens=40)
            wait_until_decoding(manager, first)
            deadline = time.time() + 60
            for i, prompt in enumerate(PROMPTS[1:4], start=1):
                manager.add_request(prompt, request_id=f"req_{i}")
            results = {}
            while len(results) < 4 and time.time() < deadline:
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    results[out.request_id] = list(out.generated_tokens)
        finally:
            manager.stop(block=True)
        stats = pool.stats()["serving"]
    assert len(results["req_0"]) == 40
    results["req_0"] = results["req_0"][:10]
    assert results == {k: reference[k] for k in ("req_0", "req_1", "req_2", "req_3")}
    _check_host_attended(stats, llama.config.num_hidden_layers)
    # A joining request's prefill (no past: device only) ran in one batch with a decode on a past.
    assert any(
        any(not runs for *_, runs in s.requests) and any(rows == 1 and runs for _, rows, runs in s.requests)
        for s in steps
    )


@needs_524
def test_always_is_refused_where_continuous_batching_cannot_split():
    model = make_model("llama")
    model.set_attn_implementation("eager")  # continuous batching then runs paged|eager: not split
    with (
        pie_rs.attach(model, host_attention="always"),
        pytest.raises(pie_rs.ConfigError, match="attends on the host through 'sdpa'"),
    ):
        model.init_continuous_batching(
            generation_config=greedy(), continuous_batching_config=cb()
        )._create_batch_processor()
    sliding = make_model("mistral_sliding")  # every layer slides: nothing engine-managed in generate
    sliding.set_attn_implementation("sdpa")
    expected = plain(sliding, config=cb(num_blocks=64))
    with (
        pie_rs.attach(sliding, gpu_budget="1MiB", host_attention="always"),
        pytest.raises(pie_rs.ConfigError, match="'sliding_attention'"),
    ):
        sliding.init_continuous_batching(
            generation_config=greedy(), continuous_batching_config=cb()
        )._create_batch_processor()
    # "auto" serves it with copies, the tokens unchanged.
    with pie_rs.attach(sliding, gpu_budget=300 * row_bytes(sliding), objective="memory", host_attention="auto") as p:
        assert tokens(sliding) == expected
        assert p.stats()["serving"]["host_attended_layer_steps"] == 0


@needs_524
@pytest.mark.cuda
def test_cuda_continuous_batching_host_attention():
    """On CUDA: host-attended layers of the paged cache, mixed prefills and decodes."""
    model = make_model("llama", device="cuda")
    model.set_attn_implementation("sdpa")
    expected = plain(model, config=cb(num_blocks=64))
    with pie_rs.attach(model, gpu_budget=300 * row_bytes(model), objective="memory", host_attention="always") as pool:
        got = tokens(model)
        stats = pool.stats()["serving"]
    assert got == expected
    _check_host_attended(stats, model.config.num_hidden_layers)
