"""Shared test helpers: GPU skips, multi-process gloo jobs, running the ``artune`` CLI.

- ``requires_gpus(n)``: a skip marker with the reason (CUDA missing, or fewer than n GPUs);
  ``requires_nvshmem(n)`` also needs nvshmem4py (``import nvshmem.core``) installed.
- ``run_gloo(fn, world_size, *args, timeout_s=...)``: run module-level ``fn(rank, world_size,
  *args)`` in ``world_size`` spawned processes joined in a gloo default group; the return values
  in rank order (a rank that raises fails the call with its traceback; a hang is killed).
- ``reap(procs, timeout_s)``: join spawned processes, killing the ones still alive.
- ``run_artune(*args, env=..., timeout_s=...)``: ``python -m artune.cli ARGS`` in a subprocess
  (the way a user runs it), with this checkout and tests/ importable; a CompletedProcess.
- ``load_benchmark(name)``: ``benchmarks/<name>.py`` imported as a fresh module (its own copy
  per call, under the name ``<name>_under_test``), for tests of the benchmark scripts.
- fixtures ``cpu_env`` (the environment for CPU runs of ``run_artune``: GPUs hidden) and
  ``gloo_job`` (``run_gloo`` itself, for tests that prefer a fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# the tests' rendezvous ports: free ones outside the ephemeral range, as a tune's
from artune.autotune.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

__all__ = [
    "requires_gpus",
    "requires_nvshmem",
    "run_gloo",
    "reap",
    "run_artune",
    "artune_env",
    "free_port",
    "ROOT",
    "TESTS",
]


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def requires_gpus(n: int) -> pytest.MarkDecorator:
    """Skip unless at least ``n`` CUDA GPUs are visible (the reason says how many are)."""
    have = _gpus()
    return pytest.mark.skipif(
        have < n,
        reason=f"needs {n} CUDA GPU(s), {have} visible"
        + ("" if have else " (torch.cuda.is_available() is False)"),
    )


def requires_nvshmem(n: int = 2) -> pytest.MarkDecorator:
    """Skip unless ``n`` GPUs are visible and nvshmem4py is installed (the reason says which)."""
    import importlib.util

    have = _gpus()
    try:
        nvshmem = importlib.util.find_spec("nvshmem.core") is not None
    except ModuleNotFoundError:
        nvshmem = False
    reason = (
        f"needs {n} CUDA GPU(s), {have} visible" if have < n
        else "needs nvshmem4py (pip install 'artune[nvshmem]')"
    )
    return pytest.mark.skipif(have < n or not nvshmem, reason=reason)


def _gloo_entry(
    rank: int, world_size: int, port: int, queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - ship the traceback to the test
        queue.put((rank, False, traceback.format_exc()))


def run_gloo(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 120.0,
    may_die: frozenset[int] = frozenset(),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (see module docstring).

    Ranks in ``may_die`` may exit without a result (fault tests); theirs is None."""
    import multiprocessing as mp
    import queue as _queue
    import time

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_gloo_entry, args=(r, world_size, port, q, fn, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            for r in may_die:
                if r not in results and not procs[r].is_alive():
                    results[r] = None
            left = deadline - time.monotonic()
            if left <= 0:
                alive = [r for r, p in enumerate(procs) if p.is_alive() and r not in results]
                raise TimeoutError(f"run_gloo: ranks {alive} still running after {timeout_s}s")
            try:
                rank, ok, value = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in results and r not in may_die
                        and p.exitcode not in (0, None)]
                if dead and q.empty():
                    raise RuntimeError(
                        f"run_gloo: rank(s) {dead} died (exit codes "
                        f"{[procs[r].exitcode for r in dead]}) without a result"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"run_gloo: rank {rank} raised:\n{value}")
            results[rank] = value
    finally:
        reap(procs, 5.0)
    return [results[r] for r in range(world_size)]


def reap(procs: list[Any], timeout_s: float) -> None:
    """Join spawned test processes, killing any still alive after ``timeout_s`` each."""
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()


def load_benchmark(name: str) -> Any:
    """``benchmarks/<name>.py`` as a fresh module (see the module docstring)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                  ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def artune_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout and tests/ on the path, no GPUs."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "SLURM_STEP_NUM_TASKS"):  # (the tests may run inside an srun)
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.setdefault("ARTUNE_COLLECTIVE_TIMEOUT_S", "60")
    env["COLUMNS"] = "160"
    env.update(extra or {})
    return env


def run_artune(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 300.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m artune.cli *args`` as a user runs it; stdout/stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "artune.cli", *args],
        env=env if env is not None else artune_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def cpu_env() -> dict[str, str]:
    """``artune_env`` with GPUs hidden, for ``--device cpu`` runs."""
    return artune_env({"CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture
def gloo_job() -> Callable[..., list[Any]]:
    """``run_gloo`` as a fixture: ``gloo_job(fn, 2, *args)``."""
    return run_gloo


@pytest.fixture(autouse=True)
def _log_once_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """``log_once`` remembers its keys per process: each test starts with none seen, so a test
    that checks a one-time message does not depend on which tests ran before it."""
    import artune.log

    monkeypatch.setattr(artune.log, "_seen", set())
