"""The decode step's all-reduce + residual add + RMSNorm: unfused against NVRAR's fused kernel.

    torchrun --nproc-per-node 4 benchmarks/fused_norm.py --hidden 4096 --rows 1,4,16,64 \
        [--context-gemm 3584,4096] --out benchmarks/results/fused_norm_4gpu.md

In a Llama layer every tensor-parallel all-reduce is followed by SGLang's fused add + RMSNorm
(``sgl_kernel.fused_add_rmsnorm``: residual += x; x = RMSNorm(residual) * weight). At decode
sizes the all-reduce and that norm each cost about a kernel's floor in a CUDA graph, so one
kernel for both (``NvrarComm.fused_add_rmsnorm``: NVRAR's lamport one-shot with the add and the
norm in its epilogue, rows cut into slices by ``fused_plan``) was the change that could put a
served model below SGLang's default (docs/nvrar.md: on 4x H100 it is 0.4-0.6 µs ahead at 1-2
rows only). Columns, µs per call (CUDA-graph replay, bf16, slowest
rank's median, the same number of calls per replay for every column):

- ``norm alone``: the norm kernel by itself;
- ``sglang + norm``: SGLang's own all-reduce (its custom all-reduce inside its graph_capture),
  then the norm: what a served Llama runs today;
- ``nvrar + norm``: NVRAR's all-reduce at its defaults, then the norm;
- ``fused, CTA per row``: the fused kernel with each row one chunk on one CTA (``block`` =
  hidden; the first version's shape: 1.5 µs slower than the default plan's 8 CTAs of 512
  elements for the plain one-shot at 8K, 4x H100, benchmarks/results/fused_norm_4gpu_h100_
  2026-11-27h2.md);
- ``nvrar fused``: the fused kernel as ``fused_plan`` cuts the rows (slices of 512 elements,
  one CTA each, exchanging their partial sums of squares).

Every column is checked first against NCCL's fp32 sum plus the residual, normed in fp32 (and
identical bits on every rank); a wrong one is reported, never timed. Without ``sgl_kernel`` the
norm is torch's (several kernels; said in the table's title). ``--context-gemm K,N`` puts the
decode step's GEMM before every call, as ``benchmarks/allreduce.py`` does, and subtracts it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from allreduce import (  # noqa: E402
    _gemm,
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

EPS = 1e-5
COLUMNS = ("norm alone", "sglang + norm", "nvrar + norm", "fused, CTA per row", "nvrar fused")


def _norm_kernel() -> tuple[Any, str]:
    """SGLang's fused add + RMSNorm (in place on both), or torch's stand-in."""
    try:
        from sgl_kernel import fused_add_rmsnorm

        return (lambda x, r, w: fused_add_rmsnorm(x, r, w, EPS)), "sgl_kernel.fused_add_rmsnorm"
    except ImportError:
        def torch_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> None:
            h = x.float() + r.float()
            r.copy_(h)
            x.copy_(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.float())
        return torch_norm, "torch (sgl_kernel not importable)"


def _reference(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor,
               group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.float()
    dist.all_reduce(s, group=group)
    h = s.to(x.dtype).float() + res.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.float(), h


def _check(out: torch.Tensor, res: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor],
           cpu_group: Any) -> str | None:
    """None when ``out``/``res`` match the fp32 reference within bf16 rounding and every rank
    holds the same bits; the same verdict on every rank."""
    o, h = want
    err = None
    scale = max(o.abs().max().item(), 1.0)
    if not (out.float() - o).abs().max().item() <= 3e-2 * scale:
        err = f"output off by {(out.float() - o).abs().max().item():.3g}"
    elif not (res.float() - h).abs().max().item() <= 3e-2 * max(h.abs().max().item(), 1.0):
        err = f"residual off by {(res.float() - h).abs().max().item():.3g}"
    return rank_verdict(err, (bits_digest(out), bits_digest(res)), cpu_group)


def _column(col: str, built: dict[str, Any], norm: Any, w: torch.Tensor, x: torch.Tensor,
            res: torch.Tensor) -> tuple[Any, Any, str | None]:
    """(call(x, res) -> the output or None when in place, capture context, why not) of a
    column; call is None where the column cannot run."""
    if col == "norm alone":
        return (lambda a, r: norm(a, r, w)), contextlib.nullcontext, None
    if col in ("nvrar fused", "fused, CTA per row") or col.startswith("fused block "):
        be = built.get("nvrar")
        block = x.shape[-1] if col == "fused, CTA per row" else None
        if col.startswith("fused block "):
            block = int(col.removeprefix("fused block "))
        why = "nvrar not built" if be is None else be.comm.fused_problem(x, res, w, block)
        if why:
            return None, None, why
        return ((lambda a, r: be.comm.fused_add_rmsnorm(a, r, w, EPS, block)), be.capture,
                None)
    be = built.get(col.split(" ")[0])
    if be is None or not be.supports(x):
        return None, None, None

    def unfused(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y = be.all_reduce(a)
        norm(y, r, w)
        return y
    return unfused, be.capture, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context-gemm", default=None, metavar="K,N")
    ap.add_argument("--out", default=None)
    ap.add_argument("--blocks", default=None, metavar="B,B,...",
                    help="instead of the usual columns: SGLang's all-reduce + norm and the fused "
                         "kernel with each of these slices per CTA (fused_plan's choice aside)")
    args = ap.parse_args()
    columns = COLUMNS if not args.blocks else ("sglang + norm", *(
        f"fused block {int(b)}" for b in args.blocks.split(",")))
    rows_list = [int(r) for r in args.rows.split(",")]
    gemm_kn = tuple(int(v) for v in args.context_gemm.split(",")) if args.context_gemm else None
    dtype = torch.bfloat16
    ctx = start_ranks(max(rows_list) * args.hidden * 2)  # one node: the fused kernel needs it
    rank, world, cpu_group = ctx.rank, ctx.world_size, ctx.cpu_group
    norm, norm_name = _norm_kernel()
    built: dict[str, Any] = {}
    notes: list[str] = []
    for name in ("sglang", "nvrar"):
        try:
            built[name] = registry.load(name).create(ctx)
        except (BackendUnavailable, ImportError, RuntimeError) as exc:
            notes.append(f"{name}: not run ({str(exc).splitlines()[0][:160]})")

    results: dict[tuple[str, int], float | str] = {}
    dev = ctx.device
    for rows in rows_list:
        g = torch.Generator(device=dev).manual_seed(rows)  # residual, weight: same on all ranks
        res0 = torch.randn(rows, args.hidden, device=dev, generator=g).to(dtype)
        w = (1 + 0.25 * torch.randn(args.hidden, device=dev, generator=g)).to(dtype)
        mine = torch.Generator(device=dev).manual_seed(1000 * rows + rank)
        x0 = torch.randn(rows, args.hidden, device=dev, generator=mine).to(dtype)
        want = _reference(x0, res0, w, ctx.group)
        gemm, gemm_us = None, 0.0
        if gemm_kn is not None:
            gemm = _gemm(gemm_kn, x0.numel() * 2, dtype, dev)
            gemm_us = _time(gemm, contextlib.nullcontext, x0, "graph", args.reps, cpu_group)
            results[("gemm alone", rows)] = gemm_us
        for col in columns:
            x, res = x0.clone(), res0.clone()
            call, capture, why = _column(col, built, norm, w, x, res)
            if call is None:
                results[(col, rows)] = "n/a"
                if why:
                    notes.append(f"{col} {rows} rows: {why}")
                continue
            if col != "norm alone":  # checked on fresh copies, then timed on others
                cx, cres = x0.clone(), res0.clone()
                out = call(cx, cres)
                torch.cuda.synchronize()
                bad = _check(cx if out is None else out, cres, want, cpu_group)
                if bad:
                    results[(col, rows)] = "WRONG"
                    notes.append(f"{col} {rows} rows: {bad}")
                    continue
            if gemm is None:
                results[(col, rows)] = _time(lambda c=call, a=x, r=res: c(a, r), capture, x,
                                             "graph", args.reps, cpu_group)
            else:
                results[(col, rows)] = _time(lambda c=call, a=x, r=res, gm=gemm: (gm(), c(a, r)),
                                             capture, x, "graph", args.reps, cpu_group) - gemm_us
        if rank == 0:
            print(f"  {rows} rows done", flush=True)

    text = None
    if rank == 0:
        card = torch.cuda.get_device_name(ctx.device)
        cols = (["gemm alone"] if gemm_kn else []) + list(columns)
        lines = [f"# All-reduce + residual add + RMSNorm, {world}x {card}", "",
                 f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
                 f"{torch.__version__}, bf16, hidden {args.hidden}; norm: {norm_name}; µs per "
                 "call, slowest rank's median over CUDA-graph replays.", ""]
        if gemm_kn:
            lines += [f"In context: every call after a [rows, {gemm_kn[0]}] x [{gemm_kn[0]}, "
                      f"{gemm_kn[1]}] GEMM; each column is the time per call minus 'gemm "
                      "alone'.", ""]
        lines += ["| rows | bytes | " + " | ".join(cols) + " | best fused vs sglang + norm |",
                  "|---" * (len(cols) + 3) + "|"]
        for rows in rows_list:
            cells = [cell(results.get((c, rows), "n/a")) for c in cols]
            gap = best_gap([results.get((c, rows)) for c in columns if "fused" in c],
                           results.get(("sglang + norm", rows)))
            lines.append(f"| {rows} | {rows * args.hidden * 2 // 1024}K | " + " | ".join(cells)
                         + f" | {gap} |")
        text = "\n".join([*lines, "", *notes_block(notes)])
    finish(text, args.out, built)


if __name__ == "__main__":
    main()
