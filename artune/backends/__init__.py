"""All-reduce backends, one module each, behind the contract in ``base.py``.

Modules are imported lazily (``load``), so listing backends needs neither CUDA nor NVSHMEM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from artune.backends.base import Backend

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "load"]

# name -> "module:Class". The order is the order in which a tune measures them.
BACKENDS: dict[str, str] = {
    "nccl": "artune.backends.nccl:NcclBackend",
    "symm_one_shot": "artune.backends.symm_mem:SymmOneShotBackend",
    "symm_two_shot": "artune.backends.symm_mem:SymmTwoShotBackend",
    "nvshmem_reduce": "artune.backends.nvshmem_reduce:NvshmemReduceBackend",
    "nvrar": "artune.backends.nvrar:NvrarBackend",
    "sglang": "artune.backends.sglang_native:SglangBackend",
    "gloo": "artune.backends.gloo:GlooBackend",
}

#: Where everything the profile does not cover goes (on CPU dry runs: gloo).
DEFAULT_BACKEND = "nccl"


def load(name: str) -> type[Backend]:
    """The backend class called ``name``; ValueError naming the known ones if there is none."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return,unused-ignore]
