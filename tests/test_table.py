"""Building the dispatch table: winners, noise hysteresis, merging."""

from __future__ import annotations

from _profiles import FP, rec

from artune.autotune.table import build_profile, build_tables, pick_winners
from artune.profile import validate


def _backends(table: list[dict]) -> list[tuple[int, int, str]]:
    return [(r["min_bytes"], r["max_bytes"], r["backend"]) for r in table]


def test_clear_winner_per_size_and_merge() -> None:
    ms = [rec("nccl", s, 15.0) for s in (1024, 2048, 4096, 8192)]
    ms += [rec("symm_one_shot", s, 7.0) for s in (1024, 2048, 4096)]
    ms += [rec("symm_one_shot", 8192, 30.0)]
    t = build_tables(ms)["bfloat16"]["graph"]
    assert _backends(t) == [(1, 5792, "symm_one_shot"), (5793, 8192, "nccl")]
    assert [p["nbytes"] for p in t[0]["points"]] == [1024, 2048, 4096]
    assert abs(t[0]["points"][0]["speedup"] - 15.0 / 7.0) < 1e-9


def test_noise_does_not_flip_flop() -> None:
    # a and b alternate by 1% at every size: within noise, so one backend must hold the whole range.
    sizes = [1 << k for k in range(10, 18)]
    ms = []
    for i, s in enumerate(sizes):
        ms.append(rec("symm_one_shot", s, 10.0 if i % 2 else 10.1))
        ms.append(rec("symm_two_shot", s, 10.1 if i % 2 else 10.0))
        ms.append(rec("nccl", s, 20.0))
    t = build_tables(ms)["bfloat16"]["graph"]
    assert len(t) == 1, _backends(t)


def test_tie_prefers_neighbour_winner_then_nccl() -> None:
    per_size = {
        1024: {"nccl": rec("nccl", 1024, 10.0), "x": rec("symm_one_shot", 1024, 5.0)},
        2048: {"nccl": rec("nccl", 2048, 10.0), "x": rec("symm_one_shot", 2048, 10.1)},
        4096: {"nccl": rec("nccl", 4096, 10.0), "x": rec("symm_one_shot", 4096, 30.0)},
    }
    w = pick_winners(per_size)
    # at 2048 both are tied: the backend chosen for the smaller neighbour is kept
    assert w[1024]["backend"] == "symm_one_shot" and w[4096]["backend"] == "nccl"
    assert w[2048]["backend"] == "symm_one_shot"
    # no smaller neighbour: the winner of the next size is kept
    first = {k: v for k, v in per_size.items() if k > 1024}
    assert pick_winners(first)[2048]["backend"] == "nccl"
    # isolated tie, no neighbour won by either tied backend -> NCCL
    lone = {4096: {"nccl": rec("nccl", 4096, 10.0), "x": rec("symm_two_shot", 4096, 9.9)}}
    assert pick_winners(lone)[4096]["backend"] == "nccl"


def test_large_spread_counts_as_tie() -> None:
    lone = {4096: {"nccl": rec("nccl", 4096, 10.0, spread=2.0),
                   "x": rec("symm_two_shot", 4096, 8.5, spread=0.1)}}
    assert pick_winners(lone)[4096]["backend"] == "nccl"
    clear = {4096: {"nccl": rec("nccl", 4096, 10.0, spread=0.1),
                    "x": rec("symm_two_shot", 4096, 8.5, spread=0.1)}}
    assert pick_winners(clear)[4096]["backend"] == "symm_two_shot"


def test_best_params_kept_and_params_split_ranges() -> None:
    ms = [rec("nccl", s, 20.0) for s in (1024, 2048, 4096)]
    ms += [rec("nvrar", 1024, 5.0, params={"ctas": 1}), rec("nvrar", 1024, 9.0, params={"ctas": 4})]
    ms += [rec("nvrar", 2048, 6.0, params={"ctas": 1})]
    ms += [rec("nvrar", 4096, 6.0, params={"ctas": 4}), rec("nvrar", 4096, 8.0, params={"ctas": 1})]
    t = build_tables(ms)["bfloat16"]["graph"]
    assert [(r["backend"], r["params"]) for r in t] == [
        ("nvrar", {"ctas": 1}), ("nvrar", {"ctas": 4})]


def test_failed_measurements_ignored_and_profile_valid() -> None:
    ms = [rec("nccl", 4096, 10.0), rec("symm_one_shot", 4096, float("nan"))]
    doc = build_profile(ms, [], fingerprint=FP, command="t", dry_run=False)
    validate(doc)
    assert _backends(doc["tables"]["bfloat16"]["graph"]) == [(1, 4096, "nccl")]
    assert doc["fingerprint_id"] and doc["created"].endswith("Z")


def test_validation_retimes_outrank_the_tune() -> None:
    """A re-time by the validation pass replaces the tune's measurements of that backend at
    that point, even where the tune read it faster; the last re-time counts; other backends
    and points keep the tune's fastest."""
    from artune.autotune.table import VALIDATION, best_per_backend

    ms = [rec("symm_one_shot", 4096, 30.0, mode="eager"), rec("symm_one_shot", 4096, 29.0,
                                                             mode="eager"),
          rec("nvrar", 4096, 25.0, mode="eager"), rec("nvrar", 8192, 26.0, mode="eager")]
    assert best_per_backend(ms)[("bfloat16", "eager")][4096]["nvrar"]["latency_us"] == 25.0
    t = build_tables(ms)["bfloat16"]["eager"]
    assert _backends(t) == [(1, 8192, "nvrar")]
    ms += [dict(rec("nvrar", 4096, 60.0, mode="eager"), source=VALIDATION),
           dict(rec("nvrar", 4096, 50.0, mode="eager"), source=VALIDATION),
           dict(rec("symm_one_shot", 4096, 31.0, mode="eager"), source=VALIDATION)]
    best = best_per_backend(ms)[("bfloat16", "eager")]
    assert best[4096]["nvrar"]["latency_us"] == 50.0  # the last re-time, not the fastest
    assert best[4096]["symm_one_shot"]["latency_us"] == 31.0
    assert best[8192]["nvrar"]["latency_us"] == 26.0
    t = build_tables(ms)["bfloat16"]["eager"]
    assert _backends(t) == [(1, 5792, "symm_one_shot"), (5793, 8192, "nvrar")]


def test_sglang_keeps_sizes_nothing_beats_by_the_incumbent_margin() -> None:
    # nvrar 5% faster than SGLang's own at 512K (kept), 20% faster at 1M (taken), NCCL far
    # behind; SGLang not measured at 2M (the fastest wins there)
    ms = [rec("sglang", 512 << 10, 9.0), rec("nvrar", 512 << 10, 8.55),
          rec("sglang", 1 << 20, 12.0), rec("nvrar", 1 << 20, 9.6),
          rec("nvrar", 2 << 20, 15.0)]
    ms += [rec("nccl", s, 20.0) for s in (512 << 10, 1 << 20, 2 << 20)]
    t = build_tables(ms, incumbent_margin=0.10)["bfloat16"]["graph"]
    assert [r["backend"] for r in t] == ["sglang", "nvrar"]
    assert t[0]["max_bytes"] < 1 << 20 and t[1]["min_bytes"] <= 1 << 20
    # margin 0: the fastest wins everywhere (the rule of the tables without the incumbent)
    t0 = build_tables(ms)["bfloat16"]["graph"]
    assert [r["backend"] for r in t0] == ["nvrar"]


def test_a_noisy_incumbent_that_is_clearly_slower_is_not_kept() -> None:
    # SGLang's eager path at 64 µs with a 35 µs spread against 32 µs: replaced
    per = {"sglang": rec("sglang", 4096, 64.0, spread=35.0),
           "symm_one_shot": rec("symm_one_shot", 4096, 32.0, spread=2.0)}
    assert pick_winners({4096: per}, incumbent_margin=0.10)[4096]["backend"] == "symm_one_shot"
    # 9% faster: kept
    per["symm_one_shot"] = rec("symm_one_shot", 4096, 58.3)
    assert pick_winners({4096: per}, incumbent_margin=0.10)[4096]["backend"] == "sglang"


def test_profile_records_the_incumbent_rule() -> None:
    doc = build_profile([rec("nccl", 4096, 10.0)], [], fingerprint=FP, command="t",
                        dry_run=False, incumbent_margin=0.1)
    assert doc["incumbent"] == {"backend": "sglang", "margin": 0.1}
    validate(doc)


def test_the_incumbent_wins_sizes_by_its_margin_only_never_through_a_tie() -> None:
    # kept at 4K (symm 5% faster); at 8K SGLang is twice as slow but so noisy that the tie rules
    # alone would keep the previous size's choice: it must not
    per = {4096: {"sglang": rec("sglang", 4096, 40.0),
                  "symm_one_shot": rec("symm_one_shot", 4096, 38.0)},
           8192: {"sglang": rec("sglang", 8192, 64.0, spread=35.0),
                  "symm_one_shot": rec("symm_one_shot", 8192, 32.0, spread=2.0)}}
    w = pick_winners(per, incumbent_margin=0.10)
    assert {n: r["backend"] for n, r in w.items()} == {4096: "sglang", 8192: "symm_one_shot"}
    # the same through the next size: SGLang fastest at 16K does not pull 8K over
    per[16384] = {"sglang": rec("sglang", 16384, 10.0),
                  "symm_one_shot": rec("symm_one_shot", 16384, 30.0)}
    del per[4096]
    w = pick_winners(per, incumbent_margin=0.10)
    assert {n: r["backend"] for n, r in w.items()} == {8192: "symm_one_shot", 16384: "sglang"}


def test_validation_rows_name_the_parameters_where_both_sides_are_one_backend() -> None:
    """A miss between two parameter sets of one backend reads as such, not "gloo vs gloo"."""
    import io

    from rich.console import Console

    from artune.autotune.ui import print_validation

    base = {"dtype": "float32", "mode": "graph", "nbytes": 262144, "routed_us": 749.9,
            "best_us": 542.6, "gap_us": 207.3, "within": False}
    rows = [dict(base, routed_backend="gloo", routed_params={"chunk": 2},
                 best_backend="gloo", best_params={"chunk": 8}),
            dict(base, nbytes=4096, routed_backend="nccl", routed_params={},
                 best_backend="gloo", best_params={"chunk": 8})]
    out = io.StringIO()
    print_validation(rows, 0.03, Console(file=out, width=200))
    text = out.getvalue()
    assert "gloo (chunk=2)" in text and "gloo (chunk=8)" in text
    assert "nccl " in text and "gloo (chunk=8)" not in text.split("4K")[1]
    assert "fastest direct" in text and "NO" in text
