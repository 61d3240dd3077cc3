"""The correctness gate on 2 gloo ranks: right, wrong, rank-dependent, mutating, raising."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import run_gloo

from artune.backends.gloo import GlooBackend

pytestmark = pytest.mark.slow


class _Wrong(GlooBackend):
    """Off by 0.5 on rank 1 only."""

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        y = super().all_reduce(x, params)
        return y + 0.5 if self.ctx.rank == 1 else y


class _Disagree(GlooBackend):
    """Within tolerance, but rank 1's bits differ (one ulp on one element)."""

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        y = super().all_reduce(x, params)
        if self.ctx.rank == 1:
            y.view(torch.int16 if y.element_size() == 2 else torch.int32)[3] += 1
        return y


class _Mutating(GlooBackend):
    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        x.mul_(1.0).add_(0.0)
        x[0] = 0
        return super().all_reduce(x, params)


class _Raising(GlooBackend):
    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        raise RuntimeError("kernel exploded")


class _Zeros(GlooBackend):
    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        return torch.zeros_like(x)


CASES = {"gloo": GlooBackend, "wrong": _Wrong, "disagree": _Disagree, "mutating": _Mutating,
         "raising": _Raising, "zeros": _Zeros}


def _gate_all(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from artune.autotune import gate
    from artune.autotune.comm import Comm
    from artune.backends.base import GroupContext

    cpu = dist.new_group(backend="gloo")
    ctx = GroupContext(group=dist.group.WORLD, cpu_group=cpu, rank=rank, world_size=world,
                       device=torch.device("cpu"), ranks_per_node=world, max_bytes=1 << 16)
    comm = Comm(cpu, rank, world, 30.0)
    out: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float32):
        x = gate.random_input(1000, dtype, ctx.device, seed=rank)
        for name, cls in CASES.items():
            out[f"{name}/{dtype}"] = gate.check(cls(ctx), {"chunks": 2}, x, comm, ctx.group)
    # 2-D results (the fused linear layer's [rows, N]): the worst element found anywhere
    prod = torch.randn(8, 125, generator=torch.Generator().manual_seed(rank))
    ref = torch.stack([prod, prod.abs()])
    dist.all_reduce(ref)
    y = ref[0].to(torch.bfloat16)
    out["2d right"] = gate.verdict(y, ref, comm, ctx.group)
    y[7, 3] += 1.0  # the last row: an argmax over rows alone would index past them
    out["2d wrong"] = gate.verdict(y, ref, comm, ctx.group)
    return out


def test_gate_verdicts_agree_on_all_ranks() -> None:
    r0, r1 = run_gloo(_gate_all, 2)
    assert r0 == r1, "every rank must reach the same verdict"
    for dt in ("torch.bfloat16", "torch.float32"):
        assert r0[f"gloo/{dt}"] is None
        assert "max abs error" in r0[f"wrong/{dt}"] and "at rank 1" in r0[f"wrong/{dt}"]
        assert "disagree bitwise" in r0[f"disagree/{dt}"]
        assert "mutated its input" in r0[f"mutating/{dt}"]
        assert "RuntimeError: kernel exploded" in r0[f"raising/{dt}"]
        assert "max abs error" in r0[f"zeros/{dt}"]
    assert r0["2d right"] is None
    assert r0["2d wrong"].startswith("max abs error 1") and "at rank 0" in r0["2d wrong"]


def test_random_input_is_never_zero_and_differs_by_seed() -> None:
    from artune.autotune.gate import random_input

    a = random_input(4096, torch.bfloat16, torch.device("cpu"), 0)
    b = random_input(4096, torch.bfloat16, torch.device("cpu"), 1)
    assert a.abs().sum() > 0 and not torch.equal(a, b)
    assert torch.equal(a, random_input(4096, torch.bfloat16, torch.device("cpu"), 0))


class _Slow(GlooBackend):
    """30 ms per call: a poor parameter set at a large size."""

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        import time

        time.sleep(0.03)
        return super().all_reduce(x, params)


def _measure_slow(rank: int, world: int, budget_us: float) -> dict[str, Any]:
    import torch.distributed as dist

    from artune.autotune import crew as crew_mod
    from artune.autotune.comm import Comm
    from artune.autotune.config import TuneConfig
    from artune.backends.base import GroupContext

    crew_mod.MEASURE_BUDGET_US = budget_us
    cpu = dist.new_group(backend="gloo")
    ctx = GroupContext(group=dist.group.WORLD, cpu_group=cpu, rank=rank, world_size=world,
                       device=torch.device("cpu"), ranks_per_node=world, max_bytes=1 << 16)
    crew = crew_mod.Crew(TuneConfig(device="cpu"), ctx, Comm(cpu, rank, world, 30.0))
    be = _Slow(ctx)
    x = crew.input("float32", 4096)
    cmd = {"mode": "eager", "nbytes": 4096, "reps": 9, "warmup": 0, "prune_after": 0}
    return crew._measure(lambda: be.all_reduce(x, {}), be.capture, cmd)


def test_a_slow_candidate_gets_fewer_repetitions_on_every_rank() -> None:
    """Repetitions are cut to the measurement budget (at least MIN_REPS), from the gathered
    probe, so every rank runs the same number of collectives; the record says how many."""
    from artune.autotune.crew import MIN_REPS, record_from

    r0, r1 = run_gloo(_measure_slow, 2, 0.1e6)  # 100 ms budget, >= 30 ms per repetition
    assert r0["reps"] == r1["reps"] == MIN_REPS
    assert all(len([v for v in row if v == v]) == MIN_REPS for row in r0["samples"])
    rec = record_from(r0, backend="slow", params={}, dtype="float32", mode="eager",
                      nbytes=4096, reps=9)
    assert rec["reps"] == MIN_REPS and rec["latency_us"] >= 30e3
    fast0, _ = run_gloo(_measure_slow, 2, 1e9)  # a generous budget keeps all 9
    assert fast0["reps"] == 9
