"""Eager validation timing in alternating rounds (Crew._measure_alternating), one process: a
stand-in for the gloo collectives, real Timers on CPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from artune.autotune.crew import Crew


class _OneRank:
    """The Comm calls Crew makes, for a world of one; counts the agreements."""

    world_size = 1

    def __init__(self) -> None:
        self.agreements = 0

    def gather_floats(self, values: list[float], what: str) -> list[list[float]]:
        self.agreements += 1
        return [list(values)]

    def gather_errors(self, error: str | None, what: str) -> list[str | None]:
        return [error]


def _crew() -> tuple[Crew, _OneRank]:
    comm = _OneRank()
    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0)
    return Crew(SimpleNamespace(), ctx, comm), comm  # type: ignore[arg-type]


def test_rounds_alternate_and_a_failing_candidate_is_dropped_alone(monkeypatch) -> None:
    import artune.autotune.crew as crew_mod

    order: list[str] = []

    def a() -> None:
        order.append("a")

    def b() -> None:
        order.append("b")

    def c() -> None:
        order.append("c")

    class Timer(crew_mod.Timer):  # b's second timed repetition raises
        samples: dict[Any, int] = {}

        def sample(self, reps: int) -> list[float]:
            n = Timer.samples[self.fn] = Timer.samples.get(self.fn, 0) + 1
            if self.fn is b and n == 2:
                raise RuntimeError("b broke")
            return super().sample(reps)

    monkeypatch.setattr(crew_mod, "Timer", Timer)
    crew, comm = _crew()
    cmd: dict[str, Any] = {"nbytes": 4096, "reps": 5, "warmup": 1}
    res = crew._measure_alternating([a, b, c], cmd)
    assert res[1] == {"skip": "eager timing raised RuntimeError: b broke"}
    calls = res[0]["calls"]
    for i in (0, 2):
        # 5 repetitions asked, 6 run: a multiple of the 3 candidates
        assert res[i]["reps"] == 6 and len(res[i]["samples"]) == 1  # one rank
        assert len(res[i]["samples"][0]) == 6 and all(v > 0 for v in res[i]["samples"][0])
    # The timed part: one batch of each live candidate per round, in turn, each round starting
    # one candidate later; b's one batch in round 1, then (it fails first in round 2) gone.
    timed = "".join(order)[-(13 * calls):]
    batches = [timed[k] for k in range(0, len(timed), calls)]
    assert all(timed[k * calls:(k + 1) * calls] == batches[k] * calls for k in range(13))
    assert "".join(batches) == "abc" + "ca" + "ac" + "ca" + "ac" + "ca"
    # estimates, warm-ups, then every repetition: 3 in rounds 1-2 (b fails in 2), 2 after
    assert comm.agreements == 3 + 3 + 3 + 3 + 2 * 4


def test_every_candidate_takes_every_position_equally_often(monkeypatch) -> None:
    """9 repetitions of 2 candidates run as 10 rounds, each candidate first in 5: an effect of
    the position in a round must not become a bias between their medians."""
    import artune.autotune.crew as crew_mod

    order: list[str] = []

    class Timer(crew_mod.Timer):  # one call per batch: the order of batches is the order
        def sample(self, reps: int) -> list[float]:
            order.append(self.fn.__name__)
            return [1.0] * reps

    def a() -> None: ...

    def b() -> None: ...

    monkeypatch.setattr(crew_mod, "Timer", Timer)
    crew, _ = _crew()
    res = crew._measure_alternating([a, b], {"nbytes": 4096, "reps": 9, "warmup": 1})
    assert [r["reps"] for r in res] == [10, 10]
    rounds = [order[k:k + 2] for k in range(0, len(order), 2)]
    assert len(rounds) == 10 and all(sorted(r) == ["a", "b"] for r in rounds)
    assert sum(r[0] == "a" for r in rounds) == sum(r[0] == "b" for r in rounds) == 5
