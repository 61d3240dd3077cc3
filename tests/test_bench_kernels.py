"""benchmarks/sglang_kernels.py: reading torch-profiler traces and the per-step statistics, on
hand-made traces whose answers are known."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import load_benchmark


def _module() -> Any:
    return load_benchmark("sglang_kernels")


def _kernel(name: str, ts: float, dur: float) -> dict[str, Any]:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def _step(t0: float, ar: str, ar_dur: float) -> tuple[list[dict[str, Any]], float]:
    """One stand-in decode step from t0: GEMM 8 µs, the all-reduce (starting 0.5 µs before the
    GEMM ends, as under PDL), a 1 µs gap, an RMSNorm of 2 µs, attention 5 µs after 0.5 µs."""
    ev = [_kernel("void nvjet_hsh_128x64_64x4_1x2_h_bz_NNT<...>(int)", t0, 8.0),
          _kernel(ar, t0 + 7.5, ar_dur)]
    t = t0 + 7.5 + ar_dur + 1.0
    ev.append(_kernel("void FusedAddRMSNormKernel<__nv_bfloat16>(int)", t, 2.0))
    ev.append(_kernel("_fwd_grouped_kernel_stage1", t + 2.5, 5.0))
    return ev, t + 7.5


def _trace(tmp: Path, name: str, steps: int, ar: str, ar_dur: float,
           host_gap: float = 100.0) -> Path:
    events: list[dict[str, Any]] = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0,
                                     "dur": 50}]
    t = 10.0
    for _ in range(steps):
        ev, t = _step(t, ar, ar_dur)
        events += ev
        t += host_gap
    path = tmp / name
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events[::-1]}, f)  # out of order on purpose
    return path


def test_kinds_and_short_names() -> None:
    mod = _module()
    nccl_ar = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgs)"
    assert mod.kind_of(nccl_ar) == "all-reduce"
    assert mod.kind_of("ncclDevKernel_AllGather_RING_LL(x)") == "other collective"
    assert mod.kind_of("oneshot_lamport_kernel") == "all-reduce"
    assert mod.kind_of("void cross_device_reduce_1stage<__nv_bfloat16, 4>(...)") == "all-reduce"
    assert mod.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert mod.kind_of("void FusedAddRMSNormKernel<__nv_bfloat16>(int)") == "norm"
    assert mod.kind_of("flashinfer::norm::FusedAddRMSNormKernel") == "norm"
    assert mod.kind_of("flashinfer::norm::RMSNormKernel") == "norm"
    assert mod.kind_of("flashinfer::BatchDecodeWithPagedKVCacheKernel") == "attention"
    assert mod.kind_of("_fwd_grouped_kernel_stage1") == "attention"
    assert mod.kind_of("triton_poi_fused_add_0") == "other"
    assert mod.short("void FusedAddRMSNormKernel<__nv_bfloat16>(int)") == "FusedAddRMSNormKernel"
    assert mod.short("void (anonymous namespace)::cross_device_reduce_1stage<__nv_bfloat16, 4>"
                     "(RankData*, int)") == "cross_device_reduce_1stage"


def test_step_statistics_of_a_known_trace(tmp_path: Path) -> None:
    mod = _module()
    path = _trace(tmp_path, "x-TP-0-DECODE.trace.json.gz", steps=4,
                  ar="oneshot_lamport_kernel", ar_dur=3.0)
    kernels = mod.read_trace(path)
    assert len(kernels) == 16 and [k[1] for k in kernels] == sorted(k[1] for k in kernels)
    s = mod.step_stats(kernels, 4)
    # a step: 8 + 3 - 0.5 (overlap) + 1 + 2 + 0.5 + 5 = 19 µs of span, 17.5 busy, 1.5 idle in
    # the graph; 100 µs between steps (three gaps over four steps)
    assert s["busy_us"] == pytest.approx(17.5)
    assert s["idle_in_graph_us"] == pytest.approx(1.5)
    assert s["idle_between_us"] == pytest.approx(300 / 4)
    assert s["period_us"] == pytest.approx((4 * 19.0 + 300) / 4)
    assert s["by_kind_us"] == pytest.approx({"gemm": 8.0, "attention": 5.0, "all-reduce": 3.0,
                                              "norm": 2.0})
    a = s["allreduce"]
    assert a["per_step"] == 1 and a["mean_us"] == pytest.approx(3.0)
    assert a["gap_before_us"] == pytest.approx(-0.5) and a["gap_after_us"] == pytest.approx(1.0)
    assert a["next_mean_us"] == pytest.approx(2.0) and a["next_median_us"] == pytest.approx(2.0)
    assert a["span_median_us"] == pytest.approx(3.0 + 1.0 + 2.0)  # AR, gap, next kernel
    assert a["next_names"] == {"FusedAddRMSNormKernel": 4}
    assert s["top"][0]["name"] == "nvjet_hsh_128x64_64x4_1x2_h_bz_NNT"
    assert s["top"][0]["per_step_us"] == pytest.approx(8.0)
    assert mod.step_stats([], 4) == {"steps": 4, "kernels": 0}


def test_from_traces_reports_each_config_and_rank(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    mod = _module()
    for config, ar, dur in (("default", "cross_device_reduce_1stage", 2.0),
                            ("artune_nccl", "oneshot_lamport_kernel", 3.0)):
        folder = tmp_path / "traces" / config / "bs1"
        folder.mkdir(parents=True)
        for rank in range(2):
            _trace(folder, f"{config}-TP-{rank}-DECODE.trace.json.gz", 3, ar, dur + rank)
        _trace(folder, f"{config}-TP-0-EXTEND.trace.json.gz", 1, ar, 50.0)  # not read
    out = tmp_path / "k.json"
    rc = mod.main(["--tp", "2", "--configs", "default,artune_nccl", "--batch-sizes", "1",
                   "--steps", "3", "--from-traces", str(tmp_path / "traces"), "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["configs"]["default"]["1"]["1"]["allreduce"]["mean_us"] == pytest.approx(3.0)
    assert doc["configs"]["artune_nccl"]["1"]["0"]["allreduce"]["mean_us"] == pytest.approx(3.0)
    md = out.with_suffix(".md").read_text()
    assert "| artune_nccl | 1 | 1 |" in md and "oneshot_lamport_kernel" in md
    assert md in capsys.readouterr().out + "\n"
    # a batch size without traces on every rank is an error, not a silent empty row
    rc = mod.main(["--tp", "3", "--configs", "default", "--batch-sizes", "1", "--steps", "3",
                   "--from-traces", str(tmp_path / "traces"), "--out", str(out)])
    assert rc == 1
    assert json.loads(out.read_text())["configs"]["default"] == {"error": "no decode trace"}


def test_worker_asks_for_a_decode_trace_per_batch_size_and_waits_for_every_rank(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker against a stand-in ``sglang.Engine`` that writes SGLang's trace files the way
    0.5.17's profiler names them (<profile_id>-TP-<rank>-<STAGE>.trace.json.gz): one profile
    request per batch size, for --steps decode steps, and the parent reads what it wrote."""
    import argparse
    import dataclasses
    import sys
    import types

    mod = _module()
    calls: list[tuple[str, Any]] = []

    @dataclasses.dataclass
    class ServerArgs:  # the fields the engine settings look for
        model_path: str = ""
        cuda_graph_bs: Any = None
        disable_custom_all_reduce: bool = False

    class Engine:
        def __init__(self, **kw: Any) -> None:
            calls.append(("engine", kw))
            self.profile: dict[str, Any] | None = None

        def start_profile(self, **kw: Any) -> None:
            calls.append(("start_profile", kw))
            self.profile = kw

        def generate(self, input_ids: Any, sampling_params: Any) -> list[dict[str, Any]]:
            n = sampling_params["max_new_tokens"]
            calls.append(("generate", (len(input_ids), n)))
            if self.profile is not None:
                p, self.profile = self.profile, None
                assert n > p["num_steps"]  # generates past the traced steps
                for r in range(2):
                    _trace(Path(p["output_dir"]), f"{p['profile_id']}-TP-{r}-EXTEND"
                           ".trace.json.gz", 1, "cross_device_reduce_1stage", 9.0)
                    _trace(Path(p["output_dir"]), f"{p['profile_id']}-TP-{r}-DECODE"
                           ".trace.json.gz", p["num_steps"], "cross_device_reduce_1stage", 2.0)
            return [{"output_ids": [0] * n} for _ in input_ids]

        def shutdown(self) -> None:
            calls.append(("shutdown", None))

    sgl = types.ModuleType("sglang")
    sgl.Engine = Engine  # type: ignore[attr-defined]
    srt = types.ModuleType("sglang.srt")
    sa = types.ModuleType("sglang.srt.server_args")
    sa.ServerArgs = ServerArgs  # type: ignore[attr-defined]
    for name, m in (("sglang", sgl), ("sglang.srt", srt), ("sglang.srt.server_args", sa)):
        monkeypatch.setitem(sys.modules, name, m)
    args = argparse.Namespace(worker="nccl", model_dir=str(tmp_path), trace_dir=str(tmp_path / "t"),
                              tp=2, batch_sizes=[1, 16], steps=5, input_len=8, mem=0.5,
                              log_level="warning")
    assert mod.worker(args) == 0
    starts = [kw for what, kw in calls if what == "start_profile"]
    assert [s["profile_id"] for s in starts] == ["nccl-bs1", "nccl-bs16"]
    assert all(s["num_steps"] == 5 and s["profile_by_stage"] and s["activities"] == ["GPU"]
               for s in starts)
    engine_kw = calls[0][1]
    assert engine_kw["disable_custom_all_reduce"] and engine_kw["cuda_graph_bs"] == [1, 16]
    assert calls[-1] == ("shutdown", None)
    found = mod._traces(tmp_path / "t" / "nccl" / "bs16", 2)
    assert found is not None and all("DECODE" in p.name for p in found.values())
    s = mod.step_stats(mod.read_trace(found[1]), 5)
    assert s["allreduce"]["mean_us"] == pytest.approx(2.0)  # the decode trace, not the prefill's


def test_allreduce_benchmarks_start_only_with_multicast_off_and_finish_their_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/allreduce.py's start and end, shared with fused_norm.py: a rank refuses to
    start while any NVLink multicast switch is on (before touching a GPU); the end writes the
    report where asked and closes the backends and the process group."""
    import torch.distributed as dist

    from artune.envs import NO_MULTICAST_ENV

    ar = load_benchmark("allreduce")
    for k, v in NO_MULTICAST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    with pytest.raises(SystemExit, match="NCCL_NVLS_ENABLE=0"):
        ar.start_ranks(1 << 20)

    class Closing:
        closed = False

        def close(self) -> None:
            self.closed = True

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    be = Closing()
    ar.finish("| table |\n", str(tmp_path / "out" / "r.md"), {"x": be})
    assert (tmp_path / "out" / "r.md").read_text() == "| table |\n"
    assert be.closed and not dist.is_initialized()


def _verdicts(rank: int, world: int, folder: str, q: Any) -> None:
    """One gloo rank: rank_verdict over cases where this rank errs, disagrees or agrees."""
    import torch.distributed as dist

    ar = load_benchmark("allreduce")
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    got = [ar.rank_verdict(None, 7, group),
           ar.rank_verdict("off by 3" if rank == 1 else None, 7, group),
           ar.rank_verdict(None, 7 + rank, group)]
    dist.destroy_process_group()
    q.put((rank, got))


def test_benchmark_checks_give_every_rank_the_same_verdict(tmp_path: Path) -> None:
    """rank_verdict (the correctness gate of allreduce.py's neighbours fused_norm.py and
    linear_ar.py): None only when no rank erred and every rank's bits agree; otherwise the
    first error, on every rank alike. best_gap: the best candidate minus the base, or '-'."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_verdicts, args=(r, 2, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank in (0, 1):
        assert out[rank] == [None, "rank 1: off by 3", "ranks disagree bitwise"], out
    ar = load_benchmark("allreduce")
    assert ar.best_gap([3.0, "n/a", 2.5], 4.0) == "-1.5 µs"
    assert ar.best_gap(["WRONG"], 4.0) == "-" and ar.best_gap([1.0], "n/a") == "-"


def test_linear_benchmark_variants_name_the_kernel_parameters() -> None:
    """linear_ar.py's ``--variants``: BNxBK with an optional pipelining depth (sS, 3 unless
    given) and prefetch (p); anything else stops with the expected form."""
    la = load_benchmark("linear_ar")
    assert la.parse_variant("32x256") == (32, 256, 3, 0)
    assert la.parse_variant("32x256p") == (32, 256, 3, 1)
    assert la.parse_variant("64x128s5") == (64, 128, 5, 0)
    assert la.parse_variant("32x512s2p") == (32, 512, 2, 1)
    for bad in ("32x", "32x256q", "s4x256", "32x256ps4"):
        with pytest.raises(SystemExit, match="BNxBK"):
            la.parse_variant(bad)


def test_allreduce_context_options_parse_or_exit_clearly() -> None:
    """allreduce.py's --context-gemm K,N and --context-norm HIDDEN: parsed when well formed,
    a clear exit naming the option otherwise; a norm over sizes that are not whole rows is
    refused before any GPU work (None)."""
    import torch

    ar = load_benchmark("allreduce")
    assert ar.context_args(None, None) == (None, None)
    assert ar.context_args("3584,4096", "4096") == ((3584, 4096), 4096)
    for bad in ("3584", "0,4096", "a,b", "1,2,3"):
        with pytest.raises(SystemExit, match="--context-gemm takes K,N"):
            ar.context_args(bad, None)
    for bad in ("0", "-1", "4k", ""):
        with pytest.raises(SystemExit, match="--context-norm takes HIDDEN"):
            ar.context_args(None, bad)
    assert ar._norm(4096, 2048, torch.bfloat16, torch.device("cpu")) is None  # 4K: half a row
