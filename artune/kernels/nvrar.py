"""NVRAR's host side: one rank's buffers, peer addresses, launches and timeout checks.

``NvrarComm`` is built over memory someone else provides (the NVRAR backend: an NVSHMEM
symmetric buffer and ``nvshmem_ptr`` addresses; the CPU tests: shared-memory files under the
Triton interpreter), so the same launch code runs in both.

    comm = NvrarComm(rank, Nodes(nodes, local), layout, buf, bases, device, timeout_s=5.0)
    y = comm.all_reduce(x, Plan("oneshot", "ll", block=1024, ctas=8, warps=4))
    comm.check()          # raises NvrarTimeoutError if any earlier call timed out

``x``: any contiguous bf16/fp16/fp32 tensor of up to ``layout.max_bytes`` on ``device``; the
result is a new tensor (or ``out``) with identical bits on every rank. Every rank must make the
same calls with the same plans in the same order (the epoch counters must stay in step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from artune import envs
from artune.kernels.nvrar_layout import (
    BLOCKS,
    LAMPORT_BLOCK_MAX,
    MAX_CTAS,
    SHARD_ALIGN,
    STEP_NORM,
    Layout,
    Nodes,
    cdiv,
    round_up,
    step_name,
)

if TYPE_CHECKING:
    import torch

__all__ = ["Plan", "NvrarComm", "NvrarTimeoutError", "ALGOS", "PROTOS", "INTERS", "decode_error",
           "init_buffer"]

ALGOS = ("oneshot", "twoshot")
PROTOS = ("ll", "signal", "lamport")
INTERS = ("auto", "nvshmem", "p2p")
_MAX_PEERS = 8  # peer-address kernel arguments (node-local ranks)
#: LL words per thread up to which a wait polls per thread (NvrarComm._spin).
SPIN_WORDS = 2
#: linear_all_reduce: output columns and K per CTA step, and the most rows (decode batches).
LINEAR_BN = 32
LINEAR_BK = 256
LINEAR_MAX_ROWS = 64
#: ... and the K loop's pipelining depth: 4 and 5 were fastest and within 0.2 µs of each other
#: on 2x and 4x H100 for Llama-3.1-8B's layers (1.0-1.9 µs off a down projection against 3;
#: benchmarks/results/linear_ar_stages_*_2026-11-28.md), and 5 was measured served.
LINEAR_DEPTH = 5
#: linear_all_reduce's parameters when none are given (the tune's fused-linear phase starts
#: its search from them; ARTUNE_FUSED_LINEAR=1 runs them).
LINEAR_DEFAULTS = {"block_n": LINEAR_BN, "block_k": LINEAR_BK, "warps": 4,
                   "stages": LINEAR_DEPTH}
#: linear_all_reduce's K-loop pipelining depths, and the shared memory a CTA may use where the
#: GPU does not say (an H100's opt-in limit, 227 KiB).
LINEAR_STAGES = range(1, 9)
SMEM_BYTES = 232448


def tile_rows(rows: int) -> int:
    """The fused linear kernel's tile height for ``rows`` rows: a power of two, 16 at least
    (``tl.dot``'s smallest)."""
    return max(16, 1 << (rows - 1).bit_length())


def linear_smem(rows: int, block_n: int, block_k: int, stages: int, elem_size: int = 2) -> int:
    """Bytes of shared memory linear_all_reduce's K loop takes: an x tile (``tile_rows``) and a
    weight tile per buffer, as Triton 3.6 lays out the pipelined loop for sm_90: a buffer per
    stage after the first, and one per stage where the tile has 64 rows (its warpgroup MMA
    keeps one more in flight); tests/test_nvrar_cpu.py checks both against the compiled
    kernel. An upper bound at one stage (Triton may need less)."""
    bm = tile_rows(rows)
    buffers = stages if bm >= 64 else max(1, stages - 1)
    return buffers * (bm + block_n) * block_k * elem_size


def linear_depth(rows: int, block_n: int, block_k: int, elem_size: int = 2,
                 smem: int = SMEM_BYTES) -> int:
    """LINEAR_DEPTH, or the deepest K loop below it whose shared memory fits in ``smem`` (1
    where none does: ``linear_problem`` then says so)."""
    return next((s for s in range(LINEAR_DEPTH, 1, -1)
                 if linear_smem(rows, block_n, block_k, s, elem_size) <= smem), 1)


def linear_defaults(rows: int, elem_size: int = 2, block_n: int = LINEAR_BN,
                    smem: int = SMEM_BYTES) -> dict[str, int]:
    """LINEAR_DEFAULTS with ``block_n`` for ``rows`` rows, made to fit in ``smem`` bytes of
    shared memory: the largest block_k (LINEAR_BK down to 64) whose K loop fits 2 stages deep,
    then the deepest loop at it (2 at least)."""
    block_k = next((bk for bk in (LINEAR_BK, LINEAR_BK // 2, 64)
                    if linear_smem(rows, block_n, bk, 2, elem_size) <= smem), 64)
    return dict(LINEAR_DEFAULTS, block_n=block_n, block_k=block_k,
                stages=max(2, linear_depth(rows, block_n, block_k, elem_size, smem)))


@dataclass(frozen=True)
class _Spec:
    """One kernel launch: the kernel, the key of its compiled variant, grid and arguments."""

    kernel: Any
    key: tuple[Any, ...]
    grid: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def compile(self) -> None:
        """Compile (or load from Triton's cache) the variant, without launching it."""
        jit = getattr(self.kernel, "jit_func", self.kernel)  # torch's requires_nvshmem wrapper
        extra = {"extern_libs": self.kernel.extern_libs} if jit is not self.kernel else {}
        jit.warmup(*self.args, grid=(self.grid,), **self.kwargs, **extra)


class NvrarTimeoutError(RuntimeError):
    """A wait inside an NVRAR kernel ran out: a peer did not make the same call in time."""


@dataclass(frozen=True)
class Plan:
    """How one all-reduce runs (the tunable parameters of backend ``nvrar``).

    ``algo``: "oneshot" (one node: push to all, sum all) or "twoshot" (reduce-scatter, then
    recursive doubling between nodes when there are several, then all-gather);
    ``proto``: "ll" (flag in every 8-byte word), "signal" (data, fence, 64-bit signal; two-shot
    only, one-shot takes it as LL) or "lamport" (the data is its own flag, half LL's bytes; one
    node only; its sentinel is 16-bit, so fp32 takes it as LL); ``block``: elements per CTA
    chunk; ``ctas``: at most this many CTAs; ``warps``: warps per CTA (16-bit lamport kernels
    run block / 128, one thread per word, whatever it says); ``inter``: inter-node
    transport, "nvshmem" (put / put-with-signal), "p2p" (stores through peer addresses; every
    rank must be NVLink-reachable) or "auto" (p2p where every rank is reachable, else nvshmem).
    """

    algo: str = "twoshot"
    proto: str = "ll"
    block: int = 1024
    ctas: int = 16
    warps: int = 4
    inter: str = "auto"

    def problem(self) -> str | None:
        """Why these values are not valid, or None."""
        if self.algo not in ALGOS:
            return f"algo={self.algo!r} is not one of {ALGOS}"
        if self.proto not in PROTOS:
            return f"proto={self.proto!r} is not one of {PROTOS}"
        if self.block not in BLOCKS:
            return f"block={self.block} is not one of {BLOCKS}"
        if not 1 <= self.ctas <= MAX_CTAS:
            return f"ctas={self.ctas} is not in 1..{MAX_CTAS}"
        if self.warps not in (1, 2, 4, 8, 16, 32):
            return f"warps={self.warps} is not a power of two in 1..32"
        if self.inter not in INTERS:
            return f"inter={self.inter!r} is not one of {INTERS}"
        if self.proto == "lamport" and self.block > LAMPORT_BLOCK_MAX:
            return (f"block={self.block} with proto='lamport': at most {LAMPORT_BLOCK_MAX} (its "
                    f"kernels run one thread per 8-byte word, at most 1024 threads)")
        return None


def init_buffer(buf: torch.Tensor, layout: Layout) -> None:
    """A rank's symmetric buffer as the kernels expect it before any call: zeros (never an
    epoch), and the sentinel 0x8000 in every 16-bit element of the lamport region. Every rank
    must have done this before any peer writes into its buffer."""
    import torch

    buf.zero_()
    at, size = layout.region("lamport")
    if size:
        buf[at:at + size].view(torch.int16).fill_(-0x8000)  # 0x8000: -0.0 in bf16 and fp16


def decode_error(code: int, rank: int, nodes: Nodes, timeout_s: float) -> str:
    """The message for an error word written by ``record_error``."""
    step = (code >> 32) & 0xFFFF
    peer = (code >> 16) & 0xFFFF
    cta = code & 0xFFFF
    if step == STEP_NORM:
        return (
            f"artune nvrar fused_add_rmsnorm: on rank {rank}, CTA {cta} waited {timeout_s:g} s "
            f"past the peers' data for the partial sums of the other CTAs of its row and gave "
            f"up: they did not all run at once (another kernel or an SM limit such as MPS or "
            f"green contexts held SMs). This NVRAR instance is now out of step with its peers: "
            f"close() it and build a new one on every rank; call the fused kernel with fewer "
            f"CTAs per row (block=) or leave the SMs free"
        )
    return (
        f"artune nvrar all_reduce: rank {rank} waited {timeout_s:g} s for rank {peer} in the "
        f"{step_name(step, nodes)} (step code {step}, CTA {cta}) and gave up. Rank {peer} did "
        f"not make the same all-reduce call (it crashed, hung, skipped it, or was given different "
        f"parameters). This NVRAR instance is now out of step with its peers: close() it and "
        f"build a new one on every rank (raise ARTUNE_TIMEOUT_S if the peer was only slow)"
    )


class NvrarComm:
    """One rank's NVRAR state: buffer, peer addresses, epoch counters, error words."""

    def __init__(
        self,
        rank: int,
        nodes: Nodes,
        layout: Layout,
        buf: torch.Tensor,
        bases: list[int],
        device: torch.device,
        timeout_s: float,
        interpret: bool = False,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        import torch

        if len(bases) != nodes.world:
            raise ValueError(f"NvrarComm: {len(bases)} peer bases for {nodes.world} ranks")
        if nodes.local > _MAX_PEERS:
            raise ValueError(
                f"NvrarComm: {nodes.local} ranks per node; NVRAR supports at most {_MAX_PEERS}"
            )
        if buf.numel() * buf.element_size() < layout.total_bytes:
            raise ValueError(
                f"NvrarComm: buffer of {buf.numel() * buf.element_size()} B is smaller than the "
                f"layout's {layout.total_bytes} B"
            )
        self.rank = rank
        self.nodes = nodes
        self.layout = layout
        self.offsets = layout.offsets()
        self.buf = buf
        self.bases = list(bases)
        self.device = device
        self.timeout_s = float(timeout_s)
        self.limit_ns = max(1, int(self.timeout_s * 1e9))
        self.interpret = interpret
        g = rank // nodes.local
        local = [self.bases[g * nodes.local + j] for j in range(nodes.local)]
        if any(b == 0 for b in local):
            raise ValueError(
                f"NvrarComm: a rank of node {g} is not load/store reachable from rank {rank}; "
                f"ranks_per_node must group NVLink-connected GPUs"
            )
        self.node_bases = local + [local[0]] * (_MAX_PEERS - nodes.local)
        if nodes.world <= _MAX_PEERS:
            world = self.bases + [self.bases[rank]] * (_MAX_PEERS - nodes.world)
            self.world_bases: list[int] | None = world
        else:
            self.world_bases = None
        self.p2p_everywhere = all(b != 0 for b in self.bases)
        self.ctr = torch.zeros(MAX_CTAS, dtype=torch.int32, device=device)
        #: Three lamport parities (``layout.lamport_parities``): each lamport call empties the
        #: slots the previous one read (``nvrar_lamport._ahead``), counting lamport calls on
        #: their own epoch counters, with what each parity's call left to clear in ``pend``.
        self.ahead = layout.lamport_parities == 3
        self.lctr = torch.zeros(MAX_CTAS, dtype=torch.int32, device=device)
        self.pend = torch.zeros(12, dtype=torch.int32, device=device)
        #: Fused add + RMSNorm: one word per CTA, its partial sum of squares tagged with the
        #: call's epoch (``nvrar_lamport._row_total``); -1: no epoch yet.
        self.partials = torch.full((MAX_CTAS,), -1, dtype=torch.int64, device=device)
        self.err_dev = torch.zeros(1, dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        self.err_host = torch.zeros(1, dtype=torch.int64, pin_memory=pin)
        self._err_view = self.err_host.numpy()
        self.rd_tab = torch.tensor(self.bases, dtype=torch.int64, device=device)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            self.max_grid = min(MAX_CTAS, props.multi_processor_count)
            self.smem = getattr(props, "shared_memory_per_block_optin", SMEM_BYTES)
        else:
            self.max_grid = MAX_CTAS
            self.smem = SMEM_BYTES
        self._sigset: int | None = None
        self._barrier = barrier
        self._ready: set[tuple[Any, ...]] = set()
        # LL waits: threads poll their own words in a PTX loop (GPU only) where each holds few.
        self.spin: bool | None = None if not interpret else False
        #: One-shot latency breakdown (benchmarks/nvrar_dev.py --diag); non-zero gives WRONG
        #: sums: 1 skips the waits, 2 the pushes too.
        self.diag = 0
        #: Programmatic dependent launch for the peer-address kernels (``nvrar_prims.pdl_begin``;
        #: ARTUNE_NVRAR_PDL): needs sm_90+, never under the interpreter.
        self.pdl = bool(envs.get("ARTUNE_NVRAR_PDL")) and not interpret and _pdl_capable(device)
        #: How the two-shot lamport kernel takes PDL where ``pdl`` is on: "off", "wait" or "on"
        #: (ARTUNE_NVRAR_TWOSHOT_PDL; ``_lamport2``).
        self.twoshot_pdl: str = envs.get("ARTUNE_NVRAR_TWOSHOT_PDL")
        #: The lamport kernels with 16 bytes per thread where a call allows them
        #: (ARTUNE_NVRAR_WIDE; ``_wide``).
        self.wide = bool(envs.get("ARTUNE_NVRAR_WIDE"))

    # ---- errors -------------------------------------------------------------------------
    def error_code(self) -> int:
        """The host-mapped error word (0: no wait ran out); no device sync."""
        return int(self._err_view[0])

    def check(self) -> None:
        """Raise NvrarTimeoutError if any earlier call on this rank timed out."""
        code = self.error_code()
        if code:
            raise NvrarTimeoutError(decode_error(code, self.rank, self.nodes, self.timeout_s))

    # ---- launch -------------------------------------------------------------------------
    def reason(self, nbytes: int, plan: Plan) -> str | None:
        """Why ``plan`` cannot run a message of ``nbytes`` here, or None."""
        bad = plan.problem() or self.layout.check_message(nbytes, plan.algo, plan.proto)
        if bad:
            return bad
        if self.nodes.nodes > 1 and plan.inter == "p2p" and not self.p2p_everywhere:
            return "inter='p2p' needs every rank load/store reachable; use inter='nvshmem'"
        return None

    def all_reduce(self, x: torch.Tensor, plan: Plan, out: torch.Tensor | None = None) -> Any:
        """Sum of ``x`` over the group into a new tensor (or ``out``); see the module docstring."""
        import torch

        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"artune nvrar all_reduce (rank {self.rank}): dtype {x.dtype} is not "
                            "bf16/fp16/fp32")
        if not x.is_contiguous():
            raise ValueError(f"artune nvrar all_reduce (rank {self.rank}): x must be contiguous "
                             "(call .contiguous())")
        n = x.numel()
        nbytes = n * x.element_size()
        bad = self.reason(nbytes, plan)
        if bad is not None:
            capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
            fix = (
                "; NVRAR's buffers are sized when the backend is built and cannot grow during "
                "CUDA-graph capture: build it with GroupContext.max_bytes >= the largest message"
                if capturing or nbytes > self.layout.max_bytes
                else ""
            )
            raise ValueError(f"artune nvrar all_reduce({nbytes} B, {plan}) on rank {self.rank}: "
                             f"{bad}{fix}")
        if out is not None and (out.dtype != x.dtype or out.numel() != n
                                or out.device != x.device or not out.is_contiguous()):
            raise ValueError(
                f"artune nvrar all_reduce (rank {self.rank}): out must be a contiguous {x.dtype} "
                f"tensor of "
                f"{n} elements on {x.device}, not {out.dtype} x {out.numel()} on {out.device}"
            )
        if n == 0:
            return torch.empty_like(x) if out is None else out
        # The kernels may read x and write y in 8-byte words: a view starting off that alignment
        # is copied (a fresh tensor is aligned), so every rank runs the same kernel layout.
        if x.data_ptr() % 16:
            x = x.clone()
        y = torch.empty_like(x) if out is None or out.data_ptr() % 16 else out
        self._launch(self.spec(x, y, plan))
        if out is not None and y is not out:
            out.copy_(y)
            return out
        return y

    def fused_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float, block: int | None = None,
                          ctas: int | None = None) -> None:
        """The all-reduce of ``x`` fused with the residual add and RMSNorm that follow it in a
        transformer layer, in place, one kernel (the lamport one-shot with the norm in its
        epilogue): ``residual = sum of x over the group + residual``, then ``x = residual *
        rsqrt(mean(residual ** 2) + eps) * weight`` (row by row, in fp32 from the sum rounded
        as the plain all-reduce rounds it, as SGLang's fused add + RMSNorm). ``x`` and
        ``residual``: contiguous [rows, hidden] of one 16-bit dtype, 16-byte aligned, the same
        on every rank for ``residual``; ``weight``: [hidden]. Each row is cut into slices of
        ``block`` elements, one CTA each, on at most ``ctas`` CTAs (``fused_plan``). The CTAs
        of a row wait for each other: when something else holds the SMs (a kernel on another
        stream, an MPS or green-context SM limit) so that they cannot all run at once, the call
        times out with that error instead. One node only. What does not fit
        raises ValueError (check with ``fused_problem`` first); after a wait of an earlier call
        ran out it raises NvrarTimeoutError, as ``check`` does."""
        self.check()
        plan = self._fused_checked(x, residual, weight, block, ctas)
        if isinstance(plan, str):
            raise ValueError(f"artune nvrar fused_add_rmsnorm (rank {self.rank}): {plan}")
        if x.numel() == 0:
            return
        self._launch(self._lamport(x, x, x.numel(), plan, norm=(residual, weight, float(eps))))

    def fused_plan(self, rows: int, hidden: int, block: int | None = None,
                   ctas: int | None = None) -> Plan | str:
        """The lamport plan of a fused call (its ``block``: the slice of a row one CTA holds),
        or why there is none. Up to FUSED_SPLIT_ROWS rows, rows are cut into slices of
        FUSED_BLOCK elements, fewer and larger where rows x slices would exceed the grid
        (``ctas``, at most the GPU's SMs); above that, into the largest chunks (a whole row up
        to 4096 elements); ``block`` when given. A row of several slices needs all of its CTAs
        at once (they exchange their partial sums of squares), so every chunk gets its own CTA
        then; rows of one slice may share CTAs. Under the interpreter (CTAs one after another)
        a row is one CTA."""
        grid = self.max_grid if ctas is None else max(1, min(ctas, self.max_grid))
        sizes = [b for b in BLOCKS if b <= LAMPORT_BLOCK_MAX and hidden % b == 0
                 and hidden // b <= FUSED_SLICES_MAX]
        if block is not None:
            if block not in sizes:
                return (f"block={block} is not one of {sizes} (a chunk size that divides hidden "
                        f"{hidden} into at most {FUSED_SLICES_MAX} slices)")
            sizes = [block]
        if not sizes:
            return (f"hidden size {hidden} is not a multiple of a chunk size in {BLOCKS} up to "
                    f"{LAMPORT_BLOCK_MAX} with at most {FUSED_SLICES_MAX} slices")
        if self.interpret:
            if hidden not in sizes:
                return (f"under the interpreter (CTAs one after another) a row is one chunk: "
                        f"hidden {hidden} must be a chunk size up to {LAMPORT_BLOCK_MAX} and "
                        f"block None or {hidden}")
            sizes = [hidden]
        elif block is None and rows > FUSED_SPLIT_ROWS:
            sizes = sizes[-1:]
        elif block is None:
            sizes = [b for b in sizes if b >= FUSED_BLOCK] or sizes[-1:]
        for b in sizes:  # smallest first: the most CTAs that fit
            slices = hidden // b
            if slices == 1 or rows * slices <= grid:
                return Plan("oneshot", "lamport", block=b, ctas=max(1, min(rows * slices, grid)))
        return (f"{rows} rows of {hidden // sizes[-1]} slices need {rows * hidden // sizes[-1]} "
                f"CTAs at once, more than the grid's {grid}")

    def fused_problem(self, x: torch.Tensor, residual: torch.Tensor,
                      weight: torch.Tensor, block: int | None = None,
                      ctas: int | None = None) -> str | None:
        """Why ``fused_add_rmsnorm(x, residual, weight, ..., block, ctas)`` cannot run here, or
        None."""
        plan = self._fused_checked(x, residual, weight, block, ctas)
        return plan if isinstance(plan, str) else None

    def _fused_checked(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       block: int | None, ctas: int | None) -> Plan | str:
        """The plan of a fused call, or why it cannot run (``fused_problem``)."""
        import torch

        if x.dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {x.dtype} is not bf16/fp16"
        if x.dim() != 2:
            return f"x must be [rows, hidden], got shape {tuple(x.shape)}"
        hidden = x.shape[-1]
        if residual.shape != x.shape or residual.dtype != x.dtype:
            return (f"residual must be {x.dtype} {tuple(x.shape)}, got {residual.dtype} "
                    f"{tuple(residual.shape)}")
        if weight.shape != (hidden,) or weight.dtype != x.dtype:
            return f"weight must be {x.dtype} ({hidden},), got {weight.dtype} {tuple(weight.shape)}"
        for name, t in (("x", x), ("residual", residual), ("weight", weight)):
            if t.device != x.device or not t.is_contiguous() or t.data_ptr() % 16:
                return f"{name} must be contiguous, 16-byte aligned and on {x.device}"
        plan = self.fused_plan(x.shape[0], hidden, block, ctas)
        if isinstance(plan, str):
            return plan
        return self.reason(x.numel() * x.element_size(), plan) or plan

    def linear_all_reduce(self, x: torch.Tensor, weight: torch.Tensor,
                          out: torch.Tensor | None = None, block_n: int = LINEAR_BN,
                          block_k: int = LINEAR_BK, warps: int = 4,
                          stages: int | None = None, prefetch: int = 0) -> torch.Tensor:
        """``sum over the group of x @ weight.T`` in one kernel: a row-parallel linear layer
        and its all-reduce (``nvrar_linear``: each CTA computes ``block_n`` output columns of
        every row and sends them as lamport words at once). ``x``: contiguous [rows, K] bf16 or
        fp16, at most LINEAR_MAX_ROWS rows; ``weight``: contiguous [N, K] of that dtype (this
        rank's shard, nn.Linear's layout), N a multiple of ``block_n`` with N / block_n CTAs
        at most the grid; the result (new, or ``out``: contiguous, 16-byte aligned) has
        identical bits on every rank: each rank's product is rounded to the dtype, as an
        unfused GEMM stores it, then summed in rank order in fp32. ``stages``: how many K
        steps the loop keeps in flight plus one (1..8, within the GPU's shared memory:
        ``linear_smem``; None: LINEAR_DEPTH, or the deepest below it that fits).
        ``prefetch`` (1): each CTA asks L2 for its weight rows before waiting for the kernel
        before it (``nvrar_linear``; ``prefetch_mode`` says how). One node only. What does not
        fit raises ValueError (``linear_problem`` says why first); after a wait of an earlier
        call ran out it raises NvrarTimeoutError, as ``check`` does."""
        import torch

        self.check()
        if stages is None:
            stages = linear_depth(x.shape[0], block_n, block_k, x.element_size(), self.smem)
        why = self.linear_problem(x, weight, out, block_n, block_k, stages)
        if why:
            raise ValueError(f"artune nvrar linear_all_reduce (rank {self.rank}): {why}")
        y = out if out is not None else torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype,
                                                    device=x.device)
        if x.shape[0]:
            self._launch(self._linear(x, weight, y, block_n, block_k, warps, stages,
                                      prefetch_mode(weight) if prefetch else 0))
        return y

    def linear_problem(self, x: torch.Tensor, weight: torch.Tensor,
                       out: torch.Tensor | None = None, block_n: int = LINEAR_BN,
                       block_k: int = LINEAR_BK, stages: int | None = None) -> str | None:
        """Why ``linear_all_reduce(x, weight, out, block_n, block_k, stages=stages)`` cannot
        run here, or None."""
        import torch

        if x.dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {x.dtype} is not bf16/fp16"
        if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
            return (f"x must be [rows, K] and weight [N, K], got {tuple(x.shape)} and "
                    f"{tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            return f"weight must be {x.dtype}, got {weight.dtype}"
        rows, n = x.shape[0], weight.shape[0]
        if stages is None:
            stages = linear_depth(rows, block_n, block_k, x.element_size(), self.smem)
        if rows > LINEAR_MAX_ROWS:
            return f"{rows} rows: at most {LINEAR_MAX_ROWS}"
        if block_n not in (16, 32, 64, 128) or block_k not in (16, 32, 64, 128, 256, 512):
            return (f"block_n={block_n} / block_k={block_k}: block_n one of 16..128 and block_k "
                    f"one of 16..512, powers of two")
        if stages not in LINEAR_STAGES:
            return f"stages={stages}: the K loop's depth is one of 1..{LINEAR_STAGES[-1]}"
        smem = linear_smem(rows, block_n, block_k, stages, x.element_size())
        if smem > self.smem:
            return (f"{rows} rows in {block_n}x{block_k} tiles {stages} stages deep need "
                    f"{smem >> 10} KiB of shared memory a CTA, more than this GPU's "
                    f"{self.smem >> 10} KiB: fewer stages or a smaller block_k")
        if n % block_n or not 1 <= n // block_n <= self.max_grid:
            return (f"N={n} must be a multiple of block_n={block_n} with at most "
                    f"{self.max_grid} CTAs")
        for name, t in (("x", x), ("weight", weight), ("out", out)):
            if t is not None and (t.device != x.device or not t.is_contiguous()):
                return f"{name} must be contiguous and on {x.device}"
        if out is not None and (out.shape != (rows, n) or out.dtype != x.dtype
                                or out.data_ptr() % 16):
            return f"out must be {x.dtype} ({rows}, {n}), 16-byte aligned"
        if self.nodes.nodes > 1:
            return "one node only (the lamport one-shot)"
        return self.layout.check_message(rows * n * x.element_size(), "oneshot", "lamport")

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, block_n: int,
                block_k: int, warps: int, stages: int, prefetch: int = 0) -> _Spec:
        from artune.kernels.nvrar_linear import linear_lamport_kernel

        assert self.world_bases is not None
        rows, k = x.shape
        n = weight.shape[0]
        bm = tile_rows(rows)
        args = (x, weight, y, rows, k, n, *self.world_bases, self.offsets["lamport"],
                self.layout.lamport_slot, *self._lamport_common())
        kwargs: dict[str, Any] = dict(W=self.nodes.world, BM=bm, BN=block_n, BK=block_k,
                                      MAXC=MAX_CTAS, INTERPRET=self.interpret, num_warps=warps,
                                      num_stages=stages, PREFETCH=prefetch, STAGES=stages,
                                      AHEAD=self.ahead)
        kwargs.update(self._pdl())
        key = ("linear", x.dtype, n, bm, block_n, block_k, warps, stages, self.pdl, prefetch,
               self.ahead)
        return _Spec(linear_lamport_kernel, key, n // block_n, args, kwargs)

    def _common(self, ctr: Any = None) -> tuple[Any, ...]:
        return (self.ctr if ctr is None else ctr, self.err_dev, self.err_host.data_ptr(),
                self.limit_ns, self.rank)

    def _lamport_common(self) -> tuple[Any, ...]:
        """A lamport kernel's ``pend`` and common arguments: with three parities its epochs
        count lamport calls only."""
        return (self.pend, *self._common(self.lctr if self.ahead else None))

    def _launch(self, spec: _Spec) -> None:
        """Launch, compiling first on the first use of the kernel in this process.

        The first use compiles on every rank, then meets the others at ``barrier`` before any
        rank launches: a rank still compiling must not make its peers' bounded waits run out.
        """
        if spec.key not in self._ready and not self.interpret:
            import torch

            if spec.key[0] == "nvshmem" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"artune nvrar: first use of {spec.key} inside CUDA-graph capture; loading an "
                    f"NVSHMEM-linked kernel is not capturable: call all_reduce once eagerly with "
                    f"this dtype and parameters before capturing"
                )
            spec.compile()
            if self._barrier is not None:
                self._barrier()
            self._ready.add(spec.key)
        spec.kernel[(spec.grid,)](*spec.args, **spec.kwargs)

    def spec(self, x: torch.Tensor, y: torch.Tensor, plan: Plan) -> _Spec:
        """What ``all_reduce(x, plan, out=y)`` launches (kernel, grid, arguments)."""
        n = x.numel()
        pack = 1 if x.element_size() == 4 else 2
        if plan.algo == "oneshot":
            return self._oneshot(x, y, n, pack, plan)
        return self._twoshot(x, y, n, pack, plan)

    def precompile(self, specs: list[_Spec], share: tuple[int, int] = (0, 1)) -> int:
        """Compile the distinct kernels of ``specs`` into Triton's on-disk cache ahead of their
        first launch; returns how many this rank compiled.

        ``share=(i, k)``: this rank compiles every k-th distinct kernel from the i-th, so k ranks
        sharing a cache directory compile each kernel once, in parallel; then every rank meets
        the others at ``barrier`` (every rank must call this). Nothing is marked ready: each
        kernel's first launch still loads it (now a cache hit) and meets the peers there, so
        whether a rank waits never depends on what happened to compile where. A kernel that fails
        to compile here is left to its first launch, which raises the error where it belongs.
        """
        todo: dict[tuple[Any, ...], _Spec] = {}
        for s in specs:
            if s.key not in self._ready and s.key not in todo:
                todo[s.key] = s
        index, count = share
        mine = 0
        try:
            if not self.interpret:
                for i, s in enumerate(todo.values()):
                    if i % count == index:
                        with contextlib.suppress(Exception):
                            s.compile()
                            mine += 1
        finally:
            if self._barrier is not None:
                self._barrier()
        return mine

    def _oneshot(self, x: torch.Tensor, y: torch.Tensor, n: int, pack: int, plan: Plan) -> _Spec:
        from artune.kernels.nvrar_oneshot import oneshot_ll_kernel

        assert self.world_bases is not None
        if plan.proto == "lamport" and x.element_size() == 2:
            return self._lamport(x, y, n, plan)
        grid = min(plan.ctas, cdiv(n, plan.block), self.max_grid)
        args = (x, y, n, *self.world_bases, self.offsets["oneshot"], self.layout.oneshot_slot,
                *self._common())
        kwargs = dict(W=self.nodes.world, PACK=pack, BLOCK=plan.block,
                      WP=1 << (self.nodes.world - 1).bit_length(), MAXC=MAX_CTAS,
                      INTERPRET=self.interpret, num_warps=plan.warps)
        kwargs["SPIN"] = spin = self._spin(plan, (kwargs["WP"] * plan.block) // pack)
        kwargs["DIAG"] = self.diag
        kwargs.update(self._pdl())
        key = ("oneshot", x.dtype, plan.block, plan.warps, spin, self.diag, self.pdl)
        return _Spec(oneshot_ll_kernel, key, grid, args, kwargs)

    def _lamport(self, x: torch.Tensor, y: torch.Tensor, n: int, plan: Plan,
                 norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> _Spec:
        from artune.kernels.nvrar_lamport import oneshot_lamport_kernel

        assert self.world_bases is not None
        grid = min(plan.ctas, cdiv(n, plan.block), self.max_grid)
        if norm is None and self._wide(x, y, n):
            return self._lamport_wide(x, y, n, plan, grid, None)
        res, weight, eps = norm if norm is not None else (x, x, 0.0)
        # NORM: the slices of a row (one CTA each, all in one round: fused_plan)
        split = weight.numel() // plan.block if norm is not None else 1
        args = (x, y, n, res, weight, eps, self.partials, *self.world_bases,
                self.offsets["lamport"], self.layout.lamport_slot, *self._lamport_common())
        warps = _lamport_warps(plan.block)
        # Words of four consecutive elements (8-byte loads and stores) where every rank's n
        # allows it: the wire layout must be the same on every rank, and n is. (NORM: rows of
        # a multiple of 256 elements, always.)
        vec = n % 4 == 0
        kwargs: dict[str, Any] = dict(W=self.nodes.world, BLOCK=plan.block, MAXC=MAX_CTAS,
                                      INTERPRET=self.interpret, num_warps=warps, VEC=vec,
                                      AHEAD=self.ahead, NORM=norm is not None, SPLIT=split,
                                      SLOTS=1 << (split - 1).bit_length())
        kwargs.update(self._pdl())
        key = ("lamport", x.dtype, plan.block, warps, self.pdl, self.ahead, norm is not None,
               split, vec)
        return _Spec(oneshot_lamport_kernel, key, grid, args, kwargs)

    def _lamport2(self, x: torch.Tensor, y: torch.Tensor, n: int, plan: Plan) -> _Spec:
        from artune.kernels.nvrar_lamport import twoshot_lamport_kernel

        assert self.world_bases is not None
        w = self.nodes.world
        shard = round_up(cdiv(n, w), plan.block)
        grid = min(plan.ctas, shard // plan.block, self.max_grid)
        if self._wide(x, y, n):
            return self._lamport_wide(x, y, n, plan, grid, shard)
        args = (x, y, n, shard, *self.world_bases, self.offsets["lamport"],
                self.layout.lamport_slot, self.layout.lamport_ag, *self._lamport_common())
        warps = _lamport_warps(plan.block)
        vec = n % 4 == 0
        kwargs: dict[str, Any] = dict(W=w, BLOCK=plan.block, MAXC=MAX_CTAS,
                                      INTERPRET=self.interpret, num_warps=warps, VEC=vec,
                                      AHEAD=self.ahead)
        # By default ("wait") the two-shot waits for the kernel before it under PDL but does not
        # let the next one launch early: with that early launch ("on") the kernel after it (a
        # served model's fused add + RMSNorm) ended 3.6 µs after the two-shot instead of 2.7
        # (the 512 KiB all-reduces of bs 64, TP=4, 4x H200, kernel traces
        # `sglang_kernels_tp4_h200_bs64{,_nopdl}_2026-11-28d.md`), and the two-shot's gain over
        # SGLang's own all-reduce was lost in place; without PDL at all ("off") its launch
        # after the GEMM cost 0.3 µs more, and that model's decode graphs took 0.63 % more GPU
        # time than with "wait" (32nd session, docs/nvrar.md). The one-shot and the fused
        # linear kernels keep the early launch (bs 1 / 16 read 2.1-2.6 points faster with it).
        mode = self._twoshot_pdl(kwargs)
        key = ("lamport2", x.dtype, plan.block, warps, mode, self.ahead, vec)
        return _Spec(twoshot_lamport_kernel, key, grid, args, kwargs)

    def _twoshot_pdl(self, kwargs: dict[str, Any]) -> str:
        """The two-shot lamport kernels' PDL mode (``twoshot_pdl`` where ``pdl`` is on, else
        "off"), added to a launch's ``kwargs``."""
        mode = self.twoshot_pdl if self.pdl else "off"
        if mode != "off":
            kwargs.update(self._pdl())
            kwargs["PDL_NEXT"] = mode == "on"
        return mode

    def _wide(self, x: torch.Tensor, y: torch.Tensor, n: int) -> bool:
        """Whether a 16-bit lamport call runs the 16-byte kernels (``nvrar_wide``): where
        ``wide`` is on, n is a multiple of 8, x and y are 16-byte aligned and the slots have
        two parities. A choice each rank makes alone: those kernels' wire layout, chunks and
        grid are the 8-byte kernels' (with n % 4 == 0, which n % 8 == 0 implies), so peers
        that do not take them interoperate, and the sums are the same bits."""
        return (self.wide and not self.ahead and n % 8 == 0 and x.data_ptr() % 16 == 0
                and y.data_ptr() % 16 == 0)

    def _lamport_wide(self, x: torch.Tensor, y: torch.Tensor, n: int, plan: Plan, grid: int,
                      shard: int | None) -> _Spec:
        """The 16-byte lamport one-shot (``shard`` None) or two-shot, one thread per 16 bytes
        of a chunk (block / 256 warps)."""
        from artune.kernels.nvrar_wide import oneshot_wide_kernel, twoshot_wide_kernel

        assert self.world_bases is not None
        warps = _lamport_warps(plan.block, wide=True)
        kwargs: dict[str, Any] = dict(W=self.nodes.world, BLOCK=plan.block, MAXC=MAX_CTAS,
                                      INTERPRET=self.interpret, num_warps=warps)
        slots = (self.offsets["lamport"], self.layout.lamport_slot)
        if shard is None:
            args = (x, y, n, *self.world_bases, *slots, *self._common())
            kwargs.update(self._pdl())
            return _Spec(oneshot_wide_kernel, ("wide", x.dtype, plan.block, warps, self.pdl),
                         grid, args, kwargs)
        args = (x, y, n, shard, *self.world_bases, *slots, self.layout.lamport_ag,
                *self._common())
        mode = self._twoshot_pdl(kwargs)
        key = ("wide2", x.dtype, plan.block, warps, mode)
        return _Spec(twoshot_wide_kernel, key, grid, args, kwargs)

    def _twoshot(self, x: torch.Tensor, y: torch.Tensor, n: int, pack: int, plan: Plan) -> _Spec:
        nodes, off = self.nodes, self.offsets
        if plan.proto == "lamport" and x.element_size() == 2 and nodes.nodes == 1:
            return self._lamport2(x, y, n, plan)
        ll = plan.proto in ("ll", "lamport")  # fp32 takes lamport as LL
        shard = round_up(cdiv(n, nodes.local), SHARD_ALIGN)
        grid = min(plan.ctas, cdiv(shard, plan.block), self.max_grid)
        use_shmem = nodes.nodes > 1 and (
            plan.inter == "nvshmem" or (plan.inter == "auto" and not self.p2p_everywhere)
        )
        kernel = _nvshmem_kernel() if use_shmem else _p2p_kernel()
        sigset = self._signal_set() if use_shmem else 0
        args = (
            x, y, n, shard, *self.node_bases, self.rd_tab,
            off["rs_ll" if ll else "rs_sig"], off["ag_ll" if ll else "ag_sig"],
            off["rd_ll" if ll else "rd_sig"], off["stage"], off["signals"],
            self.layout.ll_slot if ll else self.layout.sig_slot, self.layout.max_chunks,
            *self._common(),
        )
        kwargs = dict(N=nodes.nodes, L=nodes.local, LOG2P=nodes.log2p, EXTRA=nodes.extra,
                      STEPS=nodes.steps, PACK=pack, BLOCK=plan.block, LL=ll, SIGSET=sigset,
                      MAXC=MAX_CTAS, INTERPRET=self.interpret, num_warps=plan.warps)
        # Between nodes, block-wide rounds unless forced (``self.spin``): with per-thread
        # polling chosen by ``_spin``'s rule, the 2x2 virtual-node path read 7.6 / 8.0 / 9.7 µs
        # at 4K / 64K / 256K on 4x H100 (fourth session); with block rounds (and PDL) 5.1 /
        # 5.6 / 6.8 in the fifth (benchmarks/results/allreduce_2x2_emulated_h100.md), on
        # different runs, not side by side. On one node the rule stands (the 4x H100 tune
        # measured it).
        if nodes.nodes > 1:
            spin = ll and bool(self.spin)
        else:
            spin = ll and self._spin(plan, plan.block // pack)
        kwargs["SPIN"] = spin
        if not use_shmem:  # the NVSHMEM-linked variant launches through torch's wrapper
            kwargs.update(self._pdl())
        key = ("nvshmem" if use_shmem else "p2p", x.dtype, plan.block, plan.warps, ll, spin,
               self.pdl and not use_shmem)
        return _Spec(kernel, key, grid, args, kwargs)

    def _pdl(self) -> dict[str, bool]:
        """The kernel's PDL switch and Triton's launch option, both on (or neither given)."""
        return {"PDL": True, "launch_pdl": True} if self.pdl else {}

    def _spin(self, plan: Plan, words: int) -> bool:
        """Whether one LL wait over ``words`` 8-byte words polls per thread (``spin_ll``): each
        thread then loads its words one after another, so only while it holds at most
        ``SPIN_WORDS``. Block-wide rounds load them all at once, which wins above that (2x H200,
        benchmarks/results/nvrar_dev_2gpu_spin_h200.json). ``self.spin`` forces either way."""
        if self.spin is not None:
            return self.spin
        return words <= SPIN_WORDS * plan.warps * 32

    def _signal_set(self) -> int:
        if self._sigset is None:
            from artune.kernels.nvrar_shmem import signal_set_op

            self._sigset = signal_set_op()
        return self._sigset


#: Fused add + RMSNorm: the slice of a row one CTA holds up to FUSED_SPLIT_ROWS rows (above,
#: a row per CTA), and at most FUSED_SLICES_MAX slices per row. After a GEMM on 4x H100,
#: hidden 4096 (benchmarks/results/fused_blocks_context_4gpu_h100_2026-11-27h4.md), this rule
#: is within 0.2 µs of the best of 512-4096 at 1-64 rows; a row per CTA is 1.0 µs slower at
#: one row, 512-element slices 0.4 slower at 64 rows.
FUSED_BLOCK = 512
FUSED_SPLIT_ROWS = 8
FUSED_SLICES_MAX = 32


def _lamport_warps(block: int, wide: bool = False) -> int:
    """Warps of a lamport kernel with the per-thread gather: one thread per 8-byte word of a
    chunk (block / 4 threads), whatever the plan's ``warps``. More threads than words would give
    a word to several threads, and one could clear it before another has polled it (seen on
    4x H100: 256-element chunks with 4 warps, a wait that ran out); fewer would give a thread
    several words, which Triton 3.6 moves between layouts through shared memory (offline sm_90
    builds: 9-11 bar.sync per call at 1024-2048-element chunks with 4 warps, 1 with one word
    per thread). ``wide`` (``nvrar_wide``): one thread per 16 bytes, block / 256 warps."""
    return max(1, min(32, block // (256 if wide else 128)))


def prefetch_mode(weight: torch.Tensor) -> int:
    """How the fused linear kernel prefetches ``weight`` (``nvrar_linear``'s ``PREFETCH``): 2,
    bulk prefetches of each row's quarters, where the weight is 16-byte aligned and K a
    multiple of 32 (so every quarter starts and ends on 16 bytes); else 1, every 128-byte
    line."""
    return 2 if weight.data_ptr() % 16 == 0 and weight.shape[-1] % 32 == 0 else 1


def _pdl_capable(device: Any) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 or newer."""
    import torch

    return bool(device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0))


def _p2p_kernel() -> Any:
    from artune.kernels.nvrar_hier import hier_kernel

    return hier_kernel


_SHMEM_KERNEL: list[Any] = []


def _nvshmem_kernel() -> Any:
    """The NVSHMEM-linked variant, wrapped once per process."""
    if not _SHMEM_KERNEL:
        from artune.kernels.nvrar_hier import hier_kernel_nvshmem
        from artune.kernels.nvrar_shmem import with_nvshmem

        _SHMEM_KERNEL.append(with_nvshmem(hier_kernel_nvshmem))
    return _SHMEM_KERNEL[0]
