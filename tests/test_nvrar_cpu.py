"""CPU tests of NVRAR: layout, schedule, parameters, and the kernels under Triton's interpreter.

    python -m pytest -q tests/test_nvrar_cpu.py

The emulation tests run the real kernels and launch code (``NvrarComm``) with
``TRITON_INTERPRET=1``, one process per rank; the "symmetric buffers" are shared-memory files
mapped into every process, so a rank's stores land in its peers' receive slots as they would over
NVLink and the spin-waits really wait for the other processes. They need Triton installed (they
skip without it) and check sums against an fp32 reference, identical bits on every rank, tails,
dtypes, world sizes 2/3/4 on one node, virtual nodes (2x2, 3x1 and 3x2 with fold-in/out), the
parity reuse of slots across many calls, and a forced timeout. The interpreter rounds fp32 to
bf16 by truncation (the GPU rounds to nearest), so bf16 is compared within one ulp.
"""

from __future__ import annotations

import functools
import importlib.util
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import reap

from artune.backends.base import GroupContext
from artune.backends.nvrar import NvrarBackend, default_plan
from artune.kernels.nvrar import (
    NvrarComm,
    NvrarTimeoutError,
    Plan,
    decode_error,
    init_buffer,
    linear_depth,
)
from artune.kernels.nvrar_layout import (
    BLOCKS,
    STEP_NORM,
    STEP_RD0,
    STEP_RS,
    Layout,
    Nodes,
    cdiv,
    round_up,
    step_name,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (interpreter)")


# --------------------------------------------------------------------------------------------
# Pure Python: schedule, layout, parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 5, 6, 8])
def test_exchanges_are_symmetric_and_cover_every_node(nodes: int) -> None:
    nd = Nodes(nodes, 2)
    sends: set[tuple[int, int, str]] = set()
    recvs: set[tuple[int, int, str]] = set()
    for rank in range(nd.world):
        for what, peer in nd.partners(rank):
            assert peer % nd.local == rank % nd.local  # same local rank on another node
            assert peer != rank
            if what.startswith("step"):
                sends.add((rank, peer, what))
                recvs.add((peer, rank, what))
            elif what.endswith("send"):
                sends.add((rank, peer, what.split()[0]))
            else:
                recvs.add((peer, rank, what.split()[0]))
    assert sends == recvs
    # after fold-in and doubling, node 0's value depends on every node: simulate with sets
    have = [{g} for g in range(nodes)]
    for g in range(nd.p2, nodes):
        have[g - nd.p2] |= have[g]
    for k in range(nd.log2p):
        have = [have[g] | have[g ^ (1 << k)] if g < nd.p2 else have[g] for g in range(nodes)]
    for g in range(nd.p2, nodes):
        have[g] = have[g - nd.p2]
    assert all(h == set(range(nodes)) for h in have)


def test_layout_regions_are_disjoint_aligned_and_sized() -> None:
    for nodes, local in [(1, 2), (1, 4), (1, 8), (2, 2), (3, 2), (4, 1)]:
        lay = Layout(Nodes(nodes, local), 64 << 20, (1 << 20) if nodes == 1 else 0, 4 << 20)
        off = lay.offsets()
        starts = sorted((v, k) for k, v in off.items())
        assert all(v % 256 == 0 for v, _ in starts)
        assert off["total"] == max(off.values())
        assert lay.sig_slot * local >= 64 << 20  # every shard of the largest message fits
        assert lay.ll_slot >= 2 * ((4 << 20) // local)
        if nodes == 1:
            assert off["rd_ll"] == off["rd_sig"] or lay.nodes.steps == 0
        assert lay.total_bytes < 10 * (64 << 20)
    lay = Layout(Nodes(1, 4), 1 << 20, 1 << 16, 1 << 18)
    assert lay.check_message(1 << 16, "oneshot", "ll") is None
    assert "one-shot capacity" in (lay.check_message((1 << 16) + 2, "oneshot", "ll") or "")
    assert "LL capacity" in (lay.check_message((1 << 18) + 2, "twoshot", "ll") or "")
    assert lay.check_message((1 << 18) + 2, "twoshot", "signal") is None
    assert "exceeds" in (lay.check_message((1 << 20) + 2, "twoshot", "signal") or "")
    hier = Layout(Nodes(2, 2), 1 << 20, 0, 1 << 18)
    assert "one node only" in (hier.check_message(64, "oneshot", "ll") or "")
    # three lamport parities (ARTUNE_NVRAR_CLEAR_AHEAD): that region alone grows, by half
    three = Layout(Nodes(1, 4), 1 << 20, 1 << 16, 1 << 18, 3)
    assert three.region("lamport")[1] == 3 * lay.region("lamport")[1] // 2
    assert three.total_bytes - lay.total_bytes == lay.region("lamport")[1] // 2
    assert three.lamport_ag == lay.lamport_ag
    with pytest.raises(ValueError, match="lamport_parities=4"):
        Layout(Nodes(1, 4), 1 << 20, 1 << 16, 1 << 18, 4)


def test_plan_validation_and_error_messages() -> None:
    assert Plan().problem() is None
    assert "algo" in (Plan(algo="ring").problem() or "")
    assert "block" in (Plan(block=300).problem() or "")
    assert "ctas" in (Plan(ctas=0).problem() or "")
    code = (1 << 62) | (STEP_RS << 32) | (3 << 16) | 5
    msg = decode_error(code, 1, Nodes(1, 4), 2.0)
    assert "rank 1 waited 2 s for rank 3" in msg and "reduce-scatter" in msg and "CTA 5" in msg
    assert "close()" in msg and "ARTUNE_TIMEOUT_S" in msg
    nd = Nodes(3, 2)
    assert "step 0" in step_name(STEP_RD0, nd)
    assert "fold-in" in step_name(STEP_RD0 + nd.step_fold_in, nd)
    assert "fold-out" in step_name(STEP_RD0 + nd.step_fold_out, nd)


def _ctx(world: int, per_node: int, max_bytes: int = 64 << 20) -> GroupContext:
    return GroupContext(
        group=None,  # type: ignore[arg-type]
        cpu_group=None,  # type: ignore[arg-type]
        rank=0,
        world_size=world,
        device=torch.device("cpu"),
        ranks_per_node=per_node,
        max_bytes=max_bytes,
    )


@pytest.mark.parametrize("world,per_node", [(2, 2), (4, 4), (3, 3), (4, 2), (6, 2)])
def test_defaults_are_valid_plans_inside_the_search_space(world: int, per_node: int) -> None:
    ctx = _ctx(world, per_node)
    for nbytes in [2, 4096, 65536, 262144, 1 << 20, 2 << 20, 16 << 20, 64 << 20]:
        space = NvrarBackend.search_space(nbytes, ctx)
        params = NvrarBackend.default_params(nbytes, ctx)
        plan = Plan(**params)
        assert plan.problem() is None, (nbytes, params)
        for name, value in params.items():
            assert value in space[name], (nbytes, name, value, space[name])
        if world != per_node:
            assert "inter" in space and params["algo"] == "twoshot"
        lay = Layout(Nodes(world // per_node, per_node), ctx.max_bytes,
                     (1 << 20) if world == per_node else 0, 4 << 20)
        assert lay.check_message(nbytes, plan.algo, plan.proto) is None
    assert default_plan(4096, 1, 4)["algo"] == "oneshot"
    assert set(NvrarBackend.search_space(4096, ctx)["block"]) <= set(BLOCKS)


def test_defaults_follow_the_measured_crossovers(monkeypatch: pytest.MonkeyPatch) -> None:
    """One node of 4: the lamport one-shot up to 128 KiB, the lamport two-shot above it up to
    2 MiB (blocks 512 / 1024 / 2048), the signal two-shot beyond; virtual nodes never use
    lamport. 2 GPUs (31st session, 2x H200): the one-shot up to 1 MiB, with chunks of 512 /
    1024 / 2048 elements up to 128 KiB / 256 KiB / 1 MiB (fp32, which runs it as LL: 512-element
    chunks up to 512 KiB, the signal two-shot above), then the signal two-shot (2 MiB is beyond
    the two-shot lamport's slot halves there).
    With a one-shot capacity too small for the two-shot lamport's slot halves, the LL/signal
    two-shot takes its sizes (docs/nvrar.md, "Two-shot lamport")."""
    ctx = _ctx(4, 4, 256 << 20)
    want = {4 << 10: ("oneshot", "lamport", 512), 128 << 10: ("oneshot", "lamport", 512),
            192 << 10: ("twoshot", "lamport", 512), 512 << 10: ("twoshot", "lamport", 512),
            1 << 20: ("twoshot", "lamport", 1024), 2 << 20: ("twoshot", "lamport", 2048),
            4 << 20: ("twoshot", "signal", 4096)}
    for nbytes, (algo, proto, block) in want.items():
        d = NvrarBackend.default_params(nbytes, ctx)
        assert (d["algo"], d["proto"], d["block"]) == (algo, proto, block), (nbytes, d)
    want2 = {4 << 10: ("oneshot", "lamport", 512), 128 << 10: ("oneshot", "lamport", 512),
             256 << 10: ("oneshot", "lamport", 1024), 384 << 10: ("oneshot", "lamport", 2048),
             1 << 20: ("oneshot", "lamport", 2048),
             2 << 20: ("twoshot", "signal", 4096)}  # 2 MiB: beyond the slot halves on 2 GPUs
    for nbytes, (algo, proto, block) in want2.items():
        d2 = NvrarBackend.default_params(nbytes, _ctx(2, 2, 256 << 20))
        assert (d2["algo"], d2["proto"], d2["block"]) == (algo, proto, block), (nbytes, d2)
    for nbytes in (4 << 10, 256 << 10, 512 << 10):  # fp32 (LL): 512-element chunks
        d4 = NvrarBackend.default_params_for(nbytes, _ctx(2, 2, 256 << 20), 4)
        assert (d4["algo"], d4["proto"], d4["block"]) == ("oneshot", "lamport", 512), (nbytes, d4)
    for nbytes in (768 << 10, 1 << 20, 2 << 20):  # fp32 above 512K: the signal two-shot
        d4 = NvrarBackend.default_params_for(nbytes, _ctx(2, 2, 256 << 20), 4)
        assert (d4["algo"], d4["proto"]) == ("twoshot", "signal"), (nbytes, d4)
    assert NvrarBackend.default_params_for(1 << 20, _ctx(2, 2, 256 << 20), 4)["block"] == 2048
    for nbytes in (4 << 10, 256 << 10, 1 << 20):
        d22 = NvrarBackend.default_params(nbytes, _ctx(4, 2, 256 << 20))
        assert d22["proto"] != "lamport", (nbytes, d22)
    monkeypatch.setenv("ARTUNE_NVRAR_ONESHOT_MAX_BYTES", str(64 << 10))
    for nbytes in (512 << 10, 2 << 20):
        d = NvrarBackend.default_params(nbytes, ctx)
        assert d["algo"] == "twoshot" and d["proto"] in ("ll", "signal"), (nbytes, d)


@pytest.mark.parametrize("one,ll", [(1 << 20, 4096), (16 << 10, 4 << 20), (4096, 4096),
                                    (0, 64 << 10)])
@pytest.mark.parametrize("world,per_node", [(2, 2), (4, 4), (3, 3), (4, 2)])
def test_lowered_caps_keep_the_default_admitted_and_measured(
        monkeypatch: pytest.MonkeyPatch, one: int, ll: int, world: int, per_node: int) -> None:
    """With ARTUNE_NVRAR_ONESHOT_MAX_BYTES / ARTUNE_NVRAR_LL_MAX_BYTES lowered, the default is
    still a combination the tuner admits (it is measured first) and a plan the layout takes;
    no admitted combination is one the layout refuses."""
    from artune.autotune.search import combinations

    monkeypatch.setenv("ARTUNE_NVRAR_ONESHOT_MAX_BYTES", str(one))
    monkeypatch.setenv("ARTUNE_NVRAR_LL_MAX_BYTES", str(ll))
    ctx = _ctx(world, per_node)
    lay = Layout(Nodes(world // per_node, per_node), ctx.max_bytes,
                 min(one, ctx.max_bytes) if world == per_node else 0, min(ll, ctx.max_bytes))
    for nbytes in [2, 4096, 6144, 65536, 262144, 1 << 20, 2 << 20, 16 << 20]:
        default = NvrarBackend.default_params(nbytes, ctx)
        assert NvrarBackend.admits(default, nbytes, ctx), (nbytes, default)
        assert lay.check_message(nbytes, default["algo"], default["proto"]) is None, default
        for c in combinations(NvrarBackend.search_space(nbytes, ctx)):
            if NvrarBackend.admits(c, nbytes, ctx):
                assert lay.check_message(nbytes, c["algo"], c["proto"]) is None, (nbytes, c)


@pytest.mark.parametrize("world,per_node,limit", [(4, 4, 27), (2, 2, 29), (8, 8, 28), (4, 2, 28)])
def test_search_space_compiles_few_kernels_over_a_full_tune(world: int, per_node: int,
                                                             limit: int) -> None:
    """Each distinct (algorithm, protocol, block, warps[, transport]) is a Triton compile on
    every rank: the union over the 37 sizes of a full tune stays small (documented counts)."""
    from artune.autotune.config import parse_sizes
    from artune.autotune.search import combinations

    ctx = _ctx(world, per_node, 256 << 20)
    kernels: set[tuple[Any, ...]] = set()
    for nbytes in parse_sizes("1K:256M"):
        combos = [c for c in combinations(NvrarBackend.search_space(nbytes, ctx))
                  if NvrarBackend.admits(c, nbytes, ctx)]
        assert 1 <= len(combos) <= 45, (nbytes, len(combos))
        assert NvrarBackend.default_params(nbytes, ctx) in [
            {k: v for k, v in c.items() if k in NvrarBackend.default_params(nbytes, ctx)}
            for c in combos
        ]
        for c in combos:  # bf16 kernels: lamport ones run block / 128 warps whatever the plan
            if c["proto"] == "lamport":
                kernels.add((c["algo"], "lamport", c["block"]))
            elif c["algo"] == "oneshot":
                kernels.add(("oneshot", c["proto"], c["block"], c["warps"]))
            else:
                kernels.add(("twoshot", c["proto"], c["block"], c["warps"],
                             c.get("inter", "auto")))
    assert len(kernels) <= limit, sorted(kernels)


class _FakeKernel:
    """Stands in for a Triton kernel: records warmups (compiles) and launches."""

    def __init__(self, log: list[tuple[int, str]], rank: int, broken: set[int]) -> None:
        self.log, self.rank, self.broken = log, rank, broken

    def warmup(self, *args: Any, grid: tuple[int], **kwargs: Any) -> None:
        if kwargs["BLOCK"] in self.broken:
            raise RuntimeError("compile error")
        self.log.append((self.rank, f"warmup {kwargs['BLOCK']}"))

    def __getitem__(self, grid: tuple[int]) -> Any:
        return lambda *a, **k: self.log.append((self.rank, f"launch {k['BLOCK']}"))


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_precompile_splits_distinct_kernels_across_ranks(ranks: int) -> None:
    """Rank i of k compiles every k-th distinct variant, then meets the others at the barrier.
    Nothing is marked ready, so every rank still meets its peers at each variant's first launch
    (a cache hit by then) whatever its own compiles did; a variant that failed to compile raises
    at its first launch."""
    from artune.kernels import nvrar as mod

    nd = Nodes(1, 2)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    log: list[tuple[int, str]] = []
    blocks = [256, 512, 1024, 2048, 256, 512, 8192]  # 5 distinct kernels (8192 fails)
    for rank in range(ranks):
        comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                         [1 << 20, 2 << 20], torch.device("cpu"), timeout_s=1.0,
                         barrier=lambda r=rank: log.append((r, "barrier")))
        kernel = _FakeKernel(log, rank, broken={8192})
        x = torch.zeros(16, dtype=torch.bfloat16)
        specs = [mod._Spec(kernel, ("p2p", x.dtype, b, 4, True), 1, (x,),
                           {"BLOCK": b, "num_warps": 4}) for b in blocks]
        start = len(log)
        mine = comm.precompile(specs, (rank, ranks))
        share = [b for b in [256, 512, 1024, 2048, 8192][rank::ranks] if b != 8192]
        assert mine == len(share)
        assert [e for r, e in log[start:] if r == rank] == [f"warmup {b}" for b in share] + [
            "barrier"]
        assert not comm._ready
        # First launch: load (a cache hit in Triton), meet the peers, launch; then just launch.
        n = len(log)
        comm._launch(specs[1])
        comm._launch(specs[1])
        assert log[n:] == [(rank, "warmup 512"), (rank, "barrier"), (rank, "launch 512"),
                           (rank, "launch 512")]
        with pytest.raises(RuntimeError, match="compile error"):
            comm._launch(specs[-1])


def test_backend_refuses_cpu_groups_with_a_reason() -> None:
    assert "CUDA" in (NvrarBackend.available(_ctx(2, 2)) or "")


def test_op_is_registered_with_a_fake_and_names_the_fix() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from artune.integration import nvrar_op

    with FakeTensorMode():
        x = torch.empty(7, dtype=torch.bfloat16)
        y = torch.ops.artune.nvrar_all_reduce(x, "nobody")
        assert y.shape == x.shape and y.dtype == x.dtype
    with pytest.raises(RuntimeError, match="register_nvrar"):
        nvrar_op.nvrar_all_reduce(torch.zeros(3), "nobody")


def test_fused_op_mutates_in_place_and_traces_under_compile() -> None:
    """``torch.ops.artune.nvrar_fused_add_rmsnorm`` reaches the registered backend's
    ``comm.fused_add_rmsnorm`` with its arguments, eagerly and from a function compiled with
    fullgraph=True (its in-place contract through functionalization: the compiled function
    sees the mutations); it names the fix when nothing is registered or the backend is
    closed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from artune.integration import nvrar_op

    class Comm:  # stands in for NvrarComm: a sum of 2 equal ranks, then the norm, in place
        def __init__(self) -> None:
            self.calls = 0

        def fused_add_rmsnorm(self, x: torch.Tensor, res: torch.Tensor, w: torch.Tensor,
                              eps: float) -> None:
            self.calls += 1
            res.add_(2 * x)
            x.copy_(res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps) * w)

    class Backend:
        def __init__(self) -> None:
            self.comm: Comm | None = Comm()

    be = Backend()
    nvrar_op.register_nvrar("fused-test", be)  # type: ignore[arg-type]
    try:
        def step(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            torch.ops.artune.nvrar_fused_add_rmsnorm(x, res, w, 1e-5, "fused-test")
            return x + 0  # reads the mutated x

        for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
            x, res, w = torch.ones(2, 8), torch.zeros(2, 8), torch.full((8,), 3.0)
            out = fn(x, res, w)
            assert torch.equal(res, torch.full((2, 8), 2.0)), "residual not updated in place"
            assert torch.allclose(out, torch.full((2, 8), 3.0), rtol=1e-4)
            assert torch.allclose(x, out), "x not updated in place"
        assert be.comm is not None and be.comm.calls >= 2
        with FakeTensorMode():
            bf = torch.bfloat16
            fx, fr, fw = torch.empty(2, 8, dtype=bf), torch.empty(2, 8, dtype=bf), torch.empty(8)
            assert torch.ops.artune.nvrar_fused_add_rmsnorm(fx, fr, fw, 1e-5, "x") is None
        be.comm = None
        with pytest.raises(RuntimeError, match="closed"):
            nvrar_op.nvrar_fused_add_rmsnorm(torch.ones(1, 8), torch.ones(1, 8), torch.ones(8),
                                             1e-5, "fused-test")
    finally:
        nvrar_op.unregister_nvrar("fused-test")
    with pytest.raises(RuntimeError, match="register_nvrar"):
        nvrar_op.nvrar_fused_add_rmsnorm(torch.ones(1, 8), torch.ones(1, 8), torch.ones(8), 1e-5,
                                         "fused-test")


# --------------------------------------------------------------------------------------------
# The kernels under the Triton interpreter, one process per rank
# --------------------------------------------------------------------------------------------

Case = tuple[int, str, dict[str, Any]]  # (numel, dtype name, plan fields)


def _input(rank: int, numel: int, dtype: str, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * rank + 31 * numel + call)
    x = torch.randn(numel, generator=g).to(getattr(torch, dtype))
    x[rank::7] = -0.0  # the lamport sentinel's bits (and zeros) must pass through
    return x


#: The RMSNorm epsilon of the fused cases (``{"fused": True, "hidden": H, "ctas": c}``: the
#: all-reduce + residual add + RMSNorm of ``NvrarComm.fused_add_rmsnorm`` on numel // H rows).
FUSED_EPS = 1e-5


def _residual(numel: int, dtype: str, call: int) -> torch.Tensor:
    """A fused case's residual rows: the same on every rank, as in tensor parallelism."""
    g = torch.Generator().manual_seed(104729 * call + numel)
    return torch.randn(numel, generator=g).to(getattr(torch, dtype))


def _weight(hidden: int, dtype: str, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 * call + hidden)
    return (1.0 + 0.25 * torch.randn(hidden, generator=g)).to(getattr(torch, dtype))


def _fused_call(comm: NvrarComm, x: torch.Tensor, numel: int, dtype: str, call: int,
                fields: dict[str, Any]) -> torch.Tensor:
    """Run a fused case in place; returns the normed rows then the new residual, flat."""
    hidden = fields["hidden"]
    x = x.view(numel // hidden, hidden)
    res = _residual(numel, dtype, call).view_as(x)
    comm.fused_add_rmsnorm(x, res, _weight(hidden, dtype, call), FUSED_EPS, ctas=fields["ctas"])
    return torch.cat([x.flatten(), res.flatten()])


def _linear_operands(rank: int, numel: int, dtype: str, call: int,
                     fields: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear case's (x [M, K], weight [N, K]) of one rank (``{"linear": True, "n": N,
    "k": K, ...}``: ``NvrarComm.linear_all_reduce`` with an M x N output, numel = M * N)."""
    n, k = fields["n"], fields["k"]
    x = _input(rank, numel // n * k, dtype, call).view(-1, k)
    g = torch.Generator().manual_seed(1299709 * rank + call)
    return x, (torch.randn(n, k, generator=g) / k**0.5).to(getattr(torch, dtype))


def _linear_call(comm: NvrarComm, rank: int, numel: int, dtype: str, call: int,
                 fields: dict[str, Any]) -> torch.Tensor:
    x, w = _linear_operands(rank, numel, dtype, call, fields)
    x0, w0 = x.clone(), w.clone()
    y = comm.linear_all_reduce(x, w, block_n=fields["bn"], block_k=fields["bk"],
                               prefetch=fields.get("prefetch", 0))
    assert torch.equal(x, x0) and torch.equal(w, w0), "an operand was modified"
    return y.flatten()


def _start_together(folder: Path, rank: int, world: int, limit_s: float = 300.0) -> None:
    """A file barrier before the first call: spawned ranks finish importing up to seconds
    apart on a loaded machine, which would eat into the short timeouts and stalls the tests
    set (a rank could time out on a peer still importing, not on the one the test holds
    back)."""
    (folder / f"ready{rank}").touch()
    deadline = time.monotonic() + limit_s
    while not all((folder / f"ready{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: peers not ready after {limit_s:.0f} s")
        time.sleep(0.01)


def _rank_main(
    rank: int, nodes: int, local: int, max_bytes: int, folder: str, cases: list[Case],
    skip: int, timeout_s: float, stall: tuple[int, float, int], parities: int,
    lamport_epoch: int, wide: tuple[int, ...], q: Any,
) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        nd = Nodes(nodes, local)
        lay = Layout(nd, max_bytes, max_bytes if nodes == 1 else 0, max_bytes, parities)
        bufs = [
            torch.from_file(str(Path(folder) / f"rank{r}"), shared=True,
                            size=lay.total_bytes, dtype=torch.uint8)
            for r in range(nd.world)
        ]
        comm = NvrarComm(rank, nd, lay, bufs[rank], [b.data_ptr() for b in bufs],
                         torch.device("cpu"), timeout_s=timeout_s, interpret=True)
        comm.lctr.fill_(lamport_epoch)  # where the lamport epoch counters start (three parities)
        comm.wide = rank in wide  # the 16-byte lamport kernels on these ranks only
        _start_together(Path(folder), rank, nd.world)
        out: list[Any] = []
        for call, (numel, dtype, fields) in enumerate(cases):
            if rank == skip:
                out.append(None)
                continue
            if rank == stall[0] and call == stall[2]:
                time.sleep(stall[1])  # late for that call, then on time
            x = _input(rank, numel, dtype, call)
            x0 = x.clone()
            if fields.get("fused"):
                y = _fused_call(comm, x, numel, dtype, call, fields)
            elif fields.get("linear"):
                y = _linear_call(comm, rank, numel, dtype, call, fields)
            else:
                y = comm.all_reduce(x, Plan(**fields))
                assert torch.equal(x, x0), "x was modified"
            try:
                comm.check()
                raised = None
            except NvrarTimeoutError as exc:
                raised = str(exc)
            out.append((y.view(torch.int16 if y.element_size() == 2 else torch.int32).numpy(),
                        comm.error_code(), raised))
        q.put((rank, out, None))
    except Exception as exc:  # noqa: BLE001 - report to the parent
        import traceback

        q.put((rank, None, "".join(traceback.format_exception(exc))))


def _spawn_ranks(world: int, target: Any, args_of: Any) -> list[Any]:
    """Run ``target(*args_of(rank), queue)`` in one spawned process per rank; each puts
    (rank, out, error text or None) on the queue. Returns the outs in rank order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(r), q)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, out, err = q.get(timeout=600)
            assert err is None, f"rank {rank} failed:\n{err}"
            got[rank] = out
    finally:
        reap(procs, 30.0)
    return [got[r] for r in range(world)]


def _emulate(nodes: int, local: int, cases: list[Case], max_bytes: int = 1 << 16,
             skip: int = -1, timeout_s: float = 60.0,
             stall: tuple[int, float, int] = (-1, 0.0, 0), parities: int = 2,
             lamport_epoch: int = 0, wide: tuple[int, ...] = ()) -> list[list[Any]]:
    world = nodes * local
    lay = Layout(Nodes(nodes, local), max_bytes, max_bytes if nodes == 1 else 0, max_bytes,
                 parities)
    fresh = torch.empty(lay.total_bytes, dtype=torch.uint8)
    init_buffer(fresh, lay)
    with tempfile.TemporaryDirectory(prefix="artune-nvrar-emu-") as folder:
        for r in range(world):
            (Path(folder) / f"rank{r}").write_bytes(fresh.numpy().tobytes())
        return _spawn_ranks(
            world, _rank_main,
            lambda r: (r, nodes, local, max_bytes, folder, cases, skip, timeout_s, stall,
                       parities, lamport_epoch, wide),
        )


def _check(results: list[list[Any]], cases: list[Case], skip: int = -1) -> None:
    world = len(results)
    for call, (numel, dtype, fields) in enumerate(cases):
        outs = [results[r][call] for r in range(world) if r != skip]
        for _, err, raised in outs:
            assert err == 0 and raised is None, f"call {call} {fields}: error {err:#x} {raised}"
        first = outs[0][0]
        for bits, _, _ in outs[1:]:
            assert (bits == first).all(), f"call {call} {fields}: ranks disagree"
        dt = getattr(torch, dtype)
        y = torch.from_numpy(first.copy()).view(dt).float()
        if fields.get("linear"):
            _check_linear(y, world, numel, dtype, call, fields)
            continue
        xs = [_input(r, numel, dtype, call).float() for r in range(world)]
        ref = torch.stack(xs).sum(0)
        scale = torch.stack(xs).abs().sum(0)
        # each rounding of a partial sum to the dtype costs at most one ulp of |partial| <= scale
        eps = {"float32": 2.0**-22, "bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
        tol = 4 * eps * scale + 1e-30
        if fields.get("fused"):
            _check_fused(y, ref, tol, numel, dtype, call, fields, eps)
            continue
        bad = ((y - ref).abs() > tol).sum().item()
        assert bad == 0, f"call {call} n={numel} {dtype} {fields}: {bad} elements off"


def _check_linear(y: torch.Tensor, world: int, numel: int, dtype: str, call: int,
                  fields: dict[str, Any]) -> None:
    """A linear case against fp32: the sum over the ranks of x @ weight.T, each rank's product
    rounded to the dtype once (as the kernel sends it), then the sum rounded once."""
    ops = [_linear_operands(r, numel, dtype, call, fields) for r in range(world)]
    parts = [x.float() @ w.float().T for x, w in ops]
    ref = torch.stack(parts).sum(0).flatten()
    eps = {"bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
    size = torch.stack([x.float().abs() @ w.float().abs().T for x, w in ops]).sum(0).flatten()
    tol = 2 * eps * (torch.stack(parts).abs().sum(0).flatten() + ref.abs()) + 1e-5 * size
    bad = ((y - ref).abs() > tol).sum().item()
    assert bad == 0, f"call {call} {fields}: {bad} of {numel} elements off"


def _check_fused(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, numel: int, dtype: str,
                 call: int, fields: dict[str, Any], eps: float) -> None:
    """A fused case against fp32 references: the new residual = sum + residual, the output =
    RMSNorm of it times the weight, row by row. ``tol``: the sum's own rounding bound."""
    hidden = fields["hidden"]
    out, new_res = y[:numel], y[numel:]
    res = _residual(numel, dtype, call).float()
    h = ref + res
    tol_h = tol + 2 * eps * (ref.abs() + res.abs())  # the sum's rounding, then the add's
    bad = ((new_res - h).abs() > tol_h).sum().item()
    assert bad == 0, f"call {call} {fields}: {bad} residual elements off"
    rows = h.view(-1, hidden)
    rstd = torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + FUSED_EPS)
    w = _weight(hidden, dtype, call).float()
    want = (rows * rstd * w).flatten()
    tol_out = (tol_h.view(-1, hidden) * rstd * w.abs()).flatten() + eps * want.abs() + 1e-6
    bad = ((out - want).abs() > tol_out).sum().item()
    assert bad == 0, f"call {call} {fields}: {bad} normed elements off"


ONE_NODE_CASES: list[Case] = [
    (1, "bfloat16", {"algo": "oneshot", "block": 256, "ctas": 2}),
    (999, "float16", {"algo": "oneshot", "block": 256, "ctas": 2}),
    (1537, "float32", {"algo": "oneshot", "block": 512, "ctas": 4}),
    (3, "float16", {"algo": "twoshot", "proto": "ll", "block": 256, "ctas": 4}),
    (3001, "bfloat16", {"algo": "twoshot", "proto": "ll", "block": 256, "ctas": 3}),
    (2049, "float32", {"algo": "twoshot", "proto": "signal", "block": 256, "ctas": 2}),
    (777, "bfloat16", {"algo": "twoshot", "proto": "signal", "block": 512, "ctas": 8}),
    (999, "float16", {"algo": "oneshot", "block": 256, "ctas": 1}),  # parity 0 again
    (1, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (999, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (4099, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 3}),
    (998, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 4}),
    (2500, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 2}),
    (1001, "float32", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),  # as LL
    (4099, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 3}),
    (2000, "float16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (7, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 4}),
    (1001, "float32", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),  # as LL
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_node_emulated(world: int) -> None:
    _check(_emulate(1, world, ONE_NODE_CASES), ONE_NODE_CASES)


#: The 16-byte lamport kernels (ARTUNE_NVRAR_WIDE) where n % 8 == 0, the 8-byte ones elsewhere
#: (4099, 7): tails within a chunk and past the last pair, chunk sizes 256-1024, every CTA
#: taking several chunks, both 16-bit dtypes, and a parity reused.
WIDE_CASES: list[Case] = [
    (4104, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 3}),
    (8, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (3000, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (4099, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (2000, "float16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 1}),
    (2504, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 2}),
    (7, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 4}),
    (6144, "float16", {"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 3}),
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("world,wide", [(2, (0, 1)), (3, (0, 2)), (4, (1,)), (6, (0, 3, 5))],
                         ids=["2-all", "3-mixed", "4-one", "6-mixed"])
def test_wide_lamport_emulated(world: int, wide: tuple[int, ...]) -> None:
    """The 16-byte kernels on some ranks, the 8-byte ones on the others: the same wire layout,
    so every call is right and every rank holds the same bits; at 6 ranks the second poll of
    four sources and the shards past the fourth as well."""
    _check(_emulate(1, world, WIDE_CASES, wide=wide), WIDE_CASES)


def test_wide_is_a_local_choice() -> None:
    """``NvrarComm._wide``: only where n % 8 == 0, both tensors 16-byte aligned and two slot
    parities; the launch then runs the 16-byte kernel with one thread per 16 bytes."""
    from artune.kernels.nvrar import Plan

    nd = Nodes(1, 2)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [1 << 20, 2 << 20], torch.device("cpu"), timeout_s=1.0)
    assert comm.wide is False  # ARTUNE_NVRAR_WIDE's default
    comm.wide = True
    x = torch.zeros(4104, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    assert comm._wide(x, y, 4104)
    assert not comm._wide(x, y, 4100)  # n % 8 != 0
    assert not comm._wide(x[4:], y[4:], 4096)  # 8-byte aligned only
    spec = comm._lamport(x, y, 4104, Plan(algo="oneshot", proto="lamport", block=1024, ctas=4))
    assert spec.key[0] == "wide" and spec.kwargs["num_warps"] == 4
    spec = comm._lamport2(x, y, 4104, Plan(algo="twoshot", proto="lamport", block=512, ctas=4))
    assert spec.key[0] == "wide2" and spec.kwargs["num_warps"] == 2
    comm.wide = False
    assert not comm._wide(x, y, 4104)
    assert comm._lamport(x, y, 4104, Plan(algo="oneshot", proto="lamport")).key[0] == "lamport"


SIX_CASES: list[Case] = [
    (999, "float16", {"algo": "oneshot", "block": 256, "ctas": 2}),
    (1003, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (3001, "bfloat16", {"algo": "twoshot", "proto": "ll", "block": 256, "ctas": 3}),
    (777, "float32", {"algo": "twoshot", "proto": "signal", "block": 256, "ctas": 2}),
    (3000, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("world", [6, 8])
def test_six_and_eight_ranks_on_one_node_emulated(world: int) -> None:
    """Past four ranks: every peer-base argument (b4-b7); at 6, padded rows 6-7 as well."""
    _check(_emulate(1, world, SIX_CASES), SIX_CASES)


HIER_CASES: list[Case] = [
    (5, "bfloat16", {"algo": "twoshot", "proto": "ll", "block": 256, "ctas": 4, "inter": "p2p"}),
    (3001, "float32", {"algo": "twoshot", "proto": "signal", "block": 256, "ctas": 3,
                       "inter": "p2p"}),
    (1000, "float16", {"algo": "twoshot", "proto": "ll", "block": 256, "ctas": 2, "inter": "p2p"}),
    (777, "bfloat16", {"algo": "twoshot", "proto": "signal", "block": 512, "ctas": 8,
                       "inter": "p2p"}),
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("nodes,local", [(2, 2), (3, 1), (3, 2)], ids=["2x2", "3x1", "3x2"])
def test_virtual_nodes_emulated(nodes: int, local: int) -> None:
    _check(_emulate(nodes, local, HIER_CASES), HIER_CASES)


@needs_triton
@pytest.mark.slow
def test_slots_are_reused_safely_over_many_calls() -> None:
    plans = [("oneshot", "ll"), ("twoshot", "ll"), ("oneshot", "lamport"), ("twoshot", "signal"),
             ("oneshot", "lamport"), ("twoshot", "lamport")]
    cases: list[Case] = [
        (300 + 7 * i, "bfloat16",
         {"algo": plans[i % 6][0], "proto": plans[i % 6][1], "block": 256, "ctas": 2})
        for i in range(18)
    ]
    _check(_emulate(1, 3, cases), cases)


#: Lamport calls of every size order: one-shots and two-shots after each other (each lamport
#: call empties what the one before it read, whatever its kind and size), runs of one kind
#: longer than the three parities, other plans in between (they leave the lamport epochs alone).
AHEAD_CASES: list[Case] = [
    (4099, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 3}),
    (5, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (3000, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 2}),
    (2001, "float16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 4}),
    (2999, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 1}),
    (2000, "float16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (999, "float16", {"algo": "oneshot", "proto": "ll", "block": 256, "ctas": 2}),
    (3001, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 3}),
    (777, "bfloat16", {"algo": "twoshot", "proto": "signal", "block": 256, "ctas": 2}),
    (3001, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 1}),
    (1, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (3003, "float16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 2}),
    (4099, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 3}),
    (1001, "float32", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),  # LL
    (4097, "float16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_clear_ahead_three_parities_emulated(world: int) -> None:
    """ARTUNE_NVRAR_CLEAR_AHEAD (Layout.lamport_parities=3): every lamport call empties the slots
    its predecessor read instead of its own; the sums and bits stay right over every order."""
    _check(_emulate(1, world, AHEAD_CASES, parities=3), AHEAD_CASES)
    _check(_emulate(1, world, ONE_NODE_CASES, parities=3), ONE_NODE_CASES)


#: The fused all-reduce + residual add + RMSNorm (one row per chunk) between plain lamport
#: calls of both parities: one row, more rows than CTAs, a row per CTA.
FUSED_CASES: list[Case] = [
    (256, "bfloat16", {"fused": True, "hidden": 256, "ctas": 4}),
    (999, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (4 * 512, "float16", {"fused": True, "hidden": 512, "ctas": 2}),
    (3 * 1024, "bfloat16", {"fused": True, "hidden": 1024, "ctas": 8}),
    (2500, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 2}),
    (16 * 256, "bfloat16", {"fused": True, "hidden": 256, "ctas": 3}),
    (7, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 4}),
    (2 * 256, "float16", {"fused": True, "hidden": 256, "ctas": 1}),
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("world,parities", [(2, 2), (3, 2), (4, 2), (3, 3)])
def test_fused_add_rmsnorm_emulated(world: int, parities: int) -> None:
    """NvrarComm.fused_add_rmsnorm: the sum over the ranks plus the residual, normed, in place,
    identical bits on every rank, between plain lamport calls (two and three parities)."""
    _check(_emulate(1, world, FUSED_CASES, parities=parities), FUSED_CASES)


#: Calls above AHEAD_MAX_WORDS per source (70001 bf16 elements: 17501 words) empty their own
#: slots at their end and leave nothing to their successor; the small ones between defer.
AHEAD_BIG_CASES: list[Case] = [
    (70001, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 4}),
    (300, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 1}),
    (70001, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 4}),
    (70000, "float16", {"algo": "oneshot", "proto": "lamport", "block": 2048, "ctas": 8}),
    (3000, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (70001, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 2}),
    (301, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 1}),
    (299, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 1}),
    (70001, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 1024, "ctas": 4}),
]


#: The row-parallel linear layer + all-reduce (``linear_all_reduce``) between plain lamport
#: calls: 1, 3 and 16 rows (a full 16-row tile, rows padded in it), K not a multiple of the step.
LINEAR_CASES: list[Case] = [
    (64, "bfloat16", {"linear": True, "n": 64, "k": 40, "bn": 16, "bk": 16}),
    (999, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (3 * 32, "float16", {"linear": True, "n": 32, "k": 64, "bn": 16, "bk": 32}),
    (16 * 64, "bfloat16", {"linear": True, "n": 64, "k": 48, "bn": 32, "bk": 32}),
    (500, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 1}),
    (2 * 64, "bfloat16", {"linear": True, "n": 64, "k": 24, "bn": 16, "bk": 16}),
    # prefetch=1: the interpreter skips the prefetch (PTX), so this checks only that the
    # argument reaches the launch; the sm_90 compile test below checks the prefetch itself
    (3 * 64, "bfloat16", {"linear": True, "n": 64, "k": 40, "bn": 16, "bk": 16, "prefetch": 1}),
]


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("world,parities", [(2, 2), (3, 2), (2, 3), (3, 3)])
def test_linear_all_reduce_emulated(world: int, parities: int) -> None:
    """NvrarComm.linear_all_reduce: the sum over the ranks of x @ weight.T in one kernel,
    identical bits on every rank, between plain lamport calls that reuse its slots; with three
    parities (ARTUNE_NVRAR_CLEAR_AHEAD) each call empties what the call before it read, a
    linear one or not, and leaves its own words to the next."""
    _check(_emulate(1, world, LINEAR_CASES, parities=parities), LINEAR_CASES)


def test_linear_all_reduce_refuses_what_does_not_fit() -> None:
    """Every input linear_all_reduce cannot take is named before anything launches."""
    lay = Layout(Nodes(1, 2), 1 << 12, 1 << 12, 1 << 12)
    buf = torch.empty(lay.total_bytes, dtype=torch.uint8)
    comm = NvrarComm(0, Nodes(1, 2), lay, buf, [buf.data_ptr()] * 2, torch.device("cpu"),
                     timeout_s=1.0, interpret=True)
    bf = torch.bfloat16
    x, w = torch.zeros(2, 32, dtype=bf), torch.zeros(64, 32, dtype=bf)
    assert comm.linear_problem(x, w) is None
    for args, words in [
        ((x.float(), w.float()), "not bf16/fp16"),
        ((x, w[:, :16]), "must be [rows, K]"),
        ((x, w.half()), "weight must be torch.bfloat16"),
        ((torch.zeros(65, 32, dtype=bf), w), "at most 64"),
        ((x, torch.zeros(48, 32, dtype=bf)), "multiple of block_n=32"),
        ((x, w.t().contiguous().t()), "contiguous"),
        ((x, w, torch.zeros(2, 63, dtype=bf)), "out must be"),
        ((torch.zeros(64, 32, dtype=bf), torch.zeros(64, 32, dtype=bf)), "capacity"),
    ]:
        why = comm.linear_problem(*args)
        assert why is not None and words in why, (words, why)
        with pytest.raises(ValueError, match="linear_all_reduce \\(rank 0\\)"):
            comm.linear_all_reduce(*args)
    assert "block_n=24" in (comm.linear_problem(x, w, None, 24) or "")
    assert "stages=9" in (comm.linear_problem(x, w, None, 32, 256, 9) or "")
    # no depth given: the default 5, or the deepest that fits (64 rows: a buffer per stage)
    x64 = torch.zeros(64, 32, dtype=bf)
    assert linear_depth(2, 32, 256) == 5 and linear_depth(64, 32, 256) == 4
    assert "240 KiB of shared memory" in (comm.linear_problem(x64, w, None, 32, 256, 5) or "")
    x8, w128 = torch.zeros(8, 512, dtype=bf), torch.zeros(128, 512, dtype=bf)
    assert comm.linear_problem(x8, w128, None, 128, 512, 2) is None  # (16 + 128) rows: 144 KiB
    assert "288 KiB of shared memory" in (comm.linear_problem(x8, w128, None, 128, 512, 3)
                                          or "")
    assert comm.linear_all_reduce(x[:0], w).shape == (0, 64)


@needs_triton
@pytest.mark.slow
def test_clear_ahead_large_calls_clear_their_own_slots() -> None:
    from artune.kernels.nvrar_lamport import AHEAD_MAX_WORDS

    assert 70000 // 4 > int(getattr(AHEAD_MAX_WORDS, "value", AHEAD_MAX_WORDS)) > 3000
    _check(_emulate(1, 2, AHEAD_BIG_CASES, max_bytes=1 << 18, parities=3), AHEAD_BIG_CASES)


@needs_triton
@pytest.mark.slow
def test_clear_ahead_parities_stay_consecutive_where_the_epochs_wrap() -> None:
    """The lamport epoch counters wrap at a multiple of 3 (LAMPORT_WRAP), so the calls around
    the wrap still take consecutive parities. (A wrap at 2**32 would give two calls in a row the
    same parity; the second would read the first one's words, which nobody cleared yet.) The
    counters start 3 below the wrap, so the fourth call is the first after it, and rank 1 comes
    late to it: rank 0 must wait for its words rather than take stale ones."""
    from artune.kernels.nvrar_lamport import LAMPORT_WRAP

    wrap = int(getattr(LAMPORT_WRAP, "value", LAMPORT_WRAP))
    assert wrap < 2**31
    _check(_emulate(1, 2, AHEAD_CASES, parities=3, lamport_epoch=wrap - 3, timeout_s=30.0,
                    stall=(1, 2.0, 3)), AHEAD_CASES)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype,proto", [("float32", "ll"), ("bfloat16", "lamport")])
def test_a_skipped_call_times_out_with_the_named_error(dtype: str, proto: str) -> None:
    _skipped_call_names(
        (600, dtype, {"algo": "oneshot", "proto": proto, "block": 256, "ctas": 1}),
        "the one-shot exchange")


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("parities", [2, 3])
def test_a_skipped_two_shot_lamport_call_names_the_reduce_scatter(parities: int) -> None:
    _skipped_call_names(
        (3000, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 2}),
        "the intra-node reduce-scatter", parities)


@needs_triton
@pytest.mark.slow
def test_a_skipped_lamport_call_times_out_with_clear_ahead() -> None:
    _skipped_call_names(
        (600, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 1}),
        "the one-shot exchange", parities=3)


def _skipped_call_names(case: Case, step: str, parities: int = 2) -> None:
    """Rank 2 of 3 skips the call: ranks 0 and 1 raise, naming rank 2 and ``step``. The
    ranks start the call together (``_start_together``), and 0.5 emulated seconds = 500
    polls is long enough for both callers to have pushed, so the only missing peer is the
    skipping one."""
    results = _emulate(1, 3, [case], skip=2, timeout_s=0.5, parities=parities)
    assert results[2][0] is None
    for rank in (0, 1):
        _, code, raised = results[rank][0]
        assert code != 0 and raised is not None
        assert f"rank {rank} waited 0.5 s for rank 2 in {step}" in raised


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("algo,proto,parities", [
    ("oneshot", "ll", 2), ("oneshot", "lamport", 2), ("twoshot", "lamport", 2),
    ("oneshot", "lamport", 3), ("twoshot", "lamport", 3)])
def test_a_peer_late_past_the_timeout_fails_everywhere_never_silently(
        algo: str, proto: str, parities: int) -> None:
    """Rank 2 comes to the first call after the others gave up on it, then keeps up. The
    others are out of step from then on (their waits are off); rank 2 must not take their later
    calls' data for its own without a word, nor (two-shot) their shard sums that lack its part:
    it times out too and raises."""
    cases: list[Case] = [(600, "bfloat16", {"algo": algo, "proto": proto, "block": 256,
                                            "ctas": 1})] * 4
    results = _emulate(1, 3, cases, timeout_s=0.2, stall=(2, 6.0, 0), parities=parities)
    for rank in (0, 1):
        assert all(raised for _, _, raised in results[rank]), f"rank {rank} did not raise"
    assert results[2][-1][2] is not None, "the late rank finished every call without an error"
    assert "waited 0.2 s for rank" in results[2][-1][2]
    # Until it raises, every result the late rank returned is its own call's sum.
    for call, (bits, code, raised) in enumerate(results[2]):
        if code or raised:
            break
        y = torch.from_numpy(bits.copy()).view(torch.bfloat16).float()
        xs = torch.stack([_input(r, 600, "bfloat16", call).float() for r in range(3)])
        tol = 4 * 2.0**-7 * xs.abs().sum(0) + 1e-30
        assert ((y - xs.sum(0)).abs() <= tol).all(), f"call {call}: another call's data"


# --------------------------------------------------------------------------------------------
# Out-of-bounds writes: every byte a call changes must lie in a slot the layout gives it
# --------------------------------------------------------------------------------------------

_PATTERN = 0x5A  # neither a valid LL flag (epochs here are small) nor a valid signal
_GUARD = 4096  # bytes of pattern around every buffer and output


def _written_ranges(lay: Layout, lr: int, cases: list[Case]) -> list[tuple[int, int]]:
    """Byte ranges of rank ``lr``'s buffer (one node) that ``cases`` may write: slots of the
    sources j != lr, up to the last chunk each call covers, and their signals."""
    nd, off = lay.nodes, lay.offsets()
    out: list[tuple[int, int]] = []
    for call, (numel, dtype, f) in enumerate(cases):
        plan = Plan(**f)
        esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        pack = 2 if esize == 2 else 1
        epoch = call + 1
        if plan.proto == "lamport":
            continue  # its slots end as they began (the reader clears them): checked apart
        if plan.algo == "oneshot":
            nbytes = cdiv(numel, plan.block) * (plan.block // pack) * 8
            for j in range(nd.world):
                if j != lr:
                    at = off["oneshot"] + ((epoch & 1) * nd.world + j) * lay.oneshot_slot
                    out.append((at, at + nbytes))
            continue
        ll = plan.proto == "ll"
        shard = round_up(cdiv(numel, nd.local), 16)
        chunks = cdiv(shard, plan.block)
        chunk_bytes = (plan.block // pack) * 8 if ll else plan.block * esize
        slot = lay.ll_slot if ll else lay.sig_slot
        for region in ("rs", "ag"):
            for j in range(nd.local):
                if j != lr:
                    at = off[f"{region}_{'ll' if ll else 'sig'}"] + j * slot
                    out.append((at, at + chunks * chunk_bytes))
        if not ll:
            for phase in (0, 1):
                for j in range(nd.local):
                    first = (((epoch & 1) * lay.phases + phase) * nd.local + j) * lay.max_chunks
                    out.append((off["signals"] + 8 * first, off["signals"] + 8 * (first + chunks)))
    return out


def _rank_guarded(rank: int, world: int, folder: str, lay_args: tuple[int, int, int],
                  cases: list[Case], q: Any) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        lay = Layout(Nodes(1, world), *lay_args)
        size = lay.total_bytes + 2 * _GUARD
        raw = [torch.from_file(str(Path(folder) / f"rank{r}"), shared=True, size=size,
                               dtype=torch.uint8) for r in range(world)]
        bufs = [b[_GUARD:_GUARD + lay.total_bytes] for b in raw]
        comm = NvrarComm(rank, Nodes(1, world), lay, bufs[rank], [b.data_ptr() for b in bufs],
                         torch.device("cpu"), timeout_s=60.0, interpret=True)
        out: list[Any] = []
        for call, (numel, dtype, fields) in enumerate(cases):
            dt = getattr(torch, dtype)
            pad = _GUARD // torch.empty(0, dtype=dt).element_size()
            x = _input(rank, numel, dtype, call)
            big = torch.full((numel + 2 * pad,), 3.0, dtype=dt)
            y = comm.all_reduce(x, Plan(**fields), out=big[pad:pad + numel])
            guard_ok = bool((big[:pad] == 3.0).all() and (big[pad + numel:] == 3.0).all())
            out.append((y.view(torch.int16 if y.element_size() == 2 else torch.int32).numpy(),
                        comm.error_code(), None, guard_ok))
        q.put((rank, out, None))
    except Exception as exc:  # noqa: BLE001 - report to the parent
        import traceback

        q.put((rank, None, "".join(traceback.format_exception(exc))))


# The geometries of the 4-rank default plans that were wrong on 4x H200 (LL 512-element blocks,
# signal 2048/4096, tails, several chunks per CTA), scaled down to interpreter sizes.
GUARD_CASES: list[Case] = [
    (4 * 1024 + 3, "bfloat16", {"algo": "twoshot", "proto": "ll", "block": 512, "ctas": 2}),
    (4 * 4096 - 5, "bfloat16", {"algo": "twoshot", "proto": "signal", "block": 2048, "ctas": 1}),
    (3001, "float32", {"algo": "twoshot", "proto": "ll", "block": 256, "ctas": 4}),
    (999, "bfloat16", {"algo": "oneshot", "block": 256, "ctas": 2}),
    (4 * 4096 + 17, "float16", {"algo": "twoshot", "proto": "signal", "block": 4096, "ctas": 2}),
    (4 * 1024 + 3, "bfloat16", {"algo": "oneshot", "proto": "lamport", "block": 512, "ctas": 3}),
    (999, "float16", {"algo": "oneshot", "proto": "lamport", "block": 256, "ctas": 2}),
    (16 * 1024 + 5, "bfloat16", {"algo": "twoshot", "proto": "lamport", "block": 512, "ctas": 3}),
    (4 * 1024, "float16", {"algo": "twoshot", "proto": "lamport", "block": 256, "ctas": 4}),
]


@needs_triton
@pytest.mark.slow
def test_calls_write_only_their_slots_and_outputs() -> None:
    """4 ranks on one node, the launcher's real capacities (one-shot < LL < max): the bytes each
    call changed in every rank's buffer lie inside the slots and signals the layout gives it,
    nothing outside the buffers or the output changed, and the sums are right."""
    world, lay_args = 4, (1 << 20, 64 << 10, 256 << 10)
    lay = Layout(Nodes(1, world), *lay_args)
    lp_at, lp_size = lay.region("lamport")
    empty = bytes([0x00, 0x80]) * (lp_size // 2)  # the lamport sentinel, little-endian
    with tempfile.TemporaryDirectory(prefix="artune-nvrar-guard-") as folder:
        for r in range(world):
            raw0 = bytearray([_PATTERN]) * (lay.total_bytes + 2 * _GUARD)
            raw0[_GUARD + lp_at:_GUARD + lp_at + lp_size] = empty
            (Path(folder) / f"rank{r}").write_bytes(bytes(raw0))
        got = _spawn_ranks(
            world, _rank_guarded, lambda r: (r, world, folder, lay_args, GUARD_CASES))
        import numpy as np

        for r in range(world):
            raw = np.fromfile(Path(folder) / f"rank{r}", dtype=np.uint8)
            assert (raw[:_GUARD] == _PATTERN).all(), f"rank {r}: written below its buffer"
            assert (raw[-_GUARD:] == _PATTERN).all(), f"rank {r}: written above its buffer"
            lamport = raw[_GUARD + lp_at:_GUARD + lp_at + lp_size].tobytes()
            assert lamport == empty, f"rank {r}: lamport slots not all empty after the calls"
            allowed = np.zeros(lay.total_bytes, dtype=bool)
            allowed[lp_at:lp_at + lp_size] = True  # checked just above
            for a, b in _written_ranges(lay, r, GUARD_CASES):
                allowed[a:b] = True
            changed = raw[_GUARD:-_GUARD] != _PATTERN
            stray = np.flatnonzero(changed & ~allowed)
            if stray.size:
                regions = sorted(lay.offsets().items(), key=lambda kv: kv[1])
                at = int(stray[0])
                name = [k for k, v in regions if v <= at][-1]
                raise AssertionError(f"rank {r}: {stray.size} bytes written outside the slots, "
                                     f"first at {at} (region {name!r})")
    results = [[o[:3] for o in got[r]] for r in range(world)]
    for r in range(world):
        assert all(o[3] for o in got[r]), f"rank {r}: written outside the output"
    _check(results, GUARD_CASES)


def test_replace_keeps_plans_frozen() -> None:
    p = replace(Plan(), proto="signal")
    assert p.proto == "signal" and Plan().proto == "ll"


@pytest.mark.parametrize("quick", [False, True])
def test_quick_tunes_only_the_cta_count(quick: bool) -> None:
    """``--quick`` keeps NVRAR at its default kernels (built ahead) and searches the CTA count,
    a launch argument; a full tune searches the whole space."""
    from types import SimpleNamespace

    from artune.autotune.driver import Driver

    ctx = _ctx(4, 4, 256 << 20)
    be = NvrarBackend.__new__(NvrarBackend)  # only its class is looked at
    drv = Driver.__new__(Driver)
    drv.cfg = SimpleNamespace(quick=quick)  # type: ignore[assignment]
    drv.crew = SimpleNamespace(ctx=ctx, built={"nvrar": be})  # type: ignore[assignment]
    for nbytes in (4096, 65536, 1 << 20, 64 << 20):
        full = NvrarBackend.search_space(nbytes, ctx)
        space = drv._space("nvrar", nbytes, "bfloat16")
        default = NvrarBackend.default_params(nbytes, ctx)
        if not quick:
            assert space == full
            continue
        assert space["ctas"] == full["ctas"] and len(space["ctas"]) > 1
        for k, v in space.items():
            if k != "ctas":
                assert v == [default[k]], (nbytes, k, v)


def test_pdl_reaches_the_launch_and_the_kernel_key() -> None:
    """With ``pdl`` on, every peer-address kernel gets the PDL constexpr and Triton's
    ``launch_pdl`` option, and its compiled-variant key differs from the plain one; off (always
    under the interpreter, and with ARTUNE_NVRAR_PDL=0), neither is passed."""
    from artune.kernels.nvrar import Plan

    nd = Nodes(1, 2)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [1 << 20, 2 << 20], torch.device("cpu"), timeout_s=1.0)
    assert comm.pdl is False  # CPU: the interpreter never takes PDL
    x = torch.zeros(1000, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    plans = [Plan(algo="oneshot", proto="ll", block=256, ctas=2),
             Plan(algo="oneshot", proto="lamport", block=256, ctas=2),
             Plan(algo="twoshot", proto="ll", block=256, ctas=2),
             Plan(algo="twoshot", proto="signal", block=256, ctas=2)]
    plain = [comm.spec(x, y, p) for p in plans]
    for s in plain:
        assert "PDL" not in s.kwargs and "launch_pdl" not in s.kwargs
    comm.pdl = True
    for p, before in zip(plans, plain, strict=True):
        s = comm.spec(x, y, p)
        assert s.kwargs["PDL"] is True and s.kwargs["launch_pdl"] is True, p
        assert s.key != before.key, p


def test_the_two_shot_lamport_kernel_takes_pdl_as_its_own_variable_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-shot lamport kernel takes PDL its own way: by default (wait) it waits under PDL
    but does not launch the next grid early (in a served model the kernel after it ran longer
    with that early launch: docs/nvrar.md); =off launches it without PDL, =on as the other
    peer-address kernels; each mode its own compiled variant, and none adds PDL without
    ARTUNE_NVRAR_PDL. The one-shot lamport keeps the global switch."""
    from artune import envs
    from artune.kernels.nvrar import Plan

    nd = Nodes(1, 4)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18, 3)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [1 << 20, 2 << 20, 3 << 20, 4 << 20], torch.device("cpu"), timeout_s=1.0)
    assert comm.twoshot_pdl == "wait"
    x = torch.zeros(4096, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    two = Plan(algo="twoshot", proto="lamport", block=256, ctas=2)
    one = Plan(algo="oneshot", proto="lamport", block=256, ctas=2)
    no_pdl = comm.spec(x, y, two)
    off_one = comm.spec(x, y, one)
    comm.pdl = True
    specs = {}
    for mode in ("off", "wait", "on"):
        comm.twoshot_pdl = mode
        specs[mode] = comm.spec(x, y, two)
    assert specs["off"].kernel.__name__ == "twoshot_lamport_kernel"
    assert "PDL" not in specs["off"].kwargs and "launch_pdl" not in specs["off"].kwargs
    assert specs["off"].key == no_pdl.key
    assert specs["wait"].kwargs["launch_pdl"] is True and specs["wait"].kwargs["PDL"] is True
    assert specs["wait"].kwargs["PDL_NEXT"] is False
    assert specs["on"].kwargs["PDL_NEXT"] is True and specs["on"].kwargs["launch_pdl"] is True
    assert len({s.key for s in specs.values()}) == 3
    comm.pdl = False  # the global switch off: no mode adds PDL
    assert "PDL" not in comm.spec(x, y, two).kwargs
    comm.pdl = True
    on_one = comm.spec(x, y, one)
    assert on_one.kwargs["PDL"] is True and "PDL_NEXT" not in on_one.kwargs
    assert on_one.key != off_one.key
    monkeypatch.setenv("ARTUNE_NVRAR_TWOSHOT_PDL", "Off")
    assert envs.get("ARTUNE_NVRAR_TWOSHOT_PDL") == "off"
    monkeypatch.setenv("ARTUNE_NVRAR_TWOSHOT_PDL", "1")
    with pytest.raises(ValueError, match="expected off, wait or on"):
        envs.get("ARTUNE_NVRAR_TWOSHOT_PDL")


def test_clear_ahead_reaches_the_lamport_kernels_only() -> None:
    """Three parities: both lamport kernels get AHEAD, the pending-clear table and their own
    epoch counters (lamport calls only), under another compiled-variant key; every other kernel
    keeps the shared counters and no AHEAD."""
    from artune.kernels.nvrar import Plan

    nd = Nodes(1, 2)
    specs = {}
    for parities in (2, 3):
        lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18, parities)
        comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                         [1 << 20, 2 << 20], torch.device("cpu"), timeout_s=1.0)
        x = torch.zeros(1000, dtype=torch.bfloat16)
        plans = [Plan(algo="oneshot", proto="lamport", block=256, ctas=2),
                 Plan(algo="twoshot", proto="lamport", block=256, ctas=2),
                 Plan(algo="oneshot", proto="ll", block=256, ctas=2),
                 Plan(algo="twoshot", proto="signal", block=256, ctas=2)]
        specs[parities] = (comm, [comm.spec(x, torch.empty_like(x), p) for p in plans])
    two, three = specs[2], specs[3]
    for k, (a, b) in enumerate(zip(two[1], three[1], strict=True)):
        lamport = k < 2
        assert b.kwargs.get("AHEAD", False) is lamport and a.kwargs.get("AHEAD", False) is False
        assert (a.key != b.key) is lamport
        counters = [t for t in b.args if isinstance(t, torch.Tensor) and t.dtype == torch.int32]
        if lamport:
            assert any(t is three[0].lctr for t in counters)
            assert any(t is three[0].pend for t in counters)
            assert not any(t is three[0].ctr for t in counters)
        else:
            assert any(t is three[0].ctr for t in counters)
            assert not any(t is three[0].lctr for t in counters)


def test_lamport_per_thread_gather_never_gives_a_word_to_two_threads() -> None:
    """The per-thread gather clears each word after reading it, so a word held by two threads
    could be cleared before the second has polled it (on 4x H100 with 256-element chunks and
    4 warps a wait ran out that way): the launch runs block / 128 warps, one thread per 8-byte
    word. Words of consecutive elements only where n % 4 == 0 (the same on every rank)."""
    from artune.kernels.nvrar import Plan

    nd = Nodes(1, 4)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [(r + 1) << 20 for r in range(4)], torch.device("cpu"), timeout_s=1.0)
    for block, warps, want in [(256, 4, 2), (512, 4, 4), (1024, 4, 8), (256, 1, 2),
                               (512, 8, 4), (2048, 8, 16)]:
        for numel, vec in [(4096, True), (4098, False)]:
            x = torch.zeros(numel, dtype=torch.bfloat16)
            s = comm.spec(x, torch.empty_like(x),
                          Plan(algo="oneshot", proto="lamport", block=block, ctas=8, warps=warps))
            assert s.kwargs["num_warps"] == want and want * 32 * 4 == block, (block, warps)
            assert s.kwargs["VEC"] is vec
            assert want in s.key and vec in s.key[-1:]


def test_fused_launch_slices_zero_rows_and_the_exchange_timeout_message() -> None:
    """A fused call's launch: 3 rows of 3584 are 21 CTAs of 512 elements, 7 slices per row
    polled as 8 lanes (one dead), with the partial-sum words; zero rows launch nothing and
    raise nothing; a timeout in the exchange between a row's CTAs has its own message."""
    nd = Nodes(1, 4)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [(r + 1) << 20 for r in range(4)], torch.device("cpu"), timeout_s=1.0)
    bf = torch.bfloat16
    x, res, w = torch.zeros(3, 3584, dtype=bf), torch.zeros(3, 3584, dtype=bf), torch.ones(
        3584, dtype=bf)
    plan = comm.fused_plan(3, 3584)
    assert isinstance(plan, Plan)
    spec = comm._lamport(x, x, x.numel(), plan, norm=(res, w, 1e-5))
    assert (spec.grid, spec.kwargs["BLOCK"], spec.kwargs["SPLIT"], spec.kwargs["SLOTS"]) == (
        21, 512, 7, 8)
    assert spec.kwargs["NORM"] is True and spec.kwargs["num_warps"] == 4
    assert spec.args[6] is comm.partials and comm.partials.numel() >= spec.grid
    plain = comm._lamport(x, x, x.numel(), Plan("oneshot", "lamport", block=512, ctas=21))
    assert plain.kwargs["SPLIT"] == 1 and plain.kwargs["NORM"] is False
    # zero rows: nothing to do, no refusal (an idle rank's empty batch)
    empty = torch.zeros(0, 4096, dtype=bf)
    assert comm.fused_problem(empty, empty.clone(), torch.ones(4096, dtype=bf)) is None
    comm._launch = None  # type: ignore[assignment,method-assign]  # must not be reached
    comm.fused_add_rmsnorm(empty, empty.clone(), torch.ones(4096, dtype=bf), 1e-5)
    assert "CTAs" in step_name(STEP_NORM, nd)
    msg = decode_error((1 << 62) | (STEP_NORM << 32) | (2 << 16) | 5, 2, nd, 3.0)
    assert "rank 2, CTA 5" in msg and "did not all run at once" in msg and "close()" in msg


def test_fused_add_rmsnorm_refuses_what_it_cannot_run_with_the_reason() -> None:
    """The fused all-reduce + residual add + RMSNorm cuts rows into slices of a chunk size
    (256 to 4096 elements, at most 32 per row, one CTA each): 16-bit rows of such a multiple,
    residual and weight to match, 16-byte aligned, within the one-shot capacity and, for rows
    of several slices, all CTAs at once within the grid; anything else is refused with the
    reason, before any launch. Under the interpreter a row is one chunk."""
    nd = Nodes(1, 4)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [(r + 1) << 20 for r in range(4)], torch.device("cpu"), timeout_s=1.0)
    bf = torch.bfloat16

    def problem(rows: int, hidden: int, dt: torch.dtype = bf, **over: Any) -> str | None:
        x = over.get("x", torch.zeros(rows, hidden, dtype=dt))
        res = over.get("res", torch.zeros(rows, hidden, dtype=dt))
        w = over.get("w", torch.ones(hidden, dtype=dt))
        return comm.fused_problem(x, res, w, over.get("block"), over.get("ctas"))

    assert problem(4, 4096) is None and problem(1, 256, torch.float16) is None
    assert problem(2, 3584) is None and problem(2, 8192) is None  # 7 and 16 slices of 512
    assert "bf16/fp16" in (problem(4, 4096, torch.float32) or "")
    assert "multiple of a chunk size" in (problem(4, 3000) or "")
    assert "multiple of a chunk size" in (problem(1, 33 * 256) or "")  # 33 slices of 256
    assert "block=768" in (problem(1, 4096, block=768) or "")
    assert "at once" in (problem(4, 8192, ctas=4) or "")  # 4 rows x 2 slices of 4096 > 4 CTAs
    assert "[rows, hidden]" in (problem(1, 4096, x=torch.zeros(4096, dtype=bf)) or "")
    assert "residual must be" in (problem(2, 4096, res=torch.zeros(3, 4096, dtype=bf)) or "")
    assert "weight must be" in (problem(2, 4096, w=torch.ones(4096)) or "")
    odd = torch.zeros(2 * 4096 + 1, dtype=bf)[1:].view(2, 4096)  # 2-byte offset
    assert "aligned" in (problem(2, 4096, x=odd) or "")
    assert "exceeds" in (problem(64, 4096) or "")  # 512 KiB > the 64 KiB one-shot capacity
    # the plans: up to 8 rows, 512-element slices while rows x slices fit the grid (256 CTAs
    # off a GPU, 4 asked), then larger ones; above 8 rows the largest chunks; rows of one
    # slice share CTAs when there are more rows than CTAs
    plans = {(r, h, c): comm.fused_plan(r, h, ctas=c) for r, h, c in
             ((1, 4096, None), (8, 4096, None), (2, 4096, 4), (16, 4096, None), (64, 4096, 32),
              (600, 4096, None), (3, 3584, None), (16, 3584, None), (20, 8192, None),
              (1, 256, None))}
    got = {k: (p.block, p.ctas) if isinstance(p, Plan) else p for k, p in plans.items()}
    assert got == {(1, 4096, None): (512, 8), (8, 4096, None): (512, 64),
                   (2, 4096, 4): (2048, 4), (16, 4096, None): (4096, 16),
                   (64, 4096, 32): (4096, 32), (600, 4096, None): (4096, 256),
                   (3, 3584, None): (512, 21), (16, 3584, None): (512, 112),
                   (20, 8192, None): (4096, 40), (1, 256, None): (256, 1)}, got
    assert comm.fused_plan(1, 4096, block=1024) == Plan("oneshot", "lamport", block=1024, ctas=4)
    # under the interpreter (CTAs run one after another) a row is one chunk
    icomm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                      [(r + 1) << 20 for r in range(4)], torch.device("cpu"), timeout_s=1.0,
                      interpret=True)
    assert icomm.fused_plan(5, 4096) == Plan("oneshot", "lamport", block=4096, ctas=5)
    assert "a row is one chunk" in str(icomm.fused_plan(1, 8192))
    assert "a row is one chunk" in str(icomm.fused_plan(1, 4096, block=512))
    with pytest.raises(ValueError, match="rank 0.*multiple of a chunk size"):
        comm.fused_add_rmsnorm(torch.zeros(1, 100, dtype=bf), torch.zeros(1, 100, dtype=bf),
                               torch.ones(100, dtype=bf), 1e-5)
    # an instance whose earlier wait ran out says so before launching anything
    comm.err_host[0] = (1 << 62) | 5
    with pytest.raises(NvrarTimeoutError):
        comm.fused_add_rmsnorm(torch.zeros(1, 256, dtype=bf), torch.zeros(1, 256, dtype=bf),
                               torch.ones(256, dtype=bf), 1e-5)


def test_lamport_blocks_above_one_word_per_thread_and_wrong_outputs_are_refused() -> None:
    """A lamport chunk of more than 4096 elements would give a thread two words (and Triton two
    layouts, each polling: see LAMPORT_BLOCK_MAX); the plan is refused with the reason and the
    tuner never tries it. An ``out`` that does not match ``x`` is refused before any launch."""
    from artune.kernels.nvrar import Plan

    bad = Plan(algo="twoshot", proto="lamport", block=8192, ctas=8)
    assert "at most 4096" in (bad.problem() or "")
    assert Plan(algo="twoshot", proto="lamport", block=4096, ctas=8).problem() is None
    ctx = _ctx(8, 8, 256 << 20)
    assert not NvrarBackend.admits({"algo": "twoshot", "proto": "lamport", "block": 8192,
                                    "ctas": 8}, 4 << 20, ctx)
    nd = Nodes(1, 2)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [1 << 20, 2 << 20], torch.device("cpu"), timeout_s=1.0)
    x = torch.zeros(1000, dtype=torch.bfloat16)
    plan = Plan(algo="oneshot", proto="lamport", block=256, ctas=2)
    for out in (torch.empty(999, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.float16),
                torch.empty(2000, dtype=torch.bfloat16)[::2]):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            comm.all_reduce(x, plan, out=out)


def test_a_message_above_the_built_size_names_the_fix() -> None:
    """Buffers are sized when the backend is built (they cannot grow during CUDA-graph
    capture): a larger message is refused with the setting that fixes it, before any launch."""
    from artune.kernels.nvrar import Plan

    nd = Nodes(1, 2)
    lay = Layout(nd, 1 << 20, 1 << 16, 1 << 18)
    comm = NvrarComm(0, nd, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8),
                     [1 << 20, 2 << 20], torch.device("cpu"), timeout_s=1.0)
    x = torch.zeros((2 << 20) // 2, dtype=torch.bfloat16)  # 2 MiB: twice the built size
    with pytest.raises(ValueError, match=r"cannot grow during CUDA-graph capture.*"
                                         r"GroupContext.max_bytes >= the largest message"):
        comm.all_reduce(x, Plan(algo="twoshot", proto="signal", block=256, ctas=2))


def _close_rank(rank: int, world: int, failed_ranks: tuple[int, ...]) -> list[str]:
    """NvrarBackend.close on a gloo rank, with a stand-in for the NVRAR instance (its error
    word) and for the collective NVSHMEM free (recorded, not run)."""
    import torch.distributed as dist

    from artune.backends import _nvshmem

    freed: list[str] = []
    _nvshmem.free = lambda t: freed.append("freed")  # type: ignore[assignment]
    backend = object.__new__(NvrarBackend)
    backend.ctx = replace(_ctx(world, world), rank=rank, group=dist.group.WORLD,
                          cpu_group=dist.group.WORLD)
    code = 1 if rank in failed_ranks else 0
    backend.comm = type("Comm", (), {"error_code": lambda self: code})()  # type: ignore[assignment]
    backend.buf = torch.empty(4)  # type: ignore[assignment]
    backend.close()
    return freed


@pytest.mark.parametrize("failed", [(), (1,)])
def test_close_frees_on_every_rank_or_on_none(failed: tuple[int, ...]) -> None:
    """A timeout is recorded only on the rank that waited; the ranks agree before the
    collective free, so that none frees (and none waits forever on a peer that skips it)
    when any of them timed out, and all do otherwise."""
    from conftest import run_gloo

    results = run_gloo(_close_rank, 3, failed)
    assert results == ([[], [], []] if failed else [["freed"]] * 3)


_SM90_PROBE = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def copy(x, y):
    tl.store(y + tl.arange(0, 128), tl.load(x + tl.arange(0, 128)))


c = triton.compile(ASTSource(fn=copy, signature={"x": "*bf16", "y": "*bf16"}),
                   target=GPUTarget("cuda", 90, 32))
assert c.asm["cubin"]
"""


@functools.cache
def _sm90_unavailable() -> str | None:
    """Why Triton cannot compile a trivial kernel for an H100 (sm_90) here, or None (probed
    once per session, in a fresh process without the interpreter)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:  # Triton reads a kernel's source from its file
        path = os.path.join(tmp, "sm90_probe.py")
        with open(path, "w") as f:
            f.write(_SM90_PROBE)
        probe = subprocess.run([sys.executable, path], capture_output=True, text=True,
                               env=env, timeout=300)
    return probe.stderr.strip()[-300:] if probe.returncode else None


def _sm90_script(script: str) -> dict[str, Any]:
    """Run ``script`` (it prints a JSON object last) in a fresh process that compiles for an
    H100 (sm_90: PTX and ptxas's cubin) on this CPU machine. The test is skipped only where a
    trivial kernel cannot be compiled so; any failure of the script itself fails it (a PTX
    typo also makes ptxas fail, and must not read as "cannot compile here")."""
    import json
    import subprocess
    import sys

    why = _sm90_unavailable()
    if why is not None:
        pytest.skip(f"Triton cannot compile for sm_90 here: {why}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


_PTX_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from artune.kernels.nvrar_linear import linear_lamport_kernel as kernel

names = list(kernel.arg_names)
types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "K": "i32",
         "pend_ptr": "*i32",
         "ctr_ptr": "*i32", "err_dev": "*i64", "rank": "i32"}
# what the launch specializes on a GPU: 16-byte aligned pointers, K a multiple of 16
aligned = ["x_ptr", "w_ptr", "y_ptr", "K", "ctr_ptr", "err_dev"]


def build(prefetch, stages, bm=16):
    const = {"N": 4096, "W": 4, "BM": bm, "BN": 32, "BK": 256, "MAXC": 1024,
             "INTERPRET": False, "PDL": True, "PREFETCH": prefetch, "STAGES": stages}
    sig = {n: "constexpr" if n in const else types.get(n, "i64") for n in names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": stages})


out = {}
for mode in (0, 1, 2):
    c = build(mode, 3)
    lines = c.asm["ptx"].splitlines()
    out[mode] = {
        "lines": [i for i, ln in enumerate(lines) if "prefetch.global.L2" in ln],
        "bulk": [i for i, ln in enumerate(lines) if "cp.async.bulk.prefetch.L2" in ln],
        "wait": [i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln],
        "cubin": len(c.asm.get("cubin", b""))}
for stages in (2, 3, 4, 5):
    c = build(0, stages)
    out[f"stages{stages}"] = {"shared": c.metadata.shared,
                              "copies": c.asm["ptx"].count("cp.async.cg")}
for stages in (2, 4):
    out[f"rows64_stages{stages}"] = build(0, stages, 64).metadata.shared
print(json.dumps(out))
"""


@needs_triton
@pytest.mark.slow
def test_linear_kernel_prefetches_its_weight_before_the_pdl_wait_in_sm90_code() -> None:
    """The fused linear kernel, compiled for an H100 (sm_90, PTX and ptxas's cubin) on this
    CPU machine: its weight prefetches come before programmatic dependent launch's wait, so
    they can run while the kernel before it finishes: line by line (``PREFETCH=1``) or in bulk
    (2); none without. Its K loop pipelines ``stages`` deep (shared memory and copies in
    flight grow with it). ``prefetch_mode`` picks bulk only where every quarter row is 16-byte
    aligned."""
    from artune.kernels.nvrar import linear_smem, prefetch_mode

    got = _sm90_script(_PTX_SCRIPT)
    off, lines, bulk = got["0"], got["1"], got["2"]
    for g in (off, lines, bulk):
        assert g["cubin"] > 0 and len(g["wait"]) == 1
    assert off["lines"] == [] and off["bulk"] == []
    assert lines["lines"] and max(lines["lines"]) < lines["wait"][0] and lines["bulk"] == []
    assert bulk["bulk"] and max(bulk["bulk"]) < bulk["wait"][0] and bulk["lines"] == []
    # the K loop's pipelining depth is the launch's stages: one 24 KiB buffer of x and weight
    # tiles (16 x 256 and 32 x 256 bf16) per stage after the first, as linear_smem counts
    # (what linear_problem and the tune's ``fits`` check), more copies in flight
    depth = [got[f"stages{n}"] for n in (2, 3, 4, 5)]
    assert [d["shared"] for d in depth] == [24576, 49152, 73728, 98304]
    assert [d["shared"] for d in depth] == [linear_smem(1, 32, 256, n) for n in (2, 3, 4, 5)]
    assert all(a["copies"] < b["copies"] for a, b in zip(depth[:-1], depth[1:], strict=True))
    # a 64-row tile keeps a buffer per stage (its warpgroup MMA has one more in flight)
    assert [got[f"rows64_stages{n}"] for n in (2, 4)] == [linear_smem(64, 32, 256, n)
                                                         for n in (2, 4)] == [98304, 196608]
    # (the weight is contiguous: linear_problem refuses any other)
    w = torch.zeros(8 * 3584 + 8, dtype=torch.bfloat16)
    assert prefetch_mode(w[: 8 * 3584].view(8, 3584)) == 2
    assert prefetch_mode(torch.zeros(8, 1000, dtype=torch.bfloat16)) == 1  # K % 32
    assert prefetch_mode(w[1: 1 + 4 * 1024].view(4, 1024)) == 1  # 2 bytes off 16


_LAMPORT_PTX_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from artune.kernels.nvrar import _lamport_warps
from artune.kernels.nvrar_lamport import oneshot_lamport_kernel as kernel

names = list(kernel.arg_names)
types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16",
         "part_ptr": "*i64", "pend_ptr": "*i32", "ctr_ptr": "*i32", "err_dev": "*i64",
         "n": "i32", "rank": "i32", "eps": "fp32"}
aligned = ["x_ptr", "y_ptr", "ctr_ptr", "err_dev"]  # as a launch specializes them on a GPU
out = {}
for block in (256, 512, 1024):
    const = {"W": 4, "BLOCK": block, "MAXC": 1024, "INTERPRET": False, "PDL": True,
             "VEC": True, "AHEAD": False, "NORM": False, "SPLIT": 1, "SLOTS": 1}
    sig = {n: "constexpr" if n in const else types.get(n, "i64") for n in names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": _lamport_warps(block)})
    ptx = c.asm["ptx"]
    ttgir = c.asm["ttgir"]
    out[block] = {"bar": len(re.findall(r"\bbar\.sync\b", ptx)),
                  "convert": ttgir.count("ttg.convert_layout"),
                  "layouts": sum(ln.startswith("#blocked") for ln in ttgir.splitlines()),
                  "polls": ptx.count("ARTUNE_L4_POLL:"),
                  "shared": c.metadata.shared, "cubin": len(c.asm.get("cubin", b""))}
print(json.dumps(out))
"""


@needs_triton
@pytest.mark.slow
def test_lamport_oneshot_keeps_one_barrier_per_call_in_sm90_code() -> None:
    """The lamport one-shot as the launcher runs it (one thread per 8-byte word,
    ``_lamport_warps``), compiled for an H100 on this CPU machine: no layout conversion, no
    shared memory, one ``bar.sync`` per call (the epoch counters'), at every chunk size the
    plans use: the per-thread gather's point (docs/nvrar.md). Every [Q] tensor has one layout,
    and the four sources' words are polled by one loop per thread (one ``spin_lamport4``): a
    poll copied into a second layout would have other threads poll words whose owners clear
    them, a race. Both happen when a thread is given two words (docs/nvrar.md, "16-byte
    words"): conversions through shared memory, and the poll in two layouts."""
    got = _sm90_script(_LAMPORT_PTX_SCRIPT)
    assert set(got) == {"256", "512", "1024"}
    for block, g in got.items():
        assert g["cubin"] > 0, block
        assert (g["bar"], g["convert"], g["shared"]) == (1, 0, 0), (block, g)
        assert (g["layouts"], g["polls"]) == (1, 1), (block, g)


_WIDE_PTX_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from artune.kernels.nvrar import _lamport_warps
from artune.kernels.nvrar_wide import oneshot_wide_kernel, twoshot_wide_kernel

types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "ctr_ptr": "*i32", "err_dev": "*i64",
         "n": "i32", "shard": "i32", "rank": "i32"}
aligned = ["x_ptr", "y_ptr", "ctr_ptr", "err_dev"]
out = {}
for name, kernel in (("one", oneshot_wide_kernel), ("two", twoshot_wide_kernel)):
    names = list(kernel.arg_names)
    for block in (256, 512, 1024, 2048):
        const = {"W": 4, "BLOCK": block, "MAXC": 1024, "INTERPRET": False, "PDL": True}
        sig = {n: "constexpr" if n in const else types.get(n, "i64") for n in names}
        src = ASTSource(fn=kernel, signature=sig,
                        constexprs={(names.index(n),): v for n, v in const.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": _lamport_warps(block, wide=True)})
        ptx = c.asm["ptx"]
        ttgir = c.asm["ttgir"]
        out[f"{name}{block}"] = {
            "bar": len(re.findall(r"\bbar\.sync\b", ptx)),
            "convert": ttgir.count("ttg.convert_layout"),
            "layouts": sum(ln.startswith("#blocked") for ln in ttgir.splitlines()),
            "polls": ptx.count("ARTUNE_W4_POLL:"),
            "narrow": ptx.count("ARTUNE_L4_POLL:"),
            "st16": len(re.findall(r"st\.global\.v2\.u64", ptx)),
            "ld16": len(re.findall(r"ld\.global\.v2\.u64", ptx)),
            "st8": len(re.findall(r"st\.global\.(?:b64|u64) ", ptx)),
            "shared": c.metadata.shared, "cubin": len(c.asm.get("cubin", b""))}
print(json.dumps(out))
"""


@needs_triton
@pytest.mark.slow
def test_wide_lamport_kernels_move_16_bytes_per_thread_in_sm90_code() -> None:
    """The 16-byte lamport kernels (``nvrar_wide``) as the launcher runs them, compiled for an
    H100 on this CPU machine: every tensor in one layout (one element per thread: no layout
    conversion, no shared memory, one ``bar.sync`` per call), one 16-byte poll loop per wait
    (one-shot: one wait; two-shot: reduce-scatter and all-gather) and no 8-byte one, and every
    data store a 16-byte one: the input loads, pushes, outputs and clears each one
    instruction per 16 bytes."""
    got = _sm90_script(_WIDE_PTX_SCRIPT)
    for key, g in got.items():
        assert g["cubin"] > 0, key
        assert (g["bar"], g["convert"], g["shared"], g["layouts"]) == (1, 0, 0, 1), (key, g)
        assert (g["polls"], g["narrow"]) == ((1 if key.startswith("one") else 2), 0), (key, g)
        # W = 4. one-shot: 3 pushes, y, 4 clears (own slot masked off), the input loaded once
        # to push and once to sum; two-shot: 3 pushes (3 shards loaded), 4 clears, 3
        # all-gather pushes, y (own shard loaded), then 4 shards to y and 4 clears. The only
        # 8-byte stores: the timeout record's two words, once per wait.
        want = (8, 2, 2) if key.startswith("one") else (19, 4, 4)
        assert (g["st16"], g["ld16"], g["st8"]) == want, (key, g)


_TWOSHOT_PDL_PTX_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from artune.kernels.nvrar import _lamport_warps
from artune.kernels.nvrar_lamport import twoshot_lamport_kernel as kernel

names = list(kernel.arg_names)
types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "pend_ptr": "*i32", "ctr_ptr": "*i32",
         "err_dev": "*i64", "n": "i32", "shard": "i32", "rank": "i32"}
aligned = ["x_ptr", "y_ptr", "ctr_ptr", "err_dev"]
out = {}
for mode, pdl, nxt in (("off", False, True), ("wait", True, False), ("on", True, True)):
    const = {"W": 4, "BLOCK": 512, "MAXC": 1024, "INTERPRET": False, "PDL": pdl, "VEC": True,
             "AHEAD": False, "PDL_NEXT": nxt}
    sig = {n: "constexpr" if n in const else types.get(n, "i64") for n in names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": _lamport_warps(512)})
    ptx = c.asm["ptx"]
    out[mode] = {"wait": ptx.count("griddepcontrol.wait"),
                 "next": ptx.count("griddepcontrol.launch_dependents"),
                 "cubin": len(c.asm.get("cubin", b""))}
print(json.dumps(out))
"""


@needs_triton
@pytest.mark.slow
def test_two_shot_pdl_modes_in_sm90_code() -> None:
    """The two-shot lamport kernel compiled for an H100 in each ARTUNE_NVRAR_TWOSHOT_PDL mode:
    off has no grid-dependency instruction, wait only the wait for the previous grid (the next
    one launches when this one ends), on the wait and the early launch of the next grid."""
    got = _sm90_script(_TWOSHOT_PDL_PTX_SCRIPT)
    assert all(g["cubin"] > 0 for g in got.values()), got
    assert {m: (g["wait"], g["next"]) for m, g in got.items()} == {
        "off": (0, 0), "wait": (1, 0), "on": (1, 1)}, got


def test_a_call_plans_with_its_element_size() -> None:
    """``NvrarBackend.plan`` takes the defaults of the call's element size: on 2 GPUs a 512 KiB
    fp32 message runs the one-shot with 512-element chunks, a 16-bit one with 2048, and the
    two are cached apart (a cache keyed by bytes alone would hand one the other's plan)."""
    be = object.__new__(NvrarBackend)
    be.ctx = _ctx(2, 2, 256 << 20)
    be._plans = {}
    assert be.plan(512 << 10, None, 4).block == 512
    assert be.plan(512 << 10, None, 2).block == 2048
    assert be.plan(512 << 10, None, 4).block == 512
    assert be.plan(512 << 10, {"block": 1024}, 4).block == 1024

    class _Comm:  # what all_reduce hands the kernels
        def __init__(self) -> None:
            self.plans: list[Any] = []

        def check(self) -> None:
            pass

        def all_reduce(self, x: torch.Tensor, plan: Any, out: Any = None) -> torch.Tensor:
            self.plans.append(plan)
            return x

    comm = _Comm()
    be.comm = comm
    be.all_reduce(torch.zeros(128 << 10, dtype=torch.float32))  # 512 KiB each
    be.all_reduce(torch.zeros(256 << 10, dtype=torch.bfloat16))
    assert [p.block for p in comm.plans] == [512, 2048]


def test_the_tuner_starts_from_the_defaults_of_the_dtype_it_tunes() -> None:
    """The tuner asks for the search space and defaults of the element size it measures
    (``search_space_for`` / ``default_params_for``): on 2 GPUs a 512 KiB fp32 study starts from
    (and, with ``--quick``, keeps) the one-shot's 512-element chunks, a bf16 one from 2048."""
    from types import SimpleNamespace

    from artune.autotune.driver import Driver

    ctx = _ctx(2, 2, 256 << 20)
    be = NvrarBackend.__new__(NvrarBackend)
    drv = Driver.__new__(Driver)
    drv.crew = SimpleNamespace(ctx=ctx, built={"nvrar": be})  # type: ignore[assignment]
    for quick in (False, True):
        drv.cfg = SimpleNamespace(quick=quick)  # type: ignore[assignment]
        fp32 = drv._space("nvrar", 512 << 10, "float32")
        bf16 = drv._space("nvrar", 512 << 10, "bfloat16")
        assert fp32["block"][0] == 512 and bf16["block"][0] == 2048, (quick, fp32, bf16)
        if quick:
            assert fp32["block"] == [512] and bf16["block"] == [2048]
    assert NvrarBackend.default_params_for(512 << 10, ctx, 4)["block"] == 512
    # a backend without its own (gloo): the element-size-free methods
    from artune.backends.gloo import GlooBackend

    assert GlooBackend.search_space_for(4096, ctx, 4) == GlooBackend.search_space(4096, ctx)
    assert GlooBackend.default_params_for(4096, ctx, 4) == GlooBackend.default_params(4096, ctx)
