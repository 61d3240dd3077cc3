"""PyTorch symmetric-memory all-reduce: ``symm_one_shot`` and ``symm_two_shot``.

Both stage ``x`` in one symmetric buffer per backend (``torch.distributed._symmetric_memory.empty``
+ ``rendezvous`` on the device group, sized ``ctx.max_bytes`` at construction) and call PyTorch's
CUDA kernels over NVLink peer pointers; no multicast (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` is
required, DESIGN.md):

- one-shot: every rank loads every peer's copy and adds them
  (``symm_mem::one_shot_all_reduce_copy_out``: the copy into the buffer is fused into the kernel;
  ``one_shot_all_reduce_out`` after a ``copy_`` where the fused form is missing (it is present
  in torch 2.11) or x's offset alignment differs from the buffer's);
- two-shot: reduce-scatter then all-gather through the buffers
  (``symm_mem::two_shot_all_reduce_out``).

Constraints, read from torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemoryOps.cu (PyTorch
main) and exercised with torch 2.11 on 2 and 4 H200s by tests/gpu/test_backends_gpu.py:

- dtypes bfloat16 and float32 only (``AT_DISPATCH_FLOAT_AND_BFLOAT16``; float16 is refused);
- the byte size must be a multiple of ``max(4, element_size)`` (``get_and_verify_alignment``),
  so a bfloat16 message needs an even element count;
- two-shot's out-of-place kernel is built for world sizes 2, 4 and 8 only
  (``DISPATCH_WORLD_SIZES_NO_DEFAULT``); one-shot takes any world size;
- ranks must share one node (NVLink/P2P loads and stores).

Numerics: the sum is taken in the tensor's dtype (bf16 adds round after each add), in rank order
0, 1, ..., n-1 on every rank (``load_and_reduce``), and two-shot's reduced chunk is computed once
and copied to all: every rank gets identical bits. Both kernels end with a cross-rank barrier, so
the staging buffer may be reused by the next call (eager or graph replay) without a hazard.

    ctx = GroupContext(group=tp_group, cpu_group=gloo_group, rank=r, world_size=4,
                       device=torch.device("cuda", r), ranks_per_node=4, max_bytes=64 << 20)
    be = SymmTwoShotBackend.create(ctx)          # collective (rendezvous)
    y = be.all_reduce(x)                         # x: contiguous bf16/fp32 CUDA tensor
    be.close()
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from artune.backends.base import Backend, BackendUnavailable, GroupContext, Params, remember

if TYPE_CHECKING:
    import torch

__all__ = ["SymmOneShotBackend", "SymmTwoShotBackend"]

_ALIGN = 16  # staging buffer size granularity (the ops' widest vector access)
#: Prepared calls kept per backend (message shapes of a served model are few; past this many,
#: a shape is prepared on every call, correct but slower).
_MAX_BOUND = 1024

Call = Callable[["torch.Tensor"], "torch.Tensor"]


def _alignment(nbytes: int) -> int:
    """Largest power of two <= 16 dividing ``nbytes`` (16 for 0), as PyTorch's get_alignment."""
    for a in (16, 8, 4, 2):
        if nbytes % a == 0:
            return a
    return 1


def _has_cuda_kernel(op: str) -> bool:
    import torch

    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"symm_mem::{op}", "CUDA"))
    except RuntimeError:  # the op is not even declared in this build
        return False


class _SymmBackend(Backend):
    """Shared plumbing: the staging buffer, availability and ``supports``."""

    #: Every rank gets the same bits (fixed rank-order sum; see the module docstring).
    identical_bits: ClassVar[bool] = True
    #: ``symm_mem::`` ops this backend calls; all must have CUDA kernels in this torch build.
    _required_ops: ClassVar[tuple[str, ...]] = ()
    _world_sizes: ClassVar[tuple[int, ...] | None] = None  # None: any

    @classmethod
    def _dtypes(cls) -> tuple[torch.dtype, ...]:
        import torch

        return (torch.bfloat16, torch.float32)

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        import torch
        import torch.distributed as dist

        if not torch.cuda.is_available() or ctx.device.type != "cuda":
            return "needs CUDA (the group's device is not a GPU)"
        if not dist.is_available() or not dist.is_initialized():
            return "torch.distributed is not initialised"
        if ctx.world_size < 2:
            return f"needs at least 2 ranks (group has {ctx.world_size})"
        if cls._world_sizes is not None and ctx.world_size not in cls._world_sizes:
            sizes = ", ".join(map(str, cls._world_sizes))
            return f"PyTorch's kernel is built for world sizes {sizes} only, not {ctx.world_size}"
        if ctx.nodes != 1:
            return f"needs all ranks on one node (group spans {ctx.nodes} nodes)"
        if os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") != "1":
            return (
                "TORCH_SYMM_MEM_DISABLE_MULTICAST is not 1; NVLink multicast must stay off: start "
                "the process with TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (artune launch/tune set it)"
            )
        missing = [op for op in cls._required_ops if not _has_cuda_kernel(op)]
        if missing:
            return f"torch {torch.__version__} has no CUDA kernel for symm_mem::{missing[0]}"
        return None

    def __init__(self, ctx: GroupContext) -> None:
        super().__init__(ctx)
        import torch
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name: str = ctx.group.group_name
        self.capacity = max(_ALIGN, -(-ctx.max_bytes // _ALIGN) * _ALIGN)
        self._dtype_set = frozenset(self._dtypes())
        #: (shape, dtype, device index, contiguous) -> the call ``bind`` prepared
        self._bound: dict[tuple[Any, ...], Call] = {}
        try:
            self.buf: torch.Tensor | None = symm_mem.empty(
                self.capacity, dtype=torch.uint8, device=ctx.device
            )
            self.handle: Any = symm_mem.rendezvous(self.buf, ctx.group)
        except RuntimeError as exc:
            raise BackendUnavailable(
                f"{self.name}: symmetric-memory allocation/rendezvous of {self.capacity} B on "
                f"group {self.group_name!r} failed: {exc}"
            ) from exc

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return x.is_contiguous() and self._refusal(x) is None

    def _refusal(self, x: torch.Tensor) -> str | None:
        """Why this backend cannot take ``x`` (contiguity aside: ``bind`` copies a strided
        tensor first), or None."""
        nbytes = x.numel() * x.element_size()
        if self.closed or self.buf is None:
            return "all_reduce after close()"
        if x.device != self.buf.device:
            return f"the tensor is on {x.device}, the buffer on {self.buf.device}"
        if x.dtype not in self._dtype_set:
            return f"PyTorch's kernel takes {sorted(map(str, self._dtype_set))}, not {x.dtype}"
        if nbytes > self.capacity:
            return f"{nbytes} B exceed the {self.capacity} B buffer sized at construction"
        if nbytes % max(4, x.element_size()):
            return f"{nbytes} B is not a multiple of {max(4, x.element_size())} B"
        return None

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        call = self._bound.get((x.shape, x.dtype, x.get_device(), x.is_contiguous()))
        return (call or self.bind(x))(x)

    def bind(self, x: torch.Tensor, params: Params | None = None) -> Call:
        """The call for tensors of x's shape, dtype, device and contiguity, with the staging
        view and the op looked up once (on 4x H100 an eager one-shot call at 4K went from 30.0
        to 11.5 µs with it: benchmarks/results/router_eager_bind_4gpu_h100_2026-11-27.md).
        Raises ValueError, naming the reason, for a tensor ``supports`` refuses for more than
        its layout (a strided tensor is copied dense first)."""
        key = (x.shape, x.dtype, x.get_device(), x.is_contiguous())
        call = self._bound.get(key)
        if call is None:
            call = remember(self._bound, key, self._call_for(x), _MAX_BOUND)
        return call

    def _call_for(self, x: torch.Tensor) -> Call:
        import torch

        reason = self._refusal(x)
        if reason is not None:
            raise ValueError(f"{self.who}: cannot all-reduce {tuple(x.shape)} {x.dtype}: "
                             f"{reason}")
        if x.numel() == 0:
            return lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
        if not x.is_contiguous():
            dense = self.bind(x.contiguous())
            return lambda t: dense(t.contiguous())
        return self._prepare(x)

    def _prepare(self, x: torch.Tensor) -> Call:
        """The prepared call for contiguous, non-empty tensors like ``x``, which the backend
        takes."""
        raise NotImplementedError

    def _staged(self, x: torch.Tensor) -> torch.Tensor:
        """The first ``x.nbytes`` of the staging buffer, as ``x``'s dtype and shape."""
        nbytes = x.numel() * x.element_size()
        if self.buf is None:
            raise RuntimeError(f"{self.who}: all_reduce after close()")
        return self.buf[:nbytes].view(x.dtype).view(x.shape)

    def close(self) -> None:
        if self.buf is not None:
            import torch

            torch.cuda.synchronize(self.buf.device)
        self._bound.clear()
        self.buf = None
        self.handle = None
        super().close()


class SymmOneShotBackend(_SymmBackend):
    """One-shot all-reduce over PyTorch symmetric memory (each rank reads all peers)."""

    name = "symm_one_shot"
    _required_ops = ("one_shot_all_reduce_out",)

    def __init__(self, ctx: GroupContext) -> None:
        super().__init__(ctx)
        self._fused = _has_cuda_kernel("one_shot_all_reduce_copy_out")

    def _prepare(self, x: torch.Tensor) -> Call:
        import torch

        staged = self._staged(x)
        group, esize = self.group_name, x.element_size()
        # The fused op requires x's offset alignment to equal the buffer's (min of size and 16).
        align = _alignment(x.numel() * esize)
        fused = torch.ops.symm_mem.one_shot_all_reduce_copy_out.default if self._fused else None
        plain = torch.ops.symm_mem.one_shot_all_reduce_out.default
        empty_like = torch.empty_like

        def call(t: torch.Tensor) -> torch.Tensor:
            if self.closed:  # a call kept past close(): never a collective on a freed buffer
                raise RuntimeError(f"{self.who}: all_reduce after close()")
            out = empty_like(t)  # t is contiguous: so is out
            if (fused is not None and not t.data_ptr() % align
                    and not t.storage_offset() * esize % align):
                return fused(staged, t, "sum", group, out)
            staged.copy_(t)
            return plain(staged, "sum", group, out)

        return call


class SymmTwoShotBackend(_SymmBackend):
    """Two-shot all-reduce over PyTorch symmetric memory (reduce-scatter, then all-gather)."""

    name = "symm_two_shot"
    _required_ops = ("two_shot_all_reduce_out",)
    _world_sizes = (2, 4, 8)

    def _prepare(self, x: torch.Tensor) -> Call:
        import torch

        staged, group = self._staged(x), self.group_name
        op = torch.ops.symm_mem.two_shot_all_reduce_out.default
        empty_like = torch.empty_like

        def call(t: torch.Tensor) -> torch.Tensor:
            if self.closed:  # a call kept past close(): never a collective on a freed buffer
                raise RuntimeError(f"{self.who}: all_reduce after close()")
            out = empty_like(t)  # t is contiguous: so is out
            staged.copy_(t)
            return op(staged, "sum", group, out)

        return call
