"""Bounded host-side agreement over a process group, for code outside the tune's own ``Comm``
(the SGLang plugin's setup, a backend's collective ``close``).

The exchange goes through the group's key-value store, polled, so that every rank's wait is
bounded by its own clock (``ARTUNE_COLLECTIVE_TIMEOUT_S``), whatever the others do: a rank that
died, hangs, or arrives after a peer gave up makes each waiting rank raise an error naming it,
never a collective left waiting for gloo's own timeout (30 minutes by default). Two phases:
every rank posts its object and waits for all of them, then posts "done" and waits for all of
those. One verdict key decides the outcome, set once (``compare_set``): "ok" by the first rank
that sees every "done", or "rank r gave up: ..." by the first rank whose time ran out; every
rank acts on the value the store holds, so all of them return or all of them raise, even when
a rank gives up just as the last one arrives; global rank 0, whose process holds the store's
server, then waits until its peers have read that value (``_leave``). Each object travels
with the caller's ``what``: ranks in different agreements (one skipped a call) raise the same
error instead of pairing the wrong objects. The sequence number of an agreement is counted
in the store (it resets with the store). Bounded by the store's own timeout instead: a store
whose server stops answering without closing the connection (a frozen host). Groups without a
store (none known to torch) fall back to a monitored barrier and ``all_gather_object``."""

from __future__ import annotations

import contextlib
import pickle
import time
from typing import Any

from artune import envs

__all__ = ["gather"]

_POLL_S = (0.001, 0.05)  # first and longest pause between two looks at the store
_LINGER_S = 5.0  # the store's host waits at most this for its peers to read the verdict


class _GaveUp(Exception):
    """This rank or a peer gave up waiting (the message says which)."""


def gather(group: Any, obj: Any, what: str, error: type[Exception] = RuntimeError) -> list[Any]:
    """Every rank's ``obj`` over ``group``, indexed by group rank, within
    ARTUNE_COLLECTIVE_TIMEOUT_S; else ``error`` naming this rank, ``what`` and the ranks that
    did not arrive (or the rank that gave up first)."""
    import torch.distributed as dist

    limit = float(envs.get("ARTUNE_COLLECTIVE_TIMEOUT_S"))
    store = _store(group)
    if store is None:
        return _gather_gloo(group, obj, what, error, limit)
    ranks = list(dist.get_process_group_ranks(group))
    me = dist.get_rank()
    head = f"artune: rank {me}: {what}"
    deadline = time.monotonic() + limit

    def wait(keys: list[str]) -> str:
        """'ok' once all ``keys`` are posted (and, for the done phase, the verdict set), else
        the verdict: the first rank to decide wins (compare_set), every rank reads the same."""
        pause = _POLL_S[0]
        while True:
            if store.check([verdict]):
                return store.get(verdict).decode()
            if store.check(keys):
                return "ok"
            if time.monotonic() >= deadline:
                missing = [r for r, k in zip(ranks, keys, strict=True) if not store.check([k])]
                why = (f"rank(s) {', '.join(map(str, missing))} did not arrive within "
                       f"{limit:.0f} s (ARTUNE_COLLECTIVE_TIMEOUT_S)")
                mine = f"rank {me} gave up: {why}"
                v = store.compare_set(verdict, "", mine).decode()
                return f"not every rank of the group arrived: {why}" if v == mine else v
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])

    try:
        seq = store.add(f"artune/agree/n/{me}", 1) - 1  # lives and dies with the store
        prefix = f"artune/agree/{seq}"
        verdict = f"{prefix}/verdict"
        store.set(f"{prefix}/obj/{me}", pickle.dumps((what, obj)))
        v = wait([f"{prefix}/obj/{r}" for r in ranks])
        if v != "ok":
            raise _GaveUp(f"{head}: {v}")
        posted = [pickle.loads(store.get(f"{prefix}/obj/{r}")) for r in ranks]
        store.set(f"{prefix}/done/{me}", b"1")
        v = wait([f"{prefix}/done/{r}" for r in ranks])
        if v == "ok":  # all done: commit, unless a rank gave up first
            v = store.compare_set(verdict, "", "ok").decode()
        _leave(store, prefix, ranks, me)
        if v != "ok":
            raise _GaveUp(f"{head}: {v}")
    except _GaveUp as exc:
        raise error(str(exc)) from None
    except Exception as exc:  # the store itself failed (e.g. its server is gone)
        raise error(f"{head}: the exchange failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    whats = {w for w, _ in posted}
    if len(whats) > 1:  # same set on every rank: the same error everywhere
        raise error(f"{head}: ranks are out of step: " + "; ".join(
            f"rank {r} in {w!r}" for r, (w, _) in zip(ranks, posted, strict=True)))
    if seq:  # every rank has finished seq-1 (it posted obj for seq): drop its keys
        for k in (f"artune/agree/{seq - 1}/obj/{me}", f"artune/agree/{seq - 1}/done/{me}",
                  f"artune/agree/{seq - 1}/left/{me}", f"artune/agree/{seq - 1}/verdict"):
            with contextlib.suppress(Exception):  # a store without deletion keeps them
                store.delete_key(k)
    return [o for _, o in posted]


def _leave(store: Any, prefix: str, ranks: list[int], me: int) -> None:
    """This rank has read the verdict. The store's server lives in global rank 0's process
    (torch's default rendezvous), which may exit as soon as it returns (a failed set-up): it
    first waits, at most _LINGER_S, until every rank that reached the last phase has read the
    verdict too, so that none of them loses the store before reading the outcome every rank
    shares. Never raises: the outcome is decided already."""
    with contextlib.suppress(Exception):
        store.set(f"{prefix}/left/{me}", b"1")
        if me != 0:
            return
        end = time.monotonic() + _LINGER_S
        pause = _POLL_S[0]
        while time.monotonic() < end and any(
                store.check([f"{prefix}/done/{r}"]) and not store.check([f"{prefix}/left/{r}"])
                for r in ranks):
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])


def _store(group: Any) -> Any:
    """The group's key-value store, or None where torch keeps none for it."""
    try:
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_process_group_store(group)
    except Exception:  # noqa: BLE001 - a private accessor: fall back where it is missing
        return None


def _gather_gloo(group: Any, obj: Any, what: str, error: type[Exception],
                 limit: float) -> list[Any]:
    """The fallback: a monitored barrier bounds the arrival (on a gloo group), then
    ``all_gather_object``."""
    import datetime

    import torch.distributed as dist

    if dist.get_backend(group) == "gloo":
        try:
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=limit),
                                   wait_all_ranks=True)
        except RuntimeError as exc:
            raise error(
                f"artune: rank {dist.get_rank()}: {what}: not every rank of the group arrived "
                f"within {limit:.0f} s (ARTUNE_COLLECTIVE_TIMEOUT_S): "
                f"{str(exc).splitlines()[0]}") from exc
    out: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as exc:
        raise error(f"artune: rank {dist.get_rank()}: {what}: the exchange failed: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return out
