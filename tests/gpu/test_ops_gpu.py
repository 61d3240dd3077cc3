"""``artune.integration.ops.setup`` on GPUs: a profile checked and served on an NCCL group,
then ``torch.ops.artune.all_reduce`` by name, eagerly, in a CUDA graph, and under
``torch.compile(fullgraph=True)`` (eagerly and captured). Without 2 GPUs it
skips with the reason."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import requires_gpus

from ._dist import run_on_gpus


def _profile(path: Path, world: int) -> None:
    """A profile of this machine that routes 1 KiB-1 MiB of bf16 to NCCL and symm_one_shot."""
    from artune import profile as profile_mod
    from artune import topology
    from artune.autotune.table import build_profile

    ms = []
    for mode in ("graph", "eager"):
        for n in (1 << 10, 1 << 14, 1 << 20):
            ms.append({"backend": "nccl", "params": {}, "dtype": "bfloat16", "mode": mode,
                       "nbytes": n, "latency_us": 20.0, "spread_us": 0.1})
            ms.append({"backend": "symm_one_shot", "params": {}, "dtype": "bfloat16",
                       "mode": mode, "nbytes": n, "latency_us": 5.0, "spread_us": 0.1})
    fp = topology.fingerprint(world, world, device="cuda")
    profile_mod.save(build_profile(ms, [], fingerprint=fp, command="test", dry_run=False), path)


def _served(ctx: Any, path: str) -> dict[str, Any]:
    import artune.integration.ops as ops

    router = ops.setup(path, ctx.group, "g")
    try:
        x = torch.full((4096,), float(ctx.rank + 1), dtype=torch.bfloat16, device=ctx.device)
        eager = torch.ops.artune.all_reduce(x, "g")
        graph = torch.cuda.CUDAGraph()
        with router.capture(), torch.cuda.graph(graph):
            y = torch.ops.artune.all_reduce(x, "g")
        graph.replay()

        @torch.compile(fullgraph=True)
        def f(t: torch.Tensor) -> torch.Tensor:
            return torch.ops.artune.all_reduce(t * 2, "g") + 1

        compiled = f(x)
        cgraph = torch.cuda.CUDAGraph()
        with router.capture(), torch.cuda.graph(cgraph):
            z = f(x)
        cgraph.replay()
        torch.cuda.synchronize()
        return {"eager": eager.float().unique().tolist(), "graph": y.float().unique().tolist(),
                "compiled": compiled.float().unique().tolist(),
                "compiled_graph": z.float().unique().tolist(),
                "backend": router.choose(x, "eager").backend}
    finally:
        ops.unregister_router("g")
        router.close()


@requires_gpus(2)
@pytest.mark.gpu
def test_setup_serves_a_profile_on_an_nccl_group() -> None:
    world = min(4, torch.cuda.device_count())
    expected = float(sum(range(1, world + 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        _profile(path, world)
        for res in run_on_gpus(world, _served, str(path), max_bytes=1 << 22, timeout_s=180):
            assert res["backend"] == "symm_one_shot"
            assert res["eager"] == [expected] and res["graph"] == [expected]
            assert res["compiled"] == [2 * expected + 1]
            assert res["compiled_graph"] == [2 * expected + 1]
