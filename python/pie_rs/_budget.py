"""Parsing of the ``gpu_budget`` argument of :func:`pie_rs.attach`."""

from __future__ import annotations

import math
import os
import re

from ._errors import ConfigError

__all__ = ["parse_budget", "total_host_memory"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-z]*)\s*$", re.IGNORECASE)


def total_host_memory() -> int:
    """Bytes of physical memory of this machine (``os.sysconf``), or 0 if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _parse_size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if m is None or m.group(3).lower() not in _UNITS:
        raise ConfigError(
            f"gpu_budget {text!r} is not a size; write bytes as an int or a string such as '6GiB', '512MiB' or '1.5GB'"
        )
    # float() of the whole literal saturates to inf ("1e400") instead of overflowing an int.
    number = float(f"{m.group(1)}e{m.group(2)}") if m.group(2) else float(m.group(1))
    value = number * _UNITS[m.group(3).lower()]
    if not math.isfinite(value) or value >= 2**63:
        raise ConfigError(f"gpu_budget {text!r} is not a finite size")
    return int(value)


def parse_budget(budget: object, available: int | None, device_total: int | None = None) -> int | None:
    """Turns ``gpu_budget`` into bytes.

    Args:
        budget: ``None`` (automatic), an ``int`` number of bytes, a ``str`` size such as
            ``"6GiB"``, ``"512MiB"`` or ``"1.5GB"``, or a ``float`` fraction in ``(0, 1]``.
        available: bytes a fraction refers to (device memory free at attach, or total RAM for
            the host backend); ``None`` if unknown.
        device_total: bytes the device has in all (``torch.cuda.mem_get_info()[1]``, or total RAM
            for the host backend); a budget above it is refused. ``None`` if unknown.

    Returns:
        The budget in bytes, or ``None`` for automatic.

    Raises:
        ConfigError: the budget is not positive, not finite, a fraction above 1, unparsable, or
            larger than the device.
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ConfigError("gpu_budget must be bytes (int), a size string, a fraction (float) or None, not a bool")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not math.isfinite(budget):
            raise ConfigError(f"gpu_budget {budget!r} is not a finite number")
        if not 0.0 < budget <= 1.0:
            raise ConfigError(
                f"gpu_budget {budget!r}: a float is a fraction of device memory and must lie in (0, 1]; "
                "pass bytes as an int or a string such as '6GiB'"
            )
        if not available:
            raise ConfigError("gpu_budget as a fraction needs the device's memory size, which is unknown here")
        value = int(budget * available)
    elif isinstance(budget, str):
        value = _parse_size(budget)
    else:
        raise ConfigError(
            f"gpu_budget must be bytes (int), a size string, a fraction (float) or None, not {type(budget).__name__}"
        )
    if value <= 0:
        raise ConfigError(f"gpu_budget {budget!r} must be positive")
    if device_total and value > device_total:
        raise ConfigError(
            f"gpu_budget {budget!r} ({value} bytes) is larger than the device's {device_total} bytes; "
            "pass a smaller size, a fraction such as 0.5, or None for automatic"
        )
    return value
