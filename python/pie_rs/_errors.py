"""The pie-rs exception hierarchy, re-exported from the compiled extension.

Every failure pie-rs reports is a :class:`PieError`; the subclasses say what to change:

- :class:`ConfigError` (also a ``ValueError``): an argument, shape, plan or option is invalid;
- :class:`BudgetError`: the device budget cannot hold what was asked;
- :class:`BackendError` (also a ``RuntimeError``): the backend (CUDA driver, allocation, copies) failed;
- :class:`StateError` (also a ``RuntimeError``): the object's state does not allow the call
  (detached pool, closed engine, attaching twice);
- :class:`InternalError` (also a ``RuntimeError``): an engine invariant broke, a bug in pie-rs.
"""

from __future__ import annotations

from ._core import BackendError, BudgetError, ConfigError, InternalError, PieError, StateError

__all__ = ["BackendError", "BudgetError", "ConfigError", "InternalError", "PieError", "StateError"]
