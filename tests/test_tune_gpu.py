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
