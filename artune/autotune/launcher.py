"""Start the ranks of a tune from a shell: one process per GPU (or per CPU rank for dry runs).

``artune tune`` without RANK in its environment calls ``launch``: it starts ``nproc``
copies of ``python -m artune.cli tune ...`` with the variables torchrun would set (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and NVLink multicast off
(``artune.envs.NO_MULTICAST_ENV``), then watches them. When one dies, the others are stopped
at once (SIGTERM, then SIGKILL after ``GRACE_S``) and the error names the rank that died, so
nothing hangs. Each child also dies with the launcher (PR_SET_PDEATHSIG on Linux), and
ignores SIGINT: Ctrl-C is the launcher's to handle.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from artune import envs

__all__ = ["launch", "free_port", "GRACE_S"]

#: Seconds the surviving ranks get between SIGTERM and SIGKILL.
GRACE_S = 10.0
_POLL_S = 0.1
#: How long a failed job waits for rank 0 to exit too (and say why) before naming a rank.
_RANK0_GRACE_S = 3.0


#: Where free_port looks first, below the ephemeral range: from 20000 (clear of the
#: registered ports most services use below it, and where ``slurm.port_for`` maps srun steps)
#: up to Linux's default ephemeral range, 32768-60999; above that range up to 65535 too.
_PORT_LOW, _PORT_HIGH = 20000, 32768
#: A span of fewer free-port candidates than this is not worth drawing from.
_MIN_SPAN = 64


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; its default
    elsewhere)."""
    try:
        lo, hi = (int(v) for v in
                  Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _spans(lo: int, hi: int) -> list[tuple[int, int]]:
    """The [a, b) port spans outside the ephemeral range [lo, hi] that free_port draws from."""
    spans = ((_PORT_LOW, min(_PORT_HIGH, lo)), (hi + 1, 65536))
    return [(a, b) for a, b in spans if b - a >= _MIN_SPAN]


def free_port() -> int:
    """A TCP port free on this host right now (for MASTER_PORT), outside the ephemeral range.

    A port the kernel hands out for ``bind(0)`` is an ephemeral one: between this check and
    rank 0's listen, any outgoing connection on the host may get it as its local port, e.g. a
    rank already retrying to reach the store (a connection to a local port nobody listens on
    can connect to itself). Rank 0 then fails with EADDRINUSE (seen once in the 31st session, on
    2x H200, the tune after a killed one). So: a random free port outside the ephemeral range
    (``_spans``), and bind(0) only if none is found."""
    spans = _spans(*_ephemeral_range())
    rng = random.SystemRandom()
    for _ in range(64):
        if not spans:
            break
        a, b = rng.choice(spans)
        port = rng.randrange(a, b)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup() -> None:
    """preexec_fn: the child ignores SIGINT, so that Ctrl-C in a terminal (sent to the whole
    foreground group) reaches the launcher only, which stops the ranks with SIGTERM, instead of
    every rank printing a KeyboardInterrupt traceback (Python keeps an ignored SIGINT
    ignored); and it gets SIGTERM when the launcher dies (Linux only)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(envs.NO_MULTICAST_ENV)
    env.update(
        ARTUNE_LAUNCH_TIME=repr(time.time()),  # the tune reports its start-up time
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Ranks share the host's cores: keep each rank's intra-op threads from oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        left = max(0.0, deadline - time.monotonic())
        try:
            p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                p.kill()
            p.wait()


def launch(
    argv: Sequence[str],
    nproc: int,
    *,
    grace_s: float = GRACE_S,
    python: str = sys.executable,
) -> int:
    """Run ``python -m artune.cli *argv`` as ranks 0..nproc-1 of one job; the job's exit code.

    0 when every rank exits 0. When a rank fails, the others are stopped and the rank's code is
    returned (2 for a usage error rank 0 already explained; 1 otherwise), after an error line
    naming it.
    """
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def _on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _on_term)
    old_int = signal.getsignal(signal.SIGINT)
    interrupted = False
    try:
        for rank in range(nproc):
            procs.append(
                subprocess.Popen(
                    [python, "-m", "artune.cli", *argv],
                    env=_rank_env(rank, nproc, port),
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_child_setup if sys.platform != "win32" else None,
                )
            )
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # Prefer a rank killed by a signal (the cause) over ranks that reacted to it;
                # among the others, the first seen failing.
                rank, rc = min(failed, key=lambda f: (f[1] >= 0, f[0]))
                if codes[0] is None and rc >= 0:
                    # Rank 0 explains usage errors (exit 2), and the others may leave first
                    # when it tears the job's group down: give it a moment to say so. (A rank
                    # 0 that fails otherwise meanwhile, e.g. on the lost peer, is not blamed.)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        if procs[0].wait(timeout=_RANK0_GRACE_S) == 2:
                            rank, rc = 0, 2
                    codes = [p.poll() for p in procs]
                others = sum(1 for c in codes if c is None)
                _stop(procs, grace_s)
                if rc == 2 and rank == 0:
                    return 2
                print(
                    f"artune tune: rank {rank} (pid {procs[rank].pid}) {_how(rc)}; stopped the "
                    f"other {others} running rank(s). Measurements finished so far are kept in "
                    "the tune's storage: rerun the same command with --resume to continue.",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(_POLL_S)
    except (KeyboardInterrupt, SystemExit) as exc:
        # a second Ctrl-C (or SIGTERM) while the ranks are being stopped must not cut that
        # short with a traceback
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(procs, grace_s)
        print(
            "artune tune: interrupted; stopped all ranks. Rerun the same command with --resume "
            "to continue where it stopped.",
            file=sys.stderr,
            flush=True,
        )
        return exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
    finally:
        # After an interrupt the process is on its way out with 130 (or 128 + the signal):
        # the signals stay ignored, so that a late second Ctrl-C (a terminal sends one to the
        # whole group) cannot turn that exit into a death by SIGINT after this returns.
        if not interrupted:
            signal.signal(signal.SIGTERM, old)
            signal.signal(signal.SIGINT, old_int)
