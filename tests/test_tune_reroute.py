"""The validation pass's re-times re-route the table (Driver._reroute), one process: the
validation itself is stood in for, the table rebuild and the second validation are real."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

from _profiles import FP, rec
from rich.console import Console

from artune.autotune.driver import Driver
from artune.autotune.table import VALIDATION, build_profile, build_tables
from artune.autotune.validation import _route
from artune.profile import Profile


def _driver(ms: list[dict[str, Any]], retimed: list[dict[str, Any]]) -> tuple[Driver, list]:
    d = Driver.__new__(Driver)
    d.measurements, d.retimed = ms, retimed
    d.cfg = SimpleNamespace(rel_tol=0.03, incumbent_margin=0.10)  # type: ignore[assignment]
    d.con = Console(file=io.StringIO(), width=120)
    calls: list[dict[tuple[str, str, int], Any] | None] = []

    def validate(doc: dict[str, Any], only: dict[tuple[str, str, int], Any] | None = None
                 ) -> list:
        calls.append(only)
        return [_entry(doc, *key, within=True) for key in sorted(only or ())]

    d._validate = validate  # type: ignore[method-assign]
    return d, calls


def _entry(doc: dict[str, Any], dtype: str, mode: str, n: int, within: bool) -> dict[str, Any]:
    backend, _ = _route(Profile(doc), dtype, mode, n)
    return {"dtype": dtype, "mode": mode, "nbytes": n, "routed_backend": backend,
            "routed_params": {}, "routed_us": 1.0, "within": within}


def test_a_point_the_retimes_move_is_validated_again_with_the_new_routing() -> None:
    sizes = (4096, 8192, 16384)
    ms = [rec("symm_one_shot", n, 30.0, mode="eager") for n in sizes]
    ms += [rec("nvrar", 8192, 25.0, mode="eager")]  # the tune read nvrar fastest at 8K only
    ms += [rec("nccl", n, 60.0, mode="eager") for n in sizes]
    doc = build_profile(ms, [], fingerprint=FP, command="artune tune", dry_run=False)
    assert _route(Profile(doc), "bfloat16", "eager", 8192)[0] == "nvrar"
    doc["validation"] = [_entry(doc, "bfloat16", "eager", n, within=n != 8192) for n in sizes]
    # side by side, nvrar is the slower one at 8K
    retimed = [dict(rec("nvrar", 8192, 63.0, mode="eager"), source=VALIDATION),
               dict(rec("symm_one_shot", 8192, 31.0, mode="eager"), source=VALIDATION),
               dict(rec("symm_one_shot", 4096, 29.0, mode="eager"), source=VALIDATION)]
    d, calls = _driver(list(ms), retimed)
    d._reroute(doc)

    # validated again, the route it had (nvrar) timed beside the new one
    assert calls == [{("bfloat16", "eager", 8192): ("nvrar", {})}]
    assert [r["backend"] for r in doc["tables"]["bfloat16"]["eager"]] == ["symm_one_shot"]
    # the profile's tables are what its own measurements give (the plugin re-derives them)
    assert doc["measurements"] == ms + retimed
    assert build_tables(doc["measurements"]) == doc["tables"]
    val = {e["nbytes"]: e for e in doc["validation"]}
    assert val[8192]["routed_backend"] == "symm_one_shot" and val[8192]["within"]
    assert val[8192]["rerouted_from"] == {"backend": "nvrar", "params": {}, "routed_us": 1.0,
                                          "within": False}
    assert "rerouted_from" not in val[4096] and "rerouted_from" not in val[16384]
    assert "move 1 point(s)" in d.con.file.getvalue()  # type: ignore[attr-defined]


def test_a_stale_tune_number_cannot_take_a_point_from_fresh_retimes() -> None:
    """nvrar was 30% behind in the tune, so the validation did not re-time it; the re-time of
    the winner came out slow (host drift): the point stays with the re-timed backend."""
    ms = [rec("symm_one_shot", 4096, 20.0, mode="eager"), rec("nvrar", 4096, 26.0, mode="eager")]
    doc = build_profile(ms, [], fingerprint=FP, command="artune tune", dry_run=False)
    doc["validation"] = [_entry(doc, "bfloat16", "eager", 4096, within=True)]
    retimed = [dict(rec("symm_one_shot", 4096, 40.0, mode="eager"), source=VALIDATION)]
    d, calls = _driver(list(ms), retimed)
    d._reroute(doc)
    assert calls == []
    assert [r["backend"] for r in doc["tables"]["bfloat16"]["eager"]] == ["symm_one_shot"]


def test_retimes_that_move_nothing_validate_nothing_again() -> None:
    ms = [rec("symm_one_shot", n, 10.0) for n in (4096, 8192)] + [rec("nccl", 4096, 20.0)]
    doc = build_profile(ms, [], fingerprint=FP, command="artune tune", dry_run=False)
    doc["validation"] = [_entry(doc, "bfloat16", "graph", n, within=True) for n in (4096, 8192)]
    before = [dict(e) for e in doc["validation"]]
    retimed = [dict(rec("symm_one_shot", 4096, 10.5), source=VALIDATION)]
    d, calls = _driver(list(ms), retimed)
    d._reroute(doc)
    assert calls == [] and doc["validation"] == before
    assert build_tables(doc["measurements"]) == doc["tables"]
    assert doc["tables"]["bfloat16"]["graph"][0]["points"][0]["latency_us"] == 10.5


def _validating_driver(built: tuple[str, ...], routed: str, reps: int,
                       reply: Any) -> tuple[Driver, list[dict[str, Any]]]:
    """A Driver whose validation commands go to a stand-in crew: ``built`` backends, the
    router choosing ``routed`` everywhere, each 'validate' command answered by
    ``reply(cmd)``; returns the driver and the commands sent."""
    sent: list[dict[str, Any]] = []

    class _Crew:
        router: Any = None

        def __init__(self) -> None:
            self.built = {b: object() for b in built}

        def send(self, cmd: dict[str, Any]) -> Any:
            if cmd["op"] == "router":
                self.router = SimpleNamespace(choose=lambda x, mode: SimpleNamespace(
                    backend=routed, params={}))
                return None
            sent.append(cmd)
            return reply(cmd)

        def input(self, dtype: str, nbytes: int) -> None:
            return None

    d = Driver.__new__(Driver)
    d.cfg = SimpleNamespace(rel_tol=0.03, n_reps=reps, n_warmup=1,  # type: ignore[assignment]
                            incumbent_margin=0.1)
    d.crew, d.retimed = _Crew(), []  # type: ignore[assignment]
    d.con = Console(file=io.StringIO(), width=120)
    return d, sent


def test_validation_retimes_a_far_behind_backend_that_its_neighbours_route_to() -> None:
    """One slow eager measurement (a host hiccup: symm_one_shot 87 µs at 24K between 34 µs
    neighbours on 4x H100) must not keep that backend out of the validation's re-times."""
    from artune.autotune.table import best_per_backend
    from artune.autotune.validation import _neighbour_routes

    sizes = (16384, 24576, 32768)
    ms = [rec("symm_one_shot", n, 87.0 if n == 24576 else 34.0, mode="eager") for n in sizes]
    ms += [rec("symm_two_shot", n, 45.0, mode="eager") for n in sizes]
    ms += [rec("nccl", n, 60.0, mode="eager") for n in sizes]
    doc = build_profile(ms, [], fingerprint=FP, command="t", dry_run=False)
    near = _neighbour_routes(doc, best_per_backend(doc["measurements"]))
    # each size's own route and its neighbours'
    assert near[("bfloat16", "eager", 24576)] == {"symm_one_shot", "symm_two_shot"}
    assert near[("bfloat16", "eager", 32768)] == {"symm_one_shot", "symm_two_shot"}
    assert near[("bfloat16", "eager", 16384)] == {"symm_one_shot", "symm_two_shot"}

    d, sent = _validating_driver(
        ("symm_one_shot", "symm_two_shot", "nccl"), "symm_two_shot", 4,
        lambda cmd: [{"samples": [[40.0] * 4], "calls": 10, "reps": 4} for _ in cmd["entries"]])
    d._validate(doc)
    at = {c["nbytes"]: [e["backend"] for e in c["entries"]] for c in sent}
    # the routed call first, then the close candidate and the neighbours' backend; NCCL, far
    # behind and routed nowhere near, keeps its tune measurement
    assert at[24576] == [None, "symm_one_shot", "symm_two_shot"]


def test_a_route_the_validation_confirmed_keeps_its_size_through_a_tie() -> None:
    """At a crossover (4x H100, eager 1.5M: two-shot clearly ahead in the tune, level with
    one-shot in the side-by-side re-time), the tie rule alone would hand the size to the
    smaller neighbour's backend; the re-time of the route the validation found within
    tolerance keeps it, so nothing is moved and validated again."""
    from artune.autotune.table import CONFIRMED

    sizes = (1 << 20, 3 << 19, 1 << 21)
    ms = [rec("symm_one_shot", 1 << 20, 25.0, mode="eager"),
          rec("symm_two_shot", 1 << 20, 27.0, mode="eager"),
          rec("symm_one_shot", 3 << 19, 30.0, mode="eager"),
          rec("symm_two_shot", 3 << 19, 27.0, mode="eager"),
          rec("symm_one_shot", 1 << 21, 34.0, mode="eager"),
          rec("symm_two_shot", 1 << 21, 30.0, mode="eager")]
    doc = build_profile(ms, [], fingerprint=FP, command="artune tune", dry_run=False)
    assert _route(Profile(doc), "bfloat16", "eager", 3 << 19)[0] == "symm_two_shot"
    doc["validation"] = [_entry(doc, "bfloat16", "eager", n, within=True) for n in sizes]
    tie = [dict(rec("symm_one_shot", 3 << 19, 27.0, mode="eager"), source=VALIDATION),
           dict(rec("symm_two_shot", 3 << 19, 27.2, mode="eager"), source=VALIDATION)]
    # without the confirmation the tie goes to the smaller size's backend: moved, re-validated
    d, calls = _driver(list(ms), [dict(m) for m in tie])
    moved = dict(doc, validation=[dict(e) for e in doc["validation"]])
    d._reroute(moved)
    assert calls == [{("bfloat16", "eager", 3 << 19): ("symm_two_shot", {})}]
    # confirmed (as Driver._entry marks the routed backend's re-time when within): kept
    tie[1][CONFIRMED] = True
    d, calls = _driver(list(ms), tie)
    d._reroute(doc)
    assert calls == []
    assert _route(Profile(doc), "bfloat16", "eager", 3 << 19)[0] == "symm_two_shot"
    assert build_tables(doc["measurements"]) == doc["tables"]


def test_validation_entry_marks_the_routed_backends_retime_confirmed_only_when_within() -> None:
    from artune.autotune.table import CONFIRMED

    d = Driver.__new__(Driver)
    d.cfg = SimpleNamespace(n_reps=4, incumbent_margin=0.1)  # type: ignore[assignment]
    d.retimed = []
    choice = SimpleNamespace(backend="symm_two_shot", params={})
    cands = [("symm_one_shot", {}), ("symm_two_shot", {})]

    def res(us: float) -> dict[str, Any]:
        return {"samples": [[us] * 4, [us] * 4], "calls": 10, "reps": 4}

    e = d._entry("bfloat16", "graph", 4096, choice, cands, [res(10.1), res(10.0), res(10.05)],
                 0.03)
    assert e["within"]
    assert {m["backend"]: m.get(CONFIRMED) for m in d.retimed} == {
        "symm_one_shot": None, "symm_two_shot": True}
    e = d._entry("bfloat16", "graph", 8192, choice, cands, [res(13.0), res(10.0), res(13.0)],
                 0.03)
    assert not e["within"]
    assert [m.get(CONFIRMED) for m in d.retimed[2:]] == [None, None]


def test_a_confirmed_route_is_not_handed_to_the_incumbent_by_a_level_retime() -> None:
    """4x H100, eager 8M: two-shot beat SGLang's own by 20% in the tune and was confirmed by
    the validation, whose re-time read SGLang's own level with it; the incumbent rule alone
    would move the size to SGLang's own, which the second validation then read 40% slower."""
    from artune.autotune.table import CONFIRMED

    ms = [rec("symm_two_shot", 8 << 20, 62.0, mode="eager"),
          rec("sglang", 8 << 20, 77.0, mode="eager"),
          rec("nccl", 8 << 20, 81.0, mode="eager")]
    doc = build_profile(ms, [], fingerprint=FP, command="artune tune", dry_run=False,
                        incumbent_margin=0.10)
    assert _route(Profile(doc), "bfloat16", "eager", 8 << 20)[0] == "symm_two_shot"
    doc["validation"] = [_entry(doc, "bfloat16", "eager", 8 << 20, within=True)]
    level = [dict(rec("sglang", 8 << 20, 60.0, mode="eager"), source=VALIDATION),
             dict(rec("symm_two_shot", 8 << 20, 61.0, mode="eager"), source=VALIDATION)]
    d, calls = _driver(list(ms), [dict(m) for m in level])
    d._reroute(dict(doc, validation=[dict(e) for e in doc["validation"]]))
    assert calls == [{("bfloat16", "eager", 8 << 20): ("symm_two_shot", {})}]
    level[1][CONFIRMED] = True
    d, calls = _driver(list(ms), level)
    d._reroute(doc)
    assert calls == [] and _route(Profile(doc), "bfloat16", "eager", 8 << 20)[0] == "symm_two_shot"
    assert build_tables(doc["measurements"], incumbent_margin=0.10) == doc["tables"]


def _reading(per_round: list[float], ranks: int = 2) -> dict[str, Any]:
    return {"samples": [list(per_round) for _ in range(ranks)], "calls": 10,
            "reps": len(per_round)}


def _validate_with_readings(eager: list[list[dict[str, Any]]]
                            ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, int]], Driver]:
    """Driver._validate over one 4K point per mode, symm_one_shot routed and the only
    candidate; ``eager`` holds the eager readings in the order they are asked for (routed
    call, then the candidate), graph points always read routed +3 µs over 20."""
    ms = [rec("symm_one_shot", 4096, 20.0, mode=m) for m in ("eager", "graph")]
    doc = build_profile(ms, [], fingerprint=FP, command="t", dry_run=False)
    def reply(cmd: dict[str, Any]) -> Any:
        if cmd["mode"] == "graph":
            return [_reading([23.0] * 8), _reading([20.0] * 8)]
        return eager.pop(0)

    d, sent = _validating_driver(("symm_one_shot",), "symm_one_shot", 8, reply)
    entries = {e["mode"]: e for e in d._validate(doc)}
    return entries, [(c["mode"], c["nbytes"]) for c in sent], d


def test_an_eager_miss_is_timed_again_and_judged_on_both_readings_pooled() -> None:
    """A first eager reading out of tolerance is timed again and judged on both readings'
    rounds pooled, with the noise measured within each reading: the shift between two steady
    readings is not noise. Graph points are read once."""
    from artune.autotune.table import CONFIRMED

    # routed +3 µs over 20 in every round of the first reading, level in the second: the
    # pooled median gap is +1.5 µs, 7.5 % over, and neither reading has any spread: a miss
    entries, sent, d = _validate_with_readings([
        [_reading([23.0] * 8), _reading([20.0] * 8)],
        [_reading([20.0] * 8), _reading([20.0] * 8)],
    ])
    assert sorted(sent) == [("eager", 4096), ("eager", 4096), ("graph", 4096)]
    e = entries["eager"]
    assert e["readings"] == 2 and "readings" not in entries["graph"]
    assert e["gap_us"] == 1.5 and e["gap_spread_us"] == 0.0 and not e["within"]
    assert e["gap_from"] == "paired rounds of two readings"
    assert not entries["graph"]["within"]
    # one re-time per candidate and point, the eager one over both readings' 16 rounds, its
    # spread that of a reading (0), not of the pooled rounds (3 µs); not confirmed
    eager_retimes = [m for m in d.retimed if m["mode"] == "eager"]
    assert len(eager_retimes) == 1 and eager_retimes[0]["reps"] == 16
    assert eager_retimes[0]["spread_us"] == 0.0 and not eager_retimes[0].get(CONFIRMED)


def test_a_noisy_first_reading_can_be_outweighed_by_a_second() -> None:
    """First reading: routed +1.5/+2.5 µs in alternate rounds (median +2, interquartile range
    1: a miss); second: -1/+1 (median 0, range 2). Pooled: median +1.25 against the larger
    within-reading range, 2: within, and the routed backend's pooled re-time is confirmed."""
    from artune.autotune.table import CONFIRMED

    entries, _, d = _validate_with_readings([
        [_reading([21.5, 22.5] * 4), _reading([20.0] * 8)],
        [_reading([19.0, 21.0] * 4), _reading([20.0] * 8)],
    ])
    e = entries["eager"]
    assert e["readings"] == 2 and e["gap_us"] == 1.25 and e["gap_spread_us"] == 2.0
    assert e["within"]
    assert [m.get(CONFIRMED) for m in d.retimed if m["mode"] == "eager"] == [True]
