"""Where a served decode step's time goes, kernel by kernel: SGLang configs side by side.

    python benchmarks/sglang_kernels.py --tp 4 --profile profiles/<id>.json \
        --configs default,artune_nccl,nccl --batch-sizes 1,16 --out out/kernels_tp4.json

Why: between GEMMs, NVRAR costs what SGLang's custom all-reduce costs at the decode sizes
(4x H100, nineteenth session), yet a served model with NVRAR on every decode all-reduce
(``artune_nccl``) took 1-3 µs more per all-reduce than SGLang's default. A kernel trace of the
served engines says whether that time is in the all-reduce kernels, in the kernels next to
them, or between kernels.

Each config starts its own ``sglang.Engine`` in a subprocess, exactly as
``benchmarks/sglang_e2e.py`` does (same configs, model, engine settings, worker environment).
Per batch size it warms up, asks SGLang's profiler for ``--steps`` decode steps
(``start_profile(profile_by_stage=True, activities=["GPU"])``: the torch profiler, CUDA
activity only) and generates past them. The parent reads every rank's decode trace and reports,
per config, batch size and rank, per decode step:

- the step's period (trace window / steps), the kernels' busy time and the GPU idle time;
- time by kind of kernel (all-reduce, GEMM, attention, norm, other) by name patterns;
- the all-reduce kernels: count, mean duration, the gap before (negative: the kernel started
  before the previous one ended, programmatic dependent launch) and after, and the kernel that
  follows them with its mean duration;
- the kernels with the most time.

An all-reduce kernel's duration includes its wait for the other ranks, so a rank that arrives
first reads a longer all-reduce: the table shows every rank. Writes ``--out`` (JSON: card, date,
per-config statistics) and ``--out`` with ``.md`` (the tables), and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sglang_e2e as E  # noqa: E402

#: Kinds of kernel by (lower-case) name fragments, first match wins. All-reduce covers NCCL,
#: SGLang's custom all-reduce, torch symmetric memory and NVRAR's Triton kernels.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("all-reduce", ("allreduce", "all_reduce", "cross_device_reduce", "lamport", "oneshot",
                    "twoshot", "one_shot", "two_shot", "hier_kernel", "nvrar")),
    ("other collective", ("nccldevkernel", "allgather", "all_gather")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "splitk", "triton_mm")),
    # before attention: flashinfer's norms are flashinfer::norm::... (the twentieth session's
    # trace, benchmarks/results/sglang_kernels_tp4_h100_2026-11-27h.md, counted them as
    # attention)
    ("norm", ("rmsnorm", "layernorm", "norm")),
    ("attention", ("attn", "attention", "_fwd_", "decode_kernel", "flash")),
)
#: A gap longer than this between two kernels is the host's (between graph replays), not the
#: graph's: reported apart.
HOST_GAP_US = 50.0


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, frags in KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def read_trace(path: Path) -> list[tuple[str, float, float]]:
    """The GPU kernels of a chrome trace (torch profiler export, ``.json`` or ``.json.gz``):
    (name, start µs, duration µs), by start time."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    events = doc.get("traceEvents", doc) if isinstance(doc, dict) else doc
    out = [(str(e.get("name", "?")), float(e["ts"]), float(e.get("dur", 0.0)))
           for e in events
           if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") == "kernel"
           and "ts" in e]
    out.sort(key=lambda k: k[1])
    return out


def short(name: str, width: int = 60) -> str:
    """A kernel name without its template arguments and parameter list, cut to ``width``.
    (SGLang's custom all-reduce lives in an anonymous namespace: its kernels read
    ``void (anonymous namespace)::cross_device_reduce...``.)"""
    name = name.replace("(anonymous namespace)::", "")
    for sep in ("(", "<"):
        if sep in name and name.index(sep) > 0:
            name = name[:name.index(sep)]
    name = name.removeprefix("void ")
    return name if len(name) <= width else name[:width - 1] + "…"


def step_stats(kernels: list[tuple[str, float, float]], steps: int,
               top: int = 12) -> dict[str, Any]:
    """Per decode step: period, busy and idle time, time by kind, the all-reduce kernels and
    their neighbours, the heaviest kernels (µs). ``kernels`` as ``read_trace`` returns them."""
    if not kernels or steps < 1:
        return {"steps": steps, "kernels": 0}
    start = kernels[0][1]
    end = max(ts + dur for _, ts, dur in kernels)
    busy = idle_graph = idle_host = 0.0
    reach = start  # the end of the kernels so far (kernels may overlap under PDL)
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, ts, dur in kernels:
        if ts > reach:
            gap = ts - reach
            if gap > HOST_GAP_US:
                idle_host += gap
            else:
                idle_graph += gap
        busy += max(0.0, ts + dur - max(ts, reach))
        reach = max(reach, ts + dur)
        by_kind[kind_of(name)] += dur
        by_name[short(name)].append(dur)
    ars = [i for i, (name, _, _) in enumerate(kernels) if kind_of(name) == "all-reduce"]
    before, after, next_dur, span = [], [], [], []
    next_names: Counter[str] = Counter()
    for i in ars:
        name, ts, dur = kernels[i]
        if i > 0:
            p = kernels[i - 1]
            gap = ts - (p[1] + p[2])
            if gap <= HOST_GAP_US:
                before.append(gap)
        if i + 1 < len(kernels):
            n = kernels[i + 1]
            gap = n[1] - (ts + dur)
            if gap <= HOST_GAP_US:
                after.append(gap)
                next_dur.append(n[2])
                span.append(n[1] + n[2] - ts)
                next_names[short(n[0], 40)] += 1
    ar_durs = [kernels[i][2] for i in ars]
    heavy = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "steps": steps,
        "kernels": len(kernels),
        "period_us": (end - start) / steps,
        "busy_us": busy / steps,
        "idle_in_graph_us": idle_graph / steps,
        "idle_between_us": idle_host / steps,
        "by_kind_us": {k: v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "allreduce": {
            "per_step": len(ars) / steps,
            "mean_us": statistics.fmean(ar_durs) if ar_durs else None,
            "median_us": statistics.median(ar_durs) if ar_durs else None,
            "names": dict(Counter(short(kernels[i][0], 40) for i in ars)),
            "gap_before_us": statistics.median(before) if before else None,
            "gap_after_us": statistics.median(after) if after else None,
            "next_mean_us": statistics.fmean(next_dur) if next_dur else None,
            "next_median_us": statistics.median(next_dur) if next_dur else None,
            # from the all-reduce's start to the end of the kernel after it: the pair as one,
            # whatever programmatic dependent launch lets them overlap
            "span_median_us": statistics.median(span) if span else None,
            "next_names": dict(next_names.most_common(3)),
        },
        "top": [{"name": n, "per_step": len(d) / steps, "mean_us": statistics.fmean(d),
                 "per_step_us": sum(d) / steps} for n, d in heavy],
    }


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def tables(doc: dict[str, Any]) -> list[str]:
    """The report: one summary table over every config, batch size and rank, then the
    all-reduce neighbours and the heaviest kernels of rank 0."""
    card = doc.get("card", {})
    lines = [f"# Decode kernels, TP={doc.get('tp')}, {card.get('gpu')} x{card.get('gpus')}",
             "", f"{doc.get('date')}; {doc.get('steps')} decode steps per batch size; µs per "
             "decode step unless said (steps = trace window / steps).", ""]
    kinds = ["all-reduce", "gemm", "attention", "norm", "other collective", "other"]
    lines += ["| config | bs | rank | period | busy | idle in graph | idle between | "
              + " | ".join(kinds) + " | ARs/step | AR mean | AR median | gap before | gap after "
              "| next kernel mean | next kernel median | AR start to next end, median |",
              "|---" * (13 + len(kinds)) + "|"]
    for config, per_bs in doc.get("configs", {}).items():
        if "error" in per_bs:
            lines.append(f"| {config} | - | - | {per_bs['error']} |")
            continue
        for bs, ranks in per_bs.items():
            for rank, s in sorted(ranks.items(), key=lambda kv: int(kv[0])):
                if not s.get("kernels"):
                    lines.append(f"| {config} | {bs} | {rank} | no kernels in the trace |")
                    continue
                a = s["allreduce"]
                lines.append(
                    f"| {config} | {bs} | {rank} | {_f(s['period_us'])} | {_f(s['busy_us'])} | "
                    f"{_f(s['idle_in_graph_us'])} | {_f(s['idle_between_us'])} | "
                    + " | ".join(_f(s["by_kind_us"].get(k)) for k in kinds)
                    + f" | {_f(a['per_step'])} | {_f(a['mean_us'], 2)} | {_f(a['median_us'], 2)}"
                    f" | {_f(a['gap_before_us'], 2)} | {_f(a['gap_after_us'], 2)} | "
                    f"{_f(a['next_mean_us'], 2)} | {_f(a.get('next_median_us'), 2)} | "
                    f"{_f(a.get('span_median_us'), 2)} |")
    lines += ["", "Rank 0: the all-reduce kernels and what follows them; the heaviest kernels.", ""]
    for config, per_bs in doc.get("configs", {}).items():
        for bs, ranks in per_bs.items() if "error" not in per_bs else ():
            s = ranks.get("0") or next(iter(ranks.values()), {})
            if not s.get("kernels"):
                continue
            a = s["allreduce"]
            lines.append(f"- {config}, bs {bs}: all-reduce {a['names']}; next "
                         f"{a['next_names']}")
            for t in s["top"]:
                lines.append(f"  - {t['name']}: {t['per_step']:.1f}/step x {t['mean_us']:.2f} "
                             f"= {t['per_step_us']:.1f} µs/step")
    return lines


# ---------------------------------------------------------------------------------------------
# Worker: one engine, one config, a decode trace per batch size


def _traces(folder: Path, tp: int) -> dict[int, Path] | None:
    """Every rank's decode trace in ``folder`` (SGLang names them ...TP-<rank>-DECODE...)."""
    found: dict[int, Path] = {}
    for r in range(tp):
        hits = sorted(folder.glob(f"*TP-{r}-DECODE.trace.json*"))
        if not hits:
            return None
        found[r] = hits[-1]
    return found


def worker(args: argparse.Namespace) -> int:
    import sglang

    config = args.worker
    problem = E._plugin_problem(config)
    if problem:
        print(f"[kernels] {config}: the artune plugin would not be active: {problem}", flush=True)
        return 3
    kw = E._engine_kwargs(args, args.model_dir, config)
    engine = sglang.Engine(**kw)
    try:
        for bs in args.batch_sizes:
            folder = Path(args.trace_dir) / config / f"bs{bs}"
            folder.mkdir(parents=True, exist_ok=True)
            prompts = E._prompts(bs, args.input_len)
            E._generate(engine, prompts, 32)  # warm-up
            engine.start_profile(output_dir=str(folder), num_steps=args.steps,
                                 profile_by_stage=True, activities=["GPU"],
                                 profile_id=f"{config}-bs{bs}")
            E._generate(engine, prompts, args.steps + 16)
            deadline = time.monotonic() + 120
            while _traces(folder, args.tp) is None and time.monotonic() < deadline:
                time.sleep(1)
            print(f"[kernels] {config}: bs {bs}: "
                  f"{'traced' if _traces(folder, args.tp) else 'NO TRACE'}", flush=True)
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--profile", default=os.environ.get("ARTUNE_PROFILE"))
    p.add_argument("--configs", default="default,artune_nccl,nccl")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--steps", type=int, default=32, help="decode steps traced per batch size")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--mem", type=float, default=0.6)
    p.add_argument("--timeout", type=float, default=300, help="seconds per config")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--out", default=None)
    p.add_argument("--from-traces", default=None, metavar="DIR",
                   help="only read the traces already in DIR (<config>/bs<N>/) and report")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trace-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.new_tokens = args.steps + 16  # read by the engine settings of sglang_e2e
    if args.worker:
        return worker(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in E.CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {', '.join(E.CONFIGS)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if any(E.CONFIGS[c]["artune"] for c in configs) and not args.from_traces:
        if not args.profile or not Path(args.profile).is_file():
            p.error(f"the artune configs need --profile (an existing file), got {args.profile!r}")
        args.profile = str(Path(args.profile).resolve())
    out = Path(args.out or f"kernels_tp{args.tp}.json")
    doc: dict[str, Any] = {
        "tp": args.tp, "steps": args.steps, "card": E._card(), "profile": args.profile,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv), "configs": {}}
    trace_dir = Path(args.from_traces or tempfile.mkdtemp(prefix="artune_kernels_"))
    model_dir = tempfile.mkdtemp(prefix="artune_kernels_llama_")
    (Path(model_dir) / "config.json").write_text(json.dumps(E.LLAMA_31_8B, indent=1))
    for config in configs:
        if not args.from_traces:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", config,
                   "--model-dir", model_dir, "--trace-dir", str(trace_dir), "--tp", str(args.tp),
                   "--batch-sizes", ",".join(map(str, args.batch_sizes)),
                   "--steps", str(args.steps), "--input-len", str(args.input_len),
                   "--mem", str(args.mem), "--log-level", args.log_level]
            print(f"[kernels] {config}: starting", flush=True)
            rc, _ = E._run_worker(cmd, E._worker_env(args, config, model_dir), args.timeout)
            if rc != 0:
                print(f"[kernels] {config}: worker exit {rc}", flush=True)
        per_bs: dict[str, Any] = {}
        for bs in args.batch_sizes:
            found = _traces(trace_dir / config / f"bs{bs}", args.tp)
            if found:
                per_bs[str(bs)] = {str(r): step_stats(read_trace(f), args.steps)
                                   for r, f in found.items()}
        doc["configs"][config] = per_bs or {"error": "no decode trace"}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    lines = tables(doc)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[kernels] traces in {trace_dir}; results {out} and {out.with_suffix('.md')}")
    return 0 if all("error" not in v for v in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
