"""pie-rs: pool CPU memory into the KV cache of HuggingFace transformers models.

An implementation of "Pie: Pooling CPU Memory for LLM Inference" (Xu et al., 2024) with a
Rust engine (``pie_rs._core``)::

    import pie_rs
    pool = pie_rs.attach(model, gpu_budget="6GiB")
    out = model.generate(**inputs, max_new_tokens=512)   # unchanged call, KV now pooled
    print(pool.stats())
    pool.detach()
"""

from __future__ import annotations

from ._core import __version__, cuda_available, cuda_probe
from ._errors import BackendError, BudgetError, ConfigError, InternalError, PieError, StateError
from .cache import PieCache, PieLayer
from .distributed import gather_stats
from .pool import Pool, attach
from .prefix import PrefixStore

__all__ = [
    "BackendError",
    "BudgetError",
    "ConfigError",
    "InternalError",
    "PieCache",
    "PieError",
    "PieLayer",
    "Pool",
    "PrefixStore",
    "StateError",
    "__version__",
    "attach",
    "cuda_available",
    "cuda_probe",
    "gather_stats",
]
