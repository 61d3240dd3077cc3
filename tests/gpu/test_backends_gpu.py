"""GPU tests of the all-reduce backends symm_one_shot, symm_two_shot and nvshmem_reduce.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python -m pytest -q -s tests/gpu/test_backends_gpu.py

For each world size the GPUs allow (2 and 4), one spawn of one process per GPU builds every
backend and checks it against the exact sum (float64 over all ranks' inputs, gathered with NCCL)
and against ``dist.all_reduce``: 2 B to 128 MB, odd sizes included, bf16/fp16/fp32, eagerly
(two calls back to back) and under CUDA-graph replay (three calls captured in one graph, replayed
twice with new inputs). It also checks that ``x`` is never mutated, that the output is a fresh
tensor, that ``supports`` says yes exactly where the backend's documented constraints allow, that
every rank gets identical bits where the backend promises them, and the lifecycle (oversized and
non-contiguous inputs refused, ``close`` safe twice). Without 2 GPUs every test skips with the
reason; the CPU tests at the bottom run everywhere.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import requires_gpus

from ._dist import run_on_gpus

BACKENDS = ("symm_one_shot", "symm_two_shot", "nvshmem_reduce")
DTYPES = ("bfloat16", "float16", "float32")
MODES = ("eager", "graph")
WORLD_SIZES = (2, 4)
MAX_BYTES = 128 << 20
# Message sizes in bytes (numel = max(1, nbytes // element_size)); odd element counts included.
SIZES = (
    2,
    4,
    6,
    16,
    100,
    1_000,
    4_096,
    12_290,
    65_536,
    262_144,
    1_048_582,
    4 << 20,
    16 << 20,
    MAX_BYTES,
)
_TIMEOUT_S = 120.0  # per world size; one spawn checks all backends


def _world_size_params() -> list[Any]:
    return [pytest.param(n, marks=requires_gpus(n), id=f"ws{n}") for n in WORLD_SIZES]


def expected_support(backend: str, dtype: torch.dtype, nbytes: int) -> bool:
    """What each backend documents it takes (its module docstring), independent of its code."""
    if nbytes > MAX_BYTES:
        return False
    if backend.startswith("symm_"):
        es = torch.empty(0, dtype=dtype).element_size()
        return dtype in (torch.bfloat16, torch.float32) and nbytes % max(4, es) == 0
    return dtype in (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------------
# What runs in each spawned rank
# --------------------------------------------------------------------------------------------


def _agree(ctx: Any, ok: bool) -> bool:
    """True when ``ok`` on every rank (gloo)."""
    import torch.distributed as dist

    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.cpu_group)
    return bool(t.item())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_outputs(
    ctx: Any, xs: list[torch.Tensor], clones: list[torch.Tensor], ys: list[torch.Tensor]
) -> dict[str, Any]:
    """Compare every ``ys[i]`` with the exact sum of ``xs[i]`` over ranks; rank-local verdicts,
    except ``identical`` which every rank computes from all ranks' outputs."""
    import torch.distributed as dist

    ws = ctx.world_size
    errors: list[str] = []
    worst, worst_nccl, identical = 0.0, 0.0, True
    for x, x0, y in zip(xs, clones, ys, strict=True):
        if not torch.equal(_bits(x), _bits(x0)):
            errors.append("x was mutated")
        if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
            errors.append(f"output is {y.dtype}{tuple(y.shape)}, input {x.dtype}{tuple(x.shape)}")
            continue
        if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            errors.append("output shares x's storage")
        flat = x.reshape(-1)
        gathered = torch.empty(ws * flat.numel(), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(gathered, flat, group=ctx.group)
        g64 = gathered.view(ws, -1).double()
        exact = g64.sum(0)
        eps = torch.finfo(x.dtype).eps
        bound = ws * eps * g64.abs().sum(0) + ws * torch.finfo(x.dtype).tiny
        worst = max(worst, float(((y.reshape(-1).double() - exact).abs() / bound).max()))
        ref = x.clone()
        dist.all_reduce(ref, group=ctx.group)
        worst_nccl = max(
            worst_nccl, float(((ref.reshape(-1).double() - exact).abs() / bound).max())
        )
        ybits = y.reshape(-1).contiguous().view(torch.uint8)  # NCCL has no int16
        all_y = torch.empty(ws * ybits.numel(), dtype=ybits.dtype, device=y.device)
        dist.all_gather_into_tensor(all_y, ybits, group=ctx.group)
        identical = identical and bool((all_y.view(ws, -1) == ybits).all())
    if worst > 1.0:
        errors.append(f"error {worst:.3g}x the rounding bound (ws*eps*sum|x|) of the exact sum")
    if worst_nccl > 1.0:
        errors.append(f"dist.all_reduce itself is {worst_nccl:.3g}x the bound (reference broken?)")
    return {"errors": errors, "err_ratio": worst, "nccl_ratio": worst_nccl, "identical": identical}


def _rand(
    numel: int, dtype: torch.dtype, gen: torch.Generator, shape2d: bool = False
) -> torch.Tensor:
    x = torch.randn(numel, generator=gen, device=gen.device, dtype=torch.float32).to(dtype)
    if shape2d and numel % 8 == 0:
        x = x.view(8, numel // 8)
    return x


def _case(be: Any, ctx: Any, dtype: torch.dtype, nbytes: int, mode: str, gen: Any) -> dict:
    es = torch.empty(0, dtype=dtype).element_size()
    numel = max(1, nbytes // es)
    rec: dict[str, Any] = {
        "backend": be.name,
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "nbytes": numel * es,
        "errors": [],
    }
    probe = _rand(numel, dtype, gen)
    supported = be.supports(probe)
    rec["supported"] = supported
    if supported != expected_support(be.name, dtype, numel * es):
        rec["errors"].append(f"supports() says {supported} for {numel} x {dtype}")
    if not _agree(ctx, supported) or not supported:
        return rec
    ys: list[torch.Tensor] = []
    try:
        if mode == "eager":
            xs = [_rand(numel, dtype, gen), _rand(numel, dtype, gen, shape2d=True)]
            if numel > 1:
                # x's shape again, one element into its storage: the same prepared call
                # (symm backends bind per shape), but an offset the fused copy cannot take
                xs.append(_rand(numel + 1, dtype, gen)[1:])
            clones = [x.clone() for x in xs]
            ys = [be.all_reduce(x) for x in xs]  # back to back: no sync between the two
            rounds = [(xs, clones, ys)]
        else:
            xs = [_rand(numel, dtype, gen) for _ in range(3)]
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with be.capture(), torch.cuda.graph(graph):
                ys = [be.all_reduce(x) for x in xs]
            rounds = []
            for _ in range(2):  # the static inputs get new data each round: keep snapshots
                for x in xs:
                    x.copy_(_rand(numel, dtype, gen))
                before = [x.clone() for x in xs]
                graph.replay()
                after = [x.clone() for x in xs]
                rounds.append((after, before, [y.clone() for y in ys]))
        torch.cuda.synchronize()
        ok = True
    except Exception as exc:  # noqa: BLE001 - recorded and reported by the test
        rec["errors"].append(f"{mode} call raised {type(exc).__name__}: {exc}")
        ok = False
    if not _agree(ctx, ok):
        return rec
    rec["identical"] = True
    rec["err_ratio"] = 0.0
    for xs_r, clones_r, ys_r in rounds:
        verdict = _check_outputs(ctx, xs_r, clones_r, ys_r)
        rec["errors"] += verdict["errors"]
        rec["identical"] = rec["identical"] and verdict["identical"]
        rec["err_ratio"] = max(rec["err_ratio"], verdict["err_ratio"])
    return rec


def _lifecycle(be: Any, ctx: Any) -> list[str]:
    """Rank-local findings about refusals and close(); closes ``be``."""
    errors = []
    dev = ctx.device
    big = torch.empty((MAX_BYTES + 64) // 4, dtype=torch.float32, device=dev)
    if be.supports(big):
        errors.append(f"supports() takes {big.numel() * 4} B > max_bytes {MAX_BYTES}")
    del big
    strided = torch.randn(64, 32, device=dev)[:, ::2]
    if be.supports(strided):
        errors.append("supports() takes a non-contiguous tensor")
    small = torch.randn(256, device=dev)
    if not be.supports(small):
        errors.append("supports() refuses 1 KB of float32")
    be.close()
    try:
        be.close()
    except Exception as exc:  # noqa: BLE001
        errors.append(f"second close() raised {type(exc).__name__}: {exc}")
    if be.supports(small):
        errors.append("supports() still True after close()")
    if be.name.startswith("symm_"):
        try:  # its prepared calls are gone with the buffer: an error, not a stale call
            be.all_reduce(small)
            errors.append("all_reduce() after close() did not raise")
        except Exception:  # noqa: BLE001, S110
            pass
    return errors


def _run_all(ctx: Any, names: tuple[str, ...]) -> dict[str, Any]:
    from artune.backends import load

    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(1234 + 7919 * ctx.rank)
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(ctx.device), "backends": {}}
    for name in names:
        cls = load(name)
        reason = cls.available(ctx)
        info: dict[str, Any] = {"reason": reason, "records": [], "lifecycle": []}
        out["backends"][name] = info
        if not _agree(ctx, reason is None):
            info["reason"] = reason or "unavailable on another rank"
            continue
        be = cls.create(ctx)
        info["identical_bits"] = bool(getattr(cls, "identical_bits", True))
        for mode in MODES:
            for dtype_name in DTYPES:
                if ctx.rank == 0:
                    print(f"[{ctx.world_size} GPUs] {name} {mode} {dtype_name}", flush=True)
                for nbytes in SIZES:
                    dtype = getattr(torch, dtype_name)
                    info["records"].append(_case(be, ctx, dtype, nbytes, mode, gen))
        info["lifecycle"] = _lifecycle(be, ctx)
        torch.cuda.empty_cache()
        if hasattr(be, "_fused"):
            info["note"] = f"fused copy: {be._fused}"
    if ctx.rank == 0:
        _print_table(out, ctx.world_size)
    return out


def _print_table(out: dict[str, Any], ws: int) -> None:
    print(f"\n== {ws} x {out['gpu']}, torch {torch.__version__} ==", flush=True)
    print(
        f"{'backend':16} {'mode':6} {'dtype':9} {'ok/run':>7} {'unsup':>5} {'same bits':>9} "
        f"{'max err/bound':>13}"
    )
    for name, info in out["backends"].items():
        if info["reason"] is not None:
            print(f"{name:16} unavailable: {info['reason']}")
            continue
        if info.get("note"):
            print(f"{name:16} {info['note']}")
        for mode in MODES:
            for dt in DTYPES:
                recs = [r for r in info["records"] if r["mode"] == mode and r["dtype"] == dt]
                run = [r for r in recs if "err_ratio" in r]
                ok = sum(not r["errors"] for r in run)
                same = sum(r["identical"] for r in run)
                worst = max((r["err_ratio"] for r in run), default=0.0)
                print(
                    f"{name:16} {mode:6} {dt:9} {ok:>3}/{len(run):<3} "
                    f"{len(recs) - len(run):>5} {same:>4}/{len(run):<4} {worst:>13.3f}"
                )
    print(flush=True)


# --------------------------------------------------------------------------------------------
# The tests (parent process)
# --------------------------------------------------------------------------------------------


_RESULTS: dict[int, list[dict[str, Any]] | BaseException] = {}


def _results(world_size: int) -> list[dict[str, Any]]:
    """One spawn per world size for the whole module; a failed spawn fails every test with its
    error instead of spawning again."""
    if world_size not in _RESULTS:
        try:
            _RESULTS[world_size] = run_on_gpus(
                world_size, _run_all, BACKENDS, max_bytes=MAX_BYTES, timeout_s=_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - re-raised by every test that needs it
            _RESULTS[world_size] = exc
    got = _RESULTS[world_size]
    if isinstance(got, BaseException):
        raise RuntimeError(f"the {world_size}-GPU run failed: {got}") from got
    return got


def _backend_results(world_size: int, name: str) -> list[dict[str, Any]]:
    per_rank = [r["backends"][name] for r in _results(world_size)]
    reason = per_rank[0]["reason"]
    if reason is not None:
        if "not importable" in reason:  # packaging, not a defect: nvshmem4py absent here
            pytest.skip(f"{name}: {reason}")
        pytest.fail(f"{name} unavailable on {world_size} GPUs: {reason}")
    return per_rank


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", _world_size_params())
def test_all_reduce_matches_exact_sum(world_size: int, backend: str, dtype: str, mode: str) -> None:
    per_rank = _backend_results(world_size, backend)
    failures, ran = [], 0
    for rank, info in enumerate(per_rank):
        for r in info["records"]:
            if r["dtype"] != dtype or r["mode"] != mode:
                continue
            ran += "err_ratio" in r
            failures += [f"rank {rank}, {r['nbytes']} B: {e}" for e in r["errors"]]
    assert not failures, "\n".join(failures[:20])
    should_run = [n for n in SIZES if expected_support(backend, getattr(torch, dtype), n)]
    assert ran >= len(should_run) * world_size, f"only {ran} checks ran for {len(should_run)} sizes"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", _world_size_params())
def test_identical_bits_on_every_rank(world_size: int, backend: str) -> None:
    per_rank = _backend_results(world_size, backend)
    if not per_rank[0]["identical_bits"]:
        pytest.skip(f"{backend} does not promise identical bits (the autotune gate checks them)")
    differ = sorted(
        {
            (r["mode"], r["dtype"], r["nbytes"])
            for r in per_rank[0]["records"]
            if "identical" in r and not r["identical"]
        }
    )
    assert not differ, f"ranks got different bits for (mode, dtype, bytes): {differ[:10]}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", _world_size_params())
def test_lifecycle(world_size: int, backend: str) -> None:
    per_rank = _backend_results(world_size, backend)
    failures = [f"rank {i}: {e}" for i, info in enumerate(per_rank) for e in info["lifecycle"]]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------
# CPU: what the backends say where they cannot run
# --------------------------------------------------------------------------------------------


def _cpu_ctx() -> Any:
    from artune.backends.base import GroupContext

    return GroupContext(
        group=None,  # type: ignore[arg-type]
        cpu_group=None,  # type: ignore[arg-type]
        rank=0,
        world_size=2,
        device=torch.device("cpu"),
        ranks_per_node=2,
        max_bytes=1 << 20,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_unavailable_on_cpu_says_why(backend: str) -> None:
    from artune.backends import load
    from artune.backends.base import BackendUnavailable

    cls = load(backend)
    reason = cls.available(_cpu_ctx())
    assert isinstance(reason, str) and reason and "\n" not in reason
    with pytest.raises(BackendUnavailable, match=backend):
        cls.create(_cpu_ctx())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without CUDA")
def test_nvshmem_bootstrap_without_cuda() -> None:
    from artune.backends import _nvshmem

    assert _nvshmem.available_reason() == "CUDA is not available"
    assert not _nvshmem.is_initialized()
    with pytest.raises(RuntimeError, match="ensure_initialized"):
        _nvshmem.alloc((4,), torch.float32)
    _nvshmem.finalize()  # not initialised: a no-op, twice
    _nvshmem.finalize()


def test_symm_alignment_rule() -> None:
    from artune.backends.symm_mem import _alignment

    assert [_alignment(n) for n in (0, 2, 4, 6, 8, 12, 16, 48, 3)] == [16, 2, 4, 2, 8, 4, 16, 16, 1]


def test_importing_backends_loads_no_gpu_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, artune.backends.symm_mem, artune.backends.nvshmem_reduce, "
        "artune.backends._nvshmem; "
        "print([m for m in sys.modules if m.split('.')[0] in ('nvshmem', 'cuda', 'triton')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_symm_one_shot_prepares_one_call_per_shape_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """symm_one_shot's prepared calls (``bind``) on the CPU, its two PyTorch ops stood in for
    by a two-rank sum (2x): one call per shape, the staging view cut from the buffer in the
    input's shape, the fused op only where the input's offset alignment allows, nothing kept
    past close(). The real ops run in the GPU tests above."""
    from types import SimpleNamespace

    from artune.backends.base import Backend
    from artune.backends.symm_mem import SymmOneShotBackend, _SymmBackend

    used: list[tuple[str, tuple[int, ...], int]] = []

    def fused(staged: torch.Tensor, x: torch.Tensor, op: str, group: str,
              out: torch.Tensor) -> torch.Tensor:
        used.append(("fused", tuple(staged.shape), staged.data_ptr()))
        staged.copy_(x)
        return out.copy_(staged * 2)

    def plain(staged: torch.Tensor, op: str, group: str, out: torch.Tensor) -> torch.Tensor:
        used.append(("plain", tuple(staged.shape), staged.data_ptr()))
        return out.copy_(staged * 2)

    ns = torch.ops.symm_mem
    monkeypatch.setattr(ns, "one_shot_all_reduce_copy_out", SimpleNamespace(default=fused),
                        raising=False)
    monkeypatch.setattr(ns, "one_shot_all_reduce_out", SimpleNamespace(default=plain),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    be = SymmOneShotBackend.__new__(SymmOneShotBackend)  # its buffer on the CPU, below
    Backend.__init__(be, _cpu_ctx())
    be.group_name, be.capacity, be._fused, be.handle = "g", 1 << 16, True, None
    be._dtype_set = frozenset({torch.bfloat16, torch.float32})
    be._bound = {}
    be.buf = torch.zeros(1 << 16, dtype=torch.uint8)
    base = be.buf.data_ptr()

    x = torch.randn(4096, dtype=torch.float32).to(torch.bfloat16)
    y = be.all_reduce(x)
    assert torch.equal(y, x * 2) and used[-1] == ("fused", (4096,), base)
    assert be.bind(x) is be.bind(x.clone())  # one prepared call per shape
    x2 = x.view(8, 512)
    assert be.bind(x2) is not be.bind(x)
    y2 = be.all_reduce(x2)
    assert y2.shape == (8, 512) and torch.equal(y2, x2 * 2) and used[-1][:2] == ("fused", (8, 512))
    # x's shape one element into its storage (2 bytes): the same prepared call, the plain op
    off = torch.randn(4097, dtype=torch.float32).to(torch.bfloat16)[1:]
    assert be.bind(off) is be.bind(x)
    assert torch.equal(be.all_reduce(off), off * 2) and used[-1][0] == "plain"
    # a strided tensor: copied dense, then the dense shape's prepared call
    strided = torch.randn(4096, 2, dtype=torch.float32).to(torch.bfloat16)[:, 0]
    assert not be.supports(strided)
    assert torch.equal(be.all_reduce(strided), strided * 2)
    # what the kernel refuses is an error naming why, not a call
    with pytest.raises(ValueError, match="not torch.float16"):
        be.all_reduce(torch.zeros(64, dtype=torch.float16))
    with pytest.raises(ValueError, match="exceed"):
        be.all_reduce(torch.zeros(1 << 16, dtype=torch.float32))
    assert be.all_reduce(torch.zeros(0, dtype=torch.bfloat16)).numel() == 0
    kept = be.bind(x)
    _SymmBackend.close(be)
    with pytest.raises(RuntimeError, match="after close"):
        kept(x)  # a call kept past close() does not run
    with pytest.raises(ValueError, match="after close"):
        be.all_reduce(x)
    assert not be._bound
