"""How the validation pass judges the routed call against the fastest candidate
(Driver._entry): eager candidates timed in the same alternating rounds are compared round by
round (host drift cancels), graph ones by their medians."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from artune.autotune.driver import Driver
from artune.autotune.validation import paired_gap
from artune.profile import Choice


def _res(*per_rank: list[float]) -> dict[str, Any]:
    return {"samples": [list(r) for r in per_rank], "calls": 10, "reps": len(per_rank[0])}


def _driver() -> Driver:
    d = Driver.__new__(Driver)
    d.cfg = SimpleNamespace(n_reps=10, incumbent_margin=0.10)  # type: ignore[assignment]
    d.retimed = []
    return d


# host speed drifting from round to round
_DRIFT = [30.0, 33.0, 36.0, 39.0, 30.0, 33.0, 36.0, 39.0, 31.0, 38.0]


def test_paired_gap_is_the_round_by_round_difference_of_the_slowest_ranks() -> None:
    a = _res([10, 12, 11, 13], [11, 11, 14, 12])  # slowest rank per round: 11 12 14 13
    b = _res([10, 10, 10, 10], [9, 11, 12, 10])   # 10 11 12 10
    gap, spread = paired_gap(a, b)  # type: ignore[misc]
    assert gap == pytest.approx(1.5)  # differences 1 1 2 3
    assert spread == pytest.approx(1.25)


@pytest.mark.parametrize("a,b", [
    (_res([1, 2, 3, 4]), _res([1, 2, 3])),                  # a round missing
    (_res([1, 2, 3]), _res([1, 2, 3])),                     # too few rounds
    (_res([1, 2, 3, 4]), _res([1, 2, 3, 4], [1, 2, 3, 4])),  # ranks differ
    ({"skip": "broke"}, _res([1, 2, 3, 4])),
])
def test_paired_gap_needs_the_same_rounds(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert paired_gap(a, b) is None


def test_eager_points_are_judged_on_round_by_round_differences() -> None:
    # two ranks; the host drifts between rounds by up to 10 µs, the routed call is 0.5 µs
    # (about 1.4%) above the direct call of the same backend in the same round, plus jitter
    rng = random.Random(7)
    drift = [rng.uniform(30.0, 40.0) for _ in range(10)]
    direct = _res(*[[d + rng.gauss(0, 0.2) for d in drift] for _ in range(2)])
    routed = _res(*[[d + 0.5 + rng.gauss(0, 0.2) for d in drift] for _ in range(2)])
    e = _driver()._entry("bfloat16", "eager", 4096, Choice("nccl", {}),
                         [("nccl", {})], [routed, direct], 0.03)
    by_round = sorted(max(r[k] for r in routed["samples"]) - max(r[k] for r in direct["samples"])
                      for k in range(10))
    assert e["gap_from"] == "paired rounds"
    assert e["gap_us"] == pytest.approx((by_round[4] + by_round[5]) / 2)
    assert 0.2 < e["gap_us"] < 0.8 and e["within"] is True


def test_a_real_gap_is_still_a_miss_and_graph_points_use_medians() -> None:
    routed = _res([v + 2.0 for v in _DRIFT])  # 2 µs (5-7%) in every round
    direct = _res(list(_DRIFT))
    e = _driver()._entry("bfloat16", "eager", 4096, Choice("nccl", {}),
                         [("nccl", {})], [routed, direct], 0.03)
    assert e["gap_us"] == pytest.approx(2.0) and e["within"] is False
    g = _driver()._entry("bfloat16", "graph", 4096, Choice("nccl", {}),
                         [("nccl", {})], [routed, direct], 0.03)
    assert g["gap_from"] == "medians"
    assert g["gap_us"] == pytest.approx(g["routed_us"] - g["best_us"])


def test_the_fastest_of_several_candidates_is_the_one_paired() -> None:
    routed = _res([v + 0.2 for v in _DRIFT])
    slow = _res([v + 9.0 for v in _DRIFT])
    fast = _res(list(_DRIFT))
    e = _driver()._entry("bfloat16", "eager", 4096, Choice("symm_one_shot", {}),
                         [("nccl", {}), ("symm_one_shot", {})], [routed, slow, fast], 0.03)
    assert e["best_backend"] == "symm_one_shot"
    assert e["gap_us"] == pytest.approx(0.2) and e["within"] is True


def test_a_point_left_to_sglang_within_the_incumbent_margin_is_marked_not_passed() -> None:
    sglang = _res([9.0] * 10)
    nvrar = _res([8.6] * 10)  # 4.4% faster: beyond the 3% tolerance, within the 10% margin
    e = _driver()._entry("bfloat16", "graph", 512 << 10, Choice("sglang", {}),
                         [("nvrar", {}), ("sglang", {})], [sglang, nvrar, sglang], 0.03)
    assert e["within"] is False and e["kept_incumbent"] is True
    far = _res([7.0] * 10)  # 22% faster: a miss, whatever routed there
    e = _driver()._entry("bfloat16", "graph", 512 << 10, Choice("sglang", {}),
                         [("nvrar", {}), ("sglang", {})], [sglang, far, sglang], 0.03)
    assert e["within"] is False and "kept_incumbent" not in e
    # another backend routed there is never "kept"
    e = _driver()._entry("bfloat16", "graph", 512 << 10, Choice("nccl", {}),
                         [("nvrar", {}), ("nccl", {})], [sglang, nvrar, sglang], 0.03)
    assert "kept_incumbent" not in e


def test_eager_controls_time_the_routed_backend_directly_and_again() -> None:
    """The validation's eager controls: the routed backend called directly beside the routed
    call (a candidate already, else an extra timing) and a twin of that call; none in graph
    mode or where the routed backend is not built."""
    from artune.autotune.validation import _control_gaps, _controls

    built = {"nccl": object(), "symm": object()}
    choice = Choice("symm", {"a": 1})
    assert _controls("eager", choice, [("nccl", {}), ("symm", {"a": 1})], built) == (1, 1)
    assert _controls("eager", choice, [("symm", {"a": 2})], built) == (2, None)
    assert _controls("graph", choice, [("symm", {"a": 1})], built) == (0, None)
    assert _controls("eager", Choice("nvrar", {}), [], built) == (0, None)

    rng = random.Random(3)
    drift = [rng.uniform(30.0, 40.0) for _ in range(12)]
    direct = _res(*[[d + rng.gauss(0, 0.05) for d in drift] for _ in range(2)])
    twin = _res(*[[d + rng.gauss(0, 0.05) for d in drift] for _ in range(2)])
    routed = _res(*[[d + 0.4 + rng.gauss(0, 0.05) for d in drift] for _ in range(2)])
    gaps = _control_gaps(routed, direct, twin)
    assert gaps["router_gap_us"][0] == pytest.approx(0.4, abs=0.15)
    assert gaps["control_gap_us"][0] == pytest.approx(0.0, abs=0.15)
    assert _control_gaps({"skip": "raised"}, direct, twin) == {
        "control_gap_us": gaps["control_gap_us"]}


def test_validation_count_gives_the_router_cost_and_the_a_a_reading() -> None:
    from artune.inspect import validation_count

    entries = [{"within": True, "router_gap_us": [0.4, 0.1], "control_gap_us": [-1.0, 0.5]},
               {"within": False, "router_gap_us": [0.6, 0.1], "control_gap_us": [2.0, 0.5]},
               {"within": True}]
    text = validation_count(entries)
    assert text.startswith("routed all-reduce within tolerance of the fastest candidate at 2/3")
    assert "eager: the router's own cost +0.50 µs (median of 2 points)" in text
    assert "two identical calls read 1.50 µs apart (A/A, median of 2)" in text
    entries.append({"within": True, "control_gap_us": [0.2, 0.1]})  # its routed timing failed
    assert "(A/A, median of 3)" in validation_count(entries)
