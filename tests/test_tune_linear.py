"""The tune's fused-linear phase without GPUs: what it measures (shapes from a model's config,
rows), the profile's linear section it builds, and select_linear reading it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from artune.autotune.linear import (
    FUSED,
    LINEAR_REVISION,
    UNFUSED,
    build_linear_table,
    fits,
    layer_shapes,
    linear_space,
    model_dims,
    parse_shapes,
)
from artune.profile import Profile, ProfileError, select_linear, validate

LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "architectures": ["LlamaForCausalLM"]}


def test_layer_shapes_from_a_model_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    dims = model_dims(tmp_path)
    assert dims == model_dims(tmp_path / "config.json")
    assert layer_shapes(dims, 4) == [(1024, 4096), (3584, 4096)]
    assert layer_shapes(dims, 1) == [(4096, 4096), (14336, 4096)]
    with pytest.raises(ValueError, match="attention output width 4096 does not split over 3"):
        layer_shapes(dims, 3)
    gemma = dict(LLAMA_8B, head_dim=256, num_attention_heads=8)  # head_dim given explicitly
    (tmp_path / "g.json").write_text(json.dumps({"text_config": gemma}))
    assert model_dims(tmp_path / "g.json")["attn"] == 2048
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="no num_attention_heads, intermediate_size"):
        model_dims(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        model_dims(tmp_path / "nowhere")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON config"):
        model_dims(tmp_path / "broken.json")
    for odd in ({"num_attention_heads": 0}, {"head_dim": "128"}, {"head_dim": [1]},
                {"head_dim": True}):
        (tmp_path / "odd.json").write_text(json.dumps(dict(LLAMA_8B, **odd)))
        with pytest.raises(ValueError, match="not positive whole numbers"):
            model_dims(tmp_path / "odd.json")


def test_parse_shapes_and_space() -> None:
    assert parse_shapes("1024x4096, 3584X4096,1024x4096") == [(1024, 4096), (3584, 4096)]
    for bad in ("1024", "1024x", "0x4096", "ax4096", "1024x4096x2"):
        with pytest.raises(ValueError, match="expected KxN"):
            parse_shapes(bad)
    space = linear_space(4096, 132)  # an H100's SMs: 16-column tiles would be 256 CTAs
    assert space["block_n"] == [32, 64, 128] and space["stages"] == [2, 3, 4, 5]
    assert space["block_k"] == [64, 128, 256, 512]
    assert "prefetch" not in space  # its best case only here: set by hand, not searched
    # the K loop's shared memory: (rows to 16 at least + block_n) x block_k x 2 B a stage after
    # the first (a stage at 64 rows), within an H100's 227 KiB
    assert fits(64, "bfloat16")(dict(block_n=32, block_k=256, stages=4))  # 192 KiB
    assert not fits(64, "bfloat16")(dict(block_n=32, block_k=256, stages=5))  # 240 KiB
    assert not fits(64, "bfloat16")(dict(block_n=128, block_k=512, stages=2))  # 384 KiB
    assert fits(1, "bfloat16")(dict(block_n=128, block_k=512, stages=2))  # 144 KiB
    assert not fits(1, "bfloat16")(dict(block_n=64, block_k=512, stages=5))  # 320 KiB
    assert linear_space(48, 132)["block_n"] == [16]


def test_defaults_fit_the_k_loop_in_shared_memory() -> None:
    """linear_defaults: the kernel's defaults, one stage shallower where 64 rows need it, then
    fewer stages and a smaller block_k for wide tiles; every result fits."""
    from artune.kernels.nvrar import LINEAR_DEFAULTS, SMEM_BYTES, linear_defaults, linear_smem

    assert linear_defaults(1) == LINEAR_DEFAULTS and linear_defaults(32) == LINEAR_DEFAULTS
    assert linear_defaults(64) == dict(LINEAR_DEFAULTS, stages=4)  # 192 KiB, not 240
    assert linear_defaults(64, block_n=128) == dict(LINEAR_DEFAULTS, block_n=128, stages=2)
    assert linear_defaults(64, block_n=128, smem=100 << 10)["block_k"] == 128
    for rows in (1, 16, 33, 64):
        for bn in (16, 32, 64, 128):
            p = linear_defaults(rows, block_n=bn)
            assert linear_smem(rows, bn, p["block_k"], p["stages"]) <= SMEM_BYTES


def _rec(impl: str, rows: int, us: float, **params: int) -> dict[str, Any]:
    return {"backend": impl, "params": params, "dtype": "bfloat16", "mode": "graph",
            "nbytes": rows * 8192, "k": 1024, "n": 4096, "rows": rows, "latency_us": us}


P32 = {"block_n": 32, "block_k": 256, "warps": 4, "stages": 3}
P64 = {"block_n": 64, "block_k": 128, "warps": 8, "stages": 3}


def test_table_fuses_where_measured_faster_and_between_two_such_rows() -> None:
    recs = [
        _rec(UNFUSED, 1, 10.0), _rec(FUSED, 1, 8.0, **P32), _rec(FUSED, 1, 9.0, **P64),
        _rec(UNFUSED, 4, 10.0), _rec(FUSED, 4, 8.5, **P64), _rec(FUSED, 4, 8.9, **P32),
        _rec(UNFUSED, 16, 11.0), _rec(FUSED, 16, 10.9, **P32),  # within 3 %: unfused
        _rec(UNFUSED, 64, 14.0), _rec(FUSED, 64, 12.0, **P32),  # faster, but 16 is not
        {"backend": "nccl", "params": {}, "dtype": "bfloat16", "mode": "graph",
         "nbytes": 4096, "latency_us": 1.0},  # not this phase's
    ]
    (entry,) = build_linear_table(recs, rel_tol=0.03)
    assert (entry["dtype"], entry["k"], entry["n"]) == ("bfloat16", 1024, 4096)
    assert [(p["rows"], p["fused"], p["params"]) for p in entry["points"]] == [
        (1, True, P32), (4, True, P64), (16, False, P32), (64, True, P32)]
    assert entry["points"][2]["unfused_us"] == 11.0 and entry["points"][2]["fused_us"] == 10.9
    assert entry["ranges"] == [
        {"min_rows": 1, "max_rows": 1, "fused": True, "params": P32},
        {"min_rows": 2, "max_rows": 4, "fused": True, "params": P64},
        {"min_rows": 5, "max_rows": 63, "fused": False, "params": {}},
        {"min_rows": 64, "max_rows": 64, "fused": True, "params": P32},
    ]
    doc = {"schema_version": 1, "fingerprint": {}, "tables": {}, "linear": [entry]}
    prof = Profile(validate(doc))
    assert prof.fuses_linear()
    assert select_linear(prof, "bfloat16", 1024, 4096, 1) == P32
    assert select_linear(prof, "torch.bfloat16", 1024, 4096, 3) == P64
    assert select_linear(prof, "bfloat16", 1024, 4096, 20) is None
    assert select_linear(prof, "bfloat16", 1024, 4096, 64) == P32
    assert select_linear(prof, "bfloat16", 1024, 4096, 65) is None  # beyond what was measured
    assert select_linear(prof, "float16", 1024, 4096, 1) is None
    assert select_linear(prof, "bfloat16", 3584, 4096, 1) is None


def test_a_side_that_failed_is_never_fused() -> None:
    skips = [dict(_rec(FUSED, 4, 0.0, **P32), reason="unsupported: too big"),
             dict(_rec(UNFUSED, 1, 0.0), reason="timing raised X"),
             dict(_rec(FUSED, 8, 0.0, **P32), reason="max abs error 1 > tol 0.1")]
    (entry,) = build_linear_table([_rec(FUSED, 1, 1.0, **P32), _rec(UNFUSED, 4, 9.0)], 0.03,
                                  skips)
    assert [p["fused"] for p in entry["points"]] == [False, False, False]
    assert entry["points"][0]["unfused_why"] == "timing raised X"
    assert entry["points"][1]["fused_why"] == "unsupported: too big"
    assert entry["points"][2]["fused_why"].startswith("max abs error")
    assert entry["points"][2]["unfused_us"] is None and "unfused_why" not in entry["points"][2]
    assert not any(g["fused"] for g in entry["ranges"])
    assert not Profile(validate({"schema_version": 1, "fingerprint": {}, "tables": {},
                                 "linear": [entry]})).fuses_linear()


@pytest.mark.parametrize(("linear", "match"), [
    ({}, "linear must be a list"),
    ([{"dtype": "int8", "k": 1, "n": 1, "ranges": []}], "dtype 'int8'"),
    ([{"dtype": "bfloat16", "k": 0, "n": 1, "ranges": []}], "k and n must be positive"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 2, "max_rows": 1, "fused": False}]}], "ascending"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 1, "max_rows": 4, "fused": False},
        {"min_rows": 3, "max_rows": 8, "fused": False}]}], "ascending, after 4"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 1, "max_rows": 4, "fused": True, "params": {"block_n": 32}}]}],
     "a fused range needs params"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": []}] * 2, "listed twice"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 1, "max_rows": 4, "fused": True, "params": dict(
            block_n=32, block_k=256, warps=4, stages=3, prefetch=2)}]}], "prefetch must be 0 or 1"),
])
def test_bad_linear_sections_are_refused(linear: Any, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        validate({"schema_version": 1, "fingerprint": {}, "tables": {}, "linear": linear})


def test_cli_linear_arguments(tmp_path: Path) -> None:
    from artune.cli import build_parser, tune_config

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))

    def cfg(*argv: str) -> Any:
        return tune_config(build_parser().parse_args(["tune", *argv]), "artune tune")

    c = cfg("--linear-model", str(tmp_path), "--linear-shapes", "512x4096",
            "--linear-rows", "16,1,4")
    assert c.linear_model == {"hidden": 4096, "attn": 4096, "intermediate": 14336}
    assert c.linear_shapes == [(512, 4096)] and c.linear_rows == [1, 4, 16]
    assert cfg().linear_model is None and cfg().linear_shapes == [] and cfg().linear_rows == []
    for argv, match in ((("--linear-shapes", "1x1", "--linear-rows", "0,1"), "1 to 64"),
                        (("--linear-shapes", "1x1", "--linear-rows", "65"), "1 to 64"),
                        (("--linear-shapes", "1x1", "--linear-rows", "a"), "1 to 64"),
                        (("--linear-rows", "1"), "needs --linear-model"),
                        (("--linear-model", str(tmp_path / "no")), "not found")):
        with pytest.raises(ValueError, match=match):
            cfg(*argv)


def test_row_ranges_edges() -> None:
    (e,) = build_linear_table([_rec(UNFUSED, 16, 10.0), _rec(FUSED, 16, 5.0, **P32),
                               _rec(UNFUSED, 64, 10.0), _rec(FUSED, 64, 5.0, **P32)], 0.03)
    # below the smallest measured row count: never fused, though 16 is; between two fused: fused
    assert e["ranges"] == [{"min_rows": 1, "max_rows": 15, "fused": False, "params": {}},
                           {"min_rows": 16, "max_rows": 64, "fused": True, "params": P32}]
    (e,) = build_linear_table([_rec(UNFUSED, 1, 10.0), _rec(FUSED, 1, 5.0, **P32),
                               _rec(UNFUSED, 8, 10.0), _rec(FUSED, 8, 11.0, **P32)], 0.03)
    assert [(g["min_rows"], g["max_rows"], g["fused"]) for g in e["ranges"]] == [
        (1, 1, True), (2, 8, False)]
    skip = dict(_rec(FUSED, 4, 0.0, **P32), reason="unsupported: x")  # a point with skips only
    (e,) = build_linear_table([], 0.03, [skip])
    assert e["points"] == [{"rows": 4, "unfused_us": None, "fused_us": None, "params": None,
                            "fused": False, "fused_why": "unsupported: x"}]


def test_back_to_back_re_times_decide_where_present() -> None:
    """A point whose sides were re-timed back to back is judged on those re-times only."""
    recs = [_rec(UNFUSED, 1, 10.0), _rec(FUSED, 1, 8.0, **P32),  # the search: fused wins
            dict(_rec(UNFUSED, 1, 9.0), source="confirm"),
            dict(_rec(FUSED, 1, 8.9, **P32), source="confirm")]  # re-timed: within 3 %
    (e,) = build_linear_table(recs, 0.03)
    assert e["points"][0]["fused_us"] == 8.9 and e["points"][0]["unfused_us"] == 9.0
    assert not e["points"][0]["fused"]


def test_profile_limits_of_the_linear_section() -> None:
    from artune.kernels import nvrar
    from artune.profile import LINEAR_MAX_ROWS, LINEAR_MAX_STAGES

    assert LINEAR_MAX_ROWS == nvrar.LINEAR_MAX_ROWS
    assert LINEAR_MAX_STAGES == nvrar.LINEAR_STAGES[-1]
    good = {"min_rows": 1, "max_rows": 4, "fused": True, "params": dict(P32)}
    for bad, match in ((dict(good, max_rows=LINEAR_MAX_ROWS + 1), "at most 64"),
                       (dict(good, params=dict(P32, warps=True)), "positive whole numbers"),
                       (dict(good, params=dict(P32, stages=0)), "positive whole numbers"),
                       (dict(good, params=dict(P32, stages=9)), "stages must be 1..8")):
        with pytest.raises(ProfileError, match=match):
            validate({"schema_version": 1, "fingerprint": {}, "tables": {}, "linear": [
                {"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [bad]}]})


def test_serving_builds_nvrar_for_the_linear_section_and_drops_it_without() -> None:
    from artune.integration.group_setup import _needed, without

    doc = {"schema_version": 1, "fingerprint": {}, "tables": {"bfloat16": {"graph": [
        {"min_bytes": 1, "max_bytes": 1 << 20, "backend": "nccl", "params": {}}]}},
        "linear": [{"dtype": "bfloat16", "k": 1024, "n": 4096, "ranges": [
            {"min_rows": 1, "max_rows": 4, "fused": True, "params": dict(P32)}]}]}
    prof = Profile(validate(doc))
    assert _needed(prof) == ["nccl", "nvrar"]
    # the buffers hold the fused kernel's messages too: 4 rows x 4096 outputs x 2 B < 1 MiB
    assert prof.max_bytes() == 1 << 20
    doc["linear"][0]["ranges"][0]["max_rows"] = 64  # 512 KiB; tables to 256 KiB
    doc["tables"]["bfloat16"]["graph"][0]["max_bytes"] = 256 << 10
    assert Profile(validate(doc)).max_bytes() == 64 * 4096 * 2
    doc["linear"][0]["ranges"][0]["fused"] = False  # unfused: the tables' alone
    assert Profile(validate(doc)).max_bytes() == 256 << 10
    gone = without(prof, {"nvrar": "NVSHMEM unavailable"})
    assert not gone.fuses_linear() and _needed(gone) == ["nccl"]
    assert prof.fuses_linear()  # the original is untouched


class _FakeCrew:
    """Rank 0's crew for the phase without GPUs: every ``linear`` command answers with a
    latency from ``us(cmd)`` on two ranks."""

    def __init__(self, us: Any) -> None:
        import types

        self.us, self.sent = us, []
        self.built = {"nvrar": types.SimpleNamespace(comm=types.SimpleNamespace(max_grid=132))}
        self.ctx = types.SimpleNamespace(world_size=4)

    def send(self, cmd: dict[str, Any], decide: Any = None) -> Any:
        self.sent.append(cmd)
        if cmd["op"] != "linear":
            return None
        v = self.us(cmd)
        if v is None:  # the ranks agreed that the call failed
            return {"skip": "graph timing raised RuntimeError: boom"}
        return {"samples": [[v] * cmd["reps"]] * 2, "calls": 8, "reps": cmd["reps"]}


def _phase(tmp_path: Path, us: Any, backend: str = "nccl", resume: bool = False) -> Any:
    import io

    from rich.console import Console

    from artune.autotune.config import TuneConfig
    from artune.autotune.driver import Driver
    from artune.autotune.linear import is_linear
    from artune.autotune.search import Store

    cfg = TuneConfig(linear_shapes=[(1024, 4096)], linear_rows=[1, 64], trials=3, reps=3)
    store = Store(f"sqlite:///{tmp_path}/t.db", resume=resume, meta={})
    resumed = store.load()
    phase = Driver.__new__(Driver)  # its LinearPhase part only
    phase.cfg, phase.crew, phase.spent = cfg, _FakeCrew(us), {}
    phase.con = Console(file=io.StringIO())
    phase.linear_records = [m for m in resumed.measurements if is_linear(m)]
    phase.linear_skips = [s for s in resumed.skipped if is_linear(s)]
    doc = {"schema_version": 1, "fingerprint": {}, "dry_run": False, "tables": {"bfloat16": {
        "graph": [{"min_bytes": 1, "max_bytes": 1 << 20, "backend": backend, "params": {}}]}}}
    phase._linear_phase(store, resumed, doc)
    store.close()
    return phase, doc


def test_phase_stores_resumes_and_re_times_under_a_new_route(tmp_path: Path) -> None:
    def us(cmd: dict[str, Any]) -> float:
        if cmd["impl"] == UNFUSED:
            return 10.0
        return (6.0 if cmd["rows"] == 1 else 12.0) + (cmd["params"]["block_n"] != 32)

    phase, doc = _phase(tmp_path, us)
    linear = [c for c in phase.crew.sent if c["op"] == "linear"]
    # per row count: the unfused call, 3 fused sets (the defaults first, gated), then the
    # back-to-back re-time of both
    assert len(linear) == 2 * (1 + 3 + 2)
    assert linear[1]["params"] == {"block_n": 32, "block_k": 256, "warps": 4, "stages": 5}
    assert linear[1]["gate"] and not linear[0]["gate"] and not linear[-1]["gate"]
    (entry,) = doc["linear"]
    assert [(p["rows"], p["fused"]) for p in entry["points"]] == [(1, True), (64, False)]
    assert entry["points"][0]["fused_us"] == 6.0 and entry["points"][0]["unfused_us"] == 10.0
    assert sum(m.get("source") == "confirm" for m in doc["linear_measurements"]) == 4
    import optuna

    names = set(optuna.get_all_study_names(f"sqlite:///{tmp_path}/t.db"))
    assert "linear-unfused|bfloat16|1024x4096|1|nccl" in names
    assert f"linear-fused|bfloat16|1024x4096|64|r{LINEAR_REVISION}" in names
    assert all(m["revision"] == LINEAR_REVISION for m in doc["linear_measurements"]
               if m["backend"] == FUSED)

    again, doc2 = _phase(tmp_path, us, resume=True)  # only the re-times run again
    assert [c["impl"] for c in again.crew.sent if c["op"] == "linear"] == [
        UNFUSED, FUSED, FUSED, UNFUSED]
    assert doc2["linear"] == doc["linear"]
    fails = {"n": 0}

    def flaky(cmd: dict[str, Any]) -> float | None:  # the last re-time (64 rows) fails
        fails["n"] += 1
        return None if fails["n"] == 4 else us(cmd)

    _, doc3 = _phase(tmp_path, flaky, resume=True)
    # that point keeps neither re-time: its other side's alone would be judged against a search
    assert sorted(m["rows"] for m in doc3["linear_measurements"]
                  if m.get("source") == "confirm") == [1, 1]
    moved, _ = _phase(tmp_path, us, backend="nvrar", resume=True)  # another route: re-timed
    impls = [c["impl"] for c in moved.crew.sent if c["op"] == "linear"]
    assert impls.count(UNFUSED) == 4 and impls.count(FUSED) == 2


def test_a_resumed_tune_measures_fused_trials_of_the_earlier_kernel_again(
        tmp_path: Path) -> None:
    """Fused trials stored by a tune of revision 1 (the K loop at 3 stages whatever the set
    said; a study name without ``|r2``, records without ``revision``) are neither resumed nor
    put in the table: the fused side is searched again, the unfused side's trials are kept."""
    from artune.autotune.search import Store

    def us(cmd: dict[str, Any]) -> float:
        return 10.0 if cmd["impl"] == UNFUSED else 7.0

    store = Store(f"sqlite:///{tmp_path}/t.db", resume=False, meta={})
    for rows in (1, 64):  # revision 1's stored trials: a fused time no new trial gives
        store.add_measurement(f"{FUSED}|bfloat16|1024x4096|{rows}",
                              _rec(FUSED, rows, 1.0, **dict(P32, stages=4)))
        store.add_measurement(f"{UNFUSED}|bfloat16|1024x4096|{rows}|nccl",
                              {**_rec(UNFUSED, rows, 10.0), "route": "nccl"})
        store.add_skip(f"{FUSED}|bfloat16|1024x4096|{rows}",
                       {**_rec(FUSED, rows, 0.0, **P32), "reason": "revision 1's gate"},
                       gate=True)
    store.close()
    phase, doc = _phase(tmp_path, us, resume=True)
    sent = [c["impl"] for c in phase.crew.sent if c["op"] == "linear"]
    # per row count no unfused trial (resumed) and 3 fused sets; then each point's re-times
    assert sent == [FUSED] * 6 + [UNFUSED, FUSED] + [FUSED, UNFUSED]
    assert [p["fused_us"] for p in doc["linear"][0]["points"]] == [7.0, 7.0]
    assert all(m.get("revision") == LINEAR_REVISION for m in doc["linear_measurements"]
               if m["backend"] == FUSED)
    assert not any(m["latency_us"] == 1.0 for m in doc["linear_measurements"])
    # where every fused set fails now, the point says why with this revision's reason, not
    # revision 1's (resumed skips come first)
    failing = tmp_path / "failing"
    failing.mkdir()
    store = Store(f"sqlite:///{failing}/t.db", resume=False, meta={})
    store.add_skip(f"{FUSED}|bfloat16|1024x4096|1", {**_rec(FUSED, 1, 0.0, **P32),
                                                      "reason": "revision 1's gate"}, gate=True)
    store.close()
    _, doc = _phase(failing, lambda cmd: 10.0 if cmd["impl"] == UNFUSED else None, resume=True)
    point = doc["linear"][0]["points"][0]
    assert point["fused_us"] is None and "boom" in point["fused_why"], point


def test_the_tune_sizes_nvrar_for_the_phase_s_largest_message() -> None:
    """linear_bytes: rows x N x the element size of the largest fused message, so a tune with
    small ``--sizes`` still measures the fused kernel at 64 rows (a 2x H100 tune with --sizes
    8K,64K reported '524288 B exceeds the buffers' capacity of 65536 B', 26th session)."""
    from artune.autotune.config import TuneConfig
    from artune.autotune.linear import linear_bytes

    assert linear_bytes(TuneConfig()) == 0
    assert linear_bytes(TuneConfig(linear_shapes=[(1024, 4096)])) == 64 * 4096 * 2
    assert linear_bytes(TuneConfig(linear_shapes=[(1024, 4096)], linear_rows=[1, 16])) \
        == 16 * 4096 * 2
    dims = {"hidden": 5120, "attn": 5120, "intermediate": 13824}
    assert linear_bytes(TuneConfig(linear_shapes=[(1024, 4096)], linear_model=dims)) \
        == 64 * 5120 * 2
    assert linear_bytes(TuneConfig(linear_shapes=[(1024, 4096)], dtypes=["float32"])) == 0
