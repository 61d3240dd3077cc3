"""select(): a pure function over plain tables."""

from __future__ import annotations

import logging

import pytest
from _profiles import profile_doc

from artune.profile import Profile, select


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
