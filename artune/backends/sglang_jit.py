"""Build SGLang's custom all-reduce JIT modules ahead of a tune, in the background.

SGLang (0.5.17 and 0.5.23) compiles its custom all-reduce on first use with nvcc: the IPC
manager and the communicator when ``initialize_model_parallel`` builds the TP group, then one
kernel module per (dtype, world size) on the first all-reduce. On a machine that never ran
them, the tune's ``sglang`` candidate waits for those builds: ``initialize_model_parallel``
took 23.4 s in a cold 4x H100 tune and 5.0 s in the next one (2026-11-26,
benchmarks/results/tune_time_4gpu_*_h100.json). The builds land in SGLang's on-disk cache,
so starting them, one process per module and all at once, while the ranks start and build the
other backends takes them off the tune's critical path. When a rank reaches a module still
being built, it is SGLang's own cache that makes it wait or build it again: nothing here is
required for correctness, and any failure only means the ranks build as they would anyway.

``artune tune`` starts this from the shell when the ``sglang`` candidate is in the tune
(``start``), and ``ARTUNE_SGLANG_WARM=0`` turns it off. By hand::

    python -m artune.backends.sglang_jit 4 bfloat16 float16
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from artune import envs

__all__ = ["modules", "start", "stop", "main"]

_MOD = "sglang.kernels.ops.communication.all_reduce"
#: This module's name for ``python -m`` (``__name__`` is "__main__" when it runs that way).
_SELF = "artune.backends.sglang_jit"


def modules(world_size: int, dtypes: Sequence[str]) -> list[str]:
    """The names of the builds a TP group of ``world_size`` runs first: ipc, communicator,
    and the kernel per dtype."""
    return ["ipc", "communicator", *(f"kernel:{d}" for d in dtypes)]


def _builder(name: str, world_size: int) -> Callable[[], Any]:
    import importlib

    import torch

    m = importlib.import_module(_MOD)
    if name == "ipc":
        return m._init_ipc_manager
    if name == "communicator":
        return m._init_communicator
    dtype = getattr(torch, name.split(":", 1)[1])
    return lambda: m.get_all_reduce_module(dtype, world_size)


def _background() -> Callable[[], None] | None:
    """preexec_fn: die with the parent (Linux), leave Ctrl-C to the launcher, and yield the
    CPU to the ranks."""
    if not sys.platform.startswith("linux"):
        return None
    from artune.autotune.launcher import _child_setup as die

    def setup() -> None:
        die()
        with contextlib.suppress(OSError):
            os.nice(10)

    return setup


def start(world_size: int, dtypes: Sequence[str], python: str = sys.executable,
          log_path: Path | None = None) -> subprocess.Popen[bytes] | None:
    """Start the builds in the background (one process that starts one per module); None
    when they are turned off or SGLang's module is not there. Each build's outcome and time
    goes to ``log_path`` (appended) when given."""
    import importlib.util

    if not envs.get("ARTUNE_SGLANG_WARM"):
        return None
    try:
        if importlib.util.find_spec("sglang") is None:
            return None
    except (ImportError, ValueError):
        return None
    with contextlib.ExitStack() as stack:
        log: Any = subprocess.DEVNULL
        if log_path is not None:
            with contextlib.suppress(OSError):
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = stack.enter_context(open(log_path, "ab"))  # noqa: SIM115
        try:
            # Its own process group (``stop`` ends the builders' nvcc too), at low priority:
            # the ranks' host-bound eager timing may run beside it.
            from artune.envs import NO_MULTICAST_ENV

            # (it only compiles, but anything artune starts keeps NVLink multicast off)
            return subprocess.Popen([python, "-m", _SELF, str(world_size), *dtypes],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=dict(os.environ, **NO_MULTICAST_ENV),
                                    preexec_fn=_background(), start_new_session=True)
        except Exception:  # noqa: BLE001 - the ranks build what they need themselves
            return None
    return None


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """End the builds if they still run (the ranks have what they needed by then)."""
    import signal

    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _line(text: str) -> None:
    """One line to stderr in one write: the builds share the log (opened for appending), and
    ``print`` may write the text and its newline separately, which interleaves lines."""
    sys.stderr.flush()
    os.write(2, (text + "\n").encode())


def main(argv: Sequence[str] | None = None) -> int:
    """``WORLD DTYPE...``: build every module at once (a process each); ``--one NAME WORLD``:
    build one. Exit 0 when all were built, 1 otherwise (each failure printed)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--one"]:
        import time

        name, world = args[1], int(args[2])
        t0 = time.monotonic()
        try:
            _builder(name, world)()
        except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the ranks time
            _line(f"artune sglang_jit: {name}: {type(exc).__name__}: {exc}".splitlines()[0])
            return 1
        _line(f"artune sglang_jit: {name} ready after {time.monotonic() - t0:.1f} s")
        return 0
    world, dtypes = int(args[0]), args[1:] or ["bfloat16"]
    procs = [
        subprocess.Popen([sys.executable, "-m", _SELF, "--one", name, str(world)],
                         stdin=subprocess.DEVNULL, preexec_fn=_background())
        for name in modules(world, dtypes)
    ]
    # Wait for every build (not ``all(...)``, which stops at the first failure): the driver's
    # exit would end the builds still running, since they die with their parent.
    codes = [p.wait() for p in procs]
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
