"""``sglang``: SGLang's own tensor-parallel all-reduce, measured as one more candidate.

``artune tune`` times it next to artune's backends (it is in the registry, so a GPU tune includes
it whenever ``sglang`` is importable), so a profile only routes a size away from SGLang where
something measured faster: serving with the profile is never slower than SGLang out of the box.

What is timed is exactly what a served model calls: SGLang's ``GroupCoordinator.all_reduce`` on
its TP group (custom all-reduce, pynccl or torch.distributed, as SGLang itself resolves them), in
CUDA graphs inside SGLang's ``graph_capture()``. The backend initialises SGLang's distributed
state on the tune's ranks (``init_distributed_environment`` and ``initialize_model_parallel``
over the existing torch.distributed world, TP = the whole world) and tears it down in
``close()``. No parameters.

    torchrun --nproc-per-node 4 -m artune.cli tune     # "sglang" is one of the candidates
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from artune.backends.base import Backend, GroupContext, Params

if TYPE_CHECKING:
    import torch

__all__ = ["SglangBackend"]


def _parallel_state() -> Any:
    from sglang.srt.distributed import parallel_state

    return parallel_state


def _init_model_parallel(ps: Any, tp: int, rank: int) -> None:
    """``initialize_model_parallel`` with TP = ``tp``, PP = 1, in the shape this release takes:
    widths as arguments (0.5.17) or read from the runtime context (later releases)."""
    params = inspect.signature(ps.initialize_model_parallel).parameters
    if "tensor_model_parallel_size" in params:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        return
    from sglang.srt.runtime_context import derive_parallel_widths, get_parallel

    get_parallel().override_permanently(
        tp_size=tp, pp_size=1, attn_cp_size=1, moe_dp_size=1, shared_experts_tp_size=None,
        tp_rank=rank, pp_rank=0,
        **derive_parallel_widths(tp_size=tp, attn_cp_size=1, attn_dp_size=1, moe_ep_size=1,
                                 moe_dp_size=1, dcp_size=1, dcp_enabled=False),
    )
    ps.initialize_model_parallel()


class SglangBackend(Backend):
    name = "sglang"
    needs_cuda = True

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        try:
            ps = _parallel_state()
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
            return (f"sglang is not importable ({type(exc).__name__}: {exc}); install it "
                    f"(pip install 'artune[sglang]') to measure SGLang's own all-reduce")
        if ctx.device.type != "cuda":
            return "SGLang's all-reduce path needs CUDA tensors (on CPU it is a plain gloo call)"
        import torch.distributed as dist

        if ctx.world_size != dist.get_world_size():
            return (f"SGLang's TP group spans the whole torch.distributed world "
                    f"({dist.get_world_size()} ranks); this group has {ctx.world_size}")
        if ps.model_parallel_is_initialized():
            tp = ps.get_tp_group()
            if tp.world_size != ctx.world_size:
                return (f"SGLang's model parallel state is already initialised with TP="
                        f"{tp.world_size}; this group has {ctx.world_size} ranks")
        return None

    def __init__(self, ctx: GroupContext) -> None:
        super().__init__(ctx)
        import torch.distributed as dist

        ps = _parallel_state()
        self._owns_world = ps._WORLD is None
        self._owns_groups = not ps.model_parallel_is_initialized()
        if self._owns_world:
            ps.init_distributed_environment(
                world_size=dist.get_world_size(), rank=dist.get_rank(),
                local_rank=ctx.device.index or 0, backend=dist.get_backend(ctx.group),
            )
        if self._owns_groups:
            _init_model_parallel(ps, ctx.world_size, dist.get_rank())
        self.group = ps.get_tp_group()
        # SGLang resolves the method per call; cache whether a (size, dtype, capturing) call is
        # out of place (custom all-reduce & co.) or in place (NCCL: needs a copy to keep x).
        self._outplace: dict[tuple[int, Any, bool], bool] = {}

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return x.is_cuda and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        import torch

        capturing = torch.cuda.is_current_stream_capturing()
        key = (x.numel(), x.dtype, capturing)
        outplace = self._outplace.get(key)
        if outplace is None:
            method = self.group._resolve_outplace_all_reduce_method(x)
            outplace = self._outplace[key] = method is not None
        if outplace:
            return self.group.all_reduce(x)
        return self.group.all_reduce(x.clone())

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """SGLang's ``graph_capture`` on the caller's stream (custom all-reduce buffer
        registration, pynccl enabled), entered around ``torch.cuda.graph``."""
        import torch

        with self.group.graph_capture(stream=torch.cuda.current_stream()):
            yield

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        ps = _parallel_state()
        if self._owns_groups:
            ps.destroy_model_parallel()
        if self._owns_world and ps._WORLD is not None:
            ps._WORLD.destroy()
            ps._WORLD = None
            with contextlib.suppress(ImportError, AttributeError):
                from sglang.srt.runtime_context import get_parallel

                get_parallel().clear_stamp()
