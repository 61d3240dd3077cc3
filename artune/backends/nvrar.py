"""``nvrar``: artune's own all-reduce, Triton kernels over NVSHMEM symmetric memory.

Node-aware (``ctx.ranks_per_node`` groups ranks into nodes, virtual ones included): on one node
a one-shot LL push for small messages or a two-shot (reduce-scatter + all-gather); across nodes
reduce-scatter in the node, recursive doubling between nodes (NVSHMEM put-with-signal, or LL
words), all-gather in the node. Any element count, bf16/fp16/fp32 (fp32 accumulation), any world
size (non-powers of two of nodes fold in and out), identical bits on every rank, capturable in
CUDA graphs, every wait bounded by ARTUNE_TIMEOUT_S. See docs/nvrar.md and
``artune.kernels.nvrar``.

    be = NvrarBackend.create(ctx)                 # collective: NVSHMEM buffer, peer addresses
    y = be.all_reduce(x)                          # default parameters for x's size
    y = be.all_reduce(x, {"algo": "twoshot", "proto": "signal", "block": 4096, "ctas": 32})
    be.check()                                    # raise if an earlier call timed out
    be.close()                                    # collective

A wait that runs out writes (step, peer, CTA) to a host-mapped word; the next ``all_reduce`` or
``check()`` on that rank raises ``NvrarTimeoutError`` naming them. The buffers are sized for
``ctx.max_bytes`` when the backend is built (nothing is allocated per call but the output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from artune import agree, envs
from artune.backends import _nvshmem
from artune.backends.base import Backend, BackendUnavailable, GroupContext, Params
from artune.log import logger

if TYPE_CHECKING:
    import torch

    from artune.kernels.nvrar import NvrarComm, Plan

__all__ = ["NvrarBackend", "default_plan"]

_MAX_LOCAL = 8
_CTAS = (1, 2, 4, 8, 16, 32, 64, 128)


def _caps(ctx: GroupContext) -> tuple[int, int]:
    """(one-shot capacity, LL capacity) in bytes for ``ctx``."""
    one = min(ctx.max_bytes, int(envs.get("ARTUNE_NVRAR_ONESHOT_MAX_BYTES")))
    ll = min(ctx.max_bytes, int(envs.get("ARTUNE_NVRAR_LL_MAX_BYTES")))
    return (one if ctx.nodes == 1 else 0), ll


#: The two-shot lamport is tried only above this size: below it the one-shot (one hop, not two)
#: is the faster lamport algorithm, and the search space stays small.
_LAMPORT2_MIN = 64 << 10


def _lamport2_fits(nbytes: int, ctx: GroupContext) -> bool:
    """Whether the two-shot lamport takes ``nbytes`` on ``ctx`` (one node, slot halves)."""
    from artune.kernels.nvrar_layout import Layout, Nodes

    one, ll = _caps(ctx)
    layout = Layout(Nodes(ctx.nodes, ctx.ranks_per_node), ctx.max_bytes, one, ll)
    return 0 < nbytes <= ll and bool(one) and layout.lamport2_fits(nbytes)


def _ctas_for(chunks: int, cap: int) -> int:
    """The smallest CTA count of the search space covering ``chunks`` chunks, at most ``cap``."""
    return next((c for c in _CTAS if c >= min(chunks, cap)), _CTAS[-1])


def _fit(block: int, elems: int) -> int:
    """``block`` halved down to the message (not below the smallest block)."""
    while block > max(256, elems):
        block //= 2
    return block


def default_plan(nbytes: int, nodes: int, ranks_per_node: int, elem_size: int = 2
                 ) -> dict[str, Any]:
    """NVRAR's untuned parameters for a message of ``nbytes`` of ``elem_size``-byte elements
    (the sizes below are bf16's).

    The fastest plans measured, CUDA graph, bf16 (docs/nvrar.md, seventh session, 4x H100,
    benchmarks/results/allreduce_lamport*_4gpu_h100.md):
    - one node, up to 128 KiB (1 MiB on 2 GPUs): the lamport one-shot with its per-thread
      gather and 512-element chunks: 2.4 / 2.5 / 2.9 / 3.5 us at 4K / 16K / 64K / 128K on 4
      GPUs (the two-shot lamport: 3.9 / 4.0 at 64K / 128K); 2 GPUs: 2.2 / 2.3 / 2.5 us at 4K
      / 16K / 64K; above 128 KiB on 2 GPUs, larger chunks (31st session, 2x H200,
      benchmarks/results/allreduce_2gpu_oneshot_blocks_h200_2026-11-28f.md, two runs alike):
      1024 elements to 256 KiB, 3.0 us there (512: 3.4), then 2048: 3.4 / 3.8 / 5.1 / 5.7 us
      at 384K / 512K / 768K / 1M, where the two-shot lamport (this default before) took 4.4 /
      4.6 / 6.0 / 6.5, and 4.4 / 5.7 / 7.2 / 8.4 against 7.0 / 7.8 / 9.1 / 8.7 between the
      down projection's GEMM and SGLang's add + RMSNorm (SGLang's own all-reduce: 3.2 / 3.6 /
      4.4 / 5.1 back to back);
    - one node, above that up to 2 MiB: the lamport two-shot. More than 2 GPUs: 512-element
      chunks up to 512 KiB, 1024 up to 1 MiB, then 2048: 4.2 / 4.6 / 5.1 / 6.9 / 11.8 us at
      256K / 384K / 512K / 1M / 2M (the one-shot: 5.2 / 6.5 / 7.4 / 12.4 / -; SGLang's custom
      all-reduce 4.8 / 5.9 / 9.0 / 12.2 / 17.1), then under PDL with the early launch of the
      next kernel, which the two-shot no longer does (ARTUNE_NVRAR_TWOSHOT_PDL=wait: on 4x
      H200 4.4 / 5.4 / 7.3 / 12.7 us at 256K / 512K / 1M / 2M, 0.2-0.5 us slower back to back,
      faster in a served model: docs/nvrar.md).
      2 GPUs, above 1 MiB (eighth session, benchmarks/results/allreduce_2gpu_h100.md, at
      512K / 1M: 1024-element chunks 4.2 / 5.8 us against 10.1 / 11.7 for the LL/signal
      two-shot and 4.6 / 6.9 for the one-shot with 512-element chunks, on 2x H100): 2 MiB
      does not fit its slots there, so in effect the signal two-shot. Its capacity comes from
      the one-shot's slots (``default_params`` falls back where it does not fit). fp32 takes
      "lamport" as LL;
    - otherwise, and between nodes: ``_twoshot_plan``.
    Lamport kernels run one thread per 8-byte word of a chunk whatever ``warps`` says (block /
    128 warps; ``artune.kernels.nvrar._lamport_warps``); the plans keep 4, the others' default.
    """
    elems = max(1, nbytes // 2)
    world = ranks_per_node * nodes
    shard = -(-elems // ranks_per_node)
    # fp32 runs "lamport" as LL. On 2 GPUs (2x H200, 31st session, µs at 256K / 512K / 1M) its
    # one-shot was fastest with 512-element chunks up to 512K: 4.7 / 6.7 / 10.2 (with the
    # 16-bit chunk sizes 5.3 / 8.8 / 11.5; the two-shot LL with 1024, the default at 512K-1M
    # before, - / 8.5 / 10.8), and the signal two-shot at 1M: 8.7.
    fp32 = elem_size >= 4
    if nodes == 1 and world <= 2 and fp32 and nbytes > 512 << 10:
        return _twoshot_plan(nbytes, nodes, world, elems, shard)
    if nodes == 1 and nbytes <= ((1 << 20) if world <= 2 else (128 << 10)):
        big = nbytes > 128 << 10 and not fp32
        block = _fit(1024 if big and nbytes <= 256 << 10 else 2048 if big else 512, elems)
        return {"algo": "oneshot", "proto": "lamport", "block": block,
                "ctas": _ctas_for(-(-elems // block), 128), "warps": 4, "inter": "auto"}
    if nodes == 1 and nbytes <= 2 << 20:
        if world <= 2:
            block = 1024
        else:
            block = 512 if nbytes <= 512 << 10 else 1024 if nbytes <= 1 << 20 else 2048
        return {"algo": "twoshot", "proto": "lamport", "block": block,
                "ctas": _ctas_for(-(-shard // block), 128), "warps": 4, "inter": "auto"}
    return _twoshot_plan(nbytes, nodes, world, elems, shard)


def _twoshot_plan(nbytes: int, nodes: int, world: int, elems: int, shard: int) -> dict[str, Any]:
    """The LL/signal two-shot (hierarchical between nodes): LL up to 512 KiB (on one node of
    more than 2 GPUs with 256-element chunks: 9.2 us at 512 KiB in the sixth session's 4x H100
    tune), then the signal protocol with blocks growing with the message. Four warps beat one
    or two at every small size measured."""
    if nodes == 1 and world > 2 and nbytes <= 512 << 10:
        return {"algo": "twoshot", "proto": "ll", "block": 256,
                "ctas": _ctas_for(-(-shard // 256), 128), "warps": 4, "inter": "auto"}
    if nbytes <= 512 << 10:
        block = _fit(512, elems)
        return {"algo": "twoshot", "proto": "ll", "block": block,
                "ctas": _ctas_for(-(-shard // block), 128), "warps": 4, "inter": "auto"}
    block = _fit(2048 if nbytes <= 1 << 20 else 4096 if nbytes <= 4 << 20 else 8192, elems)
    return {"algo": "twoshot", "proto": "signal", "block": block,
            "ctas": _ctas_for(-(-shard // block), 128), "warps": 4 if nbytes <= 4 << 20 else 8,
            "inter": "auto"}


class NvrarBackend(Backend):
    """NVRAR over the group's NVSHMEM world (see the module docstring)."""

    name = "nvrar"
    identical_bits: ClassVar[bool] = True
    #: The CTA count is a launch argument; every other parameter picks a compiled kernel.
    launch_params: ClassVar[tuple[str, ...]] = ("ctas",)

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        import torch
        import torch.distributed as dist

        if ctx.device.type != "cuda" or not torch.cuda.is_available():
            return "needs CUDA GPUs (the group's device is not a GPU)"
        if not dist.is_available() or not dist.is_initialized():
            return "torch.distributed is not initialised"
        if ctx.world_size < 2:
            return f"needs at least 2 ranks (group has {ctx.world_size})"
        if ctx.ranks_per_node < 1 or ctx.world_size % ctx.ranks_per_node:
            return (
                f"world size {ctx.world_size} is not a multiple of ranks_per_node "
                f"{ctx.ranks_per_node}"
            )
        if ctx.ranks_per_node > _MAX_LOCAL:
            return f"at most {_MAX_LOCAL} ranks per node (got {ctx.ranks_per_node})"
        if torch.cuda.get_device_capability(ctx.device) < (7, 0):
            return "needs compute capability 7.0 or newer (acquire/release PTX)"
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"Triton is not importable ({exc}); pip install triton"
        return _nvshmem.group_reason(ctx)

    @classmethod
    def search_space(cls, nbytes: int, ctx: GroupContext) -> dict[str, list[Any]]:
        """``search_space_for`` bf16/fp16 messages."""
        return cls.search_space_for(nbytes, ctx, 2)

    @classmethod
    def search_space_for(cls, nbytes: int, ctx: GroupContext, elem_size: int
                         ) -> dict[str, list[Any]]:
        """A few neighbours of ``default_params`` (for ``elem_size``-byte elements): the
        other algorithm and protocols where they take the size, the block halved and
        doubled, the CTA cap halved and doubled; warps and ``inter`` as in the defaults.
        ``admits`` drops the combinations that are not plans (a one-shot signal, a lamport
        plan beyond its capacity). Every distinct (algorithm, protocol, block, warps) is a
        Triton compile (the CTA count is not), so the space stays small on purpose: over the
        37 sizes of a full tune, 1 KiB..256 MiB, it holds 27-29 distinct bf16 kernels on one
        node of 2, 4 or 8 ranks and 28 on 2x2 virtual nodes (tests/test_nvrar_cpu.py counts
        them), at most 45 admitted combinations per size, against 90 and 120 kernels for the
        full product of choices it replaced (6 blocks x 5 warps x
        algorithm/protocol/transport).
        """
        from artune.kernels.nvrar_layout import BLOCKS

        one, ll = _caps(ctx)
        d = cls.default_params_for(nbytes, ctx, elem_size)
        elems = max(1, nbytes // 2)  # bf16/fp16 have the most elements per byte
        algos = [d["algo"]] + [a for a in ("oneshot", "twoshot")
                               if a != d["algo"] and (a == "twoshot" or 0 < nbytes <= one)]
        # LL's cap bounds the two-shot only (the one-shot's slots are sized by its own cap)
        takes = {"ll": nbytes <= max(ll, one),
                 "lamport": 0 < nbytes <= one or _lamport2_fits(nbytes, ctx), "signal": True}
        protos = [d["proto"]] + [p for p in ("ll", "lamport", "signal")
                                 if p != d["proto"] and takes[p]]
        top = max(BLOCKS[0], elems)
        blocks = [b for b in (d["block"], d["block"] // 2, d["block"] * 2)
                  if b in BLOCKS and b <= top]
        ctas = [c for c in (d["ctas"], d["ctas"] // 2, d["ctas"] * 2)
                if c in _CTAS and c <= max(1, -(-elems // BLOCKS[0]))]
        if d["ctas"] not in ctas:
            ctas.insert(0, d["ctas"])
        space: dict[str, list[Any]] = {
            "algo": algos, "proto": protos, "block": blocks, "ctas": ctas, "warps": [d["warps"]],
        }
        if ctx.nodes > 1:
            space["inter"] = ["auto", "nvshmem"]  # auto: p2p where every rank is reachable
        return space

    @classmethod
    def admits(cls, params: Params, nbytes: int, ctx: GroupContext) -> bool:
        """The one-shot has no signal protocol (it would run as LL), each lamport algorithm
        stops at its capacity (the two-shot one runs on one node only, and only above
        ``_LAMPORT2_MIN``), and the two-shot LL stops at its cap: those combinations of
        ``search_space`` get no trial."""
        from artune.kernels.nvrar_layout import LAMPORT_BLOCK_MAX

        algo, proto = params.get("algo"), params.get("proto")
        one, ll = _caps(ctx)
        return not ((algo == "oneshot" and proto == "signal")
                    or (proto == "lamport" and params.get("block", 0) > LAMPORT_BLOCK_MAX)
                    or (algo == "oneshot" and proto == "lamport" and nbytes > one)
                    or (algo == "twoshot" and proto == "lamport"
                        and (nbytes <= _LAMPORT2_MIN or not _lamport2_fits(nbytes, ctx)))
                    or (algo == "twoshot" and proto == "ll" and nbytes > ll))

    @classmethod
    def default_params(cls, nbytes: int, ctx: GroupContext) -> dict[str, Any]:
        """``default_params_for`` bf16/fp16 messages."""
        return cls.default_params_for(nbytes, ctx, 2)

    @classmethod
    def default_params_for(cls, nbytes: int, ctx: GroupContext, elem_size: int
                           ) -> dict[str, Any]:
        params = default_plan(nbytes, ctx.nodes, ctx.ranks_per_node, elem_size)
        one, ll = _caps(ctx)
        elems = max(1, nbytes // 2)
        shard = -(-elems // ctx.ranks_per_node)
        if params["algo"] == "oneshot" and nbytes > one:
            params = _twoshot_plan(nbytes, ctx.nodes, ctx.world_size, elems, shard)
        if (params["algo"] == "twoshot" and params["proto"] == "lamport"
                and (nbytes <= _LAMPORT2_MIN or not _lamport2_fits(nbytes, ctx))):
            params = _twoshot_plan(nbytes, ctx.nodes, ctx.world_size, elems, shard)
        if params["algo"] == "twoshot" and params["proto"] == "ll" and nbytes > ll:
            params["proto"] = "signal"
        if ctx.nodes == 1:
            params.pop("inter")
        return params

    def __init__(self, ctx: GroupContext) -> None:
        super().__init__(ctx)
        import torch
        import torch.distributed as dist
        from nvshmem import bindings

        from artune.kernels.nvrar import NvrarComm, init_buffer
        from artune.kernels.nvrar_layout import Layout, Nodes

        _nvshmem.ensure_initialized(ctx)
        one, ll = _caps(ctx)
        self.nodes = Nodes(ctx.nodes, ctx.ranks_per_node)
        ahead = bool(envs.get("ARTUNE_NVRAR_CLEAR_AHEAD"))
        # Every rank must lay out its buffer and pack its words the same way (the settings come
        # from each process's environment), and agree before the collective allocation: ranks
        # asking NVSHMEM for different sizes would not fail cleanly.
        mine = {"ARTUNE_NVRAR_ONESHOT_MAX_BYTES": one, "ARTUNE_NVRAR_LL_MAX_BYTES": ll,
                "ARTUNE_NVRAR_CLEAR_AHEAD": ahead}
        seen: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(seen, mine, group=ctx.cpu_group)
        differ = sorted({k for s in seen for k in mine if s[k] != mine[k]})
        if differ:
            raise BackendUnavailable(
                f"{self.name}: the ranks disagree on {', '.join(differ)} (per rank: "
                f"{[[s[k] for k in differ] for s in seen]}); set them alike on every rank"
            )
        self.layout = Layout(self.nodes, ctx.max_bytes, one, ll, 3 if ahead else 2)
        self.buf: torch.Tensor | None = _nvshmem.alloc((self.layout.total_bytes,), torch.uint8)
        init_buffer(self.buf, self.layout)  # no valid epoch anywhere; lamport slots empty
        torch.cuda.synchronize(ctx.device)
        dist.barrier(group=ctx.cpu_group)  # from here peers may write into this buffer
        bases = [int(bindings.ptr(self.buf.data_ptr(), pe)) for pe in range(ctx.world_size)]
        try:
            self.comm: NvrarComm | None = NvrarComm(
                ctx.rank, self.nodes, self.layout, self.buf, bases, ctx.device,
                timeout_s=float(envs.get("ARTUNE_TIMEOUT_S")),
                barrier=lambda: dist.barrier(group=ctx.cpu_group),
            )
        except ValueError as exc:
            _nvshmem.free(self.buf)
            raise BackendUnavailable(f"{self.name}: {exc}") from exc
        self._plans: dict[tuple[int, int, tuple[tuple[str, Any], ...]], Plan] = {}

    def plan(self, nbytes: int, params: Params | None = None, elem_size: int = 2) -> Plan:
        """The full plan for a message of ``nbytes`` (``elem_size``-byte elements): the
        defaults, overridden by ``params``."""
        key = (nbytes, elem_size, tuple(sorted(params.items())) if params else ())
        plan = self._plans.get(key)
        if plan is None:
            from artune.kernels.nvrar import Plan

            merged = {**self.default_params_for(nbytes, self.ctx, elem_size),
                      **(params or {})}
            unknown = set(merged) - set(Plan.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown parameters {sorted(unknown)}; known: "
                    f"{sorted(Plan.__dataclass_fields__)}"
                )
            plan = Plan(**merged)
            if len(self._plans) < 4096:
                self._plans[key] = plan
        return plan

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        import torch

        if self.comm is None or not x.is_cuda or x.device != self.ctx.device:
            return False
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not x.is_contiguous():
            return False
        nbytes = x.numel() * x.element_size()
        try:
            plan = self.plan(nbytes, params, x.element_size())
        except (TypeError, ValueError):
            return False
        return self.comm.reason(nbytes, plan) is None

    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        comm = self.comm
        if comm is None:
            raise RuntimeError(f"{self.name}: all_reduce after close(); build a new backend")
        comm.check()
        size = x.element_size()
        return comm.all_reduce(x, self.plan(x.numel() * size, params, size))

    def prepare(self, messages: Sequence[tuple[str, int, Params]]) -> int:
        """Compile every kernel variant these messages would use, each once per node: the
        node's ranks split the distinct variants and compile their share into Triton's on-disk
        cache in parallel; each variant's first launch then loads it from there. Collective;
        returns this rank's count."""
        import torch

        comm = self.comm
        if comm is None:  # closed (close() is collective): still meet the others
            import torch.distributed as dist

            dist.barrier(group=self.ctx.cpu_group)
            return 0
        specs = []
        try:
            dummies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for dtype, nbytes, params in messages:
                if dtype not in dummies:
                    t = torch.empty(16, dtype=getattr(torch, dtype), device=self.ctx.device)
                    dummies[dtype] = (t, torch.empty_like(t))
                x, y = dummies[dtype]
                try:
                    plan = self.plan(nbytes, params, x.element_size())
                except (TypeError, ValueError):
                    continue
                if comm.reason(nbytes, plan) is None:
                    # Only the kernel variant matters: the element count is not specialised.
                    specs.append(comm.spec(x, y, plan))
        except Exception as exc:  # noqa: BLE001 - precompile's barrier must still be reached
            logger.warning("%s: rank %d cannot list kernels to precompile (%s); they compile "
                           "on first use", self.name, self.ctx.rank, exc)
            specs = []
        local = self.ctx.rank % self.ctx.ranks_per_node
        return comm.precompile(specs, (local, self.ctx.ranks_per_node))

    def check(self) -> None:
        """Raise ``NvrarTimeoutError`` if an earlier call on this rank timed out (no sync)."""
        if self.comm is not None:
            self.comm.check()

    def failure(self) -> str | None:
        """The timeout message when a wait of an earlier call ran out (host-mapped word)."""
        comm = self.comm
        if comm is None or not comm.error_code():
            return None
        from artune.kernels.nvrar import decode_error

        return decode_error(comm.error_code(), comm.rank, comm.nodes, comm.timeout_s)

    def close(self) -> None:
        """Collective: frees the symmetric buffer, when every rank can. A timeout is recorded
        only on the rank that waited, so the ranks first agree (bounded, over the CPU group)
        whether any of them timed out; then none frees, and the buffer is left to
        ``_nvshmem.finalize``: a collective free could wait forever on a peer that skips it or
        never answers. If the agreement itself fails (a peer gone), the free is skipped too."""
        comm, buf = self.comm, self.buf
        self.comm = None
        self.buf = None
        if buf is not None:
            # (A wait still running that will time out is seen by the free's device
            # synchronisation instead; the free then meets peers that all entered it.)
            try:
                failed = bool(comm is not None and comm.error_code())
                views = agree.gather(self.ctx.cpu_group, failed, f"{self.name} close")
                timed_out = [r for r, v in enumerate(views) if v]
            except Exception as exc:  # noqa: BLE001 - never hang or raise in close
                logger.warning("%s: rank %d: the ranks could not agree on freeing the NVSHMEM "
                               "buffer (%s); not freeing it", self.name, self.ctx.rank, exc)
            else:
                if timed_out:
                    logger.warning(
                        "%s: rank %d: rank(s) %s timed out earlier; not freeing the NVSHMEM "
                        "buffer collectively", self.name, self.ctx.rank,
                        ", ".join(map(str, timed_out)))
                else:
                    _nvshmem.free(buf)
        super().close()
