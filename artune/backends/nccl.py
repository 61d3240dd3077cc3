"""``nccl``: torch.distributed's all-reduce on the device group: the baseline and the fallback.

Out of place like every backend: the input is copied into a fresh output, which is reduced in
place (``dist.all_reduce`` has no out-of-place form). Capturable in CUDA graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from artune.backends.base import Backend, GroupContext, Params

if TYPE_CHECKING:
    import torch

__all__ = ["NcclBackend"]


class NcclBackend(Backend):
    name = "nccl"

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        import torch.distributed as dist

        if ctx.device.type != "cuda":
            return f"needs CUDA tensors (the group's device is {ctx.device})"
        backend = dist.get_backend(ctx.group)
        if backend != "nccl":
            return f"the device group uses {backend!r}, not 'nccl'"
        return None

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return x.is_cuda and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out, group=self.ctx.group)
        return out
