"""Inspection of a transformers model: its decoder layers, cache layer kinds, shapes and device."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._errors import ConfigError

__all__ = ["LayerInfo", "ModelInfo", "inspect_model"]

#: What pie-rs does with each layer: ``"managed"`` (engine-managed full attention) or
#: ``"sliding"`` (transformers' own ``DynamicSlidingWindowLayer``, kept on the device).
MANAGED = "managed"
SLIDING = "sliding"


@dataclass(frozen=True)
class LayerInfo:
    """One cache layer of the model, in execution order."""

    index: int
    kind: str
    kv_heads: int
    k_dim: int
    v_dim: int
    sliding_window: int | None = None


@dataclass
class ModelInfo:
    """What pie-rs needs to know about a model to serve its KV cache."""

    layers: list[LayerInfo]
    decoder_layers: list[nn.Module]
    device: torch.device
    dtype: torch.dtype
    cache_keyword: str
    text_config: Any
    managed: list[int] = field(default_factory=list)
    #: Per decoder layer, the device its weights (and so its KV) live on; several only for a model
    #: split across devices by layers (``device_map``), where ``device`` is the first layer's.
    layer_devices: list[torch.device] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.managed = [info.index for info in self.layers if info.kind == MANAGED]


def _is_transformers_model(model: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and callable(getattr(model, "generate", None))


def _layer_idx_of(module: nn.Module) -> int | None:
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int):
        return idx
    for sub in module.modules():
        idx = getattr(sub, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def _find_decoder_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The ``nn.ModuleList`` of decoder layers: ``num_layers`` modules that carry their ``layer_idx``."""
    for _, child in model.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) != num_layers:
            continue
        indices = [_layer_idx_of(m) for m in child]
        if all(idx is not None for idx in indices) and sorted(indices) == list(range(num_layers)):
            ordered: list[nn.Module] = [None] * num_layers  # type: ignore[list-item]
            for module, idx in zip(child, indices, strict=True):
                ordered[idx] = module  # type: ignore[index]
            return ordered
    raise ConfigError(
        f"could not find the {num_layers} decoder layers of {type(model).__name__} "
        "(an nn.ModuleList whose layers carry a layer_idx); pie-rs cannot hook this model"
    )


def _head_shape(config: Any) -> tuple[int, int, int]:
    """``(kv_heads, k_dim, v_dim)`` from a text config (the first update checks it)."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if not head_dim and heads and hidden:
        head_dim = hidden // heads
    if not kv_heads or not head_dim:
        raise ConfigError(
            f"cannot tell the KV head count and head size of a {type(config).__name__}; "
            "pie-rs needs num_key_value_heads/num_attention_heads and head_dim/hidden_size"
        )
    v_dim = getattr(config, "v_head_dim", None) or head_dim
    k_dim = getattr(config, "qk_head_dim", None) or head_dim
    return int(kv_heads), int(k_dim), int(v_dim)


def cache_keyword(model: nn.Module) -> str:
    """The keyword the installed transformers uses for the cache: ``cache`` (>= 5.24) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forwards
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def reference_layers(text_config: Any) -> list[Any]:
    """The cache layers transformers' own ``DynamicCache`` builds for this config."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=text_config)
    except Exception as exc:
        raise ConfigError(f"transformers cannot build a DynamicCache for this model ({exc})") from exc
    return list(cache.layers)


def inspect_model(model: object) -> ModelInfo:
    """Checks ``model`` can be served by pie-rs and describes it.

    Raises:
        ConfigError: not a transformers causal LM, encoder-decoder, no decoder layers, several
            devices, meta tensors, or a cache layer kind pie-rs cannot serve.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if not _is_transformers_model(model):
        raise ConfigError(
            f"pie_rs.attach expects a transformers PreTrainedModel with generate(), got {type(model).__name__}"
        )
    assert isinstance(model, nn.Module)
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError("encoder-decoder models are not supported by pie-rs; use a decoder-only causal LM")
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        raise ConfigError(f"{type(model).__name__} does not use transformers' KV cache; pie-rs cannot serve it")

    params = list(model.parameters()) + list(model.buffers())
    if not params:
        raise ConfigError("the model has no parameters")
    if any(p.is_meta for p in params):
        raise ConfigError(
            "the model has tensors on the meta device (not loaded); load its weights before pie_rs.attach"
        )
    devices = {p.device for p in model.parameters()}
    if len({d.type for d in devices}) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ConfigError(
            f"the model is spread over several devices of different kinds ({names}); pie-rs serves a model on "
            "one device, or split by layers over several devices of one kind (CUDA GPUs)"
        )
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len({_device_kind(v) for v in device_map.values()}) > 1:
        raise ConfigError(
            "the model was loaded with a device_map over several devices of different kinds (CPU or disk "
            "offload and GPUs); pie-rs needs one device, or layers split over GPUs only"
        )
    device = next(iter(devices))
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"the model is on {device}; pie-rs serves models on the CPU or a CUDA device")
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()

    text_config = config.get_text_config(decoder=True)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ConfigError(f"{type(model).__name__} has no decoder layers (num_hidden_layers={num_layers!r})")
    ref = reference_layers(text_config)
    if len(ref) != num_layers:
        raise ConfigError(
            f"transformers builds {len(ref)} cache layers for a model of {num_layers} decoder layers; "
            "pie-rs cannot map them"
        )
    decoder_layers = _find_decoder_layers(model, num_layers)
    layer_devices = [_layer_device(i, layer) for i, layer in enumerate(decoder_layers)]
    if len(devices) > 1:
        device = layer_devices[0]
    kv_heads, k_dim, v_dim = _head_shape(text_config)

    layers = []
    for i, layer in enumerate(ref):
        if type(layer) is DynamicLayer:
            layers.append(LayerInfo(i, MANAGED, kv_heads, k_dim, v_dim))
        elif type(layer) is DynamicSlidingWindowLayer:
            layers.append(LayerInfo(i, SLIDING, kv_heads, k_dim, v_dim, int(layer.sliding_window)))
        else:
            raise ConfigError(
                f"layer {i} uses a {type(layer).__name__} cache layer, which pie-rs cannot serve "
                "(it serves full attention, and keeps sliding-window layers as transformers does)"
            )
    return ModelInfo(
        layers=layers,
        decoder_layers=decoder_layers,
        device=device,
        dtype=dtype,
        cache_keyword=cache_keyword(model),
        text_config=text_config,
        layer_devices=layer_devices,
    )


def _device_kind(value: object) -> str:
    """``"cuda"``, ``"cpu"``, ``"disk"``, ... of a ``hf_device_map`` value (an int is a GPU index)."""
    if isinstance(value, int):
        return "cuda"
    return str(value).split(":")[0]


def _layer_device(index: int, layer: nn.Module) -> torch.device:
    """The one device decoder layer ``index``'s weights live on."""
    devices = {p.device for p in layer.parameters()} or {b.device for b in layer.buffers()}
    if len(devices) != 1:
        names = ", ".join(sorted(str(d) for d in devices)) or "none"
        raise ConfigError(
            f"decoder layer {index} has its weights on several devices ({names}); pie-rs needs each layer on one device"
        )
    return next(iter(devices))
