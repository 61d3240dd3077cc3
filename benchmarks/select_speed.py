"""Time ``artune.select()`` on the CPU (target: under 2 µs per call).

    python benchmarks/select_speed.py [--out benchmarks/results/select_speed.md]

Uses a profile with many ranges (every power of two and midpoint from 1 KB to 256 MB, three
dtypes, two modes) and message sizes drawn at random, dtypes given as torch.dtype objects, as
the SGLang hook passes them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from artune.autotune.table import build_profile  # noqa: E402
from artune.profile import Profile, select  # noqa: E402


def _profile() -> Profile:
    sizes = sorted({1 << k for k in range(10, 29)} | {3 << k for k in range(9, 27)})
    ms = []
    rng = random.Random(0)
    for dtype in ("bfloat16", "float16", "float32"):
        for mode in ("graph", "eager"):
            for s in sizes:
                for b in ("nccl", "symm_one_shot", "symm_two_shot", "nvrar"):
                    ms.append({"backend": b, "params": {}, "dtype": dtype, "mode": mode,
                               "nbytes": s, "latency_us": rng.uniform(5, 50), "spread_us": 0.0})
    fp = {"topology": {"device": "cuda"}, "versions": {}}
    return Profile(build_profile(ms, [], fingerprint=fp, command="bench", dry_run=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()
    prof = _profile()
    nranges = sum(len(r) for m in prof.tables.values() for r in m.values())
    rng = random.Random(1)
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    queries = [(rng.randint(1, 256 << 20), rng.choice(dtypes), rng.choice(("graph", "eager")))
               for _ in range(4096)]
    for q in queries[:100]:
        select(prof, *q)
    per_call = []
    for _ in range(5):
        t0 = time.perf_counter()
        n = 0
        while n < args.calls:
            for nbytes, dtype, mode in queries:
                select(prof, nbytes, dtype, mode)
            n += len(queries)
        per_call.append((time.perf_counter() - t0) / n * 1e6)
    med = statistics.median(per_call)
    lines = [
        f"# select() speed — {dt.date.today()}",
        "",
        f"CPU: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}; profile with {nranges} ranges; {args.calls} calls x 5.",
        "",
        "| statistic | µs per call |",
        "|---|---|",
        f"| median of 5 | {med:.3f} |",
        f"| min / max | {min(per_call):.3f} / {max(per_call):.3f} |",
        "",
        f"Target: < 2 µs per call — {'met' if med < 2.0 else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
