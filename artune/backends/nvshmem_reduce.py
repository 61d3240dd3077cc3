"""``nvshmem_reduce``: NVSHMEM's own on-stream sum-reduction, through nvshmem4py.

Two symmetric buffers (source and destination), each ``ctx.max_bytes`` rounded up to 16 B, are
allocated on the NVSHMEM heap at construction (``artune.backends._nvshmem``). A call copies ``x``
into the source, runs ``nvshmemx_<type>_sum_reduce_on_stream(TEAM_WORLD, dst, src, numel,
stream)`` on the current stream (nvshmem4py's binding; the element count is passed explicitly so
a message may be smaller than the buffers), and copies the destination into a fresh tensor. All
three steps are stream-ordered kernels/copies, so the call is capturable in a CUDA graph.

NVSHMEM PEs are the ranks of ``ctx.cpu_group``: the NVSHMEM world is the group this backend was
built on, and a process can host it on one group only (``_nvshmem.group_reason``).

Numerics: the sum is taken by NVSHMEM in the tensor's dtype with an algorithm NVSHMEM picks;
identical bits on every rank are not promised by NVSHMEM's API (``identical_bits = False``), and the
autotuner's correctness gate checks them per machine (they were identical in every case of
tests/gpu/test_backends_gpu.py on 2 and 4 H200s with NVSHMEM 3.4.5, nvshmem4py 0.4.1).
Reuse of the buffers by the next call relies on OpenSHMEM's completion rule for reductions (on
return the source may be reused and the destination holds the result);
tests/gpu/test_backends_gpu.py checks it with back-to-back calls, eager and in graph replays.

    be = NvshmemReduceBackend.create(ctx)      # collective; bootstraps NVSHMEM on first use
    y = be.all_reduce(x)                       # x: contiguous bf16/fp16/fp32 CUDA tensor
    be.close()                                 # collective; NVSHMEM itself stays up
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from artune.backends import _nvshmem
from artune.backends.base import Backend, GroupContext, Params

if TYPE_CHECKING:
    import torch

__all__ = ["NvshmemReduceBackend"]

_ALIGN = 16

# torch dtype name -> nvshmem4py binding prefix (nvshmem.bindings.<prefix>_sum_reduce_on_stream)
_NVSHMEM_TYPE = {"bfloat16": "bfloat16", "float16": "half", "float32": "float"}


class NvshmemReduceBackend(Backend):
    """All-reduce with NVSHMEM's host-initiated, stream-ordered team reduction."""

    name = "nvshmem_reduce"
    identical_bits: ClassVar[bool] = False

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        import torch.distributed as dist

        if ctx.device.type != "cuda":
            return "needs CUDA (the group's device is not a GPU)"
        if not dist.is_available() or not dist.is_initialized():
            return "torch.distributed is not initialised"
        if ctx.world_size < 2:
            return f"needs at least 2 ranks (group has {ctx.world_size})"
        return _nvshmem.group_reason(ctx)

    def __init__(self, ctx: GroupContext) -> None:
        super().__init__(ctx)
        import torch
        from nvshmem import bindings

        _nvshmem.ensure_initialized(ctx)
        self.capacity = max(_ALIGN, -(-ctx.max_bytes // _ALIGN) * _ALIGN)
        self.src: torch.Tensor | None = _nvshmem.alloc((self.capacity,), torch.uint8)
        self.dst: torch.Tensor | None = _nvshmem.alloc((self.capacity,), torch.uint8)
        self.team = int(_nvshmem.world_team())
        self._reduce: dict[torch.dtype, Any] = {
            getattr(torch, name): getattr(bindings, f"{prefix}_sum_reduce_on_stream")
            for name, prefix in _NVSHMEM_TYPE.items()
        }

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return (
            self.src is not None
            and x.is_cuda
            and x.device == self.src.device
            and x.dtype in self._reduce
            and x.is_contiguous()
            and x.numel() * x.element_size() <= self.capacity
        )

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        import torch

        if self.src is None or self.dst is None:
            raise RuntimeError(f"{self.who}: all_reduce after close()")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        n = x.numel()
        if n == 0:
            return out
        nbytes = n * x.element_size()
        src = self.src[:nbytes].view(x.dtype)
        dst = self.dst[:nbytes].view(x.dtype)
        src.copy_(x.reshape(-1))
        stream = torch.cuda.current_stream(x.device).cuda_stream
        self._reduce[x.dtype](self.team, dst.data_ptr(), src.data_ptr(), n, stream)
        out.view(-1).copy_(dst)
        return out

    def close(self) -> None:
        """Collective: frees the two symmetric buffers (NVSHMEM stays initialised)."""
        for t in (self.src, self.dst):
            if t is not None:
                _nvshmem.free(t)
        self.src = None
        self.dst = None
        super().close()
