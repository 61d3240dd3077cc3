"""GPU time per kernel in the decode graphs, from SGLang's profiler traces: which kernels make
two engines' decode steps differ.

``sglang_e2e.py --paired A,B --profile-bs 4`` has each engine, after its timing and check, run
one generate of ``PROFILE_TOKENS`` tokens at that batch size under SGLang's profiler
(``Engine.start_profile(activities=["GPU"])``), one Chrome trace per TP rank. Here those traces
become a table: per kernel name, GPU µs per decode step (the median over the ranks), counting
only kernels that CUDA-graph launches ran (their correlation id is a ``cudaGraphLaunch``'s), so
the eager prefill is left out. Run on its own, it compares two engines' trace folders:

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


def graph_kernels(path: Path) -> tuple[dict[str, list[float]], bool]:
    """One trace's kernels: name -> durations (µs) of the kernels graph launches ran, and True;
    or of every kernel and False when the trace has no graph launch (``cudaGraphLaunch``, with
    or without a version suffix, or the driver's ``cuGraphLaunch``)."""
    events = _events(path)
    launches = {e.get("args", {}).get("correlation") for e in events
                if str(e.get("name", "")).startswith(("cudaGraphLaunch", "cuGraphLaunch"))}
    launches.discard(None)
    out: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "kernel" or e.get("ph") != "X":
            continue
        if launches and e.get("args", {}).get("correlation") not in launches:
            continue
        out.setdefault(str(e.get("name")), []).append(float(e.get("dur", 0.0)))
    return out, bool(launches)


def trace_files(folder: str | Path) -> list[Path]:
    """The profiler traces under ``folder`` (SGLang writes ``...-TP-<rank>.trace.json.gz``)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.name.endswith((".trace.json", ".trace.json.gz")))


def table(folder: str | Path, steps: int) -> dict[str, Any]:
    """Per kernel name, over the folder's traces (one per rank): ``us`` per decode step and
    ``calls`` per step, the median over the ranks (a rank without the kernel counts 0);
    ``ranks``, and ``graphs_only`` (False if a trace had no graph launch to filter by)."""
    files = trace_files(folder)
    if not files:
        raise ValueError(f"no profiler trace (*.trace.json[.gz]) under {folder}")
    per_rank = [graph_kernels(f) for f in files]
    names = sorted({n for k, _ in per_rank for n in k})
    kernels = {}
    for n in names:
        us = [sum(k.get(n, [])) / steps for k, _ in per_rank]
        calls = [len(k.get(n, [])) / steps for k, _ in per_rank]
        kernels[n] = {"us": statistics.median(us), "calls": statistics.median(calls)}
    return {"ranks": len(files), "steps": steps,
            "graphs_only": all(g for _, g in per_rank), "kernels": kernels}


def diff_lines(base: dict[str, Any], test: dict[str, Any], base_name: str, test_name: str,
               top: int = 12) -> list[str]:
    """A markdown table of the kernels whose µs per step differ most between two engines'
    tables, and the totals."""
    kb, kt = base["kernels"], test["kernels"]
    names = sorted(set(kb) | set(kt),
                   key=lambda n: -abs(kt.get(n, {}).get("us", 0) - kb.get(n, {}).get("us", 0)))
    total_b = sum(v["us"] for v in kb.values())
    total_t = sum(v["us"] for v in kt.values())
    lines = [f"decode-graph kernels, µs per step ({test_name} vs {base_name}; total "
             f"{total_t:.1f} vs {total_b:.1f}, {total_t - total_b:+.1f}"
             + ("" if base["graphs_only"] and test["graphs_only"] else
                "; some traces without graph launches: every kernel counted") + "):",
             f"| kernel | {base_name} µs | calls | {test_name} µs | calls | Δ µs |",
             "|---|---|---|---|---|---|"]
    for n in names[:top]:
        b, t = kb.get(n, {"us": 0.0, "calls": 0.0}), kt.get(n, {"us": 0.0, "calls": 0.0})
        short = n if len(n) <= 60 else n[:57] + "..."
        lines.append(f"| `{short}` | {b['us']:.1f} | {b['calls']:g} | {t['us']:.1f} | "
                     f"{t['calls']:g} | {t['us'] - b['us']:+.1f} |")
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
