"""``torch.ops.artune.all_reduce``: the routed all-reduce as a torch custom op.

Works eagerly, inside CUDA-graph capture and under ``torch.compile(fullgraph=True)``: the op takes
the group by name (a string crosses the torch boundary; the Router lives in a registry here) and
has a fake implementation, so the compiler never traces into the communication.

    setup("profiles/<fingerprint id>.json", group, "tp")   # on every rank of the group
    y = torch.ops.artune.all_reduce(x, "tp")        # x: any contiguous bf16/fp16/fp32 tensor

``setup`` checks the profile on the group as the SGLang plugin does (``group_setup``); a Router
built by hand can be registered with ``register_router`` instead.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from artune import envs

if TYPE_CHECKING:
    from artune.router import Router

__all__ = ["Registry", "register_router", "unregister_router", "get_router", "all_reduce",
           "setup"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects reachable from a custom op by group name (strings cross the torch boundary,
    objects do not). ``weak``: hold weak references, the caller owns and closes the object."""

    def __init__(self, op: str, kind: str, register_call: str, weak: bool = False) -> None:
        self.op, self.kind, self.register_call = op, kind, register_call
        self._items: MutableMapping[str, T] = weakref.WeakValueDictionary() if weak else {}

    def register(self, group_name: str, obj: T) -> None:
        """Make ``obj`` reachable as ``group_name`` (replaces an earlier one)."""
        self._items[group_name] = obj

    def unregister(self, group_name: str) -> T | None:
        """Forget ``group_name``; returns what was registered there (None if nothing)."""
        return self._items.pop(group_name, None)

    def get(self, group_name: str) -> T:
        obj = self._items.get(group_name)
        if obj is None:
            raise RuntimeError(
                f"{self.op}: no {self.kind} registered for group {group_name!r}; call "
                f"{self.register_call}({group_name!r}, ...) first "
                f"(registered: {sorted(self._items) or 'none'})"
            )
        return obj


_ROUTERS: Registry[Router] = Registry(
    "artune::all_reduce", "router", "artune.integration.ops.register_router"
)
register_router = _ROUTERS.register
unregister_router = _ROUTERS.unregister
get_router = _ROUTERS.get


@torch.library.custom_op("artune::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the group registered as ``group_name``, out of place."""
    return get_router(group_name).all_reduce(x)


@all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def setup(profile: Any, group: Any, name: str, *, cpu_group: Any = None,
          device: torch.device | None = None, force: bool = False) -> Router:
    """Serve ``profile`` (a path) on ``group`` (None: the whole world) as
    ``torch.ops.artune.all_reduce(x, name)``. Collective: every rank of the group calls it.
    The ranks prove they hold the same profile, the profile is checked against this machine
    and the group size (``force``: skip that check), the backends it routes to are checked and
    built on the group; any failure is a ``SetupError`` on every rank
    (``artune.integration.group_setup``).

    ``cpu_group``: a gloo group over the same ranks for those checks; by default one is made
    with ``torch.distributed.new_group(ranks, use_local_synchronization=True)``, which only
    the group's ranks call. ``device``: the GPU this rank's all-reduces run on (default: the
    current CUDA device for an NCCL group, else the CPU). A router already registered as
    ``name`` is closed first (collective as well). Returns the Router: ``close()`` it and
    ``unregister_router(name)`` when done."""
    import torch.distributed as dist

    from artune.integration.group_setup import GroupSpec, build_router

    group = group if group is not None else dist.group.WORLD
    if cpu_group is None and dist.get_backend(group) == "gloo":
        cpu_group = group
    elif cpu_group is None:  # its collectives time out with artune's bound, not gloo's 30 min
        limit = float(envs.get("ARTUNE_COLLECTIVE_TIMEOUT_S"))
        cpu_group = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                   timeout=datetime.timedelta(seconds=limit),
                                   use_local_synchronization=True)
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if "nccl" in str(dist.get_backend(group)) else torch.device("cpu"))
    old = unregister_router(name)
    if old is not None:
        old.close()
    spec = GroupSpec(name=f"group {name!r}", group=group, cpu_group=cpu_group,
                     rank=dist.get_rank(group), world_size=dist.get_world_size(group),
                     device=device, group_name=getattr(group, "group_name", "") or "",
                     keeps="NCCL")
    built = build_router(profile, spec, check_topology=not force)
    assert built is not None  # strict: a mismatch raised
    router = built[1]
    register_router(name, router)
    return router
