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
        router = ops.setup(path, name="g", force=force)
    except SetupError as exc:
        return {"error": str(exc)}
    try:
        x = torch.arange(100, dtype=torch.float32) * (rank + 1)
        return {"sum": torch.ops.artune.all_reduce(x, "g").tolist()}
    finally:
        ops.unregister_router("g")
        router.close()


def test_setup_serves_a_profile_on_a_group_after_checking_it(tmp_path: Any) -> None:
    """``ops.setup``: the profile checked on the group as the SGLang plugin checks it, then the
    op serves it by name; a profile of another group size is the same error on every rank,
    unless forced."""
    good = _write_profile(tmp_path / "p2.json", 2)
    for res in run_gloo(_setup_rank, 2, good, False):
        assert res == {"sum": (torch.arange(100, dtype=torch.float32) * 3).tolist()}
    other = _write_profile(tmp_path / "p4.json", 4)
    errors = [r["error"] for r in run_gloo(_setup_rank, 2, other, False)]
    assert len(errors) == 2 and errors[0] == errors[1]
    assert "another topology" in errors[0] and "world_size" in errors[0]
    for res in run_gloo(_setup_rank, 2, other, True):
        assert "sum" in res
