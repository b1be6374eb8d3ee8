"""A model split across devices by layers (``device_map`` over several GPUs): an engine per device.

Each device gets its own engine (its own device arena, pinned host arena, copy streams and
policy) for the full-attention layers whose weights live there, sized by ``gpu_budget`` (a budget
per device; a fraction resolves against each device's free memory). One :class:`MultiDevicePool`
is the facade: ``new_cache``, ``stats`` (summed, plus ``devices``: one entry per device),
``release``, ``detach``. A :class:`MultiDeviceCache` routes each layer to its device's
:class:`pie_rs.cache._Shared`, so a layer's KV stays on its own device and the copies for it run
on that device's streams; cache-wide operations (beam reorder, crop, reset, batch changes) go to
every device's engine.

A step of one engine is the run of its layers in execution order: the last layer of each device's
run gets the post-hook that ends that engine's step, so its next prefetch (wrapping into the next
step) is queued as soon as its layers are done.

Per-device state reuses :class:`pie_rs.Pool` itself (one per device, never installed on the model)
for the kept engine, the learned shapes and the settings, so the reuse rules exist once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._engine import EngineSettings, engine_layers
from ._errors import BudgetError
from ._model import MANAGED, SLIDING, ModelInfo
from .cache import PieCache, PieLayer, _Shared, empty_stats
from .pool import Pool

__all__ = ["MultiDeviceCache", "MultiDevicePool", "device_groups"]

#: The kind of a layer another device's engine serves (in a device's view of the model).
ELSEWHERE = "elsewhere"


def device_groups(info: ModelInfo) -> list[tuple[torch.device, list[int]]]:
    """The model's decoder layers grouped by device, in order of first appearance.

    One group means one device (the ordinary :class:`pie_rs.Pool`).
    """
    groups: dict[torch.device, list[int]] = {}
    for idx, device in enumerate(info.layer_devices):
        groups.setdefault(device, []).append(idx)
    return list(groups.items())


def _device_info(info: ModelInfo, device: torch.device, layers: list[int]) -> ModelInfo:
    """``info`` as one device's engine sees it: the other devices' layers are ``ELSEWHERE``."""
    mine = set(layers)
    return dataclasses.replace(
        info,
        layers=[li if li.index in mine else dataclasses.replace(li, kind=ELSEWHERE) for li in info.layers],
        device=device,
    )


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    """One device's :class:`EngineSettings`; a budget error names the device and its layers."""

    base: EngineSettings
    label: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def build(self, layers: list[Any], capacity: int, budget_bytes: int | None) -> Any:
        try:
            return self.base.build(layers, capacity, budget_bytes)
        except BudgetError as exc:
            raise BudgetError(f"{self.label}: {exc}") from exc


class MultiDeviceCache(PieCache):
    """A :class:`pie_rs.PieCache` whose layers live on several devices, an engine per device."""

    def __init__(
        self, pool: MultiDevicePool, info: ModelInfo, max_length: int | None = None, batch_size: int | None = None
    ):
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                from ._errors import ConfigError

                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
        self._pool = pool
        self._shareds = [_Shared(group, group.info, max_length, batch_size) for group in pool.device_pools]
        self._shared = self._shareds[0]
        self._of_layer: dict[int, _Shared] = {}
        for shared in self._shareds:
            for idx in shared.info.managed:
                self._of_layer[idx] = shared
        from ._model import reference_layers

        reference = reference_layers(info.text_config)
        layers: list[Any] = [
            PieLayer(self._of_layer[li.index], li.index) if li.kind == MANAGED else reference[li.index]
            for li in info.layers
        ]
        self._sliding = [layer for li, layer in zip(info.layers, layers, strict=True) if li.kind == SLIDING]
        self._sliding_peak = 0
        super(PieCache, self).__init__(layers=layers)

    # fan-out of the cache-wide operations ---------------------------------------------------
    @contextlib.contextmanager
    def _all_quiesced(self) -> Any:
        with contextlib.ExitStack() as stack:
            for shared in self._shareds:
                stack.enter_context(shared.quiesced())
            yield

    def _check_usable(self) -> None:
        for shared in self._shareds:
            shared.check_usable()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders the batch of every layer on every device (see :meth:`PieCache.reorder_cache`)."""
        self._check_usable()
        for shared in self._shareds:
            shared.reorder(beam_idx.to(shared.device) if isinstance(beam_idx, torch.Tensor) else beam_idx)
        for layer in self._sliding:
            layer.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last ``-tokens_to_remove`` tokens of every layer on every device."""
        self._check_usable()
        with self._all_quiesced():
            super(PieCache, self).crop(tokens_to_remove)

    def reset(self) -> None:
        """Drops every token of every layer; the engines keep their memory for reuse."""
        self._check_usable()
        with self._all_quiesced():
            super(PieCache, self).reset()

    def _rebatch(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for shared in self._shareds:
            shared.rebatch(transform)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats every batch entry ``repeats`` times on every device."""
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))
        for layer in self._sliding:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the batch entries ``indices`` on every device."""
        self._rebatch(lambda t: t[indices.to(t.device)])
        for layer in self._sliding:
            layer.batch_select_indices(indices)

    @property
    def engines(self) -> list[Any]:
        """Every device's engine (``None`` before its first update), in device order."""
        return [shared.engine for shared in self._shareds]

    def stats(self) -> dict[str, Any]:
        """Summed over the devices, plus ``devices``: each device's engine statistics."""
        per_device = []
        for shared, group in zip(self._shareds, self._pool.device_pools, strict=True):
            stats = shared.engine_stats()
            stats["device"] = str(shared.device)
            stats["budget_bytes"] = group.budget_bytes
            per_device.append(stats)
        total = empty_stats()
        for key, zero in total.items():
            if isinstance(zero, list):  # layer lists (model indices): every device's
                total[key] = sorted(i for s in per_device for i in s.get(key, []))
            else:
                total[key] = sum(s.get(key, 0) for s in per_device)
        sliding = self.sliding_kv_bytes()
        total["sliding_layers"] = len(self._sliding)
        total["sliding_kv_bytes"] = sliding
        total["device_kv_bytes"] += sliding
        total["peak_device_kv_bytes"] += self._sliding_peak
        total["capacity"] = self._shared.capacity
        total["batch"] = self._shared.batch or 0
        total["devices"] = per_device
        return total

    def close(self) -> None:
        """Frees every device's engine now; the cache cannot be used afterwards."""
        for shared in self._shareds:
            shared.close()
        for layer in self._sliding:
            layer.reset()

    @property
    def closed(self) -> bool:
        return all(shared.closed for shared in self._shareds)

    def release(self) -> None:
        """Hands every device's engine, emptied, to its device pool for the next cache."""
        for shared in self._shareds:
            shared.release()

    def end_layer(self, layer_idx: int) -> None:
        shared = self._of_layer.get(layer_idx)
        if shared is not None and shared.engine is not None:
            shared.done(shared.eidx[layer_idx])


class MultiDevicePool(Pool):
    """The :class:`pie_rs.Pool` of a model split across devices by layers: one engine per device."""

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        settings: EngineSettings,
        pooled_layers: list[int] | None,
        groups: list[tuple[torch.device, list[int]]],
        budgets: list[int | None],
    ) -> None:
        super().__init__(model, info, settings, pooled_layers)
        self.device_pools: list[Pool] = []
        self._group_of = {idx: k for k, (_, layers) in enumerate(groups) for idx in layers}
        pinned = None if pooled_layers is None else set(pooled_layers)
        for (device, layers), budget in zip(groups, budgets, strict=True):
            sub = _device_info(info, device, layers)
            engine_pinned = None if pinned is None else tuple(e for e, i in enumerate(sub.managed) if i in pinned)
            sub_settings = dataclasses.replace(
                settings,
                device_index=(device.index or 0) if device.type == "cuda" else 0,
                budget_bytes=budget,
                pooled_layers=engine_pinned if engine_pinned else None,
                policy="static" if engine_pinned else settings.policy,
            )
            label = f"device {len(self.device_pools)} ({device}, layers {layers})"
            self.device_pools.append(Pool(nn.Module(), sub, DeviceSettings(sub_settings, label)))  # type: ignore[arg-type]
        self.stats_tags["devices_count"] = len(groups)

    def new_cache(self, max_length: int | None = None, batch_size: int | None = None) -> PieCache:
        """A fresh :class:`MultiDeviceCache` (a :class:`pie_rs.PieCache`) for this model."""
        self._check()
        cache = MultiDeviceCache(self, self.info, max_length=max_length, batch_size=batch_size)
        self._caches.add(cache)
        self._last = cache
        return cache

    def probe(self) -> None:
        """Builds a tiny engine per device: the options are checked against each device now."""
        for group in self.device_pools:
            if group.info.managed:
                group.settings.build(engine_layers(group.info, 1, 1), 1, group.settings.budget_bytes).close()

    def release(self) -> None:
        """Frees every device's kept engine now."""
        super().release()
        for group in getattr(self, "device_pools", ()):
            group.release()

    def detach(self) -> None:
        """Gives the model back as it was; closes every device's engines."""
        super().detach()
        for group in self.device_pools:
            group.detach()

    def _ends_run(self, idx: int) -> bool:
        nxt = idx + 1
        if nxt not in self.info.managed:
            return True
        return self._group_of[nxt] != self._group_of[idx]

    def __repr__(self) -> str:
        return f"MultiDevicePool(devices={[str(g.info.device) for g in self.device_pools]}, {super().__repr__()})"
