"""The fingerprint: what it holds, its id, and how two fingerprints are compared."""

from __future__ import annotations

import copy

import pytest
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


def test_compare_reads_a_link_matrix_as_what_links_the_pairs() -> None:
    live = copy.deepcopy(FP)
    n = 4
    live["topology"]["links"] = [["X" if i == j else "NV18" for j in range(n)] for i in range(n)]
    mixed = copy.deepcopy(live)
    mixed["topology"]["links"][0][3] = mixed["topology"]["links"][3][0] = "SYS"
    errors, _ = compare(mixed, live)
    assert errors == ["links: profile has a 4x4 link matrix (NV18, SYS), this machine has NV18 "
                      "between every pair of 4 GPUs"]
    live["topology"]["links"] = None
    assert compare(mixed, live)[0][-1].endswith("this machine has None")


_TOPO = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity
GPU0\t X \tNV18\tNV18\tSYS\t0-63\t0
GPU1\tNV18\t X \tNV18\tSYS\t0-63\t0
GPU2\tNV18\tNV18\t X \tPIX\t0-63\t0
GPU3\tSYS\tSYS\tPIX\t X \t0-63\t0

Legend:
"""


def test_link_matrix_follows_cuda_visible_devices(monkeypatch) -> None:  # noqa: ANN001
    """nvidia-smi numbers physical GPUs; the matrix is the visible GPUs' links, in their order;
    names it cannot match (UUIDs) fall back to CUDA's peer-access report."""
    import torch

    from artune import topology

    monkeypatch.setattr(topology, "_nvidia_smi", lambda *a: _TOPO)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "x")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert topology.link_matrix(2) == [["X", "NV18"], ["NV18", "X"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    assert topology.link_matrix(2) == [["X", "PIX"], ["PIX", "X"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert topology.link_matrix(2) == [["X", "SYS"], ["SYS", "X"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: True)
    assert topology.link_matrix(2) == [["X", "P2P"], ["P2P", "X"]]


@pytest.mark.parametrize("env,physical,expected", [
    (None, 4, [0, 1, 2, 3]),       # nothing hidden
    ("", 4, []),                   # everything hidden
    ("0,1", 4, [0, 1]),
    (" 3 , 2 ", 4, [3, 2]),
    ("2,9,1", 4, [2]),             # CUDA stops at the first invalid index
    ("2,9,1", None, [2, 9, 1]),    # count unknown: no bound
    ("-1,0", 4, []),
    ("1,1", 4, []),                # a repeated ordinal hides everything
    ("GPU-8c0e", 4, None),         # a UUID: only CUDA can tell
    (None, None, None),            # no variable, count unknown
])
def test_visible_gpus_as_cuda_reads_cuda_visible_devices(env: str | None, physical: int | None,
                                                         expected: list[int] | None) -> None:
    from artune.topology import _visible_indices

    assert _visible_indices(env, physical) == expected


def test_gpu_count_asks_nvml_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import artune.topology as topo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # torch's answer: 0
    monkeypatch.setattr(topo, "_nvml_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setattr(topo, "_cpu_only_torch", lambda: False)
    assert topo.gpu_count() == 3
    monkeypatch.setattr(topo, "_cpu_only_torch", lambda: True)  # GPUs, but torch cannot use them
    assert topo.gpu_count() == 0  # torch answers
    monkeypatch.setattr(topo, "_cpu_only_torch", lambda: False)
    monkeypatch.setattr(topo, "_nvml_count", lambda: None)  # no NVML: torch answers
    assert topo.gpu_count() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 5)
    assert topo.gpu_count() == 5
