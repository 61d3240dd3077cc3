"""benchmarks/sglang_e2e.py's timing of one batch size, with a stand-in engine and clock."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest


def _module() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sglang_e2e.py"
    spec = importlib.util.spec_from_file_location("sglang_e2e_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_slow_prefill_call_does_not_move_its_reps_decode_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefill 30 ms, once 120 ms; 2.5 ms per decode step: every rep reads 2.5 ms."""
    mod = _module()
    clock = [0.0]
    prefills = iter([0.030, 0.030, 0.120, 0.030, 0.030])  # the 1-token call of each rep

    class Engine:
        def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any]
                     ) -> list[dict[str, Any]]:
            n = sampling_params["max_new_tokens"]
            clock[0] += next(prefills) if n == 1 else 0.030 + 0.0025 * (n - 1)
            return [{"output_ids": [0] * n} for _ in input_ids]

    monkeypatch.setattr(mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    args = argparse.Namespace(new_tokens=257, input_len=8, reps=5)
    res = mod._time_batch(Engine(), args, bs=4)
    steps = [r["step_ms"] for r in res["reps"]]
    assert len(steps) == 5 and res["reps"][2]["t1_s"] == pytest.approx(0.120)
    assert steps == pytest.approx([2.5] * 5) and res["spread_ms"] == pytest.approx(0.0, abs=1e-9)
    assert res["step_ms"] == pytest.approx(2.5) and res["decode_tok_s"] == pytest.approx(1600)


def test_routes_summary_adds_up_every_process(tmp_path: Path) -> None:
    import json

    mod = _module()
    assert mod._routes_summary(tmp_path) is None
    rows = [{"group": "tp:0", "mode": "graph", "dtype": "bfloat16", "nbytes": n, "backend": b,
             "calls": c} for n, b, c in ((4096, "sglang (own)", 64), (8192, "sglang (own)", 2),
                                         (524288, "nvrar", 8))]
    for pid in (11, 12):
        (tmp_path / f"routes-pid{pid}.json").write_text(json.dumps({"pid": pid, "routes": rows}))
    got = mod._routes_summary(tmp_path)
    assert got == {"processes": 2, "by_mode": {"graph": {
        "nvrar": {"sizes": [524288], "calls": 16},
        "sglang (own)": {"sizes": [4096, 8192], "calls": 132}}}}


def test_pooled_compares_two_engines_each_beside_their_engine_to_engine_noise() -> None:
    mod = _module()

    def run(*steps: float) -> dict[str, Any]:
        return {"batches": [{"batch": bs, "step_ms": s}
                            for bs, s in zip((1, 4), steps, strict=True)]}

    runs = {"default": run(2.0, 3.0), "default_again": run(2.2, 3.0),
            "artune": run(2.1, 2.9), "artune_again": run(2.1, 3.1)}
    comparisons: dict[str, Any] = {}
    lines = mod._pooled(runs, comparisons)
    rel = comparisons["pooled"]["pct_artune_vs_default"]
    assert rel[1] == pytest.approx(0.0) and rel[4] == pytest.approx(0.0)
    noise = comparisons["pooled"]["engine_to_engine_pct"]
    assert noise["default"][1] == pytest.approx(100 * (1 - 2.0 / 2.2))
    assert noise["artune"][4] == pytest.approx(100 * (1 - 2.9 / 3.1))
    assert "bs1 +0.0%" in lines[0]
    # without the second artune engine there is nothing to pool
    del runs["artune_again"]
    assert mod._pooled(runs, {}) == []


def test_derived_profiles_of_the_bisection_configs(
        tmp_path: Path) -> None:
    """``artune_inert``: the 2x H100 reference profile re-derived from SGLang's own
    measurements routes every measured size, graph and eager, to SGLang's own all-reduce;
    ``artune_without_sglang``: re-derived without them, no size keeps SGLang's own."""
    import torch

    from artune.profile import load, select

    mod = _module()
    ref = Path(__file__).resolve().parents[1] / "artune" / "profiles" / "4b6998f7355af1ed.json"
    full = load(ref)
    assert len(full.backends_used()) > 1  # the original routes elsewhere too
    inert = load(mod._derived_profile(str(ref), tmp_path, only="sglang"))
    assert inert.backends_used() == ["sglang"]
    sizes = sorted({m["nbytes"] for m in full.data["measurements"]})
    for mode in ("graph", "eager"):
        for n in sizes:
            assert select(inert, n, torch.bfloat16, mode).backend == "sglang", (mode, n)
    assert inert.data["derived_without"] and "sglang" not in inert.data["derived_without"]
    # artune_without_sglang: no size keeps SGLang's own; the decode sizes go to NVRAR in graphs
    without = load(mod._derived_profile(str(ref), tmp_path, drop="sglang"))
    assert "sglang" not in without.backends_used()
    assert without.data["derived_without"] == {"sglang": "left out by sglang_e2e.py"}
    for n in (8 << 10, 32 << 10, 128 << 10, 512 << 10):
        assert select(without, n, torch.bfloat16, "graph").backend == "nvrar", n


def test_compile_pair_is_compared_without_a_default_run() -> None:
    """artune_compile against default_compile: timing and logprobs, with no ``default`` run in
    the file (an earlier summary could only compare them beside one)."""
    mod = _module()

    def run(steps: tuple[float, float], top0: float) -> dict[str, Any]:
        rows = [{"ids": [5, 6], "top": [[[top0, 5], [-3.0, 9]], [[-0.2, 6], [-4.0, 2]]]}]
        return {"batches": [{"batch": bs, "step_ms": s, "spread_ms": 0.01, "decode_tok_s": 1.0}
                            for bs, s in zip((1, 4), steps, strict=True)],
                "top_logprobs": rows}

    doc = {"tp": 2, "card": {"gpu": "G", "gpus": 2}, "date": "d", "reps": 5, "new_tokens": 8,
           "configs": {"default_compile": run((2.0, 4.0), -0.10),
                       "artune_compile": run((2.1, 3.9), -0.12)}}
    lines = mod._summarize(doc, 0.05)
    got = doc["comparisons"]["artune_compile"]
    assert got["pct_vs_default_compile"][1] == pytest.approx(5.0)
    assert got["pct_vs_default_compile"][4] == pytest.approx(-2.5)
    assert got["logits_vs_default_compile"]["max_abs_dlogprob"] == pytest.approx(0.02)
    assert got["logits_vs_default_compile"]["ok"] is True
    assert any("bs1 +5.0%  bs4 -2.5%" in ln for ln in lines)
    # a logprob gap beyond the tolerance is reported as such
    doc["configs"]["artune_compile"] = run((2.1, 3.9), -0.30)
    mod._summarize(doc, 0.05)
    assert doc["comparisons"]["artune_compile"]["logits_vs_default_compile"]["ok"] is False
