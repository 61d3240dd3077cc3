"""A row-parallel linear layer and its all-reduce: cuBLAS's GEMM then the all-reduce, against
NVRAR's one kernel for both (``NvrarComm.linear_all_reduce``).

    torchrun --nproc-per-node 4 benchmarks/linear_ar.py --shapes 1024x4096,3584x4096 \
        --rows 1,4,16,64 [--variants 32x256,16x256,64x128,32x256s4p] \
        --out benchmarks/results/linear_ar.md

Every tensor-parallel all-reduce of a Llama layer follows a row-parallel GEMM: the attention
output projection (K = 4096 / TP) and the MLP down projection (K = 14336 / TP), N = 4096 for
Llama-3.1-8B. At decode sizes both are latency: cuBLAS runs a split-K GEMM (and its reduce
kernel) for the small one, then the all-reduce is a kernel of its own. Columns, µs per call
(CUDA-graph replay, bf16, slowest rank's median, the same number of calls per replay for every
column; each call reads one of several weight copies in turn, more bytes than the L2 holds, so
the weights come from HBM as in a served model):

- ``gemm``: ``torch.nn.functional.linear`` alone (cuBLAS), no all-reduce;
- ``gemm + sglang``: then SGLang's own all-reduce (its custom all-reduce inside its
  graph_capture): what a served model runs today;
- ``gemm + nvrar``: then NVRAR's all-reduce at its defaults;
- ``fused BNxBK``: ``linear_all_reduce`` with block_n = BN output columns per CTA and block_k =
  BK; ``fused BNxBKp``: the same with ``prefetch=1`` (each CTA asks L2 for its weight rows
  before waiting for the kernel before it; here that is the previous call); ``fused BNxBKsS``:
  with the K loop pipelined S deep (``stages``, 3 unless given).

Every column is checked first against the fp32 sum over the ranks of x @ weight.T (and
identical bits on every rank); a wrong one is reported, never timed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from allreduce import (  # noqa: E402
    _time,
    best_gap,
    bits_digest,
    cell,
    finish,
    notes_block,
    rank_verdict,
    start_ranks,
)

from artune import backends as registry  # noqa: E402
from artune.backends.base import BackendUnavailable  # noqa: E402

#: Weight copies per shape: more bytes than an H100's or H200's L2 (50 / 60 MB).
L2_BYTES = 64 << 20


def _check(y: torch.Tensor, want: torch.Tensor, cpu_group: Any) -> str | None:
    """None when ``y`` matches the fp32 reference within bf16 rounding on every rank and every
    rank holds the same bits; the same verdict on every rank."""
    off = (y.float() - want).abs().max().item()
    err = None if off <= 2e-2 * max(want.abs().max().item(), 1.0) else f"off by {off:.3g}"
    return rank_verdict(err, bits_digest(y), cpu_group)


def parse_variant(spec: str) -> tuple[int, int, int, int]:
    """(block_n, block_k, stages, prefetch) of a ``--variants`` entry ``BNxBK[sS][p]``."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:s(\d+))?(p?)", spec)
    if not m:
        raise SystemExit(f"--variants: {spec!r} is not BNxBK[sS][p] (e.g. 32x256, 32x256s4p)")
    return int(m[1]), int(m[2]), int(m[3] or 3), int(bool(m[4]))


def _column(col: str, built: dict[str, Any], x: torch.Tensor,
            ws: list[torch.Tensor]) -> tuple[Any, Any, str | None]:
    """(call(i) -> the output for weight copy i, capture context, why not) of a column; call is
    None where the column cannot run."""
    y = torch.empty(x.shape[0], ws[0].shape[0], dtype=x.dtype, device=x.device)
    if col == "gemm":
        return (lambda i: torch.matmul(x, ws[i].t(), out=y)), contextlib.nullcontext, None
    if col.startswith("fused "):
        be = built.get("nvrar")
        bn, bk, stages, pf = parse_variant(col.removeprefix("fused "))
        why = ("nvrar not built" if be is None
               else be.comm.linear_problem(x, ws[0], y, bn, bk, stages))
        if why:
            return None, None, why
        return ((lambda i: be.comm.linear_all_reduce(x, ws[i], y, bn, bk, stages=stages,
                                                     prefetch=pf)),
                be.capture, None)
    be = built.get(col.removeprefix("gemm + "))
    if be is None or not be.supports(y):
        return None, None, None
    return (lambda i: be.all_reduce(F.linear(x, ws[i]))), be.capture, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1024x4096,3584x4096", metavar="KxN,...")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--variants", default="32x256,16x256,64x128", metavar="BNxBK[sS][p],...")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    for v in args.variants.split(","):
        parse_variant(v)  # a typo stops here, before any rank starts
    columns = ["gemm", "gemm + sglang", "gemm + nvrar",
               *(f"fused {v}" for v in args.variants.split(","))]
    dtype = torch.bfloat16
    ctx = start_ranks(max(rows_list) * max(n for _, n in shapes) * 2)
    rank, world, cpu_group, dev = ctx.rank, ctx.world_size, ctx.cpu_group, ctx.device
    built: dict[str, Any] = {}
    notes: list[str] = []
    for name in ("sglang", "nvrar"):
        try:
            built[name] = registry.load(name).create(ctx)
        except (BackendUnavailable, ImportError, RuntimeError) as exc:
            notes.append(f"{name}: not run ({str(exc).splitlines()[0][:160]})")

    results: dict[tuple[str, int, int], float | str] = {}
    for k, n in shapes:
        copies = max(2, -(-L2_BYTES // (k * n * 2)))
        g = torch.Generator(device=dev).manual_seed(1000 * k + rank)
        ws = [(torch.randn(n, k, device=dev, generator=g) / k**0.5).to(dtype)
              for _ in range(copies)]
        for rows in rows_list:
            x = torch.randn(rows, k, device=dev, generator=g).to(dtype)
            want = x.float() @ ws[0].float().t()
            dist.all_reduce(want, group=ctx.group)
            for col in columns:
                call, capture, why = _column(col, built, x, ws)
                if call is None:
                    results[(col, k, rows)] = "n/a"
                    if why:
                        notes.append(f"{col} K={k} {rows} rows: {why}")
                    continue
                if col != "gemm":
                    y = call(0).clone()
                    torch.cuda.synchronize()
                    bad = _check(y, want, cpu_group)
                    if bad:
                        results[(col, k, rows)] = "WRONG"
                        notes.append(f"{col} K={k} {rows} rows: {bad}")
                        continue
                turn = [0]

                def step(c: Any = call, t: list[int] = turn, nc: int = copies) -> Any:
                    t[0] += 1
                    return c(t[0] % nc)
                results[(col, k, rows)] = _time(step, capture, x, "graph", args.reps, cpu_group)
            if rank == 0:
                print(f"  K={k} N={n} {rows} rows done", flush=True)

    text = None
    if rank == 0:
        card = torch.cuda.get_device_name(dev)
        lines = [f"# Row-parallel linear + all-reduce, {world}x {card}", "",
                 f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
                 f"{torch.__version__}, bf16; µs per call, slowest rank's median over CUDA-graph "
                 f"replays; weights cycled through copies of {L2_BYTES >> 20} MiB or more.", "",
                 "| K x N | rows | " + " | ".join(columns) + " | best fused vs gemm + sglang |",
                 "|---" * (len(columns) + 3) + "|"]
        for k, n in shapes:
            for rows in rows_list:
                cells = [cell(results.get((c, k, rows), "n/a")) for c in columns]
                gap = best_gap([results.get((c, k, rows)) for c in columns
                                if c.startswith("fused")], results.get(("gemm + sglang", k, rows)))
                lines.append(f"| {k} x {n} | {rows} | " + " | ".join(cells) + f" | {gap} |")
        text = "\n".join([*lines, "", *notes_block(notes)])
    finish(text, args.out, built)


if __name__ == "__main__":
    main()
