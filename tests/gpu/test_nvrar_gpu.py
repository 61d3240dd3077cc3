"""GPU tests of the NVRAR backend (artune/backends/nvrar.py, artune/kernels/nvrar*.py).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python -m pytest -q -s tests/gpu/test_nvrar_gpu.py

One spawned process per GPU (tests/gpu/_dist.py). Checked against ``dist.all_reduce`` of the
inputs in fp32 (NCCL), with identical bits on every rank:

- one node, 2/3/4 ranks: 1 element to 64 MB (odd counts included), bf16/fp16/fp32, every
  algorithm/protocol that takes the size plus the defaults, eagerly and under CUDA-graph replay
  (several sizes and dtypes captured in one graph, replayed with new inputs);
- virtual nodes on one host (emulation of the inter-node path): 4 GPUs as 2 nodes x 2 and 3 GPUs
  as 3 nodes x 1 (non-power-of-two fold), inter-node steps through NVSHMEM puts and through
  peer stores;
- torch.compile(fullgraph=True) of a function calling ``torch.ops.artune.nvrar_all_reduce``,
  eagerly and captured in a CUDA graph;
- lamport kernels whose first use is inside a CUDA-graph capture (odd element counts);
- a soak of 100,000 consecutive all-reduces in graph replays;
- the all-reduce fused with the residual add and RMSNorm (``NvrarComm.fused_add_rmsnorm``),
  eagerly and in a graph between plain lamport calls;
- a row-parallel linear layer and its all-reduce in one kernel (``linear_all_reduce``),
  eagerly and in a skewed graph between plain lamport calls; and as the SGLang plugin runs it
  under torch.compile (``torch.ops.artune.sglang_row_linear``), eagerly and captured;
- the 16-byte lamport kernels (ARTUNE_NVRAR_WIDE) on every other rank, the 8-byte ones on the
  rest, eagerly, in a graph and in a skewed graph;
- a forced timeout: one rank skips the call, the others raise NvrarTimeoutError naming the rank,
  the peer and the step within the configured bound, and every process still shuts down.
Without the GPUs (or nvshmem4py) every test skips with the reason.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any

import pytest
import torch
from conftest import requires_nvshmem

from ._dist import run_on_gpus

MAX_BYTES = 64 << 20
DTYPES = ("bfloat16", "float16", "float32")
# per rounding of a partial sum to a 16-bit dtype (half an ulp); fp32 in _check_one
_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
# (bytes, odd element offset) -> numel = max(1, bytes // element size - offset)
SIZES = (
    (2, 0), (4, 0), (6, 0), (34, 0), (510, 0), (2_000, 0), (4_096, 1), (8_194, 0),
    (65_536, 3), (131_074, 0), (262_144, 5), (1 << 20, 3), (2 << 20, 0), (8 << 20, 7),
    (MAX_BYTES - 64, 3), (MAX_BYTES, 0),
)
_TIMEOUT_S = 280.0


def _numel(nbytes: int, off: int, dtype: torch.dtype) -> int:
    return max(1, nbytes // torch.empty(0, dtype=dtype).element_size() - off)


def _make(ctx: Any, per_node: int, timeout_s: float = 60.0) -> Any:
    """The NVRAR backend on ``ctx`` grouped in nodes of ``per_node`` ranks."""
    os.environ["ARTUNE_TIMEOUT_S"] = str(timeout_s)  # the compile barrier keeps ranks close
    from artune.backends.nvrar import NvrarBackend

    return NvrarBackend.create(replace(ctx, ranks_per_node=per_node, max_bytes=MAX_BYTES))


def _plans(be: Any, nbytes: int, dtype: torch.dtype) -> list[dict[str, Any] | None]:
    """The defaults (None) plus every algorithm/protocol that takes ``nbytes`` on ``be``.
    Virtual nodes: inter-node stores (p2p) for every dtype, NVSHMEM puts for bf16 (each
    NVSHMEM-linked variant takes seconds to compile)."""
    out: list[dict[str, Any] | None] = [None]
    if be.ctx.nodes == 1:
        cands: list[dict[str, Any]] = [  # the defaults' common blocks/warps: fewer compiles
            {"algo": "oneshot", "proto": "ll", "block": 256, "ctas": 32, "warps": 2},
            {"algo": "twoshot", "proto": "ll", "block": 512, "ctas": 32, "warps": 4},
            {"algo": "twoshot", "proto": "signal", "block": 2048, "ctas": 32, "warps": 4},
        ]
        if dtype != torch.float32:  # the data-as-flag kernels take 16-bit dtypes only
            cands.append({"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 32,
                          "warps": 4})
            cands.append({"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 32,
                          "warps": 4})
    else:
        inters = ("nvshmem", "p2p") if dtype == torch.bfloat16 else ("p2p",)
        cands = [
            {"algo": "twoshot", "proto": p, "block": 512, "ctas": 16, "warps": 4, "inter": i}
            for p in ("ll", "signal") for i in inters
        ]
    for c in cands:
        if be.layout.check_message(nbytes, c["algo"], c["proto"]) is None:
            out.append(c)
    return out


def _check_one(be: Any, x: torch.Tensor, y: torch.Tensor, what: str,
               plus: float = 0.0) -> str | None:
    """None when ``y`` is the sum of every rank's ``x`` (fp32 reference) ``+ plus`` with
    identical bits on every rank; else what is wrong (the same verdict on every rank)."""
    import torch.distributed as dist

    # a copy: for fp32 x, x.float() is x itself, and the in-place all_reduce below used to
    # overwrite x with the sum, so that the scale became W * |sum| instead of sum |x_i|
    ref = x.to(torch.float32, copy=True)
    dist.all_reduce(ref, group=be.ctx.group)
    ref += plus
    scale = x.to(torch.float32, copy=True).abs()
    dist.all_reduce(scale, group=be.ctx.group)
    mag = scale + abs(plus)
    if x.dtype == torch.float32:
        # NVRAR and NCCL both sum in fp32, in different orders: each result is within
        # (W - 1) ulps (2^-24 relative) of sum |x_i| of the exact sum (+1 rounding for plus)
        tol = 2 * (be.ctx.world_size + 1) * 2.0**-24 * mag
    else:
        # one rounding to the dtype per partial sum that crosses the wire (2 + inter-node
        # steps), 1 ulp each, twice for margin
        rounds = 2 + be.nodes.steps
        tol = 2 * rounds * _EPS[str(x.dtype).removeprefix("torch.")] * mag
    err = (y.float() - ref).abs()
    # written as "not within" so that NaN counts as off
    bad = int((~(err <= tol + 1e-30)).sum().item())
    # NCCL has no int16: widen the 16-bit patterns (a one-to-one map, so bit equality holds)
    bits = y.view(torch.int16).to(torch.int32) if y.element_size() == 2 else y.view(torch.int32)
    bits = bits.clone()
    first = bits.clone()
    dist.broadcast(first, src=dist.get_global_rank(be.ctx.group, 0), group=be.ctx.group)
    differ = int((bits != first).sum().item())
    flags = torch.tensor([bad, differ], device=x.device)
    dist.all_reduce(flags, group=be.ctx.group)
    if flags.sum().item() == 0:
        return None
    return (f"{what}: {flags[0].item()} elements off the fp32 sum (max err "
            f"{err.max().item():.3g}), {flags[1].item()} elements differ from rank 0's bits")


def _call(be: Any, x: torch.Tensor, params: dict[str, Any] | None) -> tuple[Any, str | None]:
    """One synchronised call on every rank: (y, None), or (None, what went wrong on which ranks)
    -- the same verdict on every rank, so the collectives of the checks stay in step."""
    import torch.distributed as dist

    try:
        y = be.all_reduce(x, params)
        torch.cuda.synchronize()
        be.check()
        err = None
    except Exception as exc:  # noqa: BLE001 - reported as a failure of this case
        y, err = None, f"{type(exc).__name__}: {exc}"[:400]
    errs: list[Any] = [None] * be.ctx.world_size
    dist.all_gather_object(errs, err, group=be.ctx.cpu_group)
    bad = [f"rank {r}: {e}" for r, e in enumerate(errs) if e is not None]
    return (y, None) if not bad else (None, "; ".join(bad))


def _note(be: Any, failures: list[str], msg: str) -> None:
    """Record a failure; rank 0 prints it at once (a GPU session cut short keeps the details)."""
    failures.append(msg)
    if be.ctx.rank == 0:
        print(f"\n[nvrar GPU test] FAILURE: {msg}", file=sys.stderr, flush=True)


def _sweep(ctx: Any, per_node: int, dtypes: tuple[str, ...], sizes: tuple[tuple[int, int], ...],
           graph: bool) -> list[str]:
    """Eager (and graph) checks of every plan at every size; the list of failures."""
    be = _make(ctx, per_node)
    failures: list[str] = []
    gen = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.rank)
    try:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            for nbytes, off in sizes:
                n = _numel(nbytes, off, dtype)
                for params in _plans(be, n * torch.empty(0, dtype=dtype).element_size(), dtype):
                    x = torch.randn(n, generator=gen, device=ctx.device).to(dtype)
                    x0 = x.clone()
                    what = f"eager n={n} {dname} {params or 'defaults'}"
                    y, err = _call(be, x, params)
                    if err is not None:
                        _note(be, failures, f"{what}: {err}")
                        if "NvrarTimeoutError" in err:
                            return failures  # poisoned: every later call would fail too
                        continue
                    if not torch.equal(x, x0):
                        _note(be, failures, f"{what}: x was modified")
                    bad = _check_one(be, x, y, what)
                    if bad:
                        _note(be, failures, bad)
        if graph:
            for bad in _graph_check(be, dtypes):
                _note(be, failures, bad)
    finally:
        be.close()
    return failures


def _graph_check(be: Any, dtypes: tuple[str, ...]) -> list[str]:
    """Several sizes/dtypes captured in one graph (defaults), replayed 3x with new inputs.
    1 << 20 elements (2 MiB in 16-bit) takes the two-shot lamport by default on 4 ranks, and
    so does 3 << 17 (768 KiB); on 2 ranks 768 KiB takes the one-shot (31st session) and 2 MiB
    the signal two-shot, so the 768 KiB shapes are also captured with the two-shot lamport
    asked for (wherever it runs): its launch is what ARTUNE_NVRAR_TWOSHOT_PDL sets."""
    failures: list[str] = []
    dev = be.ctx.device
    lamport2 = {"algo": "twoshot", "proto": "lamport", "block": 1024}
    calls: list[tuple[torch.Tensor, dict[str, Any] | None]] = []
    for d in dtypes:
        for n in (1, 2049, 65537, 3 << 17, 1 << 20):
            calls.append((torch.randn(n, device=dev).to(getattr(torch, d)), None))
            if n == 3 << 17 and be.supports(calls[-1][0], lamport2):
                calls.append((torch.randn(n, device=dev).to(getattr(torch, d)), lamport2))
    for x, params in calls:  # warm up (compile) every plan eagerly, as real callers do
        be.all_reduce(x, params)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with be.capture(), torch.cuda.graph(graph):
        ys = [be.all_reduce(x, params) for x, params in calls]
    for rep in range(3):
        for x, _ in calls:
            x.copy_(torch.randn(x.numel(), device=dev).to(x.dtype))
        graph.replay()
        for (x, params), y in zip(calls, ys, strict=True):
            bad = _check_one(be, x, y, f"graph replay {rep} n={x.numel()} {x.dtype} "
                                       f"{params or 'defaults'}")
            if bad:
                failures.append(bad)
    return failures


def _one_node(ctx: Any) -> list[str]:
    # every size on 4 ranks; on 2 and 3 every other size (1 element, odd counts, 64 MB kept)
    sizes = SIZES if ctx.world_size == 4 else SIZES[::2] + (SIZES[-1],)
    failures = _sweep(ctx, ctx.world_size, DTYPES, sizes, graph=True)
    if ctx.world_size == 3:  # three virtual nodes of one GPU: the fold-in/out path
        failures += [f"3x1: {f}" for f in _sweep(ctx, 1, DTYPES, SIZES[::3], graph=False)]
    return failures


def _expect_clean(world: int, fn: Any, *args: Any, timeout_s: float = _TIMEOUT_S) -> None:
    """Run ``fn(ctx, *args)`` (it returns a list of failures) on ``world`` GPUs; fail with the
    first failures any rank reports."""
    failures = run_on_gpus(world, fn, *args, max_bytes=MAX_BYTES, timeout_s=timeout_s)
    assert all(f == [] for f in failures), "\n".join(sum(failures, [])[:20])


def _run_sweep(world: int) -> None:
    _expect_clean(world, _one_node)


# One test per world size, most informative first (a GPU session may be cut short).
@requires_nvshmem(4)
@pytest.mark.gpu
def test_sweep_4_ranks() -> None:
    _run_sweep(4)


def _pdl_off_sweep(ctx: Any) -> list[str]:
    """PDL is on by default (sm_90+); with ARTUNE_NVRAR_PDL=0, every plan, eager and in a
    graph, gives the same results as the default sweeps."""
    os.environ.pop("ARTUNE_NVRAR_PDL", None)
    probe = _make(ctx, ctx.world_size)
    on_by_default = probe.comm.pdl
    probe.close()
    if not on_by_default:
        return ["PDL is off by default on a sm_90+ GPU"]
    os.environ["ARTUNE_NVRAR_PDL"] = "0"
    try:
        probe = _make(ctx, ctx.world_size)
        on = probe.comm.pdl
        probe.close()
        if on:
            return ["ARTUNE_NVRAR_PDL=0 did not turn PDL off"]
        return _sweep(ctx, ctx.world_size, ("bfloat16", "float32"), SIZES[::2] + (SIZES[-1],),
                      graph=True)
    finally:
        os.environ.pop("ARTUNE_NVRAR_PDL", None)


@requires_nvshmem(4)
@pytest.mark.gpu
def test_sweep_4_ranks_without_pdl() -> None:
    if torch.cuda.get_device_capability(0) < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    _expect_clean(4, _pdl_off_sweep)


def _virtual_nodes(ctx: Any) -> list[str]:
    return _sweep(ctx, 2, DTYPES, SIZES[::2] + (SIZES[-1],), graph=True)


def _compile_and_soak(ctx: Any, calls: int) -> dict[str, Any]:
    from artune.integration.nvrar_op import register_nvrar

    be = _make(ctx, ctx.world_size)
    register_nvrar("nvrar-test", be)
    out: dict[str, Any] = {"failures": []}
    dev = ctx.device
    try:
        # torch.compile(fullgraph=True), eagerly and inside a captured graph
        @torch.compile(fullgraph=True)
        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.artune.nvrar_all_reduce(x * 2, "nvrar-test") + 1

        x = torch.randn(3000, device=dev)
        for _ in range(2):
            y = f(x)
        bad = _check_one(be, x * 2, y, "torch.compile eager", plus=1.0)
        if bad:
            out["failures"].append(bad)
        g = torch.cuda.CUDAGraph()
        with be.capture(), torch.cuda.graph(g):
            yg = f(x)
        x.copy_(torch.randn(3000, device=dev))
        g.replay()
        bad = _check_one(be, x * 2, yg, "torch.compile in a CUDA graph", plus=1.0)
        if bad:
            out["failures"].append(bad)

        # soak: `calls` all-reduces in graph replays (100 per graph), mixed sizes and algorithms
        xs = [torch.randn(n, device=dev).to(torch.bfloat16) for n in (2048, 32768, 524288, 1000)]
        for xi in xs:
            be.all_reduce(xi)
        torch.cuda.synchronize()
        g2 = torch.cuda.CUDAGraph()
        with be.capture(), torch.cuda.graph(g2):
            ys = [be.all_reduce(xs[i % len(xs)]) for i in range(100)]
        t0 = time.perf_counter()
        for _ in range(calls // 100):
            g2.replay()
        torch.cuda.synchronize()
        out["soak_s"] = time.perf_counter() - t0
        out["soak_calls"] = calls // 100 * 100
        be.check()
        for i in range(len(xs)):
            bad = _check_one(be, xs[i], ys[i], f"soak n={xs[i].numel()}")
            if bad:
                out["failures"].append(bad)
        same = all(torch.equal(ys[i], ys[i + len(xs)]) for i in range(len(xs)))
        if not same:
            out["failures"].append("soak: repeated calls on the same input differ")
    finally:
        be.close()
    return out


@requires_nvshmem(2)
@pytest.mark.gpu
def test_compile_and_soak() -> None:
    world = min(4, torch.cuda.device_count())
    res = run_on_gpus(world, _compile_and_soak, 100_000, max_bytes=MAX_BYTES,
                      timeout_s=_TIMEOUT_S)
    assert res[0]["failures"] == [], "\n".join(res[0]["failures"])
    assert res[0]["soak_calls"] >= 100_000
    print(f"\nsoak: {res[0]['soak_calls']} all-reduces on {world} GPUs in "
          f"{res[0]['soak_s']:.2f} s")


def _timeout(ctx: Any, bound_s: float, dtype: str) -> dict[str, Any]:
    from artune.kernels.nvrar import NvrarTimeoutError

    dtype, _, wide = dtype.partition("-")  # "bfloat16-wide": the 16-byte lamport one-shot
    os.environ["ARTUNE_NVRAR_WIDE"] = "1" if wide else "0"
    be = _make(ctx, ctx.world_size, timeout_s=bound_s)
    assert be.comm.wide == bool(wide)
    x = torch.randn(4096, device=ctx.device).to(getattr(torch, dtype))
    be.all_reduce(x)  # one good call first (compiles; all ranks in step)
    torch.cuda.synchronize()
    out: dict[str, Any] = {}
    if ctx.rank != ctx.world_size - 1:  # the last rank skips the next call
        t0 = time.perf_counter()
        be.all_reduce(x)
        torch.cuda.synchronize()
        out["elapsed_s"] = time.perf_counter() - t0
        try:
            be.check()
            out["error"] = None
        except NvrarTimeoutError as exc:
            out["error"] = str(exc)
        try:
            be.all_reduce(x)
            out["second"] = None
        except NvrarTimeoutError as exc:
            out["second"] = str(exc)
    be.close()
    return out


@requires_nvshmem(2)
@pytest.mark.gpu
# LL one-shot, lamport one-shot, its 16-byte kernel (ARTUNE_NVRAR_WIDE)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16-wide"])
def test_skipped_call_times_out_with_a_named_error(dtype: str) -> None:
    bound = 1.0
    world = min(3, torch.cuda.device_count())
    res = run_on_gpus(world, _timeout, bound, dtype, max_bytes=MAX_BYTES, timeout_s=120)
    last = world - 1
    for rank in range(last):
        r = res[rank]
        assert r["error"] is not None, f"rank {rank}: no error after the peer skipped the call"
        assert f"rank {rank} waited {bound:g} s for rank {last}" in r["error"], r["error"]
        assert "one-shot exchange" in r["error"]
        assert r["elapsed_s"] < bound + 2.0, r["elapsed_s"]
        assert r["second"] is not None  # poisoned: every later call raises too


#: Lamport one-shots and two-shots of different sizes and grids back to back (elements, plan).
_SKEW_SEQ: list[tuple[int, dict[str, Any]]] = [
    (4096, {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 2}),
    (131072, {"algo": "twoshot", "proto": "lamport", "block": 1024, "ctas": 8}),
    (65536, {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 16}),
    (8192, {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 4}),
    (262144, {"algo": "twoshot", "proto": "lamport", "block": 1024, "ctas": 16}),
    (2048, {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 1}),
]


def _skewed(ctx: Any, ahead: str) -> list[str]:
    """The lamport sequence above captured in one graph, one rank held back before each call in
    turn (``torch.cuda._sleep``), replayed 200 times: the ranks drift a call apart, so a rank
    that clears or reuses slots a peer is still filling fails here, not in the eager sweep."""
    os.environ["ARTUNE_NVRAR_CLEAR_AHEAD"] = ahead
    # A short bound: the graph bakes it in, and a race this test finds may make waits run out
    # (each replay then waits the bound per call until it stops below).
    be = _make(ctx, ctx.world_size, timeout_s=10.0)
    assert be.comm.ahead == (ahead == "1")
    dev = ctx.device
    xs = [torch.randn(n, device=dev).to(torch.bfloat16) for n, _ in _SKEW_SEQ]
    for x, (_, p) in zip(xs, _SKEW_SEQ, strict=True):  # compile and meet, eagerly
        be.all_reduce(x, p)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    ys = []
    with be.capture(), torch.cuda.graph(graph):
        for i, (x, (_, p)) in enumerate(zip(xs, _SKEW_SEQ, strict=True)):
            if i % ctx.world_size == ctx.rank:
                torch.cuda._sleep(50_000)  # ~25-30 µs late to this call
            ys.append(be.all_reduce(x, p))
    for _ in range(200):
        graph.replay()
        torch.cuda.synchronize()
        if be.comm.error_code():  # a wait ran out: stop here (check() says which)
            break
    be.check()
    failures = [bad for x, y, (n, p) in zip(xs, ys, _SKEW_SEQ, strict=True)
                if (bad := _check_one(be, x, y, f"skewed graph, clear-ahead={ahead}, {n} "
                                                 f"elements {p}"))]
    be.close()
    return failures


@requires_nvshmem(2)
@pytest.mark.gpu
@pytest.mark.parametrize("ahead", ["0", "1"])
def test_skewed_lamport_sequence_in_a_graph(ahead: str) -> None:
    _expect_clean(min(4, torch.cuda.device_count()), _skewed, ahead, timeout_s=150.0)


#: Whole 16-byte pairs of 16-bit elements (the 16-byte lamport kernels take them), and one
#: count that is not (the 8-byte kernels then, on every rank).
WIDE_SIZES = ((16, 0), (2_000, 0), (8_192, 0), (8_194, 0), (65_536, 0), (131_088, 0),
              (262_144, 0), (524_288, 0), (1 << 20, 0), (2 << 20, 0))


def _wide_mixed(ctx: Any) -> list[str]:
    """ARTUNE_NVRAR_WIDE=1 on the even ranks only: the 16-byte lamport kernels there, the
    8-byte ones elsewhere (one wire layout, so the choice is each rank's own). Every plan at
    WIDE_SIZES in bf16 and fp16, eagerly, several sizes in a graph, then the skewed lamport
    sequence in a graph: right sums, identical bits on every rank."""
    wide = ctx.rank % 2 == 0
    os.environ["ARTUNE_NVRAR_WIDE"] = "1" if wide else "0"
    try:
        probe = _make(ctx, ctx.world_size)
        taken = probe.comm.wide
        probe.close()
        failures = [] if taken == wide else [f"rank {ctx.rank}: ARTUNE_NVRAR_WIDE not taken"]
        failures += _sweep(ctx, ctx.world_size, ("bfloat16", "float16"), WIDE_SIZES,
                           graph=True)
        return failures + _skewed(ctx, "0")
    finally:
        os.environ.pop("ARTUNE_NVRAR_WIDE", None)


@requires_nvshmem(2)
@pytest.mark.gpu
def test_wide_lamport_kernels_beside_the_8_byte_ones() -> None:
    _expect_clean(min(4, torch.cuda.device_count()), _wide_mixed)


def _first_use_in_capture(ctx: Any) -> list[str]:
    """Lamport kernels first used inside a CUDA-graph capture, with element counts that are
    not a multiple of 4 (the VEC=False variants; SGLang's sizes never need them, so a served
    model's precompile does not cover them): each compiles and meets its peers while the
    stream captures, then the replays must be right."""
    be = _make(ctx, ctx.world_size)
    failures: list[str] = []
    dev = ctx.device
    try:
        plans = [{"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 32, "warps": 4},
                 {"algo": "twoshot", "proto": "lamport", "block": 1024, "ctas": 32,
                  "warps": 4}]
        ns = (4099, 150_001)  # 8 KiB and 300 KiB of bf16, neither a multiple of 4
        xs = [torch.randn(n, device=dev).to(torch.bfloat16) for n in ns]
        graph = torch.cuda.CUDAGraph()
        error = ""
        try:
            with be.capture(), torch.cuda.graph(graph):
                ys = [be.all_reduce(x, p) for x, p in zip(xs, plans, strict=True)]
        except Exception as exc:  # noqa: BLE001 - reported as the test's failure
            error = f"capture with a first use failed on rank {ctx.rank}: {exc!r}"
        failed = torch.tensor([int(bool(error))], device=dev)  # every rank stops, or none
        torch.distributed.all_reduce(failed, group=ctx.group)
        if failed.item():
            return [error or f"rank {ctx.rank}: a peer's capture failed"]
        for rep in range(3):
            for x in xs:
                x.copy_(torch.randn(x.numel(), device=dev).to(x.dtype))
            graph.replay()
            for x, y, p in zip(xs, ys, plans, strict=True):
                bad = _check_one(be, x, y, f"first use in capture, replay {rep}, "
                                           f"n={x.numel()} {p['algo']}")
                if bad:
                    failures.append(bad)
        be.check()
    finally:
        be.close()
    return failures


@requires_nvshmem(2)
@pytest.mark.gpu
def test_lamport_first_used_inside_a_capture() -> None:
    _expect_clean(min(4, torch.cuda.device_count()), _first_use_in_capture, timeout_s=150.0)


def _fused(ctx: Any) -> list[str]:
    """``NvrarComm.fused_add_rmsnorm`` on every GPU: Llama's hidden size 4096 at decode row
    counts (1, 4, 16, 64), 2048, 3584 and 8192 at a few rows, the slices of fused_plan and
    others asked for, bf16 and fp16, eagerly and replayed in a CUDA graph between plain
    lamport calls, against NCCL's fp32 sum plus the residual, normed in fp32; identical bits
    on every rank."""
    import torch.distributed as dist

    be = _make(ctx, ctx.world_size)
    dev = ctx.device
    failures: list[str] = []
    eps = 1e-5

    def inputs(rows: int, hidden: int, dt: torch.dtype, seed: int) -> tuple[Any, ...]:
        g = torch.Generator(device=dev).manual_seed(seed)  # the residual and weight: same on all
        res = torch.randn(rows, hidden, device=dev, generator=g).to(dt)
        w = (1 + 0.25 * torch.randn(hidden, device=dev, generator=g)).to(dt)
        mine = torch.Generator(device=dev).manual_seed(31 * seed + ctx.rank + 1)
        x = torch.randn(rows, hidden, device=dev, generator=mine).to(dt)
        return x, res, w

    def check(x0: Any, res0: Any, w: Any, x: Any, res: Any, what: str) -> None:
        s = x0.float()
        dist.all_reduce(s, group=ctx.group)
        h = s.to(x0.dtype).float() + res0.float()
        want = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        ulp = _EPS[str(x0.dtype).removeprefix("torch.")] * 2
        tol_h = 2 * ulp * (s.abs() + res0.abs()) + 1e-6
        err = []
        if not ((res.float() - h).abs() <= tol_h).all():
            err.append(f"residual off by up to {(res.float() - h).abs().max().item():.3g}")
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        tol_o = tol_h * rstd * w.float().abs() + 2 * ulp * want.abs() + 1e-5
        if not ((x.float() - want).abs() <= tol_o).all():
            err.append(f"output off by up to {(x.float() - want).abs().max().item():.3g}")
        digest = torch.tensor([int(x.view(torch.int16).long().sum()),
                               int(res.view(torch.int16).long().sum())], device=dev)
        low, high = digest.clone(), digest.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=ctx.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=ctx.group)
        if not torch.equal(low, high):
            err.append("ranks disagree bitwise")
        failures.extend(f"rank {ctx.rank}, fused {what}: {e}" for e in err)

    try:
        # fused_plan's cut: 8 slices of 512 up to 8 rows (7 at 3584, 16 at 8192), whole rows
        # from 16; or as asked: whole rows, rows sharing CTAs (ctas=2), 4 slices of 1024, 8 of
        # 512 at 16 rows (128 CTAs), 2 of 2048 at 64 rows
        cases: list[tuple[int, int, Any, dict[str, Any]]] = [
            (r, 4096, dt, {}) for r in (1, 4, 16, 64) for dt in (torch.bfloat16, torch.float16)]
        cases += [(3, 2048, torch.bfloat16, {}), (3, 3584, torch.bfloat16, {}),
                  (2, 8192, torch.float16, {}), (4, 4096, torch.bfloat16, {"block": 4096}),
                  (5, 4096, torch.bfloat16, {"block": 4096, "ctas": 2}),
                  (4, 4096, torch.bfloat16, {"block": 1024}),
                  (16, 4096, torch.bfloat16, {"block": 512}),
                  (64, 4096, torch.float16, {"block": 2048})]
        for i, (rows, hidden, dt, kw) in enumerate(cases):  # eagerly (compiles and meets)
            x, res, w = inputs(rows, hidden, dt, 100 + i)
            x0, res0 = x.clone(), res.clone()
            be.comm.fused_add_rmsnorm(x, res, w, eps, **kw)
            check(x0, res0, w, x, res, f"eager {rows}x{hidden} {dt} {kw}")
        # the custom op, from a function compiled with fullgraph=True
        from artune.integration.nvrar_op import register_nvrar, unregister_nvrar

        register_nvrar("fused-gpu-test", be)
        try:
            def step(x: Any, res: Any, w: Any) -> Any:
                torch.ops.artune.nvrar_fused_add_rmsnorm(x, res, w, eps, "fused-gpu-test")
                return x * 1

            compiled = torch.compile(step, fullgraph=True)
            x, res, w = inputs(4, 4096, torch.bfloat16, 150)
            x0, res0 = x.clone(), res.clone()
            out = compiled(x, res, w)
            check(x0, res0, w, x, res, "torch.compile'd op, 4x4096")
            if not torch.equal(out, x):
                failures.append(f"rank {ctx.rank}: the compiled op's x is not the output")
        finally:
            unregister_nvrar("fused-gpu-test")
        # in one graph, with a plain lamport call between the fused ones (both parities)
        plain = {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 32, "warps": 4}
        ins = [inputs(rows, 4096, torch.bfloat16, 200 + rows) for rows in (1, 16, 64)]
        z = torch.randn(5000, device=dev).to(torch.bfloat16)
        be.all_reduce(z, plain)
        graph = torch.cuda.CUDAGraph()
        with be.capture(), torch.cuda.graph(graph):
            for x, res, w in ins:
                be.comm.fused_add_rmsnorm(x, res, w, eps)
                zy = be.all_reduce(z, plain)
        for rep in range(3):
            saved = []
            for j, (x, res, _) in enumerate(ins):
                mine = torch.Generator(device=dev).manual_seed(1000 * rep + 10 * j + ctx.rank)
                x.copy_(torch.randn(x.shape, device=dev, generator=mine).to(x.dtype))
                g = torch.Generator(device=dev).manual_seed(300 + 10 * rep + j)
                res.copy_(torch.randn(res.shape, device=dev, generator=g).to(res.dtype))
                saved.append((x.clone(), res.clone()))
            graph.replay()
            torch.cuda.synchronize()
            for (x, res, w), (x0, res0) in zip(ins, saved, strict=True):
                check(x0, res0, w, x, res, f"graph replay {rep}, {x.shape[0]} rows")
            bad = _check_one(be, z, zy, f"plain lamport between fused calls, replay {rep}")
            if bad:
                failures.append(bad)
        be.check()
    finally:
        be.close()
    return failures


@requires_nvshmem(2)
@pytest.mark.gpu
def test_fused_add_rmsnorm() -> None:
    _expect_clean(min(4, torch.cuda.device_count()), _fused, timeout_s=200.0)


def _check_linear_sum(ctx: Any, y: torch.Tensor, mine: torch.Tensor, rel: float, what: str,
                      failures: list[str]) -> None:
    """``y`` (16-bit) against NCCL's fp32 sum over the group of each rank's ``mine``, within
    ``rel`` of its largest magnitude, and with the same bytes on every rank (a digest of them
    compared); a failure is appended to ``failures``, named ``what``."""
    import hashlib

    import torch.distributed as dist

    want = mine.clone()
    dist.all_reduce(want, group=ctx.group)
    off = (y.float() - want).abs().max().item()
    err = None if off <= rel * max(1.0, want.abs().max().item()) else f"off by {off:.3g}"
    digest = hashlib.sha1(y.contiguous().view(torch.int16).cpu().numpy().tobytes()).hexdigest()
    got: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(got, (digest, err), group=ctx.cpu_group)
    errs = [f"rank {r}: {e}" for r, (_, e) in enumerate(got) if e]
    if errs or len({d for d, _ in got}) != 1:
        failures.append(f"{what}: {errs[0] if errs else 'ranks disagree bitwise'}")


def _linear(ctx: Any) -> list[str]:
    """``NvrarComm.linear_all_reduce`` on every GPU: Llama-3.1-8B's row-parallel shapes at
    TP=4 (K 1024 and 3584, N 4096) and others (N 2048 in 16 columns a CTA; K 1000, N 96),
    1 to 64 rows, bf16 and fp16, the default tile and others, eagerly and replayed in a CUDA
    graph between plain lamport calls with one rank held back before each call in turn,
    against NCCL's fp32 sum of x @ weight.T; identical bits on every rank. Half the cases
    prefetch their weight into L2 first (``prefetch=1``; K 1000: rows that end mid-line), and
    the K loop runs 2 to 5 stages deep (4 at 48 rows: a 64-row tile, a buffer per stage)."""

    be = _make(ctx, ctx.world_size, timeout_s=20.0)
    dev = ctx.device
    failures: list[str] = []
    bf, fp = torch.bfloat16, torch.float16
    cases = [(1, 1024, 4096, bf, 32, 256, 0, 3), (4, 3584, 4096, bf, 32, 256, 1, 4),
             (16, 1024, 2048, fp, 16, 256, 0, 3), (64, 3584, 4096, bf, 64, 128, 1, 2),
             (3, 1000, 96, bf, 16, 64, 1, 4), (2, 3584, 4096, bf, 32, 512, 0, 3),
             (1, 3584, 4096, bf, 32, 256, 1, 5), (48, 3584, 4096, bf, 32, 256, 0, 4)]

    def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str) -> None:
        _check_linear_sum(ctx, y, x.float() @ w.float().t(), 2e-2, what, failures)

    try:
        ops = []
        for i, (m, k, n, dt, bn, bk, pf, st) in enumerate(cases):
            g = torch.Generator(device=dev).manual_seed(100 * i + ctx.rank)
            x = torch.randn(m, k, device=dev, generator=g).to(dt)
            w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(dt)
            ops.append((x, w, bn, bk, pf, st))
            check(be.comm.linear_all_reduce(x, w, block_n=bn, block_k=bk, stages=st,
                                            prefetch=pf), x, w,
                  f"eager {m}x{k}x{n} {dt} {bn}x{bk} stages={st} prefetch={pf}")
        plain = torch.randn(4099 * 2, device=dev).to(torch.bfloat16)
        lam = {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 16, "warps": 4}
        be.all_reduce(plain, lam)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        ys = []
        with be.capture(), torch.cuda.graph(graph):
            for i, (x, w, bn, bk, pf, st) in enumerate(ops):
                if i % ctx.world_size == ctx.rank:
                    torch.cuda._sleep(50_000)  # ~25-30 µs late to this call
                ys.append(be.comm.linear_all_reduce(x, w, block_n=bn, block_k=bk, stages=st,
                                                    prefetch=pf))
                ys.append(be.all_reduce(plain, lam))
        for rep in range(50):
            for x, *_ in ops:
                x.copy_(torch.randn(x.shape, device=dev).to(x.dtype))
            graph.replay()
            torch.cuda.synchronize()
            if be.comm.error_code():
                break
            if rep % 25 == 0:
                for (x, w, bn, bk, pf, st), y, c in zip(ops, ys[::2], cases, strict=True):
                    check(y, x, w, f"graph replay {rep} {c[0]}x{c[1]}x{c[2]} {bn}x{bk} "
                                   f"stages={st} prefetch={pf}")
        be.check()
    finally:
        be.close()
    return failures


@requires_nvshmem(2)
@pytest.mark.gpu
def test_linear_all_reduce() -> None:
    _expect_clean(min(4, torch.cuda.device_count()), _linear, timeout_s=200.0)


class UnquantizedLinearMethod:  # named as SGLang's: the plain bf16/fp16 GEMM
    pass


def _compiled_linear(ctx: Any) -> list[str]:
    """The SGLang plugin's fused linear layer under torch.compile (fullgraph, static shapes,
    inductor, as SGLang compiles): a RowParallelLinear stand-in whose forward goes through the
    plugin's hook, with NVRAR built on the group and ARTUNE_FUSED_LINEAR=1. Llama-3.1-8B's
    o_proj and down_proj at TP=4 (K 1024 / 3584, N 4096), bf16, 1 / 4 / 16 rows: the compiled
    function run eagerly (SGLang's warm-up: the GEMM and the TP all-reduce, here NCCL's, after
    one rank is held back 8 s, longer than NVRAR's bounded waits) and captured in a CUDA graph
    replayed with new inputs (the fused kernel, every captured call), against NCCL's fp32 sum
    of x @ weight.T, with identical bits on every rank."""
    import types

    import torch.distributed as dist

    from artune.integration import sglang as plugin
    from artune.integration import sglang_linear as hook

    os.environ["ARTUNE_FUSED_LINEAR"] = "1"
    os.environ["ARTUNE_FUSED_LINEAR_ROWS"] = "16"
    # one row fused too (by default a compiled one-row layer stays with inductor, which fuses
    # its GEMM with its neighbours: tests/test_sglang_plugin.py checks that rule)
    os.environ["ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED"] = "1"
    be = _make(ctx, ctx.world_size, timeout_s=20.0)
    plugin._ROUTES["tp"] = types.SimpleNamespace(
        router=types.SimpleNamespace(backends={"nvrar": be}), profile=None)
    plugin._TP_GROUP[:] = ["tp"]
    dev = ctx.device
    failures: list[str] = []
    fused_calls = [0]
    linear_all_reduce = be.comm.linear_all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        fused_calls[0] += 1
        return linear_all_reduce(*args, **kwargs)

    be.comm.linear_all_reduce = counted

    def tp_all_reduce(y: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(y, group=ctx.group)
        return y

    hook._LINEAR_MODULE[:] = [types.SimpleNamespace(  # SGLang's linear module, as the hook uses it
        tensor_model_parallel_all_reduce=tp_all_reduce, should_skip_mlp_all_reduce=lambda: False)]

    class Row(torch.nn.Module):
        def __init__(self, k: int, n: int, seed: int) -> None:
            super().__init__()
            g = torch.Generator(device=dev).manual_seed(seed)
            w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(torch.bfloat16)
            self.weight = torch.nn.Parameter(w, requires_grad=False)
            self.bias, self.reduce_results, self.tp_size = None, True, ctx.world_size
            self.input_is_parallel, self.skip_bias_add = True, False
            self.use_dp_attention_reduce = self.use_decode_attn_tp = False
            self.quant_method = UnquantizedLinearMethod()

        def sglang_forward(self, x: torch.Tensor, skip_all_reduce: bool = False) -> Any:
            y = x @ self.weight.t()
            dist.all_reduce(y, group=ctx.group)
            return y, None

        def forward(self, x: torch.Tensor) -> Any:
            return hook._around_row_linear(Row.sglang_forward, self, x)

    o_proj, down_proj = Row(1024, 4096, 1), Row(3584, 4096, 2)

    def block(h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return down_proj(torch.nn.functional.silu(a))[0] + o_proj(h)[0]

    def check(y: torch.Tensor, h: torch.Tensor, a: torch.Tensor, what: str) -> None:
        mine = torch.nn.functional.silu(a).float() @ down_proj.weight.float().t()
        mine += h.float() @ o_proj.weight.float().t()
        _check_linear_sum(ctx, y, mine, 3e-2, what, failures)

    try:
        f = torch.compile(block, fullgraph=True, dynamic=False)
        for rows in (1, 4, 16):
            g = torch.Generator(device=dev).manual_seed(10 * rows + ctx.rank)
            h = torch.randn(rows, 1024, device=dev, generator=g).to(torch.bfloat16)
            a = torch.randn(rows, 3584, device=dev, generator=g).to(torch.bfloat16)
            before = fused_calls[0]
            if rows == 1 and ctx.rank == 1:
                time.sleep(8.0)  # a rank that compiled slower
            y = f(h, a)  # traced, compiled, run outside a capture (SGLang's warm-up)
            check(y, h, a, f"compiled, eager, {rows} rows")
            if fused_calls[0] != before:
                failures.append(f"{rows} rows: the warm-up ran the fused kernel")
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with be.capture(), torch.cuda.graph(graph):
                yg = f(h, a)
            for rep in range(3):
                h.copy_(torch.randn(h.shape, device=dev).to(h.dtype))
                a.copy_(torch.randn(a.shape, device=dev).to(a.dtype))
                graph.replay()
                torch.cuda.synchronize()
                check(yg, h, a, f"compiled, graph replay {rep}, {rows} rows")
            if fused_calls[0] - before != 2:  # 2 layers, captured
                failures.append(f"{rows} rows: {fused_calls[0] - before} fused calls in the "
                                f"capture, not 2 (a layer ran its GEMM and all-reduce)")
        be.check()
    finally:
        plugin._ROUTES.pop("tp", None)
        plugin._TP_GROUP[:] = []
        hook._LINEAR_MODULE[:] = []
        for name in ("ARTUNE_FUSED_LINEAR", "ARTUNE_FUSED_LINEAR_ROWS",
                     "ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED"):
            os.environ.pop(name, None)
        be.close()
    return failures


@requires_nvshmem(2)
@pytest.mark.gpu
def test_fused_linear_layer_under_torch_compile() -> None:
    _expect_clean(min(4, torch.cuda.device_count()), _compiled_linear, timeout_s=240.0)


@requires_nvshmem(4)
@pytest.mark.gpu
def test_virtual_nodes_2x2() -> None:
    """Emulation: 4 GPUs of one host as 2 nodes x 2 (the inter-node path, NVSHMEM and p2p)."""
    _expect_clean(4, _virtual_nodes)


@requires_nvshmem(3)
@pytest.mark.gpu
def test_sweep_3_ranks_and_3_virtual_nodes() -> None:
    _run_sweep(3)


@requires_nvshmem(2)
@pytest.mark.gpu
def test_sweep_2_ranks() -> None:
    _run_sweep(2)
