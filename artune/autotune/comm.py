"""Host-side agreement between the tune's ranks, over the gloo ``cpu_group``.

Every call is a collective (all ranks call it in the same order) bounded by the group's timeout
(``ARTUNE_COLLECTIVE_TIMEOUT_S``). A failure -- a peer that died, or one that stopped answering --
becomes a ``HostCollectiveError`` naming this rank, the step, and which peers look dead (ranks
write a heartbeat into the rendezvous store, see ``Heartbeat``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.distributed as dist

__all__ = ["Comm", "HostCollectiveError", "Heartbeat"]

#: Seconds between heartbeats; a rank silent for HEARTBEAT_STALE_S is reported as dead.
HEARTBEAT_S = 1.0
HEARTBEAT_STALE_S = 5.0


def raised_in_distributed(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.distributed's (a DistError) or was raised in a frame of
    torch.distributed (gloo's transport errors arrive as a bare RuntimeError from
    ``work.wait()``)."""
    from torch.distributed import DistError

    if isinstance(exc, DistError):
        return True
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and f"torch{os.sep}distributed{os.sep}" in last


class HostCollectiveError(RuntimeError):
    """A host collective of the tune failed (a rank died or hung)."""


class Heartbeat:
    """A daemon thread that writes ``artune/hb/<rank>`` = time into the rendezvous store every
    ``HEARTBEAT_S``, so a surviving rank can name the ones that died."""

    def __init__(
        self, store: Any, rank: int, world_size: int, check_store: Any | None = None
    ) -> None:
        self.store = store
        # A second client for reads from the main thread (one client per thread).
        self.check_store = check_store if check_store is not None else store
        self.rank = rank
        self.world_size = world_size
        self._stop = threading.Event()
        self._failing_since: float | None = None  # monotonic time of the first failed write
        self._thread = threading.Thread(target=self._loop, name="artune-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            self.store.set(f"artune/hb/{self.rank}", repr(time.time()))
            self._failing_since = None
        except Exception:  # noqa: BLE001 - a slow store, or it went with rank 0 / the launcher
            # Keep trying through a blip (a live rank that stopped beating would be named dead
            # by its peers); stop once it has failed for as long as peers wait before calling
            # a rank stale: each attempt logs c10d's "sendBytes failed" with its C++ stack
            # (seen every second under srun once rank 0 was killed).
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            elif now - self._failing_since > HEARTBEAT_STALE_S:
                self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def stale_ranks(self) -> list[int] | None:
        """Ranks whose last heartbeat is older than HEARTBEAT_STALE_S, or that never wrote one;
        None when the store itself is unreachable (it lives with rank 0 or the launcher)."""
        now = time.time()
        stale = []
        try:
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                key = f"artune/hb/{r}"
                if not self.check_store.check([key]):  # never beat: as good as stale
                    stale.append(r)
                    continue
                # The store's own timeout bounds this.
                last = float(self.check_store.get(key).decode())
                if now - last > HEARTBEAT_STALE_S:
                    stale.append(r)
        except Exception:  # noqa: BLE001 - an unreachable store is an answer too
            return None
        return stale

    def stop(self) -> None:
        """Stop and join the thread. Joining matters: a daemon thread still inside a store call
        when the interpreter exits is torn down mid-C++ and aborts the process."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=HEARTBEAT_S + 15.0)


class Comm:
    """Collectives on ``group`` (gloo), each wrapped so a failure says what happened."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        timeout_s: float,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.heartbeat = heartbeat

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        try:
            yield
        except HostCollectiveError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError/DistBackendError
            raise HostCollectiveError(
                self._explain(f"host collective {what!r}", exc, self.peers_gone())) from exc

    def peers_gone(self) -> list[int] | None:
        """After a failure: wait until a rank that died with it has missed its heartbeats, then
        the ranks that did ([] when none did or there is no heartbeat; None when the store
        itself is gone, i.e. rank 0 or the launcher died)."""
        if self.heartbeat is None:
            return []
        time.sleep(min(HEARTBEAT_STALE_S + HEARTBEAT_S, self.timeout_s))
        return self.heartbeat.stale_ranks()

    def stopped_by_peer(self, exc: BaseException) -> str | None:
        """The error to print when ``exc`` was raised inside a ``torch.distributed`` call other
        than this class's collectives (a backend's or the gate's own) and a peer has stopped:
        it names that peer. None otherwise, at once for an error raised anywhere else (the
        tune's own fault: its traceback says more; a rank-0 error stops the other ranks,
        whose heartbeats then go stale too) and after the heartbeat wait when every peer is
        alive."""
        if not raised_in_distributed(exc):
            return None
        stale = self.peers_gone()
        if stale == []:
            return None
        return self._explain("a collective of the tune", exc, stale)

    def _explain(self, failed: str, exc: BaseException, stale: list[int] | None) -> str:
        if stale is None:
            who = "the rendezvous store is unreachable: rank 0 (or the launcher) died"
        elif stale:
            who = f"rank(s) {', '.join(map(str, stale))} stopped (no heartbeat)"
        else:
            who = "a peer rank died or did not answer"
        return (
            f"rank {self.rank}: {failed} failed: {who} "
            f"(bound: ARTUNE_COLLECTIVE_TIMEOUT_S={self.timeout_s:g}s). Cause: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Measurements so far are kept: rerun with --resume."
        )

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        with self._step(what):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_floats(self, values: list[float], what: str) -> list[list[float]]:
        """Every rank's ``values`` (same length on all ranks), indexed by rank."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self._step(what):
            dist.all_gather(out, t, group=self.group)
        return [o.tolist() for o in out]

    def gather_errors(self, error: str | None, what: str) -> list[str | None]:
        """Every rank's error text (None where it had none); costs one small collective when
        no rank has an error."""
        import torch.distributed as dist

        flags = self.gather_floats([0.0 if error is None else 1.0], what)
        if not any(f[0] for f in flags):
            return [None] * self.world_size
        box: list[Any] = [None] * self.world_size
        with self._step(what):
            dist.all_gather_object(box, error, group=self.group)
        return box

    def max(self, value: float, what: str) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        with self._step(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def barrier(self, what: str) -> None:
        self.max(0.0, what)
