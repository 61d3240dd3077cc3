"""Run a function on N local GPUs, one spawned process per GPU, for the GPU tests.

    results = run_on_gpus(4, check_fn, arg1, max_bytes=128 << 20, timeout_s=180)

Each process binds GPU ``rank``, sets the no-multicast environment (DESIGN.md), joins an NCCL
group and a gloo group over the same ranks, builds a ``GroupContext`` and calls
``fn(ctx, *args)``; ``fn`` must be a module-level function and return something picklable. The
list of the ranks' return values comes back in rank order. A rank that raises fails the call with
its traceback; a run that outlives ``timeout_s`` is killed and fails naming the ranks still alive.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

# free ones outside the ephemeral range, as a tune's rendezvous port
from artune.autotune.launcher import free_port as _free_port

__all__ = ["gpu_count", "run_on_gpus"]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _entry(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    max_bytes: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    from artune.envs import NO_MULTICAST_ENV

    os.environ.update(NO_MULTICAST_ENV)  # before CUDA, NCCL or NVSHMEM start in this process

    import torch
    import torch.distributed as dist

    from artune.backends import _nvshmem
    from artune.backends.base import GroupContext

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device,
    )
    cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    ctx = GroupContext(
        group=dist.group.WORLD,
        cpu_group=cpu_group,
        rank=rank,
        world_size=world_size,
        device=device,
        ranks_per_node=world_size,
        max_bytes=max_bytes,
        group_name="test",
    )
    result = fn(ctx, *args)
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    _nvshmem.finalize()  # collective; a no-op where fn never used NVSHMEM
    dist.barrier(cpu_group)
    dist.destroy_process_group()


def run_on_gpus(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    max_bytes: int = 128 << 20,
    timeout_s: float = 180.0,
) -> list[Any]:
    """``fn(ctx, *args)`` on ``world_size`` GPUs; the ranks' results in rank order."""
    import torch.multiprocessing as mp

    if gpu_count() < world_size:
        raise RuntimeError(f"run_on_gpus: needs {world_size} GPUs, {gpu_count()} visible")
    with tempfile.TemporaryDirectory(prefix="artune-gpu-test-") as out_dir:
        pctx = mp.start_processes(
            _entry,
            args=(world_size, _free_port(), out_dir, max_bytes, timeout_s, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not pctx.join(timeout=1.0):  # raises ProcessRaisedException/ProcessExitedException
            if time.monotonic() > deadline:
                alive = [i for i, p in enumerate(pctx.processes) if p.is_alive()]
                for p in pctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(
                    f"run_on_gpus({world_size}, {fn.__name__}): ranks {alive} still running after "
                    f"{timeout_s:.0f} s (a hang in a collective?); killed them"
                )
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results
