"""``torch.ops.artune.all_reduce``: the routed all-reduce as a torch custom op.

Works eagerly, inside CUDA-graph capture and under ``torch.compile(fullgraph=True)``: the op takes
the group by name (a string crosses the torch boundary; the Router lives in a registry here) and
has a fake implementation, so the compiler never traces into the communication.

    router = Router.build(profile, ctx)
    register_router("tp", router)
    y = torch.ops.artune.all_reduce(x, "tp")        # x: any contiguous bf16/fp16/fp32 tensor
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from artune.router import Router

__all__ = ["register_router", "unregister_router", "get_router", "all_reduce"]

_ROUTERS: dict[str, Router] = {}


def register_router(group_name: str, router: Router) -> None:
    """Make ``router`` reachable from the op as ``group_name`` (replaces an earlier one)."""
    _ROUTERS[group_name] = router


def unregister_router(group_name: str) -> None:
    _ROUTERS.pop(group_name, None)


def get_router(group_name: str) -> Router:
    try:
        return _ROUTERS[group_name]
    except KeyError:
        raise RuntimeError(
            f"artune::all_reduce: no router registered for group {group_name!r}; call "
            f"artune.integration.ops.register_router({group_name!r}, router) first "
            f"(registered: {sorted(_ROUTERS) or 'none'})"
        ) from None


@torch.library.custom_op("artune::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the group registered as ``group_name``, out of place."""
    return get_router(group_name).all_reduce(x)


@all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)
