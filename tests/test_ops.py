"""``torch.ops.artune.all_reduce``: the routed all-reduce as a custom op, on gloo CPU ranks,
eagerly and under ``torch.compile(fullgraph=True)`` (the fake implementation is traced)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import run_gloo


def _rank(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from artune.autotune.table import build_profile
    from artune.backends.base import GroupContext
    from artune.integration.ops import register_router, unregister_router
    from artune.profile import Profile
    from artune.router import Router

    ms = [{"backend": "gloo", "params": {}, "dtype": "float32", "mode": "eager", "nbytes": s,
           "latency_us": 100.0, "spread_us": 1.0} for s in (1024, 65536)]
    fp = {"topology": {"device": "cpu", "world_size": world}, "versions": {}}
    profile = Profile(build_profile(ms, [], fingerprint=fp, command="test", dry_run=True))
    ctx = GroupContext(group=dist.group.WORLD, cpu_group=dist.group.WORLD, rank=rank,
                       world_size=world, device=torch.device("cpu"), ranks_per_node=world,
                       max_bytes=1 << 20, group_name="world")
    router = Router.build(profile, ctx)
    register_router("world", router)
    try:
        x = torch.arange(1000, dtype=torch.float32) * (rank + 1)
        x0 = x.clone()
        eager = torch.ops.artune.all_reduce(x, "world")
        compiled = torch.compile(lambda t: torch.ops.artune.all_reduce(t, "world") * 2,
                                 fullgraph=True, backend="aot_eager")(x)
        choice = router.choose(x, "eager")
        # plain lists: tensors sent through a queue die with the worker's shared memory
        return {"eager": eager.tolist(), "compiled": compiled.tolist(),
                "unchanged": torch.equal(x, x0),
                "backend": choice.backend}
    finally:
        unregister_router("world")
        router.close()


def test_custom_op_eager_and_compiled() -> None:
    expected = torch.arange(1000, dtype=torch.float32) * 3  # ranks 0 and 1: x * (1 + 2)
    for res in run_gloo(_rank, 2):
        assert res["backend"] == "gloo" and res["unchanged"]
        torch.testing.assert_close(torch.tensor(res["eager"]), expected)
        torch.testing.assert_close(torch.tensor(res["compiled"]), expected * 2)


def test_unregistered_group_names_the_fix() -> None:
    import artune.integration.ops  # noqa: F401 - registers the op

    with pytest.raises(RuntimeError, match=r"register_router\('nope', \.\.\.\)"):
        torch.ops.artune.all_reduce(torch.ones(4), "nope")


def _write_profile(path: Any, world: int) -> str:
    from artune import profile as profile_mod
    from artune import topology
    from artune.autotune.table import build_profile

    ms = [{"backend": "gloo", "params": {}, "dtype": "float32", "mode": "eager", "nbytes": s,
           "latency_us": 100.0, "spread_us": 1.0} for s in (1024, 65536)]
    doc = build_profile(ms, [], fingerprint=topology.fingerprint(world, world, device="cpu"),
                        command="test", dry_run=True)
    profile_mod.save(doc, path)
    return str(path)


def _setup_rank(rank: int, world: int, path: str, force: bool) -> dict[str, Any]:
    import artune.integration.ops as ops
    from artune.integration.group_setup import SetupError

    try:
        first = ops.setup(path, None, "g", force=force)
        router = ops.setup(path, None, "g", force=force)  # again: replaces and closes the first
    except SetupError as exc:
        return {"error": str(exc)}
    try:
        x = torch.arange(100, dtype=torch.float32) * (rank + 1)
        return {"sum": torch.ops.artune.all_reduce(x, "g").tolist(),
                "first_closed": first.closed and ops.get_router("g") is router}
    finally:
        ops.unregister_router("g")
        router.close()


def test_setup_serves_a_profile_on_a_group_after_checking_it(tmp_path: Any) -> None:
    """``ops.setup``: the profile checked on the group as the SGLang plugin checks it, then the
    op serves it by name (a second setup under the same name closes the first router); a
    profile of another group size is the same error on every rank, unless forced."""
    good = _write_profile(tmp_path / "p2.json", 2)
    for res in run_gloo(_setup_rank, 2, good, False):
        assert res == {"sum": (torch.arange(100, dtype=torch.float32) * 3).tolist(),
                       "first_closed": True}
    other = _write_profile(tmp_path / "p4.json", 4)
    errors = [r["error"] for r in run_gloo(_setup_rank, 2, other, False)]
    assert len(errors) == 2 and errors[0] == errors[1]
    assert "another topology" in errors[0] and "world_size" in errors[0]
    for res in run_gloo(_setup_rank, 2, other, True):
        assert "sum" in res


def _flaky_rank(rank: int, world: int, path: str, fail_on: tuple[int, ...]) -> dict[str, Any]:
    """ops.setup where the profile's fastest backend (a gloo stand-in named nvshmem_reduce)
    cannot be built on the ranks in ``fail_on``."""
    import os

    import artune.integration.ops as ops
    from artune import backends
    from artune.backends.base import BackendUnavailable
    from artune.backends.gloo import GlooBackend
    from artune.integration.group_setup import SetupError

    os.environ["ARTUNE_COLLECTIVE_TIMEOUT_S"] = "20"
    real_load = backends.load

    class Flaky(GlooBackend):
        name = "nvshmem_reduce"

        @classmethod
        def create(cls, ctx: Any) -> Any:
            if ctx.rank in fail_on:
                raise BackendUnavailable("nvshmem_reduce: out of memory on this rank")
            return super().create(ctx)

    backends.load = lambda n: Flaky if n == "nvshmem_reduce" else real_load(n)  # type: ignore
    try:
        router = ops.setup(path, None, "g")
    except SetupError as exc:
        return {"error": str(exc)}
    try:
        x = torch.ones(4096, dtype=torch.float32) * (rank + 1)
        return {"sum": torch.ops.artune.all_reduce(x, "g").unique().tolist(),
                "backend": router.choose(x, "eager").backend}
    finally:
        ops.unregister_router("g")
        router.close()


def _two_backend_profile(path: Any) -> str:
    from artune import profile as profile_mod
    from artune import topology
    from artune.autotune.table import build_profile

    ms = []
    for n in (1024, 16384, 65536):
        ms.append({"backend": "gloo", "params": {}, "dtype": "float32", "mode": "eager",
                   "nbytes": n, "latency_us": 50.0, "spread_us": 1.0})
        ms.append({"backend": "nvshmem_reduce", "params": {}, "dtype": "float32",
                   "mode": "eager", "nbytes": n, "latency_us": 5.0, "spread_us": 0.1})
    doc = build_profile(ms, [], fingerprint=topology.fingerprint(2, 2, device="cpu"),
                        command="test", dry_run=True)
    profile_mod.save(doc, path)
    return str(path)


def test_a_backend_built_on_some_ranks_only_is_the_same_error_on_every_rank(
        tmp_path: Any) -> None:
    """Building is collective: when one rank cannot build a backend the others could, every
    rank stops with the same error naming the backend and each rank's outcome (no rank goes
    on to the next backend's construction); when no rank can, its sizes move on to the
    next-fastest measured backend, as for an unavailable one."""
    import time

    path = _two_backend_profile(tmp_path / "p.json")
    t0 = time.monotonic()
    errors = [r.get("error") for r in run_gloo(_flaky_rank, 2, path, (1,), timeout_s=90)]
    assert time.monotonic() - t0 < 60
    assert errors[0] == errors[1] and errors[0] is not None
    assert "building nvshmem_reduce failed" in errors[0]
    assert "rank 0: built" in errors[0] and "rank 1: BackendUnavailable" in errors[0]
    for res in run_gloo(_flaky_rank, 2, path, (0, 1), timeout_s=90):
        assert res == {"sum": [3.0], "backend": "gloo"}
    for res in run_gloo(_flaky_rank, 2, path, (), timeout_s=90):
        assert res == {"sum": [3.0], "backend": "nvshmem_reduce"}
