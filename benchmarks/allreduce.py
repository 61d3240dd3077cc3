"""Every all-reduce backend side by side, in one run on one machine (CUDA-graph replay, bf16).

    torchrun --nproc-per-node 4 benchmarks/allreduce.py --sizes 4K:64M \
        --out benchmarks/results/allreduce_4gpu.md [--profile profiles/X.json] \
        [--backends nccl,symm_one_shot,...] [--ranks-per-node 2] [--modes graph,eager]

Times NCCL, PyTorch symmetric-memory one-shot/two-shot, nvshmem4py's reduce, SGLang's own
custom all-reduce (its GroupCoordinator.all_reduce inside its graph_capture, when sglang is
importable), NVRAR, and with ``--profile`` the routed dispatch (select() + the chosen backend,
as the integration calls it). Every (backend, size) is checked against an fp32 reference before
it is timed; a wrong result is reported, never timed. Latency: each rank's median over
repetitions of a graph replay of many calls; the slowest rank counts. ``--ranks-per-node``
groups the GPUs into virtual nodes (emulation of the inter-node path; labelled as such).

``--context-gemm K,N`` times each all-reduce the way a decode step runs it: every call in the
captured graph is preceded by a GEMM ``[M, K] x [K, N]`` (M = size / (N x element size), the
batch of a decode step whose hidden size is N; e.g. ``3584,4096`` for Llama-3.1-8B's
down-projection at TP=4), and the table reports the graph's time per call minus that of the
GEMMs alone, measured the same way. On 4x H100 NVRAR cost about 3 µs more per all-reduce at
128K-512K inside a served model than this benchmark shows without the GEMMs (docs/nvrar.md);
this is the setting that should show it. It did not (4x H100, seventh session:
`allreduce_context_4gpu_h100.md`, docs/nvrar.md "Between GEMMs").

``--context-norm HIDDEN`` follows every call with what follows a decode all-reduce in SGLang:
its fused residual add + RMSNorm (``sgl_kernel.fused_add_rmsnorm``, launched with PDL on Hopper
as SGLang launches it) over the output as [size / HIDDEN, HIDDEN] rows (e.g. 4096), and reports
the graph's time per call minus that of the norms alone (and of the GEMMs, with both). Sizes
that are not whole rows are left out. In the 29th session's served model (4x H200, TP=4, bs 64)
that norm ended 1.5 µs later after NVRAR's two-shot under PDL than after SGLang's all-reduce,
which the bare benchmark cannot show (docs/nvrar.md, "PDL and the kernel after the two-shot").
On 2x H200 (30th session, `benchmarks/gpu_session_twoshot_pdl.sh`) this setting did not
reproduce that: there PDL made the two-shot faster at 512K, not slower.

``--variant BACKEND:K=V[,K=V]`` (repeatable) adds a column: the backend with those parameters
over its defaults, e.g. ``nvrar:algo=twoshot,proto=lamport,block=1024,ctas=128``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from artune import backends as registry  # noqa: E402
from artune.autotune.config import parse_sizes  # noqa: E402
from artune.autotune.gate import random_input  # noqa: E402
from artune.autotune.timing import Timer, calls_for, summarize  # noqa: E402
from artune.backends.base import Backend, BackendUnavailable, GroupContext  # noqa: E402
from artune.envs import NO_MULTICAST_ENV  # noqa: E402

DEFAULT_BACKENDS = "nccl,symm_one_shot,symm_two_shot,nvshmem_reduce,sglang,nvrar"
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _h(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


def rank_verdict(err: str | None, digest: Any, cpu_group: Any) -> str | None:
    """One verdict for every rank from each rank's own ``err`` (None: right) and ``digest`` of
    its output's bits: the first rank's error, else "ranks disagree bitwise" where the digests
    differ, else None."""
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, (digest, err), group=cpu_group)
    errs = [f"rank {r}: {e}" for r, (_, e) in enumerate(got) if e]
    if errs:
        return errs[0]
    return None if len({d for d, _ in got}) == 1 else "ranks disagree bitwise"


def bits_digest(t: torch.Tensor) -> int:
    """A sum of a 16-bit tensor's raw bits: equal on ranks holding the same bits."""
    return int(t.view(torch.int16).long().sum())


def cell(v: Any) -> str:
    """A table cell: µs to one decimal, or what a column that could not run holds ("n/a")."""
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def notes_block(notes: list[str]) -> list[str]:
    """The report's closing "Notes:" list (nothing without notes), each line ending blank."""
    return ["Notes:", *[f"- {n}" for n in notes], ""] if notes else []


def best_gap(candidates: list[Any], base: Any) -> str:
    """The best (lowest) float of ``candidates`` minus ``base`` as "+x.y µs", "-" where either
    is missing (a column that could not run holds a string)."""
    best = min((v for v in candidates if isinstance(v, float)), default=None)
    return f"{best - base:+.1f} µs" if best is not None and isinstance(base, float) else "-"


def _check(b: Any, x: torch.Tensor, ref: torch.Tensor, cpu_group: Any) -> str | None:
    """None when ``b`` (a callable) reduces ``x`` right and identically on every rank."""
    x0 = x.clone()
    try:
        out = b(x)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported, never timed
        err: str | None = f"raised {type(exc).__name__}: {exc}"[:200]
    else:
        scale = ref.abs().max().item() or 1.0
        diff = (out.float() - ref).abs().max().item() / scale
        digest = int(out.view(torch.uint8).to(torch.int64).sum().item()) if out.numel() else 0
        digests: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest, group=cpu_group)
        if not torch.equal(x, x0):
            err = "mutated its input"
        elif not diff <= TOL[x.dtype]:
            err = f"max rel error {diff:.3g} > {TOL[x.dtype]}"
        elif len(set(digests)) != 1:
            err = "ranks disagree bitwise"
        else:
            err = None
    errs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err, group=cpu_group)
    bad = [f"rank {r}: {e}" for r, e in enumerate(errs) if e]
    return bad[0] if bad else None


def _time(fn: Any, capture: Any, x: torch.Tensor, mode: str, reps: int, cpu_group: Any) -> float:
    """Slowest rank's median µs per call. Every backend gets the same number of calls per
    repetition at a given size (the most the graph pool allows, up to MAX_CALLS), so the fixed
    cost of a replay or a batch is spread equally thin for all of them. (A count derived from a
    synchronised eager call overstates each backend by a different share of the replay launch.)"""
    fn()  # one eager call first: lazy initialisation stays out of the capture
    torch.cuda.synchronize()
    calls = calls_for(1e-3, x.numel() * x.element_size(), "graph")
    with Timer(fn, mode=mode, device=x.device, calls=calls, capture=capture) as t:
        t.prepare(warmup=2)
        med, _ = summarize(t.sample(reps))
    meds: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(meds, med, group=cpu_group)
    return max(meds)


def _gemm(kn: tuple[int, int], nbytes: int, dtype: torch.dtype,
          device: torch.device) -> Any:
    """The decode-step GEMM before an all-reduce of ``nbytes``: [M, K] x [K, N] into a buffer of
    its own (the all-reduce's input stays the checked one; stream order still runs the GEMM
    first), M = nbytes / (N x element size), at least 1."""
    k, n = kn
    m = max(1, -(-nbytes // (n * torch.empty((), dtype=dtype).element_size())))
    a = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype) / k**0.5
    c = torch.empty(m, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, w, out=c)


def _norm(hidden: int, numel: int, dtype: torch.dtype, device: torch.device) -> Any:
    """SGLang's fused residual add + RMSNorm over ``numel`` elements as [numel / hidden, hidden]
    rows, with a residual and weight of its own: a callable on the all-reduce's output (which it
    overwrites, as in the model). None where ``numel`` is not a whole number of rows."""
    if numel % hidden:
        return None
    from sgl_kernel import fused_add_rmsnorm

    m = numel // hidden
    res = torch.zeros(m, hidden, device=device, dtype=dtype)
    w = torch.ones(hidden, device=device, dtype=dtype)
    return lambda t: fused_add_rmsnorm(t.view(m, hidden), res, w, 1e-6)


def context_args(gemm: str | None, norm: str | None) -> tuple[tuple[int, int] | None, int | None]:
    """``--context-gemm K,N`` and ``--context-norm HIDDEN`` parsed (None where not given); a
    clear exit on anything else."""
    kn = None
    if gemm is not None:
        parts = gemm.split(",")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit("--context-gemm takes K,N: two positive integers, e.g. 3584,4096")
        kn = (int(parts[0]), int(parts[1]))
    hidden = None
    if norm is not None:
        if not norm.isdigit() or int(norm) < 1:
            raise SystemExit("--context-norm takes HIDDEN: a positive integer, e.g. 4096")
        hidden = int(norm)
    return kn, hidden


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    """``BACKEND:K=V[,K=V]`` -> (backend, params); integer values become ints."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise SystemExit(f"--variant {text!r}: expected BACKEND:KEY=VALUE[,KEY=VALUE]")
        params[k] = int(v) if v.lstrip("-").isdigit() else v
    if not name or not params:
        raise SystemExit(f"--variant {text!r}: expected BACKEND:KEY=VALUE[,KEY=VALUE]")
    return name, params


def start_ranks(max_bytes: int, ranks_per_node: int = 0) -> GroupContext:
    """This torchrun process's GPU, NCCL group and gloo group as a GroupContext (messages up to
    ``max_bytes``; ``ranks_per_node`` 0: the node torchrun says). Refuses to run with NVLink
    multicast on."""
    for k, v in NO_MULTICAST_ENV.items():
        if os.environ.get(k) != v:
            raise SystemExit(f"set {k}={v} before running (NVLink multicast must stay off)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu_group = dist.new_group(backend="gloo")
    rpn = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return GroupContext(
        group=dist.group.WORLD, cpu_group=cpu_group, rank=rank, world_size=world,
        device=torch.device("cuda", local), ranks_per_node=rpn, max_bytes=max_bytes,
        group_name=dist.group.WORLD.group_name,
    )


def finish(text: str | None, out: str | None, built: dict[str, Any]) -> None:
    """Print the report and write it to ``out`` (``text`` None on the ranks that do not
    report), then close the backends and the process group."""
    if text is not None:
        print(text)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
    for b in built.values():
        b.close()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(f"{1 << k}" for k in range(12, 27)),
                    help="a list (4K,64K,1M) or LO:HI[:FACTOR]; default 4K..64M, powers of two")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS)
    ap.add_argument("--modes", default="graph")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", default=None, help="also time the routed dispatch")
    ap.add_argument("--ranks-per-node", type=int, default=0, help="virtual nodes (emulation)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context-gemm", default=None, metavar="K,N",
                    help="precede every call with an [M,K]x[K,N] GEMM, M = size / (N * elsize), "
                    "and report the all-reduce's share (see the module docstring)")
    ap.add_argument("--context-norm", default=None, metavar="HIDDEN",
                    help="follow every call with SGLang's fused add + RMSNorm over HIDDEN-wide "
                    "rows and report the all-reduce's share (see the module docstring)")
    ap.add_argument("--variant", action="append", default=[], metavar="BACKEND:K=V[,K=V]",
                    help="also time BACKEND with these parameters over its defaults (a column "
                    "of its own; repeatable), e.g. nvrar:ctas=8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = {v: _variant(v) for v in args.variant}
    gemm_kn, hidden = context_args(args.context_gemm, args.context_norm)
    if hidden is not None:
        try:
            import sgl_kernel  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"--context-norm needs sgl_kernel (SGLang's kernels): {exc}") from None
    sizes = parse_sizes(args.sizes)
    ctx = start_ranks(max(sizes), args.ranks_per_node)
    rank, world, rpn, cpu_group = ctx.rank, ctx.world_size, ctx.ranks_per_node, ctx.cpu_group
    local = ctx.device.index
    dtype = getattr(torch, args.dtype)
    modes = args.modes.split(",")
    x_size = torch.empty((), dtype=dtype).element_size()

    built: dict[str, Backend] = {}
    notes: list[str] = []
    for name in args.backends.split(","):
        try:
            built[name] = registry.load(name).create(ctx)
        except (BackendUnavailable, ImportError, RuntimeError) as exc:
            notes.append(f"{name}: not run ({str(exc).splitlines()[0][:160]})")
    columns = list(built)
    for label, (name, _) in variants.items():
        if name in built:
            columns.append(label)
        else:
            notes.append(f"{label}: not run ({name} is not built)")
    router = None
    if args.profile:
        from artune.profile import load
        from artune.router import Router

        router = Router(load(args.profile), ctx, dict(built))
        columns.append("routed")

    results: dict[tuple[str, str, int], float | str] = {}
    for mode in modes:
        for nbytes in sizes:
            numel = max(1, nbytes // x_size)
            x = random_input(numel, dtype, ctx.device, seed=nbytes + rank)
            ref = x.float().clone()
            dist.all_reduce(ref)
            norm, norm_us = None, 0.0
            if hidden is not None:
                norm = _norm(hidden, numel, dtype, ctx.device)
                if norm is None:
                    notes.append(f"{_h(nbytes)}: not a whole number of {hidden}-wide rows, "
                                 "left out (--context-norm)")
                    continue
                xn = x.clone()
                norm_us = _time(lambda nr=norm, xn=xn: nr(xn), contextlib.nullcontext, x, mode,
                                args.reps, cpu_group)
                results[(mode, "norm alone", nbytes)] = norm_us
            gemm, gemm_us = None, 0.0
            if gemm_kn is not None:
                gemm = _gemm(gemm_kn, nbytes, dtype, ctx.device)
                gemm_us = _time(gemm, contextlib.nullcontext, x, mode, args.reps, cpu_group)
                results[(mode, "gemm alone", nbytes)] = gemm_us
            for col in columns:
                if col == "routed":
                    assert router is not None
                    fn_x = router.all_reduce
                    capture = router.capture
                else:
                    name, params = variants.get(col, (col, None))
                    b = built[name]
                    if not b.supports(x, params):
                        results[(mode, col, nbytes)] = "n/a"
                        continue
                    fn_x = b.all_reduce if params is None else (
                        lambda t, b=b, p=params: b.all_reduce(t, p))
                    capture = b.capture
                # Each backend gets its own copy of the input: one that writes into its input
                # (SGLang's in-graph two-shot does, 2026-11-26) must not poison the next column.
                xc = x.clone()
                err = _check(fn_x, xc, ref, cpu_group)
                if err:
                    results[(mode, col, nbytes)] = "WRONG"
                    notes.append(f"{col} {mode} {_h(nbytes)}: {err}")
                    continue
                if gemm is None and norm is None:
                    results[(mode, col, nbytes)] = _time(
                        lambda f=fn_x, xc=xc: f(xc), capture, xc, mode, args.reps, cpu_group
                    )
                else:
                    def step(f=fn_x, xc=xc, g=gemm, nr=norm) -> None:
                        if g is not None:
                            g()
                        out = f(xc)
                        if nr is not None:
                            nr(out)

                    results[(mode, col, nbytes)] = _time(
                        step, capture, xc, mode, args.reps, cpu_group) - gemm_us - norm_us
                if not torch.equal(xc, x):
                    notes.append(f"{col} {mode} {_h(nbytes)}: wrote into its input while timed")
            if rank == 0:
                print(f"  {mode} {_h(nbytes)} done", flush=True)

    text = None
    if rank == 0:
        card = torch.cuda.get_device_name(local)
        label = (f", GPUs grouped as {world // rpn} virtual nodes x {rpn} (EMULATION)"
                 if rpn != world else "")
        lines = [
            f"# All-reduce latency, {world}x {card}{label}",
            "",
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
            f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {args.dtype}; µs per call, "
            "slowest rank's median over graph replays (eager: over timed batches) of the same "
            "number of calls for every backend (64 up to 8 MiB, then 512 MiB / size).",
            "",
        ]
        columns_shown = list(columns)
        if hidden is not None:
            lines += [f"In context: every call followed by SGLang's fused add + RMSNorm over "
                      f"{hidden}-wide rows (sgl_kernel, PDL as SGLang launches it); each column "
                      "is the time per call minus 'norm alone'.", ""]
            columns_shown = ["norm alone", *columns_shown]
        if gemm_kn is not None:
            lines += [f"In context: every call after a [M, {gemm_kn[0]}] x [{gemm_kn[0]}, "
                      f"{gemm_kn[1]}] GEMM (M = size / {gemm_kn[1]} elements); each column is "
                      "the time per call minus 'gemm alone'.", ""]
            columns_shown = ["gemm alone", *columns_shown]
        for mode in modes:
            hdr = ["size", *columns_shown, "best", "best vs NCCL"]
            lines += [f"## {mode}", "", "| " + " | ".join(hdr) + " |",
                      "|" + "---|" * len(hdr)]
            for nbytes in sizes:
                row = [_h(nbytes)]
                vals = {c: results.get((mode, c, nbytes), "n/a") for c in columns_shown}
                row += [cell(vals[c]) for c in columns_shown]
                nums = {c: v for c, v in vals.items()
                        if isinstance(v, float) and c not in ("routed", "gemm alone", "norm alone")}
                best = min(nums, key=lambda c: nums[c]) if nums else "-"
                nccl = nums.get("nccl")
                row.append(best)
                row.append(f"{nccl / nums[best]:.2f}x" if nccl and best in nums else "-")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        text = "\n".join(lines + notes_block(notes))
    finish(text, args.out, built)


if __name__ == "__main__":
    main()
