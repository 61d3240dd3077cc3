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


def test_random_input_is_never_zero_and_differs_by_seed() -> None:
    from artune.autotune.gate import random_input

    a = random_input(4096, torch.bfloat16, torch.device("cpu"), 0)
    b = random_input(4096, torch.bfloat16, torch.device("cpu"), 1)
    assert a.abs().sum() > 0 and not torch.equal(a, b)
    assert torch.equal(a, random_input(4096, torch.bfloat16, torch.device("cpu"), 0))
