"""artune.agree.gather on plain gloo ranks: one outcome on every rank, even at the bound, and
ranks in different agreements found out (the dead-peer and late-peer cases are in
test_sglang_plugin.py)."""

from __future__ import annotations

import os
import time
from typing import Any

from conftest import run_gloo


def _stall_at_the_bound(rank: int, world: int) -> tuple[str, Any]:
    """Rank 0 stalls in its last look at the 'done' keys until past its deadline; rank 1 posts
    its 'done' during that stall (coordinated through the store, not by timing)."""
    import torch.distributed as dist

    from artune import agree

    os.environ["ARTUNE_COLLECTIVE_TIMEOUT_S"] = "2"
    real = agree._store
    started: list[float] = []

    class Stalling:
        def __init__(self, store: Any) -> None:
            self.store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        def set(self, key: str, value: Any) -> None:
            if rank == 1 and "/done/" in key:
                self.store.wait(["test/stalling"])  # post 'done' only once rank 0 stalls
            self.store.set(key, value)

        def check(self, keys: list[str]) -> bool:
            found = self.store.check(keys)
            if (rank == 0 and not found and "/done/" in keys[0]
                    and time.monotonic() - started[0] > 1.5):
                self.store.set("test/stalling", b"1")
                time.sleep(1.0)  # past the 2 s bound
            return bool(found)

    agree._store = lambda g: Stalling(real(g))  # type: ignore[assignment]
    group = dist.new_group([0, 1], backend="gloo")
    dist.barrier(group)
    started.append(time.monotonic())
    try:
        return ("ok", agree.gather(group, rank, "stall"))
    except RuntimeError as exc:
        return ("error", str(exc))


def test_a_rank_giving_up_as_the_last_one_arrives_gets_the_same_outcome() -> None:
    """The verdict is set once in the store: rank 1 saw every 'done' and committed "ok"
    before rank 0's time ran out, so rank 0 returns too (before, it raised while rank 1
    returned, and a collective free after it would have hung)."""
    r0, r1 = run_gloo(_stall_at_the_bound, 2, timeout_s=90)
    assert r0 == r1 == ("ok", [0, 1]), (r0, r1)


def _one_rank_skips(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from artune.agree import gather

    os.environ["ARTUNE_COLLECTIVE_TIMEOUT_S"] = "5"
    group = dist.new_group(backend="gloo")
    out: dict[str, Any] = {}
    if rank == 0:  # rank 1 skips this one
        try:
            out["a"] = gather(group, "A", "step A")
        except RuntimeError as exc:
            out["a"] = str(exc)
    try:
        out["b"] = gather(group, "B", "step B")
    except RuntimeError as exc:
        out["b"] = str(exc)
    return out


def test_ranks_in_different_agreements_raise_the_same_error() -> None:
    """Rank 1 skipped 'step A': its 'step B' meets rank 0's 'step A'. Both raise, naming each
    rank's step, instead of returning each other's objects for the wrong step."""
    r0, r1 = run_gloo(_one_rank_skips, 2, timeout_s=90)
    assert isinstance(r0["a"], str) and isinstance(r1["b"], str), (r0, r1)
    for msg, rank in ((r0["a"], 0), (r1["b"], 1)):
        assert msg.startswith(f"artune: rank {rank}: step ")
        assert "ranks are out of step: rank 0 in 'step A'; rank 1 in 'step B'" in msg


def _host_leaves_at_once(rank: int, world: int) -> tuple[str, Any]:
    """Rank 1 is slow to read the verdict (it sleeps before its first look after posting
    'done'); rank 0, whose process holds the store's server, returns and tears its process
    group down at once (run_gloo's worker), as a rank whose set-up failed does."""
    import torch.distributed as dist

    from artune import agree

    real = agree._store

    class SlowReader:
        def __init__(self, store: Any) -> None:
            self.store, self.done = store, False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        def set(self, key: str, value: Any) -> None:
            self.store.set(key, value)
            self.done = self.done or "/done/" in key

        def check(self, keys: list[str]) -> bool:
            if rank == 1 and self.done and "/verdict" in keys[0]:
                self.done = False
                time.sleep(1.0)  # rank 0 has returned by now
            return bool(self.store.check(keys))

    agree._store = lambda g: SlowReader(real(g))  # type: ignore[assignment]
    group = dist.new_group([0, 1], backend="gloo")
    try:
        return ("ok", agree.gather(group, rank, "leave"))
    except RuntimeError as exc:
        return ("error", str(exc))


def test_the_store_host_waits_until_its_peers_read_the_verdict() -> None:
    """Rank 0 returns first; its peer still reads the shared outcome from the store (before,
    it lost the store with rank 0's process and raised "the exchange failed" while rank 0
    returned: the same agreement, two outcomes)."""
    r0, r1 = run_gloo(_host_leaves_at_once, 2, timeout_s=90)
    assert r0 == r1 == ("ok", [0, 1]), (r0, r1)
