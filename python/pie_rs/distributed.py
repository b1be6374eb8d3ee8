"""Tensor parallel: one pool per rank, sized from that rank's shard, planning alike on every rank.

Under tensor parallel (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``, or a model the
user sharded over their own ``torch.distributed`` process group) every rank runs every layer on its
shard of the KV heads, and the ranks meet in a collective inside every layer. pie-rs attaches one
pool per rank; :func:`pie_rs.attach` does, on each rank:

- **Shapes from the shard.** The config's KV heads divided by the group size are the first guess
  (a ``tp_plan`` shards ``k_proj``/``v_proj`` by heads); the first update of each layer corrects
  it (``PieCache`` sizes layers from what they hand over).
- **One configuration.** The ranks exchange their arguments and model description once
  (``all_gather_object``, after a ``monitored_barrier`` on gloo so a rank that never attaches is
  named instead of waited for); any difference is refused with a ``ConfigError`` on every rank
  that names the field and each rank's value.
- **Same plan decisions.** A rank that pooled more would stall its layers and make every other
  rank wait for it in the next collective, so the ranks must choose the same plan. pie-rs gives
  every rank the same deterministic policy input rather than a collective on plan changes: the
  adaptive policy's input is each rank's own measured timing, which differs per rank, and a
  collective per plan change would have to run on the engine's policy thread (Rust, with no
  access to the process group) between two steps of the caller's thread. Instead every rank
  plans with the static budget fit (``StaticPolicy::budget_fit`` in pie-core) from the same
  inputs: the same shard shapes, the same batch and capacity (the ranks run the same
  ``generate``), and the same budget: the smallest ``gpu_budget`` of all ranks (a fraction of
  free memory resolves per device). Growth follows the engine's one rule on every rank alike.
  A pinned plan (``pooled_layers``) is used as given, the same on every rank.
- **Errors on every rank.** A budget too small fails on every rank alike (same inputs), and
  the message names the rank whose budget was the smallest and the minimum; the group stays
  usable. A rank whose engine fails mid-generate (``BackendError``, ``StateError``) records
  why in the process group's store and tears its process group down
  (after a failure mid-forward the group is out of step and cannot be used again), so the peers'
  pending collectives fail at once instead of waiting for the group's timeout; each peer then
  raises ``BackendError`` naming the failed rank.

Continuous batching (``generate_batch`` and the manager) runs through the pools too: every
rank's paged cache is sized from the same inputs and the smallest serving budget of the ranks
(one collective when the cache is made), so the ranks' schedulers decide alike; a rank whose
engine fails inside a layer finishes the forward on scratch KV and every rank raises after it
(:class:`StepFailures`), so the group stays in step.

:func:`gather_stats` collects every rank's ``pool.stats()`` on one rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from . import _core
from ._errors import BackendError, BudgetError, ConfigError, PieError, StateError
from ._model import ModelInfo

if TYPE_CHECKING:
    from ._engine import EngineSettings, LayerShape
    from .pool import Pool

__all__ = ["ATTACH_TIMEOUT", "RankGroup", "gather_stats", "resolve_group"]

#: Seconds a rank waits at attach for the other ranks to attach too (gloo groups).
ATTACH_TIMEOUT = 120.0
_FAILED_KEY = "pie_rs/failed"


@dataclass(frozen=True)
class RankGroup:
    """The process group a tensor-parallel model runs under, seen from this rank."""

    group: Any
    rank: int
    size: int

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def resolve_group(model: nn.Module, process_group: Any = None) -> RankGroup | None:
    """The group the model's tensor-parallel collectives run over, or ``None`` for one process.

    ``process_group``: a ``torch.distributed`` group to use (the user's own); ``None`` takes the
    ``"tp"`` dimension of the device mesh ``tp_plan`` loading made, when the model is sharded.
    """
    dist = _dist()
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("process_group was given but torch.distributed is not initialized")
        group = process_group
    else:
        tp_size = int(getattr(model, "_tp_size", None) or getattr(model, "tp_size", None) or 1)
        if tp_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        group = None
        mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
        if mesh is not None:
            try:
                group = mesh["tp"].get_group() if "tp" in (mesh.mesh_dim_names or ()) else mesh.get_group()
            except Exception:
                group = None
        if group is None:
            group = dist.group.WORLD
    size = dist.get_world_size(group)
    return RankGroup(group=group, rank=dist.get_rank(group), size=size) if size > 1 else None


def shard_info(info: ModelInfo, rank_group: RankGroup) -> ModelInfo:
    """``info`` with each layer's KV heads divided by the group size where it divides (first guess)."""
    n = rank_group.size
    layers = [dataclasses.replace(li, kv_heads=li.kv_heads // n) if li.kv_heads % n == 0 else li for li in info.layers]
    return dataclasses.replace(info, layers=layers)


def _gather(rank_group: RankGroup, obj: Any) -> list[Any]:
    dist = _dist()
    out: list[Any] = [None] * rank_group.size
    dist.all_gather_object(out, obj, group=rank_group.group)
    return out


def _barrier(rank_group: RankGroup) -> None:
    """Every rank reaches attach, or the ones that did not are named (gloo) after ``ATTACH_TIMEOUT``."""
    dist = _dist()
    if dist.get_backend(rank_group.group) != "gloo":
        return
    try:
        dist.monitored_barrier(
            group=rank_group.group, timeout=datetime.timedelta(seconds=ATTACH_TIMEOUT), wait_all_ranks=True
        )
    except RuntimeError as exc:
        raise StateError(
            f"pie_rs.attach on tensor-parallel {rank_group.describe()}: not every rank attached within "
            f"{ATTACH_TIMEOUT:.0f} s ({exc}); call pie_rs.attach(model, ...) on every rank"
        ) from exc


def fingerprint(info: ModelInfo, model: nn.Module, arguments: dict[str, Any]) -> dict[str, Any]:
    """What must be equal on every rank: pie-rs, the arguments of attach and the model's layout."""
    return {
        "pie_rs version": _core.__version__,
        **{name: repr(value) for name, value in arguments.items()},
        "model class": type(model).__name__,
        "layers (kind, kv_heads, k_dim, v_dim, window)": [
            (li.kind, li.kv_heads, li.k_dim, li.v_dim, li.sliding_window) for li in info.layers
        ],
        "dtype": str(info.dtype),
        "device type": info.device.type,
        "group size": None,  # filled in by agree
    }


def agree(
    rank_group: RankGroup, mine: dict[str, Any], budget_bytes: int | None
) -> tuple[int | None, int | None, list[int | None]]:
    """Checks every rank attached with the same configuration; returns the budget all ranks use.

    Returns ``(smallest budget, the rank that has it, every rank's budget)``; ``None`` budgets mean
    no limit. Raises :class:`ConfigError` on every rank when the ranks disagree.
    """
    _barrier(rank_group)
    mine = dict(mine, **{"group size": rank_group.size})
    gathered = _gather(rank_group, (mine, budget_bytes))
    prints = [g[0] for g in gathered]
    for key in mine:
        values = [p.get(key) for p in prints]
        if any(v != values[0] for v in values):
            per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ConfigError(
                f"tensor-parallel ranks disagree on {key} ({per_rank}); attach the same model with the same "
                "arguments on every rank"
            )
    budgets = [g[1] for g in gathered]
    limited = [(b, r) for r, b in enumerate(budgets) if b is not None]
    if not limited:
        return None, None, budgets
    smallest, rank = min(limited)
    return smallest, rank, budgets


@dataclass(frozen=True)
class RankSettings:
    """Builds a rank's engines like :class:`EngineSettings` and names the rank in a budget error."""

    base: EngineSettings
    rank_group: RankGroup
    budget_rank: int | None
    budgets: tuple[int | None, ...]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def build(self, layers: list[LayerShape], capacity: int, budget_bytes: int | None) -> _core.Engine:
        try:
            return self.base.build(layers, capacity, budget_bytes)
        except BudgetError as exc:
            minimum = _core.device_bytes(layers, capacity, list(range(len(layers))), 1)
            given = self.base.budget_bytes
            raise BudgetError(
                f"tensor-parallel rank {self.budget_rank}'s gpu_budget ({given} bytes) is the smallest of the "
                f"{self.rank_group.size} ranks (every rank plans with it so the ranks pool alike), and it is too "
                f"small: the KV engine needs at least {minimum} bytes on each device at batch {layers[0][0]}, "
                f"{capacity} tokens ({exc}); raise gpu_budget on rank {self.budget_rank}"
            ) from exc


def settings_for(
    rank_group: RankGroup, base: EngineSettings, budget_rank: int | None, budgets: list[int | None]
) -> RankSettings:
    """``base`` with the policy every rank can agree on (see the module docstring)."""
    if base.pooled_layers is None and base.policy == "adaptive":
        base = dataclasses.replace(base, policy="static")
    return RankSettings(base, rank_group, budget_rank, tuple(budgets))


def _store() -> Any:
    try:
        return _dist().distributed_c10d._get_default_store()
    except Exception:
        return None


def _peer_failure(store: Any) -> str | None:
    if store is None:
        return None
    try:
        if store.check([_FAILED_KEY]):
            return bytes(store.get(_FAILED_KEY)).decode(errors="replace")
    except Exception:
        return None
    return None


def _fail_group(rank_group: RankGroup, exc: BaseException) -> None:
    """Records this rank's failure and tears the group down so the peers' collectives fail now."""
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_FAILED_KEY, f"rank {rank_group.rank}: {type(exc).__name__}: {exc}")
    with contextlib.suppress(Exception):
        _dist().destroy_process_group(rank_group.group)


_HANDLED = "_pie_rs_tp_handled"


def _handled(exc: BaseException) -> BaseException:
    setattr(exc, _HANDLED, True)
    return exc


def guard(rank_group: RankGroup, call: Any) -> Any:
    """Wraps ``generate`` or ``forward`` so a failure on one rank raises on every rank in bounded time."""

    @functools.wraps(call)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (BudgetError, ConfigError):
            raise  # every rank meets these alike (same inputs, same plan): the group is still in step
        except (PieError, RuntimeError) as exc:
            if getattr(exc, _HANDLED, False):
                raise  # an inner guard (forward inside generate) already did what follows
            failed = _peer_failure(_store())
            if failed is not None and not failed.startswith(f"rank {rank_group.rank}:"):
                raise _handled(
                    BackendError(
                        f"tensor-parallel {failed}; this rank ({rank_group.rank}) stopped when its collective "
                        "failed. The process group was torn down: restart the job (or re-create the group and "
                        "reload the model)"
                    )
                ) from exc
            if isinstance(exc, PieError):
                _fail_group(rank_group, exc)
                _handled(exc)
            raise

    return guarded


class _Restore:
    """A hook-like handle (``remove()``) that puts a model attribute back as it was at detach."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name
        self.had = name in model.__dict__
        self.old = model.__dict__.get(name)

    def remove(self) -> None:
        if self.had:
            self.model.__dict__[self.name] = self.old
        else:
            self.model.__dict__.pop(self.name, None)


def install(pool: Pool, model: nn.Module, rank_group: RankGroup) -> None:
    """Makes ``pool`` a rank's pool: its stats carry the rank; its ``generate`` and ``forward`` fail on every rank."""
    settings = pool.settings
    pool.stats_tags.update(
        rank=rank_group.rank,
        world_size=rank_group.size,
        budget_rank=getattr(settings, "budget_rank", None),
        rank_budgets=list(getattr(settings, "budgets", ())),
        policy=settings.policy,
    )
    pool.rank_group = rank_group  # type: ignore[attr-defined]
    generate = model.__dict__.get("generate")
    if generate is not None:
        model.__dict__["generate"] = guard(rank_group, generate)
    # forward too, so hand-written loops (model(..., cache=pool.new_cache())) fail together as well;
    # detach removes it with the hooks.
    restore = _Restore(model, "forward")
    model.__dict__["forward"] = guard(rank_group, model.forward)
    pool._handles.append(restore)
    if hasattr(type(model), "generate_batch"):
        restore = _Restore(model, "generate_batch")
        model.__dict__["generate_batch"] = _raise_step_failure(pool, model.generate_batch)
        pool._handles.append(restore)


def _step_failures(pool: Pool) -> StepFailures | None:
    return getattr(getattr(pool, "_serving", None), "tp_failures", None)


def _raise_step_failure(pool: Pool, call: Any) -> Any:
    """Wraps ``generate_batch``: a run that stopped for a rank's failure raises on every rank.

    transformers hands a failed run's error to each request's output; under tensor parallel
    pie-rs raises it instead (this rank's own failure, or a :class:`BackendError` naming the
    rank that failed), so no rank goes on with partial results while another has raised.
    """

    @functools.wraps(call)
    def generate_batch(*args: Any, **kwargs: Any) -> Any:
        before = _step_failures(pool)
        out = call(*args, **kwargs)
        after = _step_failures(pool)
        if after is not None and after is not before and after.failure is not None:
            raise after.failure
        return out

    return generate_batch


def gather_stats(pool: Pool, dst: int = 0) -> list[dict[str, Any]] | None:
    """Every rank's ``pool.stats()`` on rank ``dst`` of the pool's group (a list by rank), ``None`` elsewhere.

    A collective: call it on every rank. With one process it returns ``[pool.stats()]``. The list's
    stats carry ``plan`` (the pooled layers each rank's ``generate`` engine ran with) and
    ``serving_plan`` (the pooled layers and prefetch depth of its last continuous-batching cache),
    and every dict gets ``plans_agree``: whether every rank ran the same plans.
    """
    stats = pool.stats()
    engine = pool.kept_engine
    plan = None
    if engine is not None:
        plan = [i for i in range(engine.num_layers) if engine.is_pooled(i)]
    stats["plan"] = plan
    serving_plan = getattr(getattr(pool, "_serving", None), "plan", None)
    stats["serving_plan"] = None if serving_plan is None else [list(serving_plan[0]), serving_plan[1]]
    rank_group: RankGroup | None = getattr(pool, "rank_group", None)
    if rank_group is None:
        stats["plans_agree"] = True
        return [stats]
    dist = _dist()
    out: list[Any] | None = [None] * rank_group.size if rank_group.rank == dst else None
    dist.gather_object(stats, out, dst=dist.get_global_rank(rank_group.group, dst), group=rank_group.group)
    if out is None:
        return None
    agree_ = all(
        (s.get("plan"), s.get("serving_plan")) == (out[0].get("plan"), out[0].get("serving_plan")) for s in out
    )
    for s in out:
        s["plans_agree"] = agree_
    return out


# ----------------------------------------------------------------------------- continuous batching
# Under tensor parallel, transformers' continuous batching runs one scheduler per rank; the ranks
# see the same requests (the driver broadcasts them) and must then make the same scheduling
# choices, which depend on the paged cache's size. pie-rs sizes every rank's paged cache from the
# same inputs: the same shard shapes (transformers' allocator divides the KV heads by the group
# size), the same request and page sizes, and the smallest serving budget of all ranks (one
# collective when the cache is made, where transformers makes its own); ``paged_fit`` is a pure
# function of these, so every rank gets the same rows, plan and prefetch depth, and a budget
# that cannot hold the smallest cache fails on every rank alike.


def serving_group(pool: Pool, tp_size: int) -> RankGroup | None:
    """The pool's group when transformers' continuous batching runs tensor-parallel (``tp_size``), else ``None``."""
    if tp_size <= 1:
        return None
    rank_group: RankGroup | None = getattr(pool, "rank_group", None)
    if rank_group is None or rank_group.size != tp_size:
        # Every rank's pool was attached alike (attach compared them), so every rank refuses here.
        found = "no tensor-parallel group" if rank_group is None else f"a group of {rank_group.size} ranks"
        raise ConfigError(
            f"continuous batching runs this model tensor-parallel over {tp_size} ranks, but pie_rs.attach found "
            f"{found}; attach on every rank with the model's tensor-parallel group (process_group=...)"
        )
    return rank_group


def agree_serving(
    rank_group: RankGroup, budget: int | None, prefer: int | None = None
) -> tuple[int | None, int | None, str]:
    """The budget every rank's paged cache is sized with: the smallest of the ranks' (a collective).

    Returns ``(budget, the rank that has it, a run id)``; the budget and rank are ``None`` when no
    rank has a limit, and of ranks tied for the smallest, ``prefer`` (the rank whose ``gpu_budget``
    was the smallest at attach) is named. The run id (rank 0's) is the same on every rank and new
    for every cache: it names this cache's failure record in the store (see :class:`StepFailures`).
    """
    gathered = _gather(rank_group, (budget, uuid.uuid4().hex))
    run = str(gathered[0][1])
    limited = [b for b, _ in gathered if b is not None]
    if not limited:
        return None, None, run
    smallest = min(limited)
    ranks = [r for r, (b, _) in enumerate(gathered) if b == smallest]
    return smallest, prefer if prefer in ranks else ranks[0], run


def serving_budget_error(rank_group: RankGroup, budget_rank: int | None, budget: int | None, why: str) -> BudgetError:
    """A paged cache too big for the shared budget, said the same on every rank, naming the rank to change."""
    return BudgetError(
        f"tensor-parallel continuous batching: rank {budget_rank}'s budget for the paged cache ({budget} bytes) is "
        f"the smallest of the {rank_group.size} ranks, and every rank sizes its cache with it so their schedulers "
        f"decide alike; it is too small: {why}; raise gpu_budget on rank {budget_rank}"
    )


class StepFailures:
    """Keeps a tensor-parallel continuous-batching run's ranks in step when one rank's engine fails.

    A rank that raised inside a layer would leave its peers waiting in that layer's collective
    (tearing the group down does not close its connections while transformers and the device mesh
    hold it). So the failed rank only records the failure here (in the process group's store) and
    runs the rest of the forward on scratch KV; after the forward every rank checks the record and
    raises, before any token of the step is delivered. The group stays in step and usable: the
    ranks' loops end through transformers' own stop status and the next run can start.
    """

    def __init__(self, rank_group: RankGroup, run: str) -> None:
        self.rank_group = rank_group
        self.key = f"pie_rs/serving_failed/{run}"
        self.store = _store()
        self.failure: BaseException | None = None

    def record(self, exc: BaseException) -> None:
        """This rank failed: the peers learn it after the forward (the first failure is kept)."""
        if self.failure is not None:
            return
        self.failure = exc
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(self.key, f"rank {self.rank_group.rank}: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        """After a forward: raises this rank's failure, or a peer's as a :class:`BackendError`."""
        if self.failure is not None:
            raise self.failure
        failed = None
        if self.store is not None:
            with contextlib.suppress(Exception):
                if self.store.check([self.key]):
                    failed = bytes(self.store.get(self.key)).decode(errors="replace")
        if failed is not None:
            self.failure = BackendError(
                f"tensor-parallel continuous batching stopped: {failed}. Every rank stopped this run after the "
                f"same step (this is rank {self.rank_group.rank}); the process group is still in step, so the next "
                "run can start"
            )
            raise self.failure
