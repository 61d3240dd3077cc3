"""``sglang``: SGLang's own tensor-parallel all-reduce, measured as one more candidate.

``artune tune`` times it next to artune's backends (it is in the registry, so a GPU tune includes
it whenever ``sglang`` is importable), so a profile only routes a size away from SGLang where
something measured faster: serving with the profile is never slower than SGLang out of the box.

What is timed is what a served model runs below the point where artune's plugin routes: SGLang's
``GroupCoordinator._resolve_outplace_all_reduce_method`` and then ``_all_reduce_out_place``
(custom all-reduce, pynccl, ... as SGLang resolves them) or ``_all_reduce_in_place``, on its TP
group, in CUDA graphs inside SGLang's ``graph_capture()``. The layers above that point
(``GroupCoordinator.all_reduce``, the ``sglang::outplace_all_reduce`` op) run for SGLang's and
artune's backends alike in a served model, so they are left out of both measurements.

The contract holds: the result is a new tensor and ``x`` is never written. Where SGLang reduces
its input in place (NCCL/pynccl, and custom all-reduce v2 inside a CUDA graph at the sizes where
it runs two-shot over registered inputs: > 384 KiB on 4 H200s), the candidate reduces a copy;
those sizes therefore carry one device-to-device copy that a served model does not pay (see
docs/sglang.md, "Measuring SGLang's own all-reduce").

The backend initialises SGLang's distributed state on the tune's ranks
(``init_distributed_environment`` and ``initialize_model_parallel`` over the existing
torch.distributed world, TP = the whole world) and tears it down in ``close()``. No parameters.

    torchrun --nproc-per-node 4 -m artune.cli tune     # "sglang" is one of the candidates
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from artune.backends.base import Backend, GroupContext, Params
from artune.log import log_once

if TYPE_CHECKING:
    import torch

__all__ = ["SglangBackend"]

#: SGLang's methods that write the sum into their input (parallel_state.py reduces a clone for
#: "pymscclpp" in its own "auto" path for that reason).
_IN_PLACE_METHODS = frozenset({"pymscclpp"})


def _parallel_state() -> Any:
    from sglang.srt.distributed import parallel_state

    return parallel_state


def _capturing() -> bool:
    import torch

    return bool(torch.cuda.is_current_stream_capturing())


def _init_model_parallel(ps: Any, tp: int, rank: int, attn_dp: int = 1) -> None:
    """``initialize_model_parallel`` with TP = ``tp``, PP = 1 and attention data parallelism
    ``attn_dp`` (attention-TP groups of tp / attn_dp ranks), in the shape this release takes:
    widths as arguments (0.5.17) or read from the runtime context (later releases)."""
    params = inspect.signature(ps.initialize_model_parallel).parameters
    if "tensor_model_parallel_size" in params:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     attention_data_parallel_size=attn_dp)
        return
    from sglang.srt.runtime_context import derive_parallel_widths, get_parallel

    get_parallel().override_permanently(
        tp_size=tp, pp_size=1, attn_cp_size=1, moe_dp_size=1, shared_experts_tp_size=None,
        tp_rank=rank, pp_rank=0,
        **derive_parallel_widths(tp_size=tp, attn_cp_size=1, attn_dp_size=attn_dp,
                                 moe_ep_size=1, moe_dp_size=1, dcp_size=1, dcp_enabled=False),
    )
    ps.initialize_model_parallel()


def _ca_reduces_in_place(ca: Any, nbytes: int, capturing: bool) -> bool:
    """Whether SGLang's custom all-reduce ``ca`` writes the sum of an ``nbytes`` input into the
    input itself when called now.

    Custom all-reduce v2 does so inside a CUDA graph when it runs two-shot over registered inputs
    (custom_all_reduce.cuh: ``inplace = use_graph && algo == "2shot_pull"``, 0.5.17 and 0.5.23);
    eagerly it stages through its workspace and returns a new tensor, and the legacy
    ``CustomAllreduce`` (v1) always returns a new tensor. An implementation this function does
    not know counts as in place inside a graph: a copy too many, never a clobbered input.
    """
    if not capturing:
        return False
    can_use_graph = getattr(ca, "_can_use_graph", None)
    if can_use_graph is None:
        return type(ca).__name__ != "CustomAllreduce"
    if not can_use_graph():  # outside ca.capture(): the eager algorithms, captured as they are
        return False
    algo = getattr(ca, "override_algo", None)
    if algo is not None:  # the push algorithms never read registered inputs
        return str(algo.name) == "TWO_SHOT_PULL"
    pick_config = getattr(ca, "_pick_config", None)  # 0.5.23: AllReduceConfig(algo, use_graph,..)
    if pick_config is not None:
        cfg = pick_config(nbytes, True)
        return cfg is not None and bool(cfg.use_graph) and cfg.algo.name == "TWO_SHOT_PULL"
    pick_algo = getattr(ca, "_pick_algo", None)  # 0.5.17: (algo, _PullMode)
    if pick_algo is not None:
        algo, mode = pick_algo(nbytes, can_use_graph=True)
        return algo is not None and mode.name == "GRAPH" and algo.name == "TWO_SHOT_PULL"
    return True


def _trust_nvlink_peer_access() -> None:
    """Skip SGLang's one-time peer-access probe when every local GPU pair is NVLink-connected.

    Before its custom all-reduce, SGLang tests every GPU pair in a subprocess and caches the
    answer per CUDA_VISIBLE_DEVICES (custom_all_reduce_utils.gpu_p2p_access_check): 30 s of the
    first 4-GPU tune on 4x H100 (2026-11-26). The probe exists for PCIe machines whose driver
    reports peer access that does not work; over NVLink the driver's report
    (``SGLANG_SKIP_P2P_CHECK=1``, SGLang's own switch) gives the same answer. Set for this
    process only, never over the user's own setting.
    """
    import os

    if "SGLANG_SKIP_P2P_CHECK" in os.environ:
        return
    import torch

    from artune.topology import link_matrix

    n = torch.cuda.device_count()
    if n < 2:
        return
    links = link_matrix(n)  # follows CUDA_VISIBLE_DEVICES
    if all(links[i][j].startswith("NV") for i in range(n) for j in range(n) if i != j):
        os.environ["SGLANG_SKIP_P2P_CHECK"] = "1"


class SglangBackend(Backend):
    name = "sglang"
    needs_cuda = True
    late_setup = True  # initialize_model_parallel waits on SGLang's JIT builds (sglang_jit)
    slow_imports = ("sglang.srt.distributed.parallel_state",)

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

        #: Where the build time went (the tune records it beside "build sglang").
        self.setup_parts: dict[str, float] = {}
        t0 = time.perf_counter()
        _trust_nvlink_peer_access()
        self.setup_parts["NVLink check"] = time.perf_counter() - t0
        ps = _parallel_state()  # imported already by available()
        self._owns_world = ps._WORLD is None
        self._owns_groups = not ps.model_parallel_is_initialized()
        if self._owns_world:
            t0 = time.perf_counter()
            ps.init_distributed_environment(
                world_size=dist.get_world_size(), rank=dist.get_rank(),
                local_rank=ctx.device.index or 0, backend=dist.get_backend(ctx.group),
            )
            self.setup_parts["init_distributed_environment"] = time.perf_counter() - t0
        if self._owns_groups:
            t0 = time.perf_counter()
            _init_model_parallel(ps, ctx.world_size, dist.get_rank())
            self.setup_parts["initialize_model_parallel"] = time.perf_counter() - t0
        self.group = ps.get_tp_group()
        self._captures = 0  # depth of capture() contexts entered

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return x.is_cuda and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        group = self.group
        capturing = _capturing()
        if capturing and not self._captures:
            log_once(
                "sglang:capture-outside",
                "sglang: all_reduce captured outside SglangBackend.capture(): SGLang then runs "
                "its eager algorithms in the graph, not the ones it serves with; enter "
                "capture() around torch.cuda.graph",
                logging.WARNING,
            )
        # Resolved on every call: SGLang's answer depends on the capture state (ca.capture()
        # sets it) as well as on size and dtype.
        method = group._resolve_outplace_all_reduce_method(x)
        if method is None:  # SGLang reduces in place here (pynccl in graphs, NCCL eagerly)
            out = x.clone()
            group._all_reduce_in_place(out)
            return out
        nbytes = x.numel() * x.element_size()
        copy = method in _IN_PLACE_METHODS or (
            method == "ca" and _ca_reduces_in_place(group.ca_comm, nbytes, capturing)
        )
        src = x.clone() if copy else x
        out = group._all_reduce_out_place(src, method)
        if not copy and out.data_ptr() == x.data_ptr():
            log_once(
                f"sglang:in-place:{method}",
                f"sglang: method {method!r} wrote the sum into its input ({nbytes} B, "
                f"capturing={capturing}); artune's sglang candidate does not expect that from "
                f"this SGLang release and its inputs get clobbered: report it",
                logging.ERROR,
            )
        return out

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """SGLang's ``graph_capture`` on the caller's stream (custom all-reduce graph mode, pynccl
        enabled). Enter it around ``torch.cuda.graph``, never inside: SGLang registers the
        captured inputs with the peers when it exits, which it cannot do while capturing."""
        import torch

        if _capturing():
            raise RuntimeError(
                "SglangBackend.capture() was entered while the stream is capturing; enter it "
                "before torch.cuda.graph (SGLang registers the graph's inputs when it exits, "
                "which CUDA does not allow during capture)"
            )
        with self.group.graph_capture(stream=torch.cuda.current_stream()):
            self._captures += 1
            try:
                yield
            finally:
                self._captures -= 1

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
