"""benchmarks/sglang_e2e.py (and its paired mode, benchmarks/e2e_paired.py) with stand-in
engines and clocks."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import load_benchmark


def _module() -> Any:
    return load_benchmark("sglang_e2e")


def _paired() -> Any:
    """benchmarks/e2e_paired.py, as sglang_e2e.py imports it."""
    import sys

    _module()
    return sys.modules["e2e_paired"]


def _clock_both(monkeypatch: pytest.MonkeyPatch, mod: Any, clock: list[float]) -> None:
    """A stand-in clock in sglang_e2e.py and in its paired part."""
    fake = SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0],
                           monotonic_ns=lambda: int(clock[0] * 1e9), sleep=lambda s: None)
    monkeypatch.setattr(mod, "time", fake)
    monkeypatch.setattr(_paired(), "time", fake)


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

    monkeypatch.setattr(mod, "time", SimpleNamespace(perf_counter=lambda: clock[0],
                                                     monotonic_ns=lambda: int(clock[0] * 1e9)))
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


def test_prefetch_configs_run_a_copy_of_the_profile_with_prefetch_on(tmp_path: Path) -> None:
    """``artune_prefetch``: the 4x H100 reference profile's fused ranges, every other field
    unchanged, with ``prefetch`` 1; the plugin's ``select_linear`` hands it to the kernel. A
    profile without a fused range is refused."""
    from artune.profile import load, select_linear

    mod = _module()
    ref = Path(__file__).resolve().parents[1] / "artune" / "profiles" / "6eeb601b655cf21c.json"
    args = argparse.Namespace(profile=str(ref))
    env = mod._worker_env(args, "artune_compile_prefetch", str(tmp_path))
    variant, full = load(env["ARTUNE_PROFILE"]), load(ref)
    assert env["ARTUNE_PROFILE"] != str(ref)
    for k, n in ((1024, 4096), (3584, 4096)):
        for rows in (1, 4, 32, 64):
            want = select_linear(full, "bfloat16", k, n, rows)
            got = select_linear(variant, "bfloat16", k, n, rows)
            assert got == (None if want is None else dict(want, prefetch=1)), (k, rows)
    assert variant.data["tables"] == full.data["tables"]
    assert "ARTUNE_PROFILE" not in mod._worker_env(args, "default", str(tmp_path))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({k: v for k, v in full.data.items() if k != "linear"}))
    with pytest.raises(SystemExit, match="no fused linear range"):
        mod._linear_variant_profile(str(plain), tmp_path, {"prefetch": 1})


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


def test_a_pair_without_default_compares_its_logprobs_with_its_base() -> None:
    """A side-by-side pair neither of whose configs is compared with ``default`` (artune_nccl
    vs nccl, artune_deep vs artune) gets its test's logprobs judged against its base's."""
    mod = _module()

    def run(top0: float) -> dict[str, Any]:
        return {"batches": [{"batch": 1, "step_ms": 2.0, "spread_ms": 0.01,
                             "decode_tok_s": 1.0}],
                "top_logprobs": [{"ids": [5, 6], "top": [[[top0, 5], [-3.0, 9]],
                                                         [[-0.2, 6], [-4.0, 2]]]}]}

    doc = {"tp": 2, "card": {"gpu": "G", "gpus": 2}, "date": "d", "reps": 5, "new_tokens": 8,
           "configs": {"artune": run(-0.10), "artune_deep": run(-0.10)},
           "paired": {"engines": ["artune", "artune_deep"], "band_pct": 1.0,
                      "pairs": [{"first": "artune", "base": "artune", "test": "artune_deep",
                                 "by_batch": {}}]}}
    lines = mod._summarize(doc, 0.05)
    got = doc["comparisons"]["artune_deep"]["logits_vs_artune"]
    assert got["max_abs_dlogprob"] == 0.0 and got["ok"] is True
    assert any(ln.startswith("logprobs artune_deep vs artune") and ln.endswith("OK")
               for ln in lines)
    doc["configs"]["artune_deep"] = run(-0.30)
    lines = mod._summarize(doc, 0.05)
    assert doc["comparisons"]["artune_deep"]["logits_vs_artune"]["ok"] is False
    assert any("artune_deep vs artune" in ln and "MISMATCH" in ln for ln in lines)
    # a pair with default is judged against default only, once
    doc["configs"]["default"] = doc["configs"].pop("artune")
    doc["paired"]["pairs"][0]["base"] = "default"
    mod._summarize(doc, 0.05)
    assert "logits_vs_default" not in doc["comparisons"]["artune_deep"]


# ---------------------------------------------------------------------------------------------
# Paired mode: two engines side by side, reps alternating


def test_median_interval_from_order_statistics() -> None:
    pm = _paired()
    xs = [float(x) for x in (7, 1, 9, 3, 5, 2, 8, 4, 10, 6)]
    low, high, cover = pm.median_ci(xs)
    # n = 10: k = 2 covers 1 - 2 * 11 / 1024; k = 3 (1 - 2 * 56 / 1024 = 0.89) is below 95 %
    assert (low, high) == (2.0, 9.0) and cover == pytest.approx(1 - 22 / 1024)
    # n = 5: no interval reaches 95 %: the full range, with what it covers
    assert pm.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
    with pytest.raises(ValueError):
        pm.median_ci([])


@pytest.mark.parametrize(("low", "high", "says"), [
    (-0.5, 0.8, "within ±1%"), (1.2, 3.0, "slower by more than 1%"),
    (-4.0, -1.5, "faster by more than 1%"), (-3.0, 0.9, "no slower than +1%"),
    (-0.2, 2.5, "no faster than -1%"), (-2.0, 2.0, "not resolved"),
])
def test_verdict_against_the_band(low: float, high: float, says: str) -> None:
    assert _paired().verdict(low, high, 1.0).startswith(says)


def _no_check(monkeypatch: pytest.MonkeyPatch, mod: Any) -> None:
    """The worker's logprob check stubbed out (no engine weights to set or read)."""
    monkeypatch.setattr(mod, "_set_norms", lambda engine: None)
    monkeypatch.setattr(mod, "_top_logprobs", lambda engine, args: [{"ids": [1], "top": []}])


def _stand_ins(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[float]]:
    """sglang_e2e.py on a stand-in clock (in its paired part too) with the logprob check
    stubbed out: the module and the clock, in seconds, that the stand-in engines move."""
    mod = _module()
    clock = [0.0]
    _clock_both(monkeypatch, mod, clock)
    _no_check(monkeypatch, mod)
    return mod, clock


class _StepEngine:
    """A stand-in engine on a stand-in clock: prefill 30 ms, then ``step`` ms per decode step
    plus a drift shared by every engine (the machine getting slower as the run goes on)."""

    def __init__(self, clock: list[float], step_ms: float, fail_at: int | None = None) -> None:
        self.clock, self.step_ms, self.calls, self.fail_at = clock, step_ms, 0, fail_at

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any],
                 **_: Any) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("engine fault")
        n = sampling_params["max_new_tokens"]
        drift = 1 + 0.01 * self.clock[0]  # 1 % slower per simulated second, for everyone
        self.clock[0] += 0.030 + (n - 1) * self.step_ms * drift / 1e3
        return [{"output_ids": [0] * n} for _ in input_ids]


def test_serve_answers_each_command_and_goes_on_after_a_failing_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module()
    clock = [0.0]
    monkeypatch.setattr(mod, "time", SimpleNamespace(perf_counter=lambda: clock[0],
                                                     monotonic_ns=lambda: int(clock[0] * 1e9)))
    _no_check(monkeypatch, mod)
    args = argparse.Namespace(new_tokens=101, input_len=4)
    engine = _StepEngine(clock, 2.0, fail_at=4)
    answers: list[dict[str, Any]] = []
    mod._serve(engine, args, iter(["warm 4\n", "rep 4\n", "rep 4\n", "bogus\n", "check\n",
                                   "quit\n", "rep 4\n"]), answers.append)
    assert answers[0] == {"warm": 4}
    assert answers[1]["t1_s"] == pytest.approx(0.030)
    assert answers[1]["tn_s"] > 0.030 + 100 * 2.0e-3  # decode steps, with the drift
    assert answers[2]["error"].startswith("RuntimeError: engine fault")  # 4th generate fails
    assert "unknown command 'bogus'" in answers[3]["error"]
    assert answers[4]["top_logprobs"] == [{"ids": [1], "top": []}]
    assert len(answers) == 5  # nothing after quit


class _FakeServed:
    """``Served``'s interface over an in-process ``_serve`` loop (no subprocess)."""

    log: list[tuple[str, str]] = []

    def __init__(self, config: str, mod: Any, args: argparse.Namespace, engine: Any,
                 start_error: str | None = None, silent_on: str | None = None) -> None:
        self.config, self.mod, self.args, self.engine = config, mod, args, engine
        self.start_error, self.silent_on, self.closed = start_error, silent_on, False
        self.notes = ["[artune INFO] routing with p.json"] if "artune" in config else []

    def ask(self, command: str | None, timeout: float) -> dict[str, Any]:
        if command is None:
            if self.start_error:
                raise RuntimeError(f"{self.config}: {self.start_error}")
            return {"ready": True, "startup_s": 1.0, "engine_kwargs": {"tp_size": 2}}
        if command == self.silent_on:  # as Served.ask says of a worker that does not answer
            raise TimeoutError(f"{self.config}: no answer to {command!r} within {timeout:.0f} s")
        _FakeServed.log.append((self.config, command))
        got: list[dict[str, Any]] = []
        self.mod._serve(self.engine, self.args, [command], got.append)
        if "error" in got[0]:
            raise RuntimeError(f"{self.config}: {command}: {got[0]['error']}")
        return got[0]

    def close(self, timeout: float = 90.0) -> None:
        self.closed, self.close_timeout = True, timeout


def _pair(paired: dict[str, Any]) -> dict[str, Any]:
    """The one pair of a two-engine run's statistics."""
    assert len(paired["pairs"]) == 1
    return paired["pairs"][0]


def _paired_args(**kw: Any) -> argparse.Namespace:
    base = dict(tp=2, input_len=4, new_tokens=101, reps=10, batch_sizes=[1, 16],
                paired_mem=0.35, band=1.0, timeout=300.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_paired_run_alternates_the_order_and_sees_2_percent_through_a_drift(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """B is 2 % slower than A; the machine drifts 1 % per second, i.e. by more than that over
    the run. Rounds alternate A B / B A, and the per-round comparison shows +2 %, beyond the
    1 % band, with both engines' reps kept as the one-engine mode keeps them."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args()
    engines = {"default": _StepEngine(clock, 2.0), "artune": _StepEngine(clock, 2.04)}
    _FakeServed.log = []
    made: dict[str, _FakeServed] = {}

    def spawn(name: str) -> _FakeServed:
        made[name] = _FakeServed(name, mod, args, engines[name])
        return made[name]

    results, paired = mod.run_paired(args, ("default", "artune"), spawn, deadline=None,
                                     artune={"artune"})
    reps = [(c, cmd) for c, cmd in _FakeServed.log if cmd == "rep 16"]
    assert reps[:4] == [("default", "rep 16"), ("artune", "rep 16"),
                        ("artune", "rep 16"), ("default", "rep 16")]
    assert [c for c, cmd in _FakeServed.log if cmd.startswith("warm")] == ["default", "artune"] * 2
    assert all(s.closed for s in made.values())
    for bs in ("1", "16"):
        st = _pair(paired)["by_batch"][bs]
        assert st["rounds"] == 10 and st["verdict"] == "slower by more than 1%"
        assert st["interval_pct"][0] <= 2.0 + 0.2 and st["interval_pct"][1] >= 2.0 - 0.2
        assert st["median_pct"] == pytest.approx(2.0, abs=0.3)
    # unpaired, the drift alone moves a config's own reps by more than the 2 %
    steps = [r["step_ms"] for r in results["default"]["batches"][1]["reps"]]
    assert max(steps) / min(steps) - 1 > 0.02
    assert results["artune"]["artune_routed"] is True and "error" not in results["artune"]
    assert results["artune"]["top_logprobs"] == [{"ids": [1], "top": []}]
    assert results["default"]["settings"]["paired"] is True
    lines = mod.paired_lines({"paired": paired})
    assert "2 engines (default, artune, in start order)" in lines[0]
    assert lines[1] == "  artune vs default:" and "bs16: +2.0" in lines[3]


def test_paired_run_started_artune_first_still_reports_artune_against_the_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Started in the order artune, default (the engine started first gets the GPUs' memory
    first): the statistics still read artune against default, so a run in each order can be
    put side by side; an A/A pair reads the second against the first."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(batch_sizes=[4])
    engines = {"default": _StepEngine(clock, 2.0), "artune": _StepEngine(clock, 2.04)}
    _, paired = mod.run_paired(args, ("artune", "default"),
                               lambda n: _FakeServed(n, mod, args, engines[n]), None,
                               artune={"artune"})
    assert paired["engines"] == ["artune", "default"]
    assert (_pair(paired)["first"], _pair(paired)["base"], _pair(paired)["test"]) == (
        "artune", "default", "artune")
    assert _pair(paired)["by_batch"]["4"]["median_pct"] == pytest.approx(2.0, abs=0.3)
    lines = mod.paired_lines({"paired": paired})
    assert "(artune, default, in start order)" in lines[0] and lines[1] == "  artune vs default:"
    assert _paired().orient("default", "default_again", set()) == ("default", "default_again")
    assert _paired().orient("default", "artune", {"artune"}) == ("default", "artune")


def test_paired_run_that_fails_keeps_the_finished_rounds_and_names_the_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module()
    clock = [0.0]
    _clock_both(monkeypatch, mod, clock)
    args = _paired_args(reps=6, batch_sizes=[4])
    # B's 6th generate fails: warm-up (1), then rounds 1-2 (2 generates each): in round 3
    engines = {"default": _StepEngine(clock, 2.0), "default_again": _StepEngine(clock, 2.0, 6)}
    made: list[_FakeServed] = []

    def spawn(name: str) -> _FakeServed:
        made.append(_FakeServed(name, mod, args, engines[name]))
        return made[-1]

    results, paired = mod.run_paired(args, ("default", "default_again"), spawn, None)
    assert "default_again: rep 4: RuntimeError: engine fault" in results["default"]["error"]
    assert _pair(paired)["by_batch"]["4"]["rounds"] == 2  # only rounds both engines finished
    assert len(results["default"]["batches"][0]["reps"]) == 2
    assert all(s.closed for s in made)
    # an engine that never comes up: the other one is closed, nothing is timed
    made.clear()

    def spawn_fail(name: str) -> _FakeServed:
        made.append(_FakeServed(name, mod, args, engines[name],
                                start_error="the worker ended (exit 3)" if made else None))
        return made[-1]

    results, paired = mod.run_paired(args, ("default", "default_again"), spawn_fail, None)
    assert results["default"]["error"] == "default_again: the worker ended (exit 3)"
    assert _pair(paired)["by_batch"] == {} and all(s.closed for s in made)


def test_served_worker_process_round_trip_timeout_and_death(tmp_path: Path) -> None:
    """``Served`` against a real child process speaking the protocol: answers on the result
    pipe (the child's stdout stays a log), a command it does not answer times out, and its
    death is reported with its exit code."""
    import os
    import sys

    mod = _module()
    child = tmp_path / "child.py"
    child.write_text(
        "import json, os, sys\n"
        "fd = int(sys.argv[sys.argv.index('--result-fd') + 1])\n"
        "out = os.fdopen(fd, 'w', buffering=1)\n"
        "print('engine log line', flush=True)\n"
        "out.write(json.dumps({'ready': True, 'startup_s': 0.1}) + '\\n')\n"
        "for line in sys.stdin:\n"
        "    cmd = line.split()\n"
        "    if cmd[0] == 'rep':\n"
        "        out.write(json.dumps({'t1_s': 0.01, 'tn_s': 0.5}) + '\\n')\n"
        "    elif cmd[0] == 'die':\n"
        "        sys.exit(7)\n"
        "    elif cmd[0] == 'quit':\n"
        "        break\n")
    served = mod.Served("default", [sys.executable, str(child)], dict(os.environ))
    assert served.ask(None, 30)["ready"] is True
    assert served.ask("rep 4", 30) == {"t1_s": 0.01, "tn_s": 0.5}
    with pytest.raises(TimeoutError, match="default: no answer to 'silent 1' within 1 s"):
        served.ask("silent 1", 1)
    with pytest.raises(RuntimeError, match=r"default: the worker ended \(exit 7\)"):
        served.ask("die", 30)
    served.close(timeout=10)
    assert served.proc.returncode == 7


def test_main_paired_writes_both_configs_the_statistics_and_the_summary(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import json

    mod, clock = _stand_ins(monkeypatch)
    monkeypatch.setattr(mod, "_gpu_mem_used", lambda: [])
    monkeypatch.delenv("ARTUNE_PROFILE", raising=False)
    for k in [k for k in os.environ if k.startswith("TORCHINDUCTOR_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", "ATEN")
    spawned: list[tuple[str, list[str], dict[str, str]]] = []
    wargs = argparse.Namespace(new_tokens=256, input_len=128)

    def served(config: str, cmd: list[str], env: dict[str, str]) -> _FakeServed:
        spawned.append((config, cmd, env))
        return _FakeServed(config, mod, wargs, _StepEngine(clock, 2.0))

    monkeypatch.setattr(mod, "Served", served)
    out = tmp_path / "e2e.json"
    rc = mod.main(["--paired", "default,default_again", "--tp", "2", "--reps", "6",
                   "--batch-sizes", "4", "--out", str(out)])
    assert rc == 0
    assert [c for c, _, _ in spawned] == ["default", "default_again"]
    cmd = spawned[0][1]
    assert cmd[cmd.index("--mem") + 1] == "0.35" and "ARTUNE_PROFILE" not in spawned[0][2]
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) == {"default", "default_again"}
    st = _pair(doc["paired"])["by_batch"]["4"]
    assert st["rounds"] == 6 and st["verdict"] == "within ±1%"
    assert "  default_again vs default:" in doc["summary"]
    # the compile settings the engines inherited are in the file and the summary
    assert doc["compile_env"] == {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "ATEN"}
    assert spawned[1][2]["TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS"] == "ATEN"
    assert "compile settings: TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN" in doc["summary"]
    with pytest.raises(SystemExit):
        mod.main(["--paired", "default", "--out", str(out)])


def test_paired_verdict_needs_a_full_interval_and_order_medians_are_kept() -> None:

    def row(*steps: float) -> dict[str, Any]:
        return {"reps": [{"step_ms": x} for x in steps]}

    few = _paired().paired_stats(row(2.0, 2.0, 2.0), row(2.002, 2.0, 2.002), 1.0,
                                 [True, False, True])
    assert few["rounds"] == 3 and few["coverage"] < 0.95
    assert few["verdict"] == "not resolved (3 rounds: too few for a 95% interval)"
    # the base first in rounds 0, 2, 4, ...: the test reads +1 % there, -1 % where it was first
    st = _paired().paired_stats(row(*[2.0] * 10), row(*[2.02, 1.98] * 5), 2.0,
                                [True, False] * 5)
    assert st["base_first_median_pct"] == pytest.approx(1.0)
    assert st["test_first_median_pct"] == pytest.approx(-1.0)
    assert st["verdict"] == "within ±2%"
    order = _paired().round_order
    assert [order(["a", "b"], r) for r in range(4)] == [["a", "b"], ["b", "a"]] * 1 + [
        ["b", "a"], ["a", "b"]]
    assert order(["a", "b", "c"], 4) == ["c", "a", "b"] and order(["a", "b", "c"], 3) == [
        "a", "c", "b"]
    # over every two rounds each engine goes before each other once; over 2N rounds each
    # takes each place twice
    names = ["a", "b", "c", "d"]
    rounds = [order(names, r) for r in range(8)]
    for x in names:
        assert sorted(o.index(x) for o in rounds) == [0, 0, 1, 1, 2, 2, 3, 3]
        for y in names:
            if x != y:
                for k in range(0, 8, 2):
                    pair = rounds[k:k + 2]
                    assert sum(o.index(x) < o.index(y) for o in pair) == 1


def test_paired_run_saves_each_batch_size_and_kills_a_worker_that_stops_answering(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module()
    clock = [0.0]
    _clock_both(monkeypatch, mod, clock)
    args = _paired_args(reps=6, batch_sizes=[1, 4, 16])
    made: dict[str, _FakeServed] = {}

    def spawn(name: str) -> _FakeServed:
        made[name] = _FakeServed(name, mod, args, _StepEngine(clock, 2.0),
                                 silent_on="rep 16" if name == "artune" else None)
        return made[name]

    saved: list[list[str]] = []
    results, paired = mod.run_paired(
        args, ("default", "artune"), spawn, None,
        save=lambda res, pd: saved.append(sorted(_pair(pd)["by_batch"])))
    assert saved == [["1"], ["1", "4"]]  # after each finished batch size
    assert sorted(_pair(paired)["by_batch"]) == ["1", "4"]
    assert "artune: no answer to 'rep 16'" in results["default"]["error"]
    assert made["artune"].close_timeout == 0 and made["default"].close_timeout == 30


def test_paired_check_failure_keeps_the_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module()
    clock = [0.0]
    _clock_both(monkeypatch, mod, clock)

    def norms_fail(engine: Any) -> None:
        raise RuntimeError("update_weights_from_tensor failed")

    monkeypatch.setattr(mod, "_set_norms", norms_fail)
    args = _paired_args(reps=6, batch_sizes=[4])
    results, paired = mod.run_paired(
        args, ("default", "artune"),
        lambda n: _FakeServed(n, mod, args, _StepEngine(clock, 2.0)), None)
    assert "error" not in results["default"] and _pair(paired)["by_batch"]["4"]["rounds"] == 6
    assert "update_weights_from_tensor failed" in results["artune"]["check_error"]


def test_paired_run_stops_for_the_budget_keeping_finished_rounds_and_the_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget ends in bs 64: its rounds stop before the time kept for the logprob
    checks, which then run; the rounds done are kept and the cut is said (no error)."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(reps=10, batch_sizes=[1, 64, 128])
    # each 101-token generate costs ~0.23 s of the stand-in clock: the budget ends in bs 64
    paired_mod = _paired()
    checks = 2 * paired_mod.CHECK_RESERVE_S
    deadline = paired_mod.PAIRED_RESERVE_S + checks + 8.0
    results, paired = mod.run_paired(
        args, ("default", "artune"),
        lambda n: _FakeServed(n, mod, args, _StepEngine(clock, 2.0)), deadline)
    assert "error" not in results["default"] and "check_error" not in results["default"]
    assert results["default"]["rounds_cut"].startswith("budget: bs 64 stopped after")
    assert results["default"]["top_logprobs"] and results["artune"]["top_logprobs"]
    assert _pair(paired)["by_batch"]["1"]["rounds"] == 10
    assert 0 < _pair(paired)["by_batch"]["64"]["rounds"] < 10
    assert "128" not in _pair(paired)["by_batch"]  # a larger batch size is left out
    assert "not resolved" in _pair(paired)["by_batch"]["64"]["verdict"]  # too few rounds for 95 %
    assert clock[0] <= deadline - paired_mod.PAIRED_RESERVE_S - checks
    doc = {"tp": 2, "card": {"gpu": "g", "gpus": 2}, "date": "d", "reps": 10, "new_tokens": 101,
           "configs": results, "paired": paired}
    assert any(line.startswith("fewer rounds than asked: budget: bs 64 stopped")
               for line in mod._summarize(doc, 0.05))


def test_paired_budget_ending_during_a_wait_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget runs out while a worker is being waited for (the wait cut to what was
    left): the error says the budget ran out, naming the engine and the command, not that
    the worker gave no answer within 0 s; that worker is not waited for at the end."""
    mod = _module()
    clock = [0.0]
    _clock_both(monkeypatch, mod, clock)
    args = _paired_args(reps=10, batch_sizes=[1, 64])
    made: dict[str, _FakeServed] = {}

    def spawn(n: str) -> _FakeServed:
        # artune's worker stops answering in bs 64, once less than a rep's limit is left
        made[n] = _FakeServed(n, mod, args, _StepEngine(clock, 2.0),
                              silent_on="rep 64" if n == "artune" else None)
        return made[n]

    deadline = _paired().PAIRED_RESERVE_S + 2 * _paired().CHECK_RESERVE_S + 8.0
    results, paired = mod.run_paired(args, ("default", "artune"), spawn, deadline)
    error = results["default"]["error"]
    assert error.startswith("budget: the time ran out waiting for artune's answer to 'rep 64'")
    assert "s were left)" in error and "within 0 s" not in error
    assert made["artune"].close_timeout == 0 and made["default"].close_timeout == 30


def test_paired_budget_ending_in_the_check_keeps_the_timings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """All rounds done, then the budget ends while the logprob check runs: the timings stand
    (no "error"), the check's absence is said, and the engine that did not answer is not
    waited for."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(reps=6, batch_sizes=[4])
    made: dict[str, _FakeServed] = {}

    def spawn(n: str) -> _FakeServed:
        made[n] = _FakeServed(n, mod, args, _StepEngine(clock, 2.0), silent_on="check")
        return made[n]

    results, paired = mod.run_paired(args, ("default", "artune"), spawn, None)
    assert _pair(paired)["by_batch"]["4"]["rounds"] == 6
    assert all("error" not in r for r in results.values())
    assert "no answer to 'check'" in results["default"]["check_error"]
    assert made["default"].close_timeout == 0 and made["artune"].close_timeout == 30


def test_paired_engines_get_the_same_kv_pool_and_sleep_on_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in ServerArgs: the fields SGLang 0.5.17 has (server_args.py) are set; a
    release without them gets them dropped, with a line saying so."""
    import dataclasses
    import sys
    import types

    mod = _module()

    def server_args(*extra: str) -> None:
        names = ["model_path", "load_format", "skip_tokenizer_init", "tp_size",
                 "attention_backend", "sampling_backend", "mem_fraction_static", "dtype",
                 "disable_cuda_graph", "random_seed", "log_level", "cuda_graph_bs", *extra]
        cls = dataclasses.make_dataclass("ServerArgs", [(n, Any, None) for n in names])
        fake = types.ModuleType("sglang.srt.server_args")
        fake.ServerArgs = cls  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "sglang.srt.server_args", fake)

    args = argparse.Namespace(batch_sizes=[1, 64, 4], tp=4, mem=0.35, log_level="warning",
                              input_len=128, new_tokens=256, paired_engine=True)
    server_args("max_total_tokens", "sleep_on_idle")
    kw = mod._engine_kwargs(args, "/m", "default")
    assert kw["max_total_tokens"] == 2 * 64 * (128 + 256) and kw["sleep_on_idle"] is True
    assert kw["cuda_graph_bs"] == [1, 4, 64] and kw["mem_fraction_static"] == 0.35
    args.paired_engine = False
    assert "max_total_tokens" not in mod._engine_kwargs(args, "/m", "default")
    args.paired_engine = True
    server_args()
    kw = mod._engine_kwargs(args, "/m", "default")
    assert "max_total_tokens" not in kw and "sleep_on_idle" not in kw


def test_across_files_orients_old_files_and_balances_the_start_order(tmp_path: Path) -> None:
    """Two engine pairs of artune vs default, one started each way, each with a +1 % start
    order effect (the engine started first is faster) on top of artune being 0.5 % slower:
    each file reads artune against default (the second was written B against A, before the
    orientation), the hull spans both, and the order-balanced median takes the effect out.
    A one-engine file is named as such."""
    pm = _paired()

    def doc(first: str, second: str, step: dict[str, float]) -> dict[str, Any]:
        def reps(n: str) -> list[dict[str, float]]:
            return [{"step_ms": step[n] * (1 + 0.001 * (i % 3))} for i in range(12)]
        return {"paired": {"a": first, "b": second},
                "configs": {n: {"batches": [{"batch": 4, "reps": reps(n)}],
                                **({"artune_routed": True} if n == "artune" else {})}
                            for n in (first, second)}}

    files = []
    for i, (first, second, step) in enumerate([
            ("default", "artune", {"default": 2.0, "artune": 2.0 * 1.015}),
            ("artune", "default", {"artune": 2.0 * 1.005, "default": 2.0 * 1.01})]):
        f = tmp_path / f"p{i}.json"
        f.write_text(json.dumps(doc(first, second, step)))
        files.append(str(f))
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"configs": {}}))
    lines = pm.across_lines([*files, str(one)])
    rows = [x for x in lines if x.startswith("| p")]
    assert all("| artune vs default |" in x for x in rows)
    assert "| +1.50 |" in rows[0] and "| -0.50 |" in rows[1]  # start order effect of ±1 %
    assert any("one.json | not a side-by-side run" in x for x in lines)
    across = [x for x in lines if x.startswith("| artune vs default | 4 | 2 |")]
    cover = pm.median_ci([0.0] * 12)[2]
    assert len(across) == 1 and "| +0.50 | [+0.50, +0.50] (" in across[0]
    # the two orders' hulls ([+1.5] and [-0.5]) lie 2 points apart: no verdict from it
    assert f"({1 - 2 * (1 - cover):.1%}) | none: the start orders' hulls are 2.00 points" \
        in across[0]
    assert "[-0.50, +1.50]" in across[0] and "no faster than -1%" in across[0]
    # the balanced interval: the mean of each start order's hull ends, at the Bonferroni level
    def iv(low: float, high: float, cover: float = 0.95) -> dict[str, Any]:
        return {"interval_pct": [low, high], "coverage": cover}

    assert pm.balanced_interval({True: [iv(-1.0, 0.5, 0.96), iv(-0.2, 0.9, 0.97)],
                                 False: [iv(0.4, 2.0)]}) == pytest.approx((-0.3, 1.45, 0.88))
    assert pm.orders_apart({True: [iv(-1.0, 0.5)], False: [iv(0.4, 2.0)]}) is None
    assert pm.orders_apart({True: [iv(-6.9, -5.5)], False: [iv(-0.4, 1.1)]}) == pytest.approx(5.1)
    with pytest.raises(ValueError, match="each start order"):
        pm.balanced_interval({True: [iv(0.0, 1.0)], False: []})
    assert pm.main([*files]) == 0
    old = json.loads(Path(files[1]).read_text())  # no "pairs": recomputed for the summary
    assert pm.paired_lines(old)[1] == "  artune vs default:"
    png = tmp_path / "intervals.png"
    assert pm.main([*files, "--plot", str(png)]) == 0
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert pm.plot_intervals(files, str(tmp_path / "again.png")) == 2  # one bar per pair
    with pytest.raises(ValueError, match="no side-by-side results"):
        pm.plot_intervals([str(one)], str(tmp_path / "none.png"))


def test_plot_labels_drop_what_every_file_name_shares() -> None:
    """The plot's row labels: the results files' names without the part all of them share
    (up to an underscore), so the panels keep their width for the intervals."""
    pm = _paired()
    paths = ["r/sglang_e2e_tp2_h200_paired_graph_bs64_2026-11-28e.json",
             "r/sglang_e2e_tp2_h200_paired_graph_compile_rule_2026-11-28e.json",
             "r/sglang_e2e_tp2_h200_paired_graph_compile_aa_2026-11-28e.json"]
    assert pm.short_stems(paths) == {paths[0]: "bs64_2026-11-28e",
                                     paths[1]: "compile_rule_2026-11-28e",
                                     paths[2]: "compile_aa_2026-11-28e"}
    # one file, or the same file twice: its whole stem (nothing to tell apart)
    assert pm.short_stems(paths[:1]) == {paths[0]: "tp2_h200_paired_graph_bs64_2026-11-28e"}
    # a name that is all prefix keeps its whole stem rather than an empty label
    two = ["a/sglang_e2e_x_.json", "a/sglang_e2e_x_z.json"]
    assert pm.short_stems(two) == {two[0]: "x_", two[1]: "z"}
    # the shared part is cut at an underscore, never inside a word
    two = ["a/sglang_e2e_tp2_bs64.json", "a/sglang_e2e_tp2_bs16.json"]
    assert pm.short_stems(two) == {two[0]: "bs64", two[1]: "bs16"}


def test_across_files_balanced_verdict_where_the_start_orders_agree(tmp_path: Path) -> None:
    """Two engine pairs whose intervals overlap (per-round effects of artune spread evenly
    over 0 to +0.6 % with the default started first, -0.2 to +0.4 % with artune first): the
    balanced interval is the mean of the two orders' ends, and its verdict is drawn."""
    pm = _paired()

    def doc(first: str, pcts: list[float]) -> dict[str, Any]:
        steps = {"default": [2.0] * len(pcts), "artune": [2.0 * (1 + p / 100) for p in pcts]}
        second = "artune" if first == "default" else "default"
        return {"paired": {"engines": [first, second], "a": first, "b": second},
                "configs": {n: {"batches": [{"batch": 4, "reps": [{"step_ms": x}
                                                                  for x in steps[n]]}],
                                **({"artune_routed": True} if n == "artune" else {})}
                            for n in ("default", "artune")}}

    files = []
    for first, lo, hi in (("default", 0.0, 0.6), ("artune", -0.2, 0.4)):
        pcts = [lo + (hi - lo) * i / 29 for i in range(30)]
        f = tmp_path / f"{first}_first.json"
        f.write_text(json.dumps(doc(first, pcts)))
        files.append(str(f))
    across = [x for x in pm.across_lines(files) if x.startswith("| artune vs default | 4 | 2 |")]
    assert len(across) == 1
    cells = [c.strip() for c in across[0].split("|")]
    low_d, high_d = pm.median_ci([0.6 * i / 29 for i in range(30)])[:2]
    low_a, high_a = pm.median_ci([-0.2 + 0.6 * i / 29 for i in range(30)])[:2]
    assert low_d < high_a  # the two orders' intervals overlap
    assert cells[7].startswith(f"[{(low_d + low_a) / 2:+.2f}, {(high_d + high_a) / 2:+.2f}]")
    assert cells[6] == "+0.20" and cells[8] == "within ±1% (above 0)"


def test_four_engines_side_by_side_give_every_pair_and_group_by_config(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two engines of each config (the second default engine 1 % slower than the first, artune
    2 % slower than the first default): the order rotates over the four, all six pairs are
    reported (artune against default where the configs differ, the later against the earlier
    otherwise), and read back from the file the four cross pairs form one group whose hull
    spans the engine effect, beside the two A/A groups."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(batch_sizes=[4], reps=12)
    names = ("default", "artune", "default_again", "artune_again")
    steps = {"default": 2.0, "artune": 2.04, "default_again": 2.02, "artune_again": 2.04}
    _FakeServed.log = []
    results, paired = mod.run_paired(
        args, names, lambda n: _FakeServed(n, mod, args, _StepEngine(clock, steps[n])), None,
        artune={"artune", "artune_again"})
    reps = [c for c, cmd in _FakeServed.log if cmd == "rep 4"]
    assert reps[:8] == [*names, *names[::-1]]  # a rotation, then its reverse
    got = {(q["test"], q["base"]): q["by_batch"]["4"]["median_pct"] for q in paired["pairs"]}
    assert set(got) == {("artune", "default"), ("default_again", "default"),
                        ("artune_again", "default"), ("artune", "default_again"),
                        ("artune_again", "default_again"), ("artune_again", "artune")}
    assert got[("artune", "default")] == pytest.approx(2.0, abs=0.3)
    assert got[("artune", "default_again")] == pytest.approx(1.0, abs=0.3)
    assert got[("default_again", "default")] == pytest.approx(1.0, abs=0.3)
    assert got[("artune_again", "artune")] == pytest.approx(0.0, abs=0.3)
    assert results["default"]["paired_with"] == ["artune", "default_again", "artune_again"]
    f = tmp_path / "four.json"
    f.write_text(json.dumps({"paired": paired, "configs": results}))
    lines = _paired().across_lines([str(f)])
    assert sum(x.startswith("| four.json |") for x in lines) == 6
    # the four cross pairs in one group: from +1 % (against the slower default) to +2 %
    assert any(x.startswith("| artune vs default | 4 | 4 | [+0.") for x in lines), lines
    assert any(x.startswith("| default vs default | 4 | 1 |") for x in lines)
    assert any(x.startswith("| artune vs artune | 4 | 1 |") for x in lines)


def _grandchild_script(path: Path, pid_file: Path) -> list[str]:
    """A worker that starts a long sleeper (as an engine starts its schedulers), writes the
    sleeper's pid to ``pid_file`` and then hangs."""
    import sys

    path.write_text(
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('engine log line', flush=True)\n"
        "time.sleep(600)\n")
    return [sys.executable, str(path)]


def _wait_for_pid(pid_file: Path) -> int:
    import time

    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            return int(pid_file.read_text())
        time.sleep(0.05)
    raise AssertionError("the worker never started its sleeper")


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone: nothing of it runs)."""
    import os
    import time

    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, 9)  # do not leave it behind when the test fails
    except ProcessLookupError:
        pass
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_timed_out_worker_takes_what_it_started_with_it(tmp_path: Path) -> None:
    """A worker killed at its time limit: the processes it started (an engine's schedulers,
    compile workers) are killed too, not left on the GPUs to slow the next engine."""
    import os

    mod = _module()
    pid_file = tmp_path / "sleeper.pid"
    cmd = _grandchild_script(tmp_path / "worker.py", pid_file)
    rc, _ = mod._run_worker(cmd, dict(os.environ), timeout=3)
    assert rc == 124
    assert _gone(_wait_for_pid(pid_file))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_paired_worker_that_does_not_stop_takes_what_it_started_with_it(
        tmp_path: Path) -> None:
    import os

    mod = _module()
    pid_file = tmp_path / "sleeper.pid"
    cmd = _grandchild_script(tmp_path / "worker.py", pid_file)
    served = mod.Served("default_compile", cmd, dict(os.environ))
    sleeper = _wait_for_pid(pid_file)
    served.close(timeout=0)
    assert served.proc.returncode is not None
    assert _gone(sleeper)


class _GraphEngine(_StepEngine):
    """A ``_StepEngine`` whose wall-clock steps wander by up to ±6 % from call to call (a busy
    host's scheduler) while its decode graphs take ``gpu_ms`` on the GPU, written as two TP
    ranks' replays into ``folder`` (graph_times' format): rank 1 launched first and waits
    0.3 ms per replay for rank 0 inside the graph."""

    def __init__(self, clock: list[float], step_ms: float, gpu_ms: float, folder: Path,
                 phase: float) -> None:
        super().__init__(clock, step_ms)
        self.gpu_ms, self.folder, self.phase = gpu_ms, folder, phase
        folder.mkdir(parents=True, exist_ok=True)

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any],
                 **_: Any) -> list[dict[str, Any]]:
        import math

        n = sampling_params["max_new_tokens"]
        t0 = self.clock[0] + 0.030
        wander = 1 + 0.06 * math.sin(1.7 * self.calls + self.phase)
        self.step_ms, base = self.step_ms * wander, self.step_ms
        try:
            out = super().generate(input_ids, sampling_params)
        finally:
            self.step_ms = base
        step_s = (self.clock[0] - t0) / max(n - 1, 1)
        for rank, wait_us in ((0, 0.0), (1, 300.0)):
            with (self.folder / f"graph-times-pid{100 + rank}.txt").open("a") as f:
                for i in range(n - 1):
                    t_ns = int((t0 + i * step_s) * 1e9)
                    f.write(f"{t_ns} 7 {self.gpu_ms * 1e3 + wait_us + (i % 3):.2f}\n")
                    if i % 10 == 0:  # another graph (a draft model's, say): left out
                        f.write(f"{t_ns + 1} 9 400.00\n")
        return out


def test_paired_run_resolves_the_decode_graphs_gpu_time_where_the_wall_clock_cannot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Wall-clock steps of both engines wander by ±6 % (not resolved against ±1 %); artune's
    decode graphs take 1.75 ms on the GPU against default's 1.80 (-2.8 %): each rep gets its
    window's replays (the fastest rank's median), and the same rounds resolve "faster by more
    than 1 %" on the GPU time, in the statistics, the batch rows and the summary lines."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(batch_sizes=[4], reps=12)
    folders = {n: Path(_paired().graph_folder(tmp_path, n)) for n in ("default", "artune")}
    engines = {"default": _GraphEngine(clock, 2.0, 1.80, folders["default"], 0.0),
               "artune": _GraphEngine(clock, 2.0, 1.75, folders["artune"], 2.0)}

    class Served(_FakeServed):
        def __init__(self, name: str) -> None:
            super().__init__(name, mod, args, engines[name])
            self.graph_times = str(folders[name])

    results, paired = mod.run_paired(args, ("default", "artune"), Served, deadline=None,
                                     artune={"artune"})
    st = _pair(paired)["by_batch"]["4"]
    assert st["verdict"].startswith("not resolved")
    g = st["graph"]
    assert g["median_pct"] == pytest.approx((1.75 / 1.80 - 1) * 100, abs=0.01)
    assert g["verdict"] == "faster by more than 1%"
    row = results["artune"]["batches"][0]
    assert row["graph_ms"] == pytest.approx(1.751)  # rank 0's time, not rank 1's
    assert row["graph_reps"] == 12
    rep = row["reps"][0]
    assert rep["replays"] == 100 and rep["processes"] == 2 and rep["graphs"] == 2
    assert rep["graph_ms_max"] == pytest.approx(2.051)
    lines = mod.paired_lines({"paired": paired})
    assert any("decode graph GPU time: -2.78%" in x and "faster by more than 1%" in x
               for x in lines)
    doc = {"tp": 2, "card": {"gpu": "g", "gpus": 2}, "date": "d", "reps": 12,
           "new_tokens": 101, "configs": results, "paired": paired}
    assert any(x.startswith("artune: decode graph GPU ms/step") and "bs4 1.751" in x
               for x in mod._summarize(doc, 0.05))
    (tmp_path / "run.json").write_text(json.dumps(doc))
    row = next(x for x in _paired().across_lines([str(tmp_path / "run.json")])
               if x.startswith("| run.json | artune vs default"))
    graph_cell = row.split("|")[-2].strip()  # the last column: the GPU time's
    assert graph_cell.startswith("-2.78 [") and graph_cell.endswith("faster by more than 1%")


def test_the_engines_are_told_where_to_time_their_graphs(tmp_path: Path) -> None:
    mod = _module()
    args = argparse.Namespace(profile=str(tmp_path / "p.json"))
    for config in ("default", "artune"):
        env = mod._worker_env(args, config, str(tmp_path))
        assert env["ARTUNE_GRAPH_TIMES"] == os.path.join(tmp_path, "graph-times", config)


def test_a_rep_missing_a_ranks_replays_gets_no_gpu_time_and_says_why(tmp_path: Path) -> None:
    """Rank 1 wrote nothing for the second rep's window (its writer behind or stopped): that
    rep gets ``graph_missing``, the batch row counts the reps with GPU times, and the pair's
    GPU-time verdict says how many rounds it rests on."""
    paired = _paired()
    folder = tmp_path / "g"
    folder.mkdir()
    lines = {0: [], 1: []}
    for w in range(8):
        for i in range(50):
            t = w * 1000 + i
            lines[0].append(f"{t} 7 2000.00")
            if w != 1:
                lines[1].append(f"{t} 7 2300.00")
    for rank, rows in lines.items():
        (folder / f"graph-times-pid{rank}.txt").write_text("\n".join(rows) + "\n")
    reps = [{"t1_s": 0.03, "tn_s": 0.5, "win_ns": [w * 1000, w * 1000 + 49]} for w in range(8)]
    paired.attach_graph_times(reps, str(folder), processes=2, min_replays=40)
    assert reps[1]["graph_missing"] == "1 of 2 ranks replayed" and "graph_ms" not in reps[1]
    assert all(r["graph_ms"] == pytest.approx(2.0) for i, r in enumerate(reps) if i != 1)
    short = paired.attach_graph_times([dict(win_ns=reps[0]["win_ns"])], str(folder),
                                      processes=2, min_replays=60)
    assert short[0]["graph_missing"] == "50 replays, fewer than 60"
    assert "graph_ms" not in short[0]
    base = paired.batch_row(4, [dict(r) for r in reps], 101)
    assert base["graph_reps"] == 7
    test = paired.batch_row(4, [dict(r, tn_s=0.49) for r in reps], 101)
    st = paired.paired_stats(base, test, 1.0, [True, False] * 4)
    assert st["rounds"] == 8 and st["graph"]["rounds"] == 7
    assert st["graph"]["verdict"] == "within ±1% (7 of 8 rounds with GPU times)"



def _trace(path: Path, kernels: dict[str, float], steps: int, prefill_us: float) -> None:
    """A profiler trace (gzipped Chrome JSON) of ``steps`` graph launches, each running
    ``kernels`` (name -> µs), and an eager prefill GEMM launched by cudaLaunchKernel."""
    import gzip

    events: list[dict[str, Any]] = [
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "dur": prefill_us,
         "args": {"correlation": 1}},
    ]
    for s in range(steps):
        corr = 100 + s
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch",
                       "args": {"correlation": corr}})
        events += [{"ph": "X", "cat": "kernel", "name": n, "dur": us,
                    "args": {"correlation": corr}} for n, us in kernels.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


class _ProfiledEngine(_StepEngine):
    """A ``_StepEngine`` with SGLang's profiler API: ``stop_profile`` writes one trace per TP
    rank into ``start_profile``'s folder, with this engine's decode kernels."""

    def __init__(self, clock: list[float], step_ms: float, kernels: dict[str, float]) -> None:
        super().__init__(clock, step_ms)
        self.kernels, self.folder, self.tokens = kernels, None, 0

    def start_profile(self, output_dir: str, activities: list[str], profile_prefix: str) -> None:
        assert activities == ["GPU"] and profile_prefix == "bs4"
        self.folder = output_dir

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any],
                 **kw: Any) -> list[dict[str, Any]]:
        self.tokens = sampling_params["max_new_tokens"]
        return super().generate(input_ids, sampling_params, **kw)

    def stop_profile(self) -> None:
        assert self.folder is not None
        for rank in (0, 1):
            _trace(Path(self.folder) / f"bs4-TP-{rank}.trace.json.gz", self.kernels,
                   self.tokens - 1, 900.0)


def test_kernel_profile_after_the_check_names_the_kernels_that_differ(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--profile-bs 4: after the check each engine profiles one generate; the kernel tables
    (graph launches only: the eager prefill GEMM is left out) go into the results, and the
    summary lists the kernels by how much their µs per step differ, the largest first."""
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(batch_sizes=[4], reps=2, profile_bs=4, profile_dir=str(tmp_path / "p"))
    engines = {"default": _ProfiledEngine(clock, 2.0, {"gemm": 20.0, "allreduce": 3.0,
                                                        "norm": 2.0}),
               "artune": _ProfiledEngine(clock, 2.0, {"gemm": 20.0, "fused_linear": 19.0,
                                                       "norm": 2.5})}
    results, paired = mod.run_paired(args, ("default", "artune"),
                                     lambda n: _FakeServed(n, mod, args, engines[n]), None,
                                     artune={"artune"})
    k = results["artune"]["kernels"]
    assert k["bs"] == 4 and k["ranks"] == 2 and k["steps"] == 31 and k["graphs_only"]
    assert k["kernels"]["gemm"] == {"us": 20.0, "us_min": 20.0, "calls": 1.0}  # no prefill's 900
    assert "replays" not in k  # the stand-in traces have no timestamps
    doc = {"tp": 2, "card": {"gpu": "g", "gpus": 2}, "date": "d", "reps": 2, "new_tokens": 101,
           "configs": results, "paired": paired}
    lines = mod._summarize(doc, 0.05)
    at = lines.index("bs 4, 31 decode steps under the profiler:")
    assert "total 41.5 vs 25.0, +16.5" in lines[at + 1]
    rows = [ln.split("|")[1].strip() for ln in lines[at + 4:at + 8]]
    assert rows == ["`fused_linear`", "`allreduce`", "`norm`", "`gemm`"]
    assert lines[at + 4].endswith("| +19.0 |") and lines[at + 5].endswith("| -3.0 |")


def _timed_trace(path: Path, replays: list[list[tuple[str, float, float]]],
                 copies: tuple[tuple[float, float], ...] = ()) -> None:
    """A profiler trace whose graph launches ran ``replays``: each a list of (kernel, start µs,
    µs); ``copies`` (start, µs) are memcpy nodes of the first replay."""
    import gzip

    events: list[dict[str, Any]] = []
    for i, run in enumerate(replays):
        corr = 100 + i
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch",
                       "ts": 0.0, "args": {"correlation": corr}})
        events += [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": us,
                    "args": {"correlation": corr}} for n, ts, us in run]
    events += [{"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": ts, "dur": us,
                "args": {"correlation": 100}} for ts, us in copies]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_replay_spans_split_a_graph_replay_into_busy_idle_and_overlap(tmp_path: Path) -> None:
    """The GPU time of a replay is its kernels, the gaps between them, minus what ran at once:
    a kernel launched early that waits for its predecessor (programmatic dependent launch)
    counts once in ``busy``; the gap before a kernel counts in ``idle``. The numbers are those
    of one replay (the median span's), so they add up; across ranks, those of the rank with the
    median span and of the one with the least. A rank whose all-reduce waits longer for its
    peers shows in the kernel's median rank, not in its least rank."""
    import importlib

    _module()
    kt = importlib.import_module("kernel_table")
    # gemm 1000-1010, a 2 µs gap, ar 1012-1017, norm 1016-1020 (1 µs at once with ar), a gap,
    # end 1023-1025: span 25; in the first replay also a memcpy 1020-1021. The second replay
    # ends 1 µs later (span 26), the third 5 µs later (span 30): the second is the median.
    run = [("gemm", 1000.0, 10.0), ("ar", 1012.0, 5.0), ("norm", 1016.0, 4.0),
           ("end", 1023.0, 2.0)]
    replays = [run, [(n, t + 100 + (n == "end"), d) for n, t, d in run],
               [(n, t + 200 + 5 * (n == "end"), d) for n, t, d in run]]
    _timed_trace(tmp_path / "e" / "r0.trace.json.gz", replays, copies=((1020.0, 1.0),))
    spans = kt.replay_spans(tmp_path / "e" / "r0.trace.json.gz")
    assert spans == {"span": 26.0, "busy": 20.0, "idle": 6.0, "overlap": 1.0, "other": 0.0,
                     "replays": 3.0}
    _timed_trace(tmp_path / "one.trace.json.gz", [run], copies=((1020.0, 1.0),))
    assert kt.replay_spans(tmp_path / "one.trace.json.gz") == {
        "span": 25.0, "busy": 21.0, "idle": 4.0, "overlap": 1.0, "other": 1.0,
        "replays": 1.0}  # the first replay alone: the memcpy fills 1 µs of a gap
    slow = [("gemm", 1000.0, 10.0), ("ar", 1012.0, 9.0), ("norm", 1021.0, 2.0)]
    _timed_trace(tmp_path / "e" / "r1.trace.json.gz", [slow, slow, slow])
    table = kt.table(tmp_path / "e", 3)
    assert table["kernels"]["ar"] == {"us": 7.0, "us_min": 5.0, "calls": 1.0}
    assert table["replays"]["ranks"] == 2
    assert table["replays"]["span"] == {"median": 26.0, "min": 23.0}
    assert table["replays"]["idle"] == {"median": 6.0, "min": 2.0}
    lines = kt.diff_lines(table, table, "a", "b")
    assert lines[0].startswith("one decode-graph replay on the GPU")
    assert lines[1].split()[:2] == ["span", "26.0"] and "(gaps between nodes)" in lines[3]
    assert "| `ar` | 7.0 | 5.0 | 1 | 7.0 | 5.0 | 1 | +0.0 |" in lines


def test_kernel_table_on_its_own_and_without_traces(tmp_path: Path, capsys) -> None:
    import importlib

    _module()  # puts benchmarks/ on the path
    kt = importlib.import_module("kernel_table")
    _trace(tmp_path / "a" / "x.trace.json.gz", {"k": 10.0}, 4, 0.0)
    _trace(tmp_path / "b" / "x.trace.json.gz", {"k": 12.0}, 4, 0.0)
    assert kt.main([str(tmp_path / "a"), str(tmp_path / "b"), "--steps", "4"]) == 0
    assert "| `k` | 10.0 | 10.0 | 1 | 12.0 | 12.0 | 1 | +2.0 |" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    assert kt.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "no profiler trace" in capsys.readouterr().err


def test_a_failing_kernel_profile_is_recorded_and_the_timings_stand(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod, clock = _stand_ins(monkeypatch)
    args = _paired_args(batch_sizes=[4], reps=2, profile_bs=4, profile_dir=str(tmp_path / "p"))
    engines = {"default": _StepEngine(clock, 2.0), "artune": _StepEngine(clock, 2.0)}
    results, paired = mod.run_paired(args, ("default", "artune"),
                                     lambda n: _FakeServed(n, mod, args, engines[n]), None,
                                     artune={"artune"})
    assert "start_profile" in results["default"]["profile_error"]
    assert "kernels" not in results["artune"] and _pair(paired)["by_batch"]["4"]["rounds"] == 2
