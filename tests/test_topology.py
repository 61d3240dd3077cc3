"""The fingerprint: what it holds, its id, and how two fingerprints are compared."""

from __future__ import annotations

import copy

from _profiles import FP

from artune.topology import compare, fingerprint, fingerprint_id


def test_cpu_fingerprint_has_topology_and_versions() -> None:
    fp = fingerprint(world_size=2, gpus_per_node=2, device="cpu")
    topo = fp["topology"]
    assert (topo["device"], topo["world_size"], topo["nodes"], topo["gpus_per_node"]) == (
        "cpu", 2, 1, 2)
    assert fp["versions"]["torch"]


def test_id_depends_on_topology_not_versions() -> None:
    other = copy.deepcopy(FP)
    other["versions"]["nccl"] = "9.9.9"
    assert fingerprint_id(other) == fingerprint_id(FP)
    other["topology"]["links"] = [["X", "PIX"], ["PIX", "X"]]
    assert fingerprint_id(other) != fingerprint_id(FP)


def test_compare_names_each_difference() -> None:
    live = copy.deepcopy(FP)
    live["topology"]["gpu"] = "NVIDIA H100 80GB HBM3"
    live["topology"]["world_size"] = 2
    live["versions"]["nccl"] = "2.27.3"
    errors, warnings = compare(FP, live)
    assert errors == [
        "gpu: profile has 'NVIDIA H200', this machine has 'NVIDIA H100 80GB HBM3'",
        "world_size: profile has 4, this machine has 2",
    ]
    assert warnings == ["nccl: profile has '2.28.9', this machine has '2.27.3'"]
    assert compare(FP, copy.deepcopy(FP)) == ([], [])
