"""attach/detach, keywords, statistics, validation errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import DynamicCache

import pie_rs
from pie_rs._budget import parse_budget
from pie_rs._model import cache_keyword

from helpers import generate, layer_bytes
from models import make_inputs, make_model


def test_exports() -> None:
    assert isinstance(pie_rs.__version__, str) and pie_rs.__version__
    assert isinstance(pie_rs.cuda_available(), bool)
    for name in ("BudgetError", "ConfigError", "BackendError", "StateError"):
        assert issubclass(getattr(pie_rs, name), pie_rs.PieError)
    assert issubclass(pie_rs.ConfigError, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("100", 100),
        (" 2 kib ", 2048),
        ("1e3", 1000),
        (4096, 4096),
    ],
)
def test_parse_budget(text, expected) -> None:
    assert parse_budget(text, None) == expected


def test_parse_budget_fraction() -> None:
    assert parse_budget(0.5, 1000) == 500
    assert parse_budget(1.0, 1000) == 1000
    assert parse_budget(None, 1000) is None


@pytest.mark.parametrize(
    "bad", [0, -5, 0.0, 1.5, -0.1, math.nan, math.inf, "lots", "12 parsecs", "", "-1GiB", True, [1]]
)
def test_bad_budgets(bad) -> None:
    with pytest.raises(pie_rs.ConfigError):
        parse_budget(bad, 1000)


def test_attach_detach_restores_model() -> None:
    model = make_model("llama")
    inputs = make_inputs(2)
    expected = generate(model, inputs, "greedy")
    before = dict(model.__dict__)
    hooks = (len(model.model.layers[0]._forward_pre_hooks), len(model.model.layers[0]._forward_hooks))
    pool = pie_rs.attach(model, gpu_budget="1GiB")
    assert "generate" in model.__dict__
    assert torch.equal(generate(model, inputs, "greedy"), expected)
    pool.detach()
    assert "generate" not in model.__dict__
    assert model.__dict__.keys() == before.keys()
    assert (len(model.model.layers[0]._forward_pre_hooks), len(model.model.layers[0]._forward_hooks)) == hooks
    assert torch.equal(generate(model, inputs, "greedy"), expected)
    with pytest.raises(pie_rs.StateError):
        pool.new_cache()
    with pytest.raises(pie_rs.StateError):
        pool.stats()
    pool.detach()  # idempotent
    # and it can be attached again
    with pie_rs.attach(model) as again:
        assert torch.equal(generate(model, inputs, "greedy"), expected)
        assert again.stats()["generations"] == 1


def test_attach_twice_raises() -> None:
    model = make_model("llama")
    with pie_rs.attach(model), pytest.raises(pie_rs.StateError):
        pie_rs.attach(model)


def test_cache_of_detached_pool_raises() -> None:
    model = make_model("llama")
    pool = pie_rs.attach(model)
    cache = pool.new_cache(max_length=16)
    pool.detach()
    with pytest.raises(pie_rs.StateError), torch.no_grad():
        model(**make_inputs(1), use_cache=True, **{cache_keyword(model): cache})


def test_cache_keyword_new() -> None:
    model = make_model("llama")
    if cache_keyword(model) != "cache":
        pytest.skip("the installed transformers predates the `cache` keyword")
    inputs = make_inputs(2)
    expected = generate(model, inputs, "greedy")
    with pie_rs.attach(model) as pool:
        cache = pool.new_cache(max_length=32)
        out = generate(model, inputs, "greedy", cache=cache, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected)
        assert out.cache is cache
        assert cache.get_seq_length() == expected.shape[1] - 1
        assert not cache.closed


def test_cache_keyword_old() -> None:
    model = make_model("llama")
    inputs = make_inputs(2)
    expected = generate(model, inputs, "greedy")
    with pie_rs.attach(model) as pool:
        cache = pool.new_cache(max_length=32)
        with warnings.catch_warnings():
            # transformers >= 5.24 announces the rename with a FutureWarning; older ones know only this keyword.
            warnings.simplefilter("ignore", FutureWarning)
            out = generate(model, inputs, "greedy", past_key_values=cache)
        assert torch.equal(out, expected)
        assert cache.get_seq_length() == expected.shape[1] - 1
        assert pool.stats()["steps"] == 10


def test_own_dynamic_cache_passes_through() -> None:
    model = make_model("llama")
    inputs = make_inputs(2)
    expected = generate(model, inputs, "greedy")
    with pie_rs.attach(model) as pool:
        ref = DynamicCache(config=model.config)
        out = generate(model, inputs, "greedy", **{cache_keyword(model): ref})
        assert torch.equal(out, expected)
        assert ref.get_seq_length() == expected.shape[1] - 1
        assert pool.stats()["generations"] == 0


def test_use_cache_false_and_static_pass_through() -> None:
    model = make_model("llama")
    inputs = make_inputs(1)
    expected = generate(model, inputs, "greedy")
    with pie_rs.attach(model) as pool:
        assert torch.equal(generate(model, inputs, "greedy", use_cache=False), expected)
        with pytest.warns(UserWarning, match="pie-rs is not used"):
            assert torch.equal(generate(model, inputs, "greedy", cache_implementation="static"), expected)
        assert pool.stats()["generations"] == 0


def test_stats_and_budget_accounting() -> None:
    model = make_model("llama", layers=6)
    inputs = make_inputs(2, 7)
    slot = layer_bytes(model, 2, 7 + 10)
    budget = 4 * slot  # 6 layers cannot all be resident
    with pie_rs.attach(model, gpu_budget=budget) as pool:
        generate(model, inputs, "greedy")
        stats = pool.stats()
    for key in (
        "resident_layers",
        "pooled_layers",
        "device_kv_bytes",
        "peak_device_kv_bytes",
        "host_kv_bytes",
        "h2d_bytes",
        "d2h_bytes",
        "stall_seconds",
        "steps",
    ):
        assert key in stats
    assert stats["resident_layers"] + stats["pooled_layers"] == 6
    assert stats["pooled_layers"] >= 3
    assert stats["peak_device_kv_bytes"] <= budget
    assert stats["host_kv_bytes"] > 0
    assert stats["d2h_bytes"] > 0
    assert stats["steps"] == 10
    assert stats["stall_seconds"] >= 0.0


def test_h2d_bytes_match_prediction() -> None:
    """Host-to-device bytes follow the engine's prediction, step by step.

    Pinned plan: layers 1, 3, 5 pooled through one staging slot, so every decode step fetches
    each pooled layer once. ``predicted_h2d_bytes_per_step()`` counts them at the lengths the
    step starts with; the prefetch of the first pooled layer for the *next* step is issued after
    that layer got this step's token, so it moves one token more. Resuming after a quiesce
    refetches the first pooled layer once (the staging slot is treated as stale).
    """
    model = make_model("llama", layers=6)
    ids = make_inputs(2, 7)["input_ids"]
    kw = cache_keyword(model)
    token_bytes = 2 * 2 * (16 + 16) * 4  # batch x kv_heads x (k_dim + v_dim) x fp32, one token of one layer
    with pie_rs.attach(model, pooled_layers=[1, 3, 5], prefetch_depth=1) as pool, torch.no_grad():
        cache = pool.new_cache(max_length=32)
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        engine = cache.engine
        engine.quiesce()
        engine.resume()
        base = engine.stats()["h2d_bytes"]
        predicted = 7 * token_bytes  # the refetch after resume
        steps = 6
        for _ in range(steps):
            predicted += engine.predicted_h2d_bytes_per_step() + token_bytes
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{kw: cache})
        engine.quiesce()
        engine.resume()
        stats = engine.stats()
    assert stats["pooled_layers"] == 3 and stats["prefetch_depth"] == 1
    assert stats["h2d_bytes"] - base == predicted
    # Pooled layers write back only their new tokens: a prefill of 7 and one token per step.
    assert stats["d2h_bytes"] == 3 * (7 + steps) * token_bytes


class _NotAModel(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"gpu_budget": 0}, pie_rs.ConfigError),
        ({"gpu_budget": -1}, pie_rs.ConfigError),
        ({"gpu_budget": math.nan}, pie_rs.ConfigError),
        ({"gpu_budget": 2.0}, pie_rs.ConfigError),
        ({"gpu_budget": "a lot"}, pie_rs.ConfigError),
        ({"gpu_budget": 100}, pie_rs.BudgetError),
        ({"backend": "tpu"}, pie_rs.ConfigError),
        ({"backend": "cuda"}, pie_rs.ConfigError),
        ({"policy": "random"}, pie_rs.ConfigError),
        ({"objective": "beauty"}, pie_rs.ConfigError),
        ({"pooled_layers": [9]}, pie_rs.ConfigError),
        ({"pooled_layers": [1, 1]}, pie_rs.ConfigError),
        ({"pooled_layers": "1"}, pie_rs.ConfigError),
        ({"prefetch_depth": 0}, pie_rs.ConfigError),
    ],
)
def test_bad_arguments_leave_model_untouched(kwargs, error) -> None:
    model = make_model("llama")
    inputs = make_inputs(2)
    expected = generate(model, inputs, "greedy")
    with pytest.raises(error):
        pool = pie_rs.attach(model, **kwargs)
        # A budget too small for any plan may only show when the first cache is sized.
        try:
            generate(model, inputs, "greedy")
        finally:
            pool.detach()
    assert "generate" not in model.__dict__
    assert torch.equal(generate(model, inputs, "greedy"), expected)
    with pie_rs.attach(model) as pool:  # and attach still works
        assert torch.equal(generate(model, inputs, "greedy"), expected)


def test_not_a_model() -> None:
    with pytest.raises(pie_rs.ConfigError):
        pie_rs.attach(_NotAModel())
    with pytest.raises(pie_rs.ConfigError):
        pie_rs.attach("gpt2")


def test_meta_model() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from models import FAMILIES

    kwargs = dict(FAMILIES["llama"])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(pie_rs.ConfigError, match="meta"):
        pie_rs.attach(model)


def test_partly_meta_model() -> None:
    model = make_model("llama")
    model.model.layers[1].to("meta")
    with pytest.raises(pie_rs.ConfigError):
        pie_rs.attach(model)


@pytest.mark.cuda
def test_model_on_several_devices() -> None:
    model = make_model("llama")
    model.model.layers[1].to("cuda")
    with pytest.raises(pie_rs.ConfigError, match="several devices"):
        pie_rs.attach(model)


def test_unsupported_layer_kind() -> None:
    """A layer kind pie-rs cannot serve (linear attention) is refused at attach, never served wrongly."""
    model = make_model("llama")
    model.config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    with pytest.raises(pie_rs.ConfigError, match="cannot serve"):
        pie_rs.attach(model)
    model.config.layer_types = ["full_attention"] * 4


def test_bad_cache_arguments() -> None:
    model = make_model("llama")
    with pie_rs.attach(model) as pool:
        with pytest.raises(pie_rs.ConfigError):
            pool.new_cache(max_length=0)
        with pytest.raises(pie_rs.ConfigError):
            pool.new_cache(batch_size=-2)
        cache = pool.new_cache(max_length=16, batch_size=3)
        with pytest.raises(pie_rs.ConfigError, match="batch"), torch.no_grad():
            model(**make_inputs(2), use_cache=True, **{cache_keyword(model): cache})
        # the model still generates identically with a fresh cache afterwards
        inputs = make_inputs(2)
        pool.detach()
        expected = generate(model, inputs, "greedy")
    with pie_rs.attach(model):
        assert torch.equal(generate(model, inputs, "greedy"), expected)


def test_policy_options_are_parsed_once_by_pie_core():
    from pie_rs import _core

    assert _core.policy_config("adaptive", "memory", None, 3, 4) == {
        "policy": "adaptive",
        "objective": "memory",
        "pooled_layers": None,
        "prefetch_depth": 3,
        "host_attention": "never",
        "memory_slowdown": 1.02,
    }
    assert _core.policy_config("adaptive", "memory", None, None, 4, "never", 1.1)["memory_slowdown"] == 1.1
    assert _core.policy_config("adaptive", "speed", None, None, 4, "always")["host_attention"] == "always"
    with pytest.raises(pie_rs.ConfigError, match='"auto", "never" or "always"'):
        _core.policy_config("adaptive", "speed", None, None, 4, "sometimes")
    pinned = _core.policy_config("adaptive", "speed", [3, 1], None, 4)
    assert pinned["policy"] == "static" and pinned["pooled_layers"] == [1, 3]
    for bad in (("random", "speed", None, None), ("adaptive", "beauty", None, None), ("static", "speed", [1, 1], 2)):
        with pytest.raises(pie_rs.ConfigError):
            _core.policy_config(*bad, 4)
    with pytest.raises(pie_rs.ConfigError, match="does not exist"):
        _core.policy_config("static", "speed", [4], 1, 4)


def test_memory_slowdown_reaches_the_engine_and_bad_values_leave_the_model_alone(llama, inputs, expected):
    for bad in (0.9, float("nan"), float("inf")):
        with pytest.raises(pie_rs.ConfigError, match="slowdown must be a finite factor of at least 1"):
            pie_rs.attach(llama, objective="memory", memory_slowdown=bad)
    assert torch.equal(generate(llama, inputs, "greedy"), expected)  # nothing was attached
    with pie_rs.attach(llama, objective="memory", memory_slowdown=1.25) as pool:
        assert pool.settings.memory_slowdown == 1.25
        assert torch.equal(generate(llama, inputs, "greedy"), expected)
        engine = pool.settings.build([(1, 2, 16, 16, 4)] * 4, 64, None)
        try:
            assert engine.plan()["memory_slowdown"] == 1.25
        finally:
            engine.close()


def test_attach_pins_layers_given_in_any_order(llama, inputs, expected):
    with pie_rs.attach(llama, pooled_layers=[3, 1], prefetch_depth=1) as pool:
        assert pool.pooled_layers == [1, 3]
        assert pool.policy == "static"
        assert torch.equal(generate(llama, inputs, "greedy"), expected)
        assert pool.stats()["pooled"] == [1, 3]
