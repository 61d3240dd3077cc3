"""The process's one NVSHMEM bootstrap, shared by ``nvshmem_reduce`` and NVRAR.

nvshmem4py is the single owner of NVSHMEM initialisation in an artune process (DESIGN.md): PyTorch's
NVSHMEM symmetric memory and Triton kernels that call NVSHMEM device functions run on top of it.
NVSHMEM PEs are the ranks of ``ctx.cpu_group`` in group order, so NVSHMEM's ``TEAM_WORLD`` is that
group; a process can bootstrap NVSHMEM once, on one group.

    reason = available_reason()                 # None, or why NVSHMEM cannot be used here
    ensure_initialized(ctx)                     # collective over ctx.cpu_group, idempotent
    buf = alloc((n,), torch.bfloat16)           # collective: a symmetric tensor on this GPU
    peer = peer_tensor(buf, pe)                 # the same buffer on PE ``pe``, for NVLink loads
    free(buf)                                   # collective, safe twice
    finalize()                                  # collective: frees everything, safe twice

Every function here is host-side and collective where it says so; none is safe inside CUDA-graph
capture except ``world_team``/``peer_tensor``/``my_pe``/``n_pes``.
NVSHMEM_DISABLE_NVLS=1 is required: NVLink multicast must stay off (DESIGN.md).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from artune.backends.base import GroupContext

__all__ = [
    "available_reason",
    "group_reason",
    "ensure_initialized",
    "is_initialized",
    "alloc",
    "free",
    "peer_tensor",
    "world_team",
    "my_pe",
    "n_pes",
    "finalize",
]

_INSTALL_HINT = "pip install nvshmem4py-cu13 cuda-python (or artune[nvshmem])"


@dataclass
class _State:
    initialized: bool = False
    finalized: bool = False
    owner: bool = False  # True when this module called nvshmem.core.init
    ranks: tuple[int, ...] = ()  # global ranks of the group NVSHMEM was bootstrapped on
    rank: int = -1
    nranks: int = 0
    device_index: int = -1
    live: dict[int, torch.Tensor] = field(default_factory=dict)  # data_ptr -> symmetric tensor


_state = _State()
_lock = threading.RLock()


def available_reason() -> str | None:
    """Why NVSHMEM cannot be used in this process (one line), or None when it can."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if os.environ.get("NVSHMEM_DISABLE_NVLS") != "1":
        return (
            "NVSHMEM_DISABLE_NVLS is not 1; NVLink multicast must stay off: start the process "
            "with NVSHMEM_DISABLE_NVLS=1 (artune launch/tune set it)"
        )
    if _state.finalized:
        return "NVSHMEM was finalized in this process and cannot be initialised again"
    try:
        import cuda.core  # noqa: F401
    except ImportError as exc:
        return f"cuda.core is not importable ({exc}); {_INSTALL_HINT}"
    try:
        import nvshmem.core  # noqa: F401
    except ImportError as exc:
        return f"nvshmem4py is not importable ({exc}); {_INSTALL_HINT}"
    except Exception as exc:  # noqa: BLE001 - a broken native install: report, don't crash
        return f"nvshmem4py failed to import: {type(exc).__name__}: {exc}"
    return None


def _group_ranks(ctx: GroupContext) -> tuple[int, ...]:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(ctx.cpu_group))


def group_reason(ctx: GroupContext) -> str | None:
    """Why NVSHMEM cannot serve ``ctx`` (it was bootstrapped on another group), or None."""
    reason = available_reason()
    if reason is not None:
        return reason
    if _state.initialized and _state.ranks != _group_ranks(ctx):
        return (
            f"NVSHMEM is already bootstrapped on ranks {list(_state.ranks)} and a process can "
            f"bootstrap it once; this group has ranks {list(_group_ranks(ctx))}"
        )
    return None


def is_initialized() -> bool:
    """True once ``ensure_initialized`` succeeded (and ``finalize`` was not called)."""
    return _state.initialized


def _size_heap(max_bytes: int) -> None:
    """Size NVSHMEM's symmetric heap for the backends sharing it, unless the user set it.

    NVSHMEM reads NVSHMEM_SYMMETRIC_SIZE once, at init, from this process's environment, so it
    is set here, just before init (the one exception to "only the launcher writes os.environ").
    nvshmem_reduce takes 2 x max_bytes and NVRAR about 2.2 x max_bytes on one node (twice that
    with virtual nodes); NVSHMEM's default, 1 GiB, is too small from max_bytes = 256 MiB on.
    """
    need = 6 * max_bytes + (512 << 20)
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(max(need, 1 << 30)))


def ensure_initialized(ctx: GroupContext) -> None:
    """Bootstrap NVSHMEM over ``ctx.cpu_group`` once per process (collective on the first call).

    Group rank 0 makes the unique id, broadcasts its bytes over the gloo ``cpu_group``, and every
    rank calls ``nvshmem.core.init(initializer_method="uid")`` on ``ctx.device``. Later calls
    return at once when the group is the same one and raise RuntimeError when it is not.
    """
    import torch
    import torch.distributed as dist

    with _lock:
        reason = group_reason(ctx)
        if reason is not None:
            raise RuntimeError(f"artune NVSHMEM bootstrap: {reason}")
        if _state.initialized:
            return

        import numpy as np
        import nvshmem.core as nvshmem
        from cuda.core import Device
        from nvshmem.core import _internal_tracking as tracking

        ranks = _group_ranks(ctx)
        rank = dist.get_rank(ctx.cpu_group)
        nranks = dist.get_world_size(ctx.cpu_group)
        index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)

        if tracking._is_initialized["status"] == tracking.InternalInitStatus.INITIALIZED:
            # Someone in this process initialised nvshmem4py already: adopt it if it matches.
            from nvshmem import bindings

            pe, npes = bindings.my_pe(), bindings.n_pes()
            if (pe, npes) != (rank, nranks):
                raise RuntimeError(
                    f"artune NVSHMEM bootstrap: NVSHMEM was initialised elsewhere in this process "
                    f"as PE {pe} of {npes}, but this group needs PE {rank} of {nranks}; let "
                    f"artune initialise it (call artune.backends._nvshmem.ensure_initialized "
                    f"before anything else touches NVSHMEM)"
                )
            owner = False
        else:
            device = Device(index)
            device.set_current()
            uid = nvshmem.get_unique_id(empty=rank != 0)
            raw = uid._data.view(np.uint8)
            blob = torch.from_numpy(raw.copy() if rank == 0 else np.zeros(raw.size, np.uint8))
            dist.broadcast(blob, src=ranks[0], group=ctx.cpu_group)
            if rank != 0:
                raw[:] = blob.numpy()
            _size_heap(ctx.max_bytes)
            nvshmem.init(device=device, uid=uid, rank=rank, nranks=nranks, initializer_method="uid")
            owner = True

        _state.initialized = True
        _state.owner = owner
        _state.ranks = ranks
        _state.rank = rank
        _state.nranks = nranks
        _state.device_index = index


def _require_init(call: str) -> None:
    if not _state.initialized:
        raise RuntimeError(
            f"artune._nvshmem.{call}: NVSHMEM is not initialised in this process; call "
            f"artune.backends._nvshmem.ensure_initialized(ctx) first"
        )


def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Collective: a symmetric tensor of ``shape``/``dtype`` on this rank's GPU (uninitialised).

    Every PE must call it with the same shape and dtype, in the same order.
    """
    with _lock:
        _require_init("alloc")
        import nvshmem.core as nvshmem

        t = nvshmem.tensor(tuple(shape), dtype=dtype)
        _state.live[t.data_ptr()] = t
        return t


def free(t: torch.Tensor) -> None:
    """Collective: free a tensor from ``alloc``. Safe to call twice (the second call is a no-op
    on every rank). Waits for this device's pending work first."""
    import nvshmem.core as nvshmem
    import torch

    with _lock:
        if not _state.initialized:
            return
        owned = _state.live.pop(t.data_ptr(), None)
        if owned is None:
            return
        torch.cuda.synchronize(_state.device_index)
        nvshmem.free_tensor(owned)


def peer_tensor(t: torch.Tensor, pe: int) -> torch.Tensor:
    """The tensor ``t`` (from ``alloc``) as it lives on PE ``pe``, addressable by this GPU's loads
    and stores over NVLink (``nvshmem_ptr``). ValueError when ``pe`` is not reachable that way."""
    _require_init("peer_tensor")
    import nvshmem.core as nvshmem

    if not 0 <= pe < _state.nranks:
        raise ValueError(f"artune._nvshmem.peer_tensor: PE {pe} is not in 0..{_state.nranks - 1}")
    if pe == _state.rank:
        return t
    from nvshmem import bindings

    if bindings.ptr(t.data_ptr(), pe) == 0:
        raise ValueError(
            f"artune._nvshmem.peer_tensor: PE {pe} is not load/store reachable from PE "
            f"{_state.rank} (no NVLink/P2P path); use NVSHMEM put/get instead"
        )
    return nvshmem.get_peer_tensor(t, pe)


def world_team() -> Any:
    """The NVSHMEM team of all PEs (``TEAM_WORLD``), for host-side collectives."""
    _require_init("world_team")
    import nvshmem.core as nvshmem

    return nvshmem.Teams.TEAM_WORLD


def my_pe() -> int:
    _require_init("my_pe")
    return _state.rank


def n_pes() -> int:
    _require_init("n_pes")
    return _state.nranks


def finalize() -> None:
    """Collective: free every tensor from ``alloc`` and finalize NVSHMEM. Safe to call twice.

    NVSHMEM cannot be initialised again in this process afterwards.
    """
    with _lock:
        if not _state.initialized:
            return
        for t in list(_state.live.values()):
            free(t)
        if _state.owner:
            import nvshmem.core as nvshmem

            nvshmem.finalize()
            _state.finalized = True
        _state.initialized = False
        _state.owner = False
        _state.ranks = ()
