"""Bad input: every case is a ``pie_rs.PieError`` subclass that says what to change, and leaves
the model as it was (it then generates the same tokens as before attach).

Complements tests/test_api.py, which already covers: budgets 0, -1, NaN, 2.0, "a lot" and 100
bytes; backend/policy/objective/plan arguments; not a model; meta tensors (whole and partial);
several CUDA devices; a linear-attention layer; attaching twice; ``new_cache``/``stats``/a cache
after detach; bad ``max_length``/``batch_size`` and a batch mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import pie_rs
from pie_rs._budget import parse_budget, total_host_memory
from pie_rs._model import cache_keyword

from helpers import generate, layer_bytes
from models import FAMILIES, make_model


def assert_no_pie(model: torch.nn.Module) -> None:
    """Nothing of pie-rs is left on the model: no generate wrapper, no pool, no hooks."""
    assert "generate" not in model.__dict__
    assert "_pie_rs_pool" not in model.__dict__
    for layer in model.model.layers:
        assert not layer._forward_pre_hooks and not layer._forward_hooks


def assert_untouched(model: torch.nn.Module, inputs: dict[str, torch.Tensor], expected: torch.Tensor) -> None:
    """The model has no pie-rs left on it and generates as before; attach still works."""
    assert_no_pie(model)
    assert torch.equal(generate(model, inputs, "greedy"), expected)
    with pie_rs.attach(model):
        assert torch.equal(generate(model, inputs, "greedy"), expected)


# ------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    "budget",
    [0.0, -0.5, math.inf, -math.inf, 1.0000001, "1e400", "nan", "0", "-3MiB", "6 GiBs", "", True, [1], b"6GiB"],
)
def test_bad_budget_is_a_config_error(llama, budget) -> None:
    with pytest.raises(pie_rs.ConfigError, match="gpu_budget") as info:
        pie_rs.attach(llama, gpu_budget=budget)
    assert isinstance(info.value, pie_rs.PieError)
    assert_no_pie(llama)


def test_model_generates_as_before_after_bad_budgets(llama, inputs, expected) -> None:
    for budget in (math.inf, "1e400", "6 GiBs", -0.5):
        with pytest.raises(pie_rs.ConfigError):
            pie_rs.attach(llama, gpu_budget=budget)
    assert_untouched(llama, inputs, expected)


def test_budget_below_one_staging_slot(llama, inputs, expected) -> None:
    """One byte less than one staging slot holds nothing; exactly one slot pools every layer."""
    slot = layer_bytes(llama, 2, 7 + 10)
    pool = pie_rs.attach(llama, gpu_budget=slot - 1)
    try:
        with pytest.raises(pie_rs.BudgetError, match=r"raise the budget|raise gpu_budget") as info:
            generate(llama, inputs, "greedy")
        assert str(slot - 1) in str(info.value)
        # The pool refuses again, it does not half-work.
        with pytest.raises(pie_rs.BudgetError):
            generate(llama, inputs, "greedy")
    finally:
        pool.detach()
    assert_untouched(llama, inputs, expected)
    with pie_rs.attach(llama, gpu_budget=slot) as pool:
        assert torch.equal(generate(llama, inputs, "greedy"), expected)
        stats = pool.stats()
        assert stats["pooled_layers"] == 4 and stats["peak_device_kv_bytes"] <= slot


def test_parse_budget_larger_than_device() -> None:
    with pytest.raises(pie_rs.ConfigError, match="larger than the device"):
        parse_budget("2GiB", None, device_total=2**30)
    with pytest.raises(pie_rs.ConfigError, match="larger than the device"):
        parse_budget(2**30 + 1, None, device_total=2**30)
    assert parse_budget(2**30, None, device_total=2**30) == 2**30
    assert parse_budget(0.5, 1000, device_total=2000) == 500


def test_budget_larger_than_device(llama, inputs, expected) -> None:
    too_much = 4 * total_host_memory() if not torch.cuda.is_available() else 2**60
    with pytest.raises(pie_rs.ConfigError, match="larger than the device"):
        pool = pie_rs.attach(llama, gpu_budget=too_much)
        pool.detach()
    assert_untouched(llama, inputs, expected)


# ------------------------------------------------------------------------------------- models
def test_decoder_layers_not_found(inputs) -> None:
    model = make_model("llama")
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:3])  # config still says 4
    with pytest.raises(pie_rs.ConfigError, match="could not find the 4 decoder layers"):
        pie_rs.attach(model)
    assert "generate" not in model.__dict__


def test_no_decoder_layers() -> None:
    model = make_model("llama")
    model.config.num_hidden_layers = 0
    with pytest.raises(pie_rs.ConfigError, match="no decoder layers"):
        pie_rs.attach(model)
    assert "generate" not in model.__dict__


def test_encoder_decoder_refused() -> None:
    from transformers import AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(pie_rs.ConfigError, match="encoder-decoder"):
        pie_rs.attach(model)
    assert "generate" not in model.__dict__


def test_device_map_over_several_devices(llama, inputs, expected) -> None:
    """A model dispatched with a device_map over several devices (CPU-runnable variant)."""
    llama.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": 0, "lm_head": "cpu"}
    try:
        with pytest.raises(pie_rs.ConfigError, match="several devices"):
            pie_rs.attach(llama)
    finally:
        del llama.hf_device_map
    assert_no_pie(llama)


def test_dtype_change_after_attach(inputs) -> None:
    """generate after ``model.double()`` is served right (the engine is sized per call); a cache
    already holding float32 KV refuses float64 states."""
    model = make_model("llama")
    kw = cache_keyword(model)
    pool = pie_rs.attach(model)
    try:
        model.double()
        out = generate(model, inputs, "greedy")
        cache = pool.new_cache(max_length=32)
        model.float()
        with torch.no_grad():
            model(**inputs, use_cache=True, **{kw: cache})
            model.double()
            with pytest.raises(pie_rs.ConfigError, match=r"float64.*float32"):
                model(input_ids=inputs["input_ids"][:, -1:], use_cache=True, **{kw: cache})
    finally:
        pool.detach()
    assert_no_pie(model)
    assert torch.equal(out, generate(model, inputs, "greedy"))  # float64 without pie-rs


# ---------------------------------------------------------------------------------------- use
def test_attach_twice_keeps_the_first_pool(llama, inputs, expected) -> None:
    with pie_rs.attach(llama, pooled_layers=[1, 3]) as pool:
        hooks = len(llama.model.layers[1]._forward_pre_hooks)
        with pytest.raises(pie_rs.StateError, match="already attached"):
            pie_rs.attach(llama, gpu_budget="1MiB")
        assert len(llama.model.layers[1]._forward_pre_hooks) == hooks
        assert torch.equal(generate(llama, inputs, "greedy"), expected)
        assert pool.stats()["pooled_layers"] == 2
    assert_no_pie(llama)


def test_use_after_detach_and_close(llama, inputs, expected) -> None:
    kw = cache_keyword(llama)
    pool = pie_rs.attach(llama)
    cache = pool.new_cache(max_length=32)
    closed = pool.new_cache(max_length=32)
    closed.close()
    with pytest.raises(pie_rs.StateError, match="closed"), torch.no_grad():
        llama(**inputs, use_cache=True, **{kw: closed})
    pool.detach()
    with pytest.raises(pie_rs.StateError, match="detached"):
        pool.model  # noqa: B018
    with pytest.raises(pie_rs.StateError, match="detached"):
        generate(llama, inputs, "greedy", **{kw: cache})
    assert_no_pie(llama)
    assert torch.equal(generate(llama, inputs, "greedy"), expected)


def test_cache_of_another_shape_of_model(llama, inputs) -> None:
    """A cache made for a model with 2 KV heads, used by one with 4: refused at the first layer."""
    kwargs = dict(FAMILIES["llama"])
    kwargs.pop("model_type")
    kwargs["num_key_value_heads"] = 4
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kwargs)).eval()
    with pie_rs.attach(llama) as pool, torch.no_grad():
        cache = pool.new_cache(max_length=32)
        cache.update(torch.zeros(2, 2, 7, 16), torch.zeros(2, 2, 7, 16), 0)
        with pytest.raises(pie_rs.ConfigError, match="kv_heads=2"):
            other(**inputs, use_cache=True, **{cache_keyword(other): cache})


def test_cache_of_another_pool(inputs) -> None:
    a, b = make_model("llama"), make_model("llama", seed=3)
    with pie_rs.attach(a) as pool_a, pie_rs.attach(b), torch.no_grad():
        cache = pool_a.new_cache(max_length=32)
        with pytest.raises(pie_rs.ConfigError, match="another"):
            b(**inputs, use_cache=True, **{cache_keyword(b): cache})


def test_cache_of_a_deeper_model(llama, inputs) -> None:
    deeper = make_model("llama", layers=8)
    with pie_rs.attach(llama) as pool, torch.no_grad():
        cache = pool.new_cache(max_length=32)
        with pytest.raises(pie_rs.ConfigError):
            deeper(**inputs, use_cache=True, **{cache_keyword(deeper): cache})


def _filled_cache(pool: pie_rs.Pool) -> tuple[pie_rs.PieCache, torch.Tensor, torch.Tensor]:
    cache = pool.new_cache(max_length=32)
    k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    cache.update(k, v, 0)
    return cache, k, v


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda k: k[:, :1], "kv_heads=2"),  # wrong head count
        (lambda k: k[..., :8], "16/16"),  # wrong head size
        (lambda k: k.expand(2, -1, -1, -1), "batch=1"),  # wrong batch
        (lambda k: k[0], "shapes"),  # 3-D
        (lambda k: k.double(), "float64"),  # wrong dtype
        (lambda k: k.half(), "float16"),
    ],
)
def test_wrong_kv_in_update(llama, make_bad, match) -> None:
    with pie_rs.attach(llama) as pool:
        cache, k, v = _filled_cache(pool)
        bad = make_bad(k)
        with pytest.raises(pie_rs.ConfigError, match=match):
            cache.update(bad, bad, 0)
        # The refused update changed nothing: the next good one sees exactly the old tokens.
        k2, v2 = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
        keys, values = cache.update(k2, v2, 0)
        assert torch.equal(keys, torch.cat([k, k2], dim=2))
        assert torch.equal(values, torch.cat([v, v2], dim=2))


def test_wrong_device_in_first_update(llama) -> None:
    with pie_rs.attach(llama) as pool:
        cache = pool.new_cache(max_length=32)
        meta = torch.empty(1, 2, 3, 16, device="meta")
        with pytest.raises(pie_rs.ConfigError, match="meta"):
            cache.update(meta, meta, 0)


def test_wrong_device_in_later_update(llama) -> None:
    with pie_rs.attach(llama) as pool:
        cache, _, _ = _filled_cache(pool)
        meta = torch.empty(1, 2, 1, 16, device="meta")
        with pytest.raises(pie_rs.ConfigError, match="meta"):
            cache.update(meta, meta, 0)


def test_generate_past_max_length_of_explicit_cache(llama, inputs) -> None:
    """A cache made for 12 tokens serving 7 + 20: it grows (as documented) and stays exact."""
    kw = cache_keyword(llama)
    ref = generate(llama, inputs, "greedy", max_new_tokens=20, **{kw: DynamicCache(config=llama.config)})
    with pie_rs.attach(llama, pooled_layers=[1, 3], prefetch_depth=1) as pool:
        cache = pool.new_cache(max_length=12)
        out = generate(llama, inputs, "greedy", max_new_tokens=20, **{kw: cache})
        assert torch.equal(out, ref)
        assert cache.max_cache_len >= 7 + 20 - 1
