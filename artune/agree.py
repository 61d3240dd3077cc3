"""Bounded host-side agreement over a process group, for code outside the tune's own ``Comm``
(the SGLang plugin's setup, a backend's collective ``close``).

The exchange goes through the group's key-value store, polled, so that every rank's wait is
bounded by its own clock (``ARTUNE_COLLECTIVE_TIMEOUT_S``), whatever the others do: a rank that
died, hangs, or arrives after a peer gave up makes each waiting rank raise an error naming it,
never a collective left waiting for gloo's own timeout (30 minutes by default). Two phases:
every rank posts its object and waits for all of them, then posts "done" and waits for all of
those; a rank that gives up posts an abort that every rank still waiting sees at once. So a
rank returns only if every rank had posted its object, and fails fast once any rank gave up.
Groups without a store (none known to torch) fall back to a monitored barrier and
``all_gather_object``."""

from __future__ import annotations

import pickle
import time
from typing import Any

from artune import envs

__all__ = ["gather"]

#: Agreements made so far per group (every rank makes the same ones, in the same order).
_SEQ: dict[str, int] = {}
_POLL_S = (0.001, 0.05)  # first and longest pause between two looks at the store


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
    name = str(getattr(group, "group_name", "") or "-".join(map(str, ranks)))
    seq = _SEQ.get(name, 0)
    _SEQ[name] = seq + 1
    prefix = f"artune/agree/{seq}"
    deadline = time.monotonic() + limit
    head = f"artune: rank {me}: {what}"

    def wait(kind: str) -> None:
        keys = [f"{prefix}/{kind}/{r}" for r in ranks]
        pause = _POLL_S[0]
        while True:
            if store.check([f"{prefix}/abort"]):
                raise _GaveUp(f"{head}: {store.get(f'{prefix}/abort').decode()}")
            if store.check(keys):
                return
            if time.monotonic() >= deadline:
                missing = [r for r, k in zip(ranks, keys, strict=True) if not store.check([k])]
                why = (f"rank(s) {', '.join(map(str, missing))} did not arrive within "
                       f"{limit:.0f} s (ARTUNE_COLLECTIVE_TIMEOUT_S)")
                store.set(f"{prefix}/abort", f"rank {me} gave up: {why}".encode())
                raise _GaveUp(f"{head}: not every rank of the group arrived: {why}")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])

    try:
        store.set(f"{prefix}/obj/{me}", pickle.dumps(obj))
        wait("obj")
        out = [pickle.loads(store.get(f"{prefix}/obj/{r}")) for r in ranks]
        store.set(f"{prefix}/done/{me}", b"1")
        wait("done")
    except _GaveUp as exc:
        raise error(str(exc)) from None
    except Exception as exc:  # the store itself failed (e.g. its server is gone)
        raise error(f"{head}: the exchange failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    try:  # every rank has read it (each read all before posting done)
        store.delete_key(f"{prefix}/obj/{me}")
    except Exception:  # noqa: BLE001, S110 - a store without deletion keeps a few bytes
        pass
    return out


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
