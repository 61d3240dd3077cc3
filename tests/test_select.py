"""select(): a pure function over plain tables."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from _profiles import profile_doc

from artune.backends.base import Backend
from artune.profile import Profile, select

#: What a Router reads of its GroupContext in these tests (its messages name rank and group).
_CTX = SimpleNamespace(rank=0, group_name="test")


@pytest.fixture()
def prof() -> Profile:
    return Profile(profile_doc())


def test_ranges_cover_every_size_up_to_the_largest(prof: Profile) -> None:
    for mode in ("graph", "eager"):
        rs = prof.tables["bfloat16"][mode]
        assert rs[0]["min_bytes"] == 1
        for a, b in zip(rs, rs[1:], strict=False):
            assert b["min_bytes"] == a["max_bytes"] + 1
        assert rs[-1]["max_bytes"] == 32 << 20


@pytest.mark.parametrize(
    "nbytes,backend",
    [(1, "symm_one_shot"), (4096, "symm_one_shot"), (65536, "symm_one_shot"),
     (262144, "symm_two_shot"), (4 << 20, "symm_two_shot"), (32 << 20, "nccl")],
)
def test_measured_points_route_to_their_winner(prof: Profile, nbytes: int, backend: str) -> None:
    c = select(prof, nbytes, "bfloat16", "graph")
    assert (c.backend, c.covered) == (backend, True)


def test_boundary_is_geometric_midpoint(prof: Profile) -> None:
    mid = int((65536 * 262144) ** 0.5)  # 131072
    assert select(prof, mid, "bfloat16", "graph").backend == "symm_one_shot"
    assert select(prof, mid + 1, "bfloat16", "graph").backend == "symm_two_shot"


def test_torch_dtype_accepted(prof: Profile) -> None:
    torch = pytest.importorskip("torch")
    assert select(prof, 4096, torch.bfloat16, "eager").backend == "symm_one_shot"


def test_beyond_table_and_missing_dtype_go_to_nccl_logged_once(prof: Profile, caplog) -> None:
    logger = logging.getLogger("artune")
    logger.addHandler(caplog.handler)
    try:
        for _ in range(3):
            c = select(prof, 1 << 30, "bfloat16", "graph")
            assert (c.backend, c.covered) == ("nccl", False)
            c = select(prof, 4096, "float32", "graph")
            assert (c.backend, c.covered) == ("nccl", False)
    finally:
        logger.removeHandler(caplog.handler)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("no range for" in m for m in msgs) == 1
    assert sum("no float32/graph table" in m for m in msgs) == 1


def test_dry_run_falls_back_to_gloo() -> None:
    doc = profile_doc()
    doc["dry_run"] = True
    assert select(Profile(doc), 1 << 40, "bfloat16", "graph").backend == "gloo"


def test_select_is_deterministic(prof: Profile) -> None:
    sizes = [1, 7, 4095, 4096, 100_000, 131072, 131073, 1 << 22, (32 << 20) + 1]
    first = [select(prof, s, "bfloat16", m) for s in sizes for m in ("graph", "eager")]
    again = [select(Profile(profile_doc()), s, "bfloat16", m) for s in sizes
             for m in ("graph", "eager")]
    assert first == again


class _Counting:
    """A built backend stand-in: counts supports() calls; refuses sizes above ``limit``."""

    def __init__(self, name: str, limit: int = 1 << 40) -> None:
        self.name, self.limit, self.asked, self.calls = name, limit, 0, 0
        self.closed = False

    def supports(self, x, params=None) -> bool:  # noqa: ANN001
        self.asked += 1
        return not self.closed and x.numel() * x.element_size() <= self.limit

    def all_reduce(self, x, params=None):  # noqa: ANN001, ANN201
        self.calls += 1
        return x

    bind = Backend.bind  # the contract's default: all_reduce with params bound

    def close(self) -> None:
        pass


def test_router_decides_once_per_shape_and_falls_back_when_unsupported(prof: Profile) -> None:
    """The router asks select() and supports() once per (size, dtype, mode, device,
    contiguity) and then looks the decision up; a backend refusing the tensor sends it to
    the fallback, also remembered."""
    import torch

    from artune.router import Router

    built = {n: _Counting(n) for n in ("nccl", "symm_one_shot", "symm_two_shot")}
    built["symm_two_shot"].limit = 0  # refuses everything: its ranges go to NCCL
    router = Router(prof, _CTX, built)  # type: ignore[arg-type]
    small = torch.zeros(2048, dtype=torch.bfloat16)  # 4 KiB: one-shot in the profile
    mid = torch.zeros(131072, dtype=torch.bfloat16)  # 256 KiB: two-shot in the profile
    for _ in range(5):
        assert router.choose(small, "graph").backend == "symm_one_shot"
        router.all_reduce(small, "graph")
        fb = router.choose(mid, "graph")
        assert fb.backend == "nccl" and not fb.covered
        router.all_reduce(mid, "graph")
    assert built["symm_one_shot"].asked == 1 and built["symm_one_shot"].calls == 5
    assert built["symm_two_shot"].asked == 1 and built["symm_two_shot"].calls == 0
    assert built["nccl"].calls == 5
    # all_reduce's inlined lookup builds decide()'s key: a decided shape never resolves again
    resolved = []
    inner = router._resolve
    router._resolve = lambda x, mode: resolved.append(mode) or inner(x, mode)  # type: ignore
    router.all_reduce(small, "graph")
    assert resolved == [] and built["symm_one_shot"].calls == 6
    router._resolve = inner  # type: ignore[method-assign]
    # A non-contiguous tensor of the same size is decided on its own.
    strided = torch.zeros(4096, dtype=torch.bfloat16)[::2]
    router.choose(strided, "graph")
    assert built["symm_one_shot"].asked == 2
    # A backend closed after a decision is decided again (here: its sizes go to NCCL), even
    # when its supports() does not look at ``closed``.
    built["symm_one_shot"].closed = True
    built["symm_one_shot"].supports = lambda x, params=None: True  # type: ignore[method-assign]
    router.all_reduce(small, "graph")  # the remembered decision is not used
    assert built["symm_one_shot"].calls == 6 and built["nccl"].calls == 6
    assert router.choose(small, "graph").backend == "nccl"
    router.all_reduce(small, "graph")
    assert built["symm_one_shot"].calls == 6 and built["nccl"].calls == 7
    router.detach()
    assert router.backends == {} and not router._decided


def test_a_closed_or_detached_router_refuses_with_the_rank_and_group(prof: Profile) -> None:
    """After close() the router raises, naming the rank, the group and the fix, instead of
    serving through its closed fallback."""
    import torch

    from artune.router import Router

    ctx = SimpleNamespace(rank=3, group_name="tp")
    x = torch.zeros(2048, dtype=torch.bfloat16)
    for end in ("close", "detach"):
        built = {n: _Counting(n) for n in ("nccl", "symm_one_shot", "symm_two_shot")}
        router = Router(prof, ctx, built)  # type: ignore[arg-type]
        router.all_reduce(x, "graph")
        getattr(router, end)()
        with pytest.raises(RuntimeError, match=r"rank 3: .*group tp .*Router\.build"):
            router.all_reduce(x, "graph")
        assert built["symm_one_shot"].calls == 1 and built["nccl"].calls == 0


def test_a_full_decision_cache_starts_afresh(prof: Profile, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """Prefill all-reduces come in many shapes: once the per-shape caches are full they are
    emptied, so that new shapes are remembered again (not decided anew on every call)."""
    import torch

    from artune import router as router_mod

    monkeypatch.setattr(router_mod, "_MAX_DECIDED", 4)
    built = {n: _Counting(n) for n in ("nccl", "symm_one_shot", "symm_two_shot")}
    router = router_mod.Router(prof, _CTX, built)  # type: ignore[arg-type]
    shapes = [torch.zeros(1024 + 8 * i, dtype=torch.bfloat16) for i in range(6)]
    for x in shapes:
        router.all_reduce(x, "graph")
    assert len(router._bound) <= 4 and len(router._decided) <= 4
    asked = built["symm_one_shot"].asked
    router.all_reduce(shapes[-1], "graph")  # the newest shape is remembered
    assert built["symm_one_shot"].asked == asked


def test_select_speed_benchmark_runs_with_every_kind_of_backend(
        tmp_path, monkeypatch) -> None:
    """benchmarks/select_speed.py (few calls): the host-work backends return a copy of their
    input, and the results file has the rows of every kind of backend."""
    import sys

    import torch
    from conftest import load_benchmark

    mod = load_benchmark("select_speed")
    x = torch.arange(2048, dtype=torch.bfloat16)
    y = mod._HostWork(None).all_reduce(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    prepared = mod._Prepared(None)
    y = prepared.all_reduce(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    # one prepared call per shape: the same one again, another for another shape
    assert prepared.bind(x) is prepared.bind(x.clone())
    assert prepared.bind(x.view(2, 1024)) is not prepared.bind(x)
    out = tmp_path / "speed.md"
    monkeypatch.setattr(sys, "argv", ["select_speed.py", "--calls", "4096", "--out", str(out)])
    mod.main()
    text = out.read_text()
    assert "| median of 5 |" in text
    for what in ("return at once", "a one-shot call's host-side tensor work (no bind)",
                 "the same work, prepared per shape (bind)"):
        assert f"| {what} | router.all_reduce(x, 'eager') |" in text
