"""NVSHMEM device functions bound for Triton, and the wrapper that links them into a kernel.

Only the two block-scoped puts NVRAR's inter-node steps need (NVSHMEM 3.x device API, called by
every thread of the CTA):

- ``nvshmemx_putmem_block(dest, source, nbytes, pe)``: blocking for the source (reusable on return);
- ``nvshmemx_putmem_signal_block(dest, source, nbytes, sig_addr, signal, sig_op, pe)``: the data,
  then the 64-bit signal at ``sig_addr`` on ``pe`` updated with ``sig_op``.

``dest``/``sig_addr`` are this PE's addresses of symmetric objects; ``source`` any local device
memory NVSHMEM can read (NVRAR stages into its symmetric buffer, as IBGDA needs).
The signal operation codes come from nvshmem4py (``nvshmem.bindings.Signal_op``): NVSHMEM 3.4.5
defines SIGNAL_SET = 9 and SIGNAL_ADD = 10 (not the 0 / 5 some docstrings claim; DESIGN.md).

Kernels that call these must be linked against ``libnvshmem_device.bc`` and have their CUDA
module registered with NVSHMEM (``nvshmemx_cumodule_init``) after loading; ``with_nvshmem`` does
both through PyTorch's ``requires_nvshmem``.
"""

from __future__ import annotations

from typing import Any

from triton.language import core

__all__ = ["putmem_block", "putmem_signal_block", "signal_set_op", "with_nvshmem"]


@core.extern
def putmem_block(dest, source, nbytes, pe, _semantic=None):
    return core.extern_elementwise(
        "",
        "",
        [dest, source, nbytes, pe],
        {
            (core.int64, core.int64, core.int64, core.int32): (
                "nvshmemx_putmem_block",
                core.int32,
            )
        },
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def putmem_signal_block(
    dest, source, nbytes, sig_addr, signal, sig_op, pe, _semantic=None
):
    return core.extern_elementwise(
        "",
        "",
        [dest, source, nbytes, sig_addr, signal, sig_op, pe],
        {
            (
                core.int64,
                core.int64,
                core.int64,
                core.int64,
                core.uint64,
                core.int32,
                core.int32,
            ): ("nvshmemx_putmem_signal_block", core.int32)
        },
        is_pure=False,
        _semantic=_semantic,
    )


def signal_set_op() -> int:
    """NVSHMEM_SIGNAL_SET of the NVSHMEM library nvshmem4py binds (9 on NVSHMEM 3.4.5)."""
    from nvshmem import bindings

    return int(bindings.Signal_op.SIGNAL_SET)


def with_nvshmem(jit_fn: Any) -> Any:
    """``jit_fn`` (a ``triton.jit`` kernel) linked with NVSHMEM's device library and registered
    with NVSHMEM on load. RuntimeError naming the fix when PyTorch or the library cannot."""
    try:
        from torch.distributed._symmetric_memory._nvshmem_triton import requires_nvshmem
    except ImportError as exc:
        raise RuntimeError(
            "artune nvrar: inter-node puts need torch.distributed._symmetric_memory."
            f"_nvshmem_triton.requires_nvshmem, which this PyTorch lacks ({exc}); use "
            "inter='p2p' where every rank is NVLink-reachable"
        ) from exc
    try:
        return requires_nvshmem(jit_fn)
    except RuntimeError as exc:
        raise RuntimeError(
            f"artune nvrar: cannot link NVSHMEM's device library ({exc}); install "
            "nvidia-nvshmem-cu13 or set NVSHMEM_LIB_DIR to the folder holding libnvshmem_device.bc"
        ) from exc
