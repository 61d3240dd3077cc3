"""A short real tune on 2 GPUs (skipped without them): every available backend, both modes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import artune_env, requires_gpus, run_artune

from artune.profile import load, select

pytestmark = [pytest.mark.gpu, pytest.mark.slow, requires_gpus(2)]


def test_short_tune_on_two_gpus(tmp_path: Path) -> None:
    out = tmp_path / "gpu2.json"
    r = run_artune(
        "tune", "--nproc-per-node", "2", "--quick", "--sizes", "4K,256K,4M", "--out", str(out),
        env=artune_env(), timeout_s=600,
    )
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prof = load(out)
    topo = prof.fingerprint["topology"]
    assert not prof.dry_run and topo["device"] == "cuda" and topo["world_size"] == 2
    assert topo["gpu"] and topo["links"] and prof.fingerprint["versions"]["nccl"]
    ms = prof.data["measurements"]
    backends = {m["backend"] for m in ms}
    assert "nccl" in backends and "gloo" not in backends
    for mode in ("graph", "eager"):
        assert {m["nbytes"] for m in ms if m["backend"] == "nccl" and m["mode"] == mode} == {
            4096, 262144, 4 << 20}
        assert select(prof, 4096, "bfloat16", mode).covered
    for m in ms:
        assert len(m["rank_medians_us"]) == 2 and 0 < m["latency_us"] < 1e5
    # Every candidate either was measured or says why not.
    skipped = {s["backend"] for s in prof.data["skipped"] if s["nbytes"] is None}
    for name in ("symm_one_shot", "symm_two_shot", "nvshmem_reduce", "nvrar", "sglang"):
        assert name in backends or name in skipped
    val = prof.data["validation"]
    assert len(val) == 2 * 3 and all(v["routed_us"] for v in val)


def test_tune_measures_fused_linear_layers_and_resumes(tmp_path: Path) -> None:
    """--linear-shapes: the fused-linear phase times, per row count, the GEMM + routed
    all-reduce and the fused kernel (gated first), writes the profile's linear section, and a
    --resume after it measures nothing again."""
    from artune.autotune.linear import FUSED, UNFUSED
    from artune.profile import select_linear

    out = tmp_path / "lin.json"
    # (sizes up to 1M: NVRAR's receive slots are sized from them, and 64 rows x 4096 columns
    # of bf16 is 512 KiB)
    args = ("tune", "--nproc-per-node", "2", "--quick", "--sizes", "4K:1M:4", "--modes",
            "graph", "--backends", "nccl,nvrar", "--linear-shapes", "2048x4096",
            "--linear-rows", "1,16,64", "--out", str(out))
    r = run_artune(*args, env=artune_env(), timeout_s=600)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "row-parallel linear bfloat16 K=2048 N=4096" in r.stdout
    prof = load(out)
    (entry,) = prof.data["linear"]
    assert (entry["dtype"], entry["k"], entry["n"]) == ("bfloat16", 2048, 4096)
    assert [p["rows"] for p in entry["points"]] == [1, 16, 64]
    for p in entry["points"]:  # both sides measured at every row count
        assert 0 < p["unfused_us"] < 1e4 and 0 < p["fused_us"] < 1e4, p
        want = p["fused_us"] <= p["unfused_us"] * (1 - 0.03)
        assert p["fused"] == want
        assert (select_linear(prof, "bfloat16", 2048, 4096, p["rows"]) is not None) == want
    recs = prof.data["linear_measurements"]
    assert {m["backend"] for m in recs} == {FUSED, UNFUSED}
    searched = [m for m in recs if m.get("source") != "confirm"]
    # each point's two sides re-timed back to back after the search
    assert sum(m.get("source") == "confirm" for m in recs) == 2 * 3
    assert not any(m["backend"].startswith("linear") for m in prof.data["measurements"])
    r2 = run_artune(*args, "--resume", env=artune_env(), timeout_s=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    again = load(out)
    # the search's trials resumed, not measured again (only the re-times run again)
    assert [m for m in again.data["linear_measurements"] if m.get("source") != "confirm"] == \
        searched
    assert [p["rows"] for p in again.data["linear"][0]["points"]] == [1, 16, 64]
