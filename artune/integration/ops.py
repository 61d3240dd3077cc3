"""``torch.ops.artune.all_reduce``: the routed all-reduce as a torch custom op.

Works eagerly, inside CUDA-graph capture and under ``torch.compile(fullgraph=True)``: the op takes
the group by name (a string crosses the torch boundary; the Router lives in a registry here) and
has a fake implementation, so the compiler never traces into the communication.

    router = Router.build(profile, ctx)
    register_router("tp", router)
    y = torch.ops.artune.all_reduce(x, "tp")        # x: any contiguous bf16/fp16/fp32 tensor
"""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from artune.router import Router

__all__ = ["Registry", "register_router", "unregister_router", "get_router", "all_reduce"]

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

    def unregister(self, group_name: str) -> None:
        self._items.pop(group_name, None)

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
