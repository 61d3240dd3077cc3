"""Bounded host-side agreement over a gloo group, for code outside the tune's own ``Comm``
(the SGLang plugin's setup, a backend's collective ``close``)."""

from __future__ import annotations

from typing import Any

from artune import envs

__all__ = ["gather"]


def gather(group: Any, obj: Any, what: str, error: type[Exception] = RuntimeError) -> list[Any]:
    """Every rank's ``obj`` over the gloo ``group``, indexed by rank. Bounded
    (ARTUNE_COLLECTIVE_TIMEOUT_S): the ranks first meet at a monitored barrier, so that a rank
    that died or hangs makes the others raise ``error`` naming this rank, ``what`` and the
    missing ranks, instead of waiting for gloo's own timeout (30 minutes by default)."""
    import datetime

    import torch.distributed as dist

    limit = float(envs.get("ARTUNE_COLLECTIVE_TIMEOUT_S"))
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
