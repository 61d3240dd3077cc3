"""Synthetic measurements and profiles for the CPU tests (plain tables, no GPU)."""

from __future__ import annotations

from typing import Any

from artune.autotune.table import build_profile

FP = {
    "topology": {
        "device": "cuda", "gpu": "NVIDIA H200", "sm": "9.0", "gpus_per_node": 4, "nodes": 1,
        "world_size": 4, "links": [["X", "NV18"], ["NV18", "X"]],
    },
    "versions": {"torch": "2.11.0+cu130", "nccl": "2.28.9", "driver": "580.159.04"},
}


def rec(backend: str, nbytes: int, lat: float, spread: float = 0.1, mode: str = "graph",
        dtype: str = "bfloat16", params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"backend": backend, "params": params or {}, "dtype": dtype, "mode": mode,
            "nbytes": nbytes, "rank_medians_us": [lat] * 4, "latency_us": lat,
            "spread_us": spread, "reps": 10}


def measurements() -> list[dict[str, Any]]:
    """nccl ~15 µs flat, one-shot wins small sizes, two-shot mid sizes, NCCL the largest."""
    ms = []
    for mode in ("graph", "eager"):
        for s, (n, a, b) in {
            4096: (14.8, 7.1, 9.0), 65536: (14.0, 8.4, 9.9), 262144: (14.6, 11.2, 9.4),
            1 << 20: (20.8, 18.3, 12.9), 4 << 20: (42.0, 48.5, 29.0),
            32 << 20: (177.7, 330.5, 190.0),
        }.items():
            ms += [rec("nccl", s, n, mode=mode), rec("symm_one_shot", s, a, mode=mode),
                   rec("symm_two_shot", s, b, mode=mode)]
    return ms


def profile_doc() -> dict[str, Any]:
    return build_profile(measurements(), [{"backend": "nvshmem_reduce", "params": {},
                         "dtype": "bfloat16", "mode": None, "nbytes": None,
                         "reason": "nvshmem4py is not installed"}],
                         fingerprint=FP, command="artune tune (test)", dry_run=False)
