"""GPU time per kernel in the decode graphs, from SGLang's profiler traces: which kernels make
two engines' decode steps differ.

``sglang_e2e.py --paired A,B --profile-bs 4`` has each engine, after its timing and check, run
one generate of ``PROFILE_TOKENS`` tokens at that batch size under SGLang's profiler
(``Engine.start_profile(activities=["GPU"])``), one Chrome trace per TP rank. Here those traces
become a table: per kernel name, GPU µs per decode step (the median over the ranks), counting
only kernels that CUDA-graph launches ran (their correlation id is a ``cudaGraphLaunch``'s), so
the eager prefill is left out; and, per rank, one replay's span on the GPU split into the time
some kernel or copy ran, the gaps between them and the kernels that ran at once (a kernel
launched early with programmatic dependent launch waits inside its own duration, so the kernels'
µs can add up to more than the replay). Run on its own, it compares two engines' trace folders:

    python benchmarks/kernel_table.py DIR_A DIR_B --steps 31
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: Tokens of the profiled generate: PROFILE_TOKENS - 1 decode steps.
PROFILE_TOKENS = 32


def _events(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    return list(doc.get("traceEvents", []) if isinstance(doc, dict) else doc)


#: Chrome-trace categories of the GPU work a graph replay runs besides kernels
_OTHER_NODES = ("gpu_memcpy", "gpu_memset")


def _graph_launches(events: list[dict[str, Any]]) -> set[Any]:
    """The correlation ids of the trace's graph launches (``cudaGraphLaunch``, with or without
    a version suffix, or the driver's ``cuGraphLaunch``)."""
    launches = {e.get("args", {}).get("correlation") for e in events
                if str(e.get("name", "")).startswith(("cudaGraphLaunch", "cuGraphLaunch"))}
    launches.discard(None)
    return launches


def graph_kernels(path: Path, events: list[dict[str, Any]] | None = None,
                  ) -> tuple[dict[str, list[float]], bool]:
    """One trace's kernels (``events``, read from ``path`` when not given): name -> durations
    (µs) of the kernels graph launches ran, and True; or of every kernel and False when the
    trace has no graph launch."""
    events = _events(path) if events is None else events
    launches = _graph_launches(events)
    out: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "kernel" or e.get("ph") != "X":
            continue
        if launches and e.get("args", {}).get("correlation") not in launches:
            continue
        out.setdefault(str(e.get("name")), []).append(float(e.get("dur", 0.0)))
    return out, bool(launches)


def replay_spans(path: Path, events: list[dict[str, Any]] | None = None,
                 ) -> dict[str, float] | None:
    """One trace's typical decode-graph replay on the GPU: of its graph launches, the one
    with the median span (the upper one of an even count), in µs: ``span`` (first node's start
    to last node's end), ``busy`` (the time some kernel or copy ran: the union of their
    intervals), ``idle`` (span - busy: the gaps between nodes), ``overlap`` (the nodes' summed
    durations - busy: kernels running at once, e.g. one launched early with programmatic
    dependent launch and waiting), ``other`` (its memcpy and memset nodes' µs), all of that
    one replay, so they add up; and ``replays``. None where the trace has no graph launch or no
    timestamps."""
    events = _events(path) if events is None else events
    launches = _graph_launches(events)
    nodes: dict[Any, list[tuple[float, float, bool]]] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", *_OTHER_NODES) or "ts" not in e:
            continue
        corr = e.get("args", {}).get("correlation")
        if corr in launches:
            nodes.setdefault(corr, []).append((float(e["ts"]), float(e.get("dur", 0.0)),
                                               e.get("cat") != "kernel"))
    if not nodes:
        return None
    runs = []
    for run in nodes.values():
        run.sort()
        busy, end = 0.0, run[0][0]
        for ts, dur, _ in run:  # the union of the intervals, in start order
            busy += max(0.0, ts + dur - max(ts, end))
            end = max(end, ts + dur)
        span = end - run[0][0]
        runs.append({"span": span, "busy": busy, "idle": span - busy,
                     "overlap": sum(d for _, d, _ in run) - busy,
                     "other": sum(d for _, d, other in run if other)})
    out = _median_by_span(runs)
    out["replays"] = float(len(nodes))
    return out


def _median_by_span(items: list[dict[str, float]]) -> dict[str, float]:
    """The item with the median ``span`` (the upper one of an even count), as a copy."""
    return dict(sorted(items, key=lambda r: r["span"])[len(items) // 2])


def trace_files(folder: str | Path) -> list[Path]:
    """The profiler traces under ``folder`` (SGLang writes ``...-TP-<rank>.trace.json.gz``)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.name.endswith((".trace.json", ".trace.json.gz")))


def table(folder: str | Path, steps: int) -> dict[str, Any]:
    """Per kernel name, over the folder's traces (one per rank): ``us`` per decode step and
    ``calls`` per step, the median over the ranks (a rank without the kernel counts 0), and
    ``us_min``, the rank with the fewest µs (of a kernel that waits for its peers, such as an
    all-reduce, the rank that arrived last waited least: its time is nearest the kernel's own);
    ``replays``: ``replay_spans`` of the rank with the median span (``median``) and of the
    rank with the least (``min``), each quantity beside the other, where the traces have
    timestamps; ``ranks``, and ``graphs_only`` (False if a trace had no graph launch to filter
    by). Each trace is read once."""
    files = trace_files(folder)
    if not files:
        raise ValueError(f"no profiler trace (*.trace.json[.gz]) under {folder}")
    events = [_events(f) for f in files]
    per_rank = [graph_kernels(f, ev) for f, ev in zip(files, events, strict=True)]
    names = sorted({n for k, _ in per_rank for n in k})
    kernels = {}
    for n in names:
        us = [sum(k.get(n, [])) / steps for k, _ in per_rank]
        calls = [len(k.get(n, [])) / steps for k, _ in per_rank]
        kernels[n] = {"us": statistics.median(us), "us_min": min(us),
                      "calls": statistics.median(calls)}
    out: dict[str, Any] = {"ranks": len(files), "steps": steps,
                           "graphs_only": all(g for _, g in per_rank), "kernels": kernels}
    spans = [s for s in (replay_spans(f, ev) for f, ev in zip(files, events, strict=True))
             if s is not None]
    if spans:
        mid, least = _median_by_span(spans), min(spans, key=lambda r: r["span"])
        out["replays"] = {k: {"median": mid[k], "min": least[k]} for k in mid}
        out["replays"]["ranks"] = len(spans)
    return out


def diff_lines(base: dict[str, Any], test: dict[str, Any], base_name: str, test_name: str,
               top: int = 12) -> list[str]:
    """The replays' span, busy and idle time on the GPU (where both tables have them), then a
    markdown table of the kernels whose µs per step differ most between two engines' tables
    (the median rank's µs, and the least over the ranks), and the totals."""
    kb, kt = base["kernels"], test["kernels"]
    names = sorted(set(kb) | set(kt),
                   key=lambda n: -abs(kt.get(n, {}).get("us", 0) - kb.get(n, {}).get("us", 0)))
    total_b = sum(v["us"] for v in kb.values())
    total_t = sum(v["us"] for v in kt.values())
    lines = [f"decode-graph kernels, µs per step ({test_name} vs {base_name}; total "
             f"{total_t:.1f} vs {total_b:.1f}, {total_t - total_b:+.1f}"
             + ("" if base["graphs_only"] and test["graphs_only"] else
                "; some traces without graph launches: every kernel counted") + "):",
             f"| kernel | {base_name} µs | least rank | calls | {test_name} µs | least rank "
             f"| calls | Δ µs |",
             "|---|---|---|---|---|---|---|---|"]
    none = {"us": 0.0, "us_min": 0.0, "calls": 0.0}
    for n in names[:top]:
        b, t = kb.get(n, none), kt.get(n, none)
        short = n if len(n) <= 60 else n[:57] + "..."
        lines.append(f"| `{short}` | {b['us']:.1f} | {b.get('us_min', b['us']):.1f} | "
                     f"{b['calls']:g} | {t['us']:.1f} | {t.get('us_min', t['us']):.1f} | "
                     f"{t['calls']:g} | {t['us'] - b['us']:+.1f} |")
    return replay_lines(base, test, base_name, test_name) + lines


def replay_lines(base: dict[str, Any], test: dict[str, Any], base_name: str,
                 test_name: str) -> list[str]:
    """One line per quantity of ``replay_spans`` (the median rank's, and the least over the
    ranks), the two engines side by side; none where a table has no replays."""
    rb, rt = base.get("replays"), test.get("replays")
    if not rb or not rt:
        return []
    lines = [f"one decode-graph replay on the GPU, µs ({base_name} -> {test_name}; the median "
             f"replay of the rank with the median span, of the rank with the least span in "
             f"brackets):"]
    for key, what in (("span", "first node's start to last node's end"),
                      ("busy", "some kernel or copy running"),
                      ("idle", "gaps between nodes"),
                      ("overlap", "kernels running at once"),
                      ("other", "memcpy and memset nodes")):
        b, t = rb[key], rt[key]
        lines.append(f"  {key:8s} {b['median']:8.1f} [{b['min']:.1f}] -> {t['median']:8.1f} "
                     f"[{t['min']:.1f}]  {t['median'] - b['median']:+.1f}  ({what})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base")
    p.add_argument("test")
    p.add_argument("--steps", type=int, default=PROFILE_TOKENS - 1)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    try:
        a, b = table(args.base, args.steps), table(args.test, args.steps)
    except ValueError as exc:
        print(f"kernel_table: {exc}", file=sys.stderr)
        return 2
    print("\n".join(diff_lines(a, b, Path(args.base).name, Path(args.test).name, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
