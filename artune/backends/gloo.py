"""``gloo``: torch.distributed's gloo all-reduce on CPU tensors, for dry runs without GPUs.

``artune tune --device cpu`` measures it so the whole pipeline (launch, gate, Optuna search,
table, validation, profile) can be tried and tested anywhere. It has one tunable parameter,
``chunks``: the message is reduced in that many consecutive pieces, one gloo call each (more
pieces cost more latency on loopback, so a search has something real to find and to prune).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from artune.backends.base import Backend, GroupContext, Params

if TYPE_CHECKING:
    import torch

__all__ = ["GlooBackend"]


class GlooBackend(Backend):
    name = "gloo"
    needs_cuda = False
    launch_params = ("chunks",)  # how the call is split; nothing is built per value

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        import torch.distributed as dist

        if ctx.device.type != "cpu":
            return "the gloo backend is for CPU dry runs (`artune tune --device cpu`)"
        backend = dist.get_backend(ctx.group)
        if backend != "gloo":
            return f"the device group uses {backend!r}, not 'gloo'"
        return None

    @classmethod
    def search_space(cls, nbytes: int, ctx: GroupContext) -> dict[str, list[Any]]:
        return {"chunks": [1, 2, 4]}

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return x.device.type == "cpu" and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        chunks = int((params or {}).get("chunks", 1))
        flat = out.view(-1)
        for piece in flat.tensor_split(max(1, min(chunks, flat.numel()))):
            dist.all_reduce(piece, group=self.ctx.group)
        return out
