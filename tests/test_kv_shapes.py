"""The cache sizes each layer from what the layer hands it; the config is only the first guess.

Two models whose cached heads differ from their config: one whose config overstates every layer's
KV heads (as a tensor-parallel rank's full config does for its shard), and one whose third layer
caches fewer heads than the others (found only at that layer's first update, after the engine was
made and two layers already hold tokens).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaAttention

import pie_rs
from pie_rs._engine import rescale_shapes

from helpers import generate
from models import make_inputs, make_model


def lying_config_model() -> torch.nn.Module:
    """Every layer caches 2 KV heads; the config says 4."""
    model = make_model("llama")
    model.config.num_key_value_heads = 4
    return model


def mixed_heads_model() -> torch.nn.Module:
    """Layer 2 caches 1 KV head of size 16; the others (and the config) 2."""
    model = make_model("llama")
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = 1
    torch.manual_seed(5)
    attn = LlamaAttention(config, layer_idx=2).eval()
    model.model.layers[2].self_attn = attn
    return model


@pytest.mark.parametrize("make", [lying_config_model, mixed_heads_model], ids=["config-overstates", "one-layer-fewer"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_tokens_identical_when_cached_heads_differ_from_config(make, mode) -> None:
    model = make()
    inputs = make_inputs(2)
    expected = generate(model, inputs, mode)
    with pie_rs.attach(model, pooled_layers=[0, 2], prefetch_depth=1) as pool:
        assert torch.equal(generate(model, inputs, mode), expected)
        stats = pool.stats()
        assert stats["pooled_layers"] == 2 and stats["h2d_bytes"] > 0
        learned = pool.kv_shapes()
        assert learned == (
            [(2, 16, 16)] * 4 if make is lying_config_model else [(2, 16, 16), (2, 16, 16), (1, 16, 16), (2, 16, 16)]
        )
        # The next generate starts from the learned shapes (the kept engine already has them).
        engine = pool.kept_engine
        assert engine is not None
        assert torch.equal(generate(model, inputs, mode), expected)
        assert pool.kept_engine is engine


def test_a_later_layer_with_other_heads_keeps_the_earlier_layers_tokens() -> None:
    """The rebuild at layer 2's first update carries layers 0 and 1's prompt KV over, exactly."""
    model = mixed_heads_model()
    with pie_rs.attach(model, pooled_layers=[1], prefetch_depth=1) as pool, torch.no_grad():
        cache = pool.new_cache(max_length=32)
        ks = [torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 2, 5, 16)]
        for i, k in enumerate(ks):
            keys, values = cache.update(k, -k, i)
            assert torch.equal(keys, k) and torch.equal(values, -k)
        first_engine = cache.engine
        for i, k in enumerate(ks):
            assert torch.equal(cache.layers[i].keys, k) and torch.equal(cache.layers[i].values, -k)
        # Settled now: a layer that holds tokens and changes its heads is refused, not rebuilt.
        with pytest.raises(pie_rs.ConfigError, match="kv_heads=1"):
            cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 2)
        assert cache.engine is first_engine
        assert torch.equal(cache.layers[2].keys, ks[2])


def test_rescale_shapes() -> None:
    guess = [(8, 128, 128), (8, 128, 128), (4, 128, 128), (8, 64, 64)]
    # A tensor-parallel shard of 2: every head count halves; head sizes stay.
    assert rescale_shapes(guess, 0, (4, 128, 128)) == [(4, 128, 128), (4, 128, 128), (2, 128, 128), (4, 64, 64)]
    # A factor that does not divide a layer's count leaves that layer's guess for its own update.
    assert rescale_shapes([(3, 16, 16), (2, 16, 16)], 1, (1, 16, 16)) == [(3, 16, 16), (1, 16, 16)]
    # A head size that differs replaces the same guessed size in the other layers.
    assert rescale_shapes([(2, 16, 16), (2, 16, 8)], 0, (2, 32, 32)) == [(2, 32, 32), (2, 32, 8)]
