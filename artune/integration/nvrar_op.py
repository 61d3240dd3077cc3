"""``torch.ops.artune.nvrar_all_reduce``: NVRAR alone as a torch custom op.

For callers that want NVRAR without a profile (tests, benchmarks, a model that always uses it).
Out of place, with a fake implementation, so it works eagerly, inside CUDA-graph capture and
under ``torch.compile(fullgraph=True)``; the backend crosses the torch boundary by name.

    be = NvrarBackend.create(ctx)
    register_nvrar("tp", be)
    y = torch.ops.artune.nvrar_all_reduce(x, "tp")     # x: contiguous bf16/fp16/fp32 CUDA tensor
    # the all-reduce fused with the residual add + RMSNorm after it, in place on x and residual
    # (NvrarComm.fused_add_rmsnorm: 16-bit rows of a hidden size cut into 256-4096-element
    # slices, at most 32)
    torch.ops.artune.nvrar_fused_add_rmsnorm(x, residual, weight, 1e-5, "tp")

The registry holds weak references: the caller owns the backend and closes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from artune.integration.ops import Registry

if TYPE_CHECKING:
    from artune.backends.nvrar import NvrarBackend

__all__ = ["register_nvrar", "unregister_nvrar", "get_nvrar", "nvrar_all_reduce",
           "nvrar_fused_add_rmsnorm"]

_BACKENDS: Registry[NvrarBackend] = Registry(
    "artune::nvrar_all_reduce", "NVRAR backend",
    "artune.integration.nvrar_op.register_nvrar", weak=True,
)
register_nvrar = _BACKENDS.register
unregister_nvrar = _BACKENDS.unregister
get_nvrar = _BACKENDS.get


@torch.library.custom_op("artune::nvrar_all_reduce", mutates_args=())
def nvrar_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the group registered as ``group_name`` (NVRAR, default parameters)."""
    return get_nvrar(group_name).all_reduce(x)


@nvrar_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("artune::nvrar_fused_add_rmsnorm", mutates_args=("x", "residual"))
def nvrar_fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, group_name: str) -> None:
    """In place: ``residual`` += the sum of ``x`` over the group registered as ``group_name``,
    then ``x`` = RMSNorm(residual) * weight, in one NVRAR kernel (see
    ``NvrarComm.fused_add_rmsnorm`` for what it takes; anything else raises ValueError)."""
    comm = get_nvrar(group_name).comm
    if comm is None:
        raise RuntimeError(f"artune::nvrar_fused_add_rmsnorm: the NVRAR backend of "
                           f"{group_name!r} is closed; build and register a new one")
    comm.fused_add_rmsnorm(x, residual, weight, eps)


@nvrar_fused_add_rmsnorm.register_fake
def _fused_fake(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                group_name: str) -> None:
    return None
