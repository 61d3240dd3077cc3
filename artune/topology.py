"""The machine fingerprint a profile is keyed by.

Two parts: ``topology`` (what decides which backend is fastest: GPU model and SM version, GPUs
per node, nodes, world size, the link matrix between a node's GPUs) and ``versions`` (driver,
CUDA, torch, NCCL, NVSHMEM, Triton, artune). A profile is only valid where the topology part
matches; version differences are reported as warnings.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

__all__ = ["fingerprint", "fingerprint_id", "compare", "gpu_count"]

TOPOLOGY_KEYS = ("device", "gpu", "sm", "gpus_per_node", "nodes", "world_size", "links")


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without CUDA).

    Asked of NVML where it answers, without importing torch: ``artune tune`` calls this before
    it starts the ranks, and importing torch there cost seconds of the tune's wall time.
    CUDA_VISIBLE_DEVICES as CUDA reads it (indices up to the first invalid one); entries that
    are not indices (UUIDs, MIG instances), a missing NVML and a CPU build of torch go through
    torch instead."""
    physical = _nvml_count()
    ids = (_visible_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), physical)
           if physical is not None else None)
    if ids is not None and not _cpu_only_torch():
        return len(ids)
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as "no GPU"
        return 0


def _visible_indices(env: str | None, physical: int | None) -> list[int] | None:
    """Physical indices (nvidia-smi's numbering) of the GPUs that CUDA_VISIBLE_DEVICES=``env``
    exposes, in CUDA's order, as CUDA reads it: indices up to the first invalid one (beyond
    ``physical`` GPUs, when that is known), none at all when one repeats. None when only CUDA
    can tell (entries that are not plain indices: UUIDs, MIG instances; or no variable and an
    unknown count)."""
    if env is None:
        return None if physical is None else list(range(physical))
    seen: list[int] = []
    for item in (i.strip() for i in env.split(",")):
        if not item.lstrip("-").isdigit():
            if item:
                return None
            break
        index = int(item)
        if index in seen:
            return []  # a repeated ordinal hides every GPU (as torch reads the variable)
        if index < 0 or (physical is not None and index >= physical):
            break  # CUDA ignores this entry and every one after it
        seen.append(index)
    return seen


def _cpu_only_torch() -> bool:
    """Whether the installed torch is a CPU build (its version says so; no import)."""
    version = _pkg_version("torch") or ""
    return version.endswith("+cpu")


def _nvml_count() -> int | None:
    """Physical GPUs NVML reports (driver library only), or None without a usable NVML."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint(0)
        ok = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
        nvml.nvmlShutdown()
    except AttributeError:
        return None
    return int(count.value) if ok else None


def _pkg_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _nvidia_smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=15, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _physical_gpus(n: int) -> list[int] | None:
    """Physical indices (nvidia-smi's numbering) of the first ``n`` visible GPUs, or None when
    CUDA_VISIBLE_DEVICES names them in a way nvidia-smi's table cannot be matched to (UUIDs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = list(range(n)) if env is None else _visible_indices(env, None)
    return ids[:n] if ids is not None and len(ids) >= n else None


def link_matrix(n: int) -> list[list[str]]:
    """Links between the first ``n`` visible GPUs as ``nvidia-smi topo -m`` names them ("NV18",
    "PIX", "SYS", "X" on the diagonal), following CUDA_VISIBLE_DEVICES; from CUDA peer access
    ("P2P"/"none") where nvidia-smi is missing or the visible GPUs cannot be matched to it."""
    text = _nvidia_smi("topo", "-m")
    phys = _physical_gpus(n)
    if text and phys is not None:
        rows = {r[0]: r[1:] for r in (line.split() for line in text.splitlines())
                if r and r[0].startswith("GPU") and r[0][3:].isdigit()}
        try:
            matrix = [[rows[f"GPU{i}"][j] for j in phys] for i in phys]
        except (KeyError, IndexError):
            matrix = []
        if len(matrix) == n:
            return matrix
    import torch

    return [
        [
            "X" if i == j else ("P2P" if torch.cuda.can_device_access_peer(i, j) else "none")
            for j in range(n)
        ]
        for i in range(n)
    ]


def fingerprint(
    world_size: int, gpus_per_node: int, device: str = "cuda", local_gpu: int = 0
) -> dict[str, Any]:
    """The fingerprint of this machine for a group of ``world_size`` ranks, ``gpus_per_node`` on
    each node. ``device="cpu"`` describes a gloo dry run."""
    import torch

    topo: dict[str, Any] = {
        "device": device,
        "gpus_per_node": gpus_per_node,
        "nodes": max(1, world_size // max(1, gpus_per_node)),
        "world_size": world_size,
    }
    versions: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "artune": _pkg_version("artune"),
        "optuna": _pkg_version("optuna"),
    }
    if device == "cpu":
        topo.update(gpu=None, sm=None, links=None)
        versions["cpu"] = platform.processor() or platform.machine()
    else:
        props = torch.cuda.get_device_properties(local_gpu)
        topo.update(
            gpu=props.name,
            sm=f"{props.major}.{props.minor}",
            links=link_matrix(min(gpus_per_node, torch.cuda.device_count())),
        )
        driver = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        versions.update(
            driver=driver.splitlines()[0].strip() if driver else None,
            cuda=torch.version.cuda,
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            nvshmem=_pkg_version("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12"),
            nvshmem4py=_pkg_version("nvshmem4py-cu13", "nvshmem4py-cu12"),
            triton=_pkg_version("triton"),
            sglang=_pkg_version("sglang"),
        )
    return {"topology": topo, "versions": versions}


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short stable hash of the topology part (versions excluded)."""
    topo = {k: fp.get("topology", {}).get(k) for k in TOPOLOGY_KEYS}
    blob = json.dumps(topo, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _shown(key: str, value: Any) -> str:
    """A fingerprint field for a message: a link matrix as what links its pairs."""
    if key == "links" and isinstance(value, list) and value and all(
            isinstance(row, list) and len(row) == len(value) for row in value):
        n = len(value)
        kinds = sorted({str(value[i][j]) for i in range(n) for j in range(n) if i != j})
        if len(kinds) == 1:
            return f"{kinds[0]} between every pair of {n} GPUs"
        return f"a {n}x{n} link matrix ({', '.join(kinds)})" if kinds else f"{n} GPU"
    return repr(value)


def compare(expected: dict[str, Any], live: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings): topology fields that differ, then version fields that differ, each as
    'field: profile has X, this machine has Y'."""
    errors, warnings = [], []
    et, lt = expected.get("topology", {}), live.get("topology", {})
    for key in TOPOLOGY_KEYS:
        if et.get(key) != lt.get(key):
            errors.append(f"{key}: profile has {_shown(key, et.get(key))}, this machine has "
                          f"{_shown(key, lt.get(key))}")
    ev, lv = expected.get("versions", {}), live.get("versions", {})
    for key in sorted(set(ev) | set(lv)):
        if key in ("artune", "python", "optuna"):
            continue
        if ev.get(key) != lv.get(key):
            warnings.append(f"{key}: profile has {ev.get(key)!r}, this machine has {lv.get(key)!r}")
    return errors, warnings
