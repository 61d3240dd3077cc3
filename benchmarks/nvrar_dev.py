"""NVRAR development benchmark: every NVRAR variant against NCCL, per size, on this machine.

    torchrun --nproc-per-node 4 benchmarks/nvrar_dev.py --out OUT.json [--ranks-per-node 2]
        [--sizes 4K,64K,...] [--quick] [--lamport] [--wide both]

CUDA-graph replay, bf16. For each size: NCCL (``dist.all_reduce`` in place on a static buffer)
and a grid of NVRAR plans (algorithm, protocol, block, warps; CTAs cover the chunks, at most
128), plus NVRAR's defaults. Every plan is first checked against NCCL's fp32 sum with identical
bits on every rank; a wrong plan is reported, never timed. Latency per call: each rank's median
over replays of a graph of ``calls`` calls; the slowest rank counts. With ``--ranks-per-node``
smaller than the world size the GPUs form virtual nodes: the inter-node path runs on one host
(emulation, labelled so). Writes a JSON of every measurement (card, date, versions) and prints
a table: NCCL, NVRAR's defaults, the best plan, speedups over NCCL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from artune.envs import NO_MULTICAST_ENV  # noqa: E402

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
DEFAULT_SIZES = "4K,16K,64K,256K,512K,1M,2M,4M,16M,64M"


def _bytes(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    return int(float(s[:-1]) * _UNITS[s[-1]]) if s[-1] in _UNITS else int(s)


def _h(n: int) -> str:
    for unit in ("M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def plans_for(nbytes: int, nodes: int, quick: bool, lamport: bool = False
              ) -> list[dict[str, Any]]:
    """The NVRAR plans timed at ``nbytes`` (bf16); ``lamport``: the lamport one-shot (up to
    1 MiB) and two-shot (from 128 KiB) at chunks of 512-2048 elements only."""
    elems = nbytes // 2
    out: list[dict[str, Any]] = []
    if lamport and nodes == 1:
        for algo, lo, hi in (("oneshot", 0, 1 << 20), ("twoshot", 128 << 10, 4 << 20)):
            if lo <= nbytes <= hi:
                out += [{"algo": algo, "proto": "lamport", "block": b, "warps": 4}
                        for b in (512, 1024, 2048)]
        for p in out:
            p["ctas"] = min(128, max(1, -(-elems // p["block"])))
        return out
    if nodes > 1:  # virtual nodes: both inter-node transports, one block size
        for proto in ("ll", "signal") if nbytes <= 4 << 20 else ("signal",):
            for inter in ("nvshmem", "p2p"):
                out.append({"algo": "twoshot", "proto": proto, "block": 512, "warps": 4,
                            "inter": inter})
        for p in out:
            p["ctas"] = min(128, max(1, -(-elems // p["block"])))
        return out
    if nbytes <= 1 << 20:  # one-shot LL and lamport (one node)
        for block, warps in ((256, 1), (256, 2), (256, 4), (512, 2), (512, 4), (1024, 4),
                             (2048, 4)):
            if block <= max(256, elems):
                out.append({"algo": "oneshot", "proto": "ll", "block": block, "warps": warps})
        for block, warps in ((256, 2), (512, 4), (1024, 4), (2048, 4), (4096, 8)):
            if block <= max(256, elems):
                out.append({"algo": "oneshot", "proto": "lamport", "block": block,
                            "warps": warps})
    if 64 << 10 <= nbytes <= 4 << 20:  # two-shot LL
        for block, warps in ((512, 2), (512, 4), (1024, 4), (2048, 4)):
            out.append({"algo": "twoshot", "proto": "ll", "block": block, "warps": warps})
    if nbytes >= 256 << 10:  # two-shot signal
        grid = ((1024, 4), (2048, 4), (4096, 4), (2048, 8)) if nbytes <= 4 << 20 else (
            (4096, 8), (8192, 8), (8192, 16), (4096, 16))
        for block, warps in grid:
            out.append({"algo": "twoshot", "proto": "signal", "block": block, "warps": warps})
    if quick:
        out = out[::3]
    for p in out:
        p["ctas"] = min(128, max(1, -(-elems // p["block"])))  # the kernel caps it per shard
    return out


def start(tool: str) -> tuple[int, int, torch.device, Any]:
    """A torchrun rank's start: refuse unless NVLink multicast is off, bind this rank's GPU,
    NCCL and a gloo group. Returns (rank, world size, device, the gloo group)."""
    for k, v in NO_MULTICAST_ENV.items():
        if os.environ.get(k) != v:
            raise SystemExit(f"{tool}: set {k}={v} (NVLink multicast must stay off)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    cpu = dist.new_group(backend="gloo")
    os.environ.setdefault("ARTUNE_TIMEOUT_S", "60")  # first-use compiles stay well inside it
    return rank, world, device, cpu


def _run_local(fn: Any, be: Any) -> tuple[Any, str | None]:
    """(result, None) or (None, the error) of one synchronised call."""
    try:
        y = fn()
        torch.cuda.synchronize()
        be.check()
        return y, None
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return None, f"{type(exc).__name__}: {exc}"[:300]


def _time_graph(fn: Any, calls: int, reps: int) -> float:
    """Median µs per call of ``calls`` back-to-back calls captured in one graph."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


# Small result collectives run on the default (NCCL) group, outside any capture.
def _slowest(us: float, group: Any) -> float:
    t = torch.tensor([us], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _agree(ok: bool, group: Any) -> bool:
    t = torch.tensor([0 if ok else 1], device="cuda")
    dist.all_reduce(t, group=group)
    return t.item() == 0


def _correct(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, group: Any) -> bool:
    close = bool(((y.float() - ref).abs() <= 2 ** -6 * scale + 1e-6).all().item())
    bits = y.view(torch.int16).to(torch.int32)  # NCCL has no int16; one-to-one widening
    first = bits.clone()
    dist.broadcast(first, src=0, group=group)
    return _agree(close and torch.equal(bits, first), group)


def _floor_kernel(device: torch.device) -> Any:
    """A one-store Triton kernel: the launch floor of a graph node on this machine."""
    import triton
    import triton.language as tl

    @triton.jit
    def one_store(p):
        tl.store(p, tl.load(p) + 1)

    t = torch.zeros(1, dtype=torch.int32, device=device)
    return lambda: one_store[(1,)](t)


def _diag(be: Any, sizes: list[int], floor: float, reps: int, device: torch.device, rank: int,
          out: str) -> None:
    """One-shot latency breakdown (default plan, graph of 20 calls, slowest rank): whole; no
    waits (slots read once: push + local work); no pushes and no waits (local work only). The
    ablated kernels compute wrong sums: they are timed, never checked."""
    t = torch.zeros(1, device=device)
    torch_op = _slowest(_time_graph(lambda: t.add_(1), 20, reps), None)
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 2, device=device).to(torch.bfloat16)
        plan = be.plan(nbytes, None)
        if plan.algo != "oneshot":
            continue
        row: dict[str, Any] = {"bytes": nbytes, "plan": plan.__dict__}
        for d, label in ((0, "whole"), (1, "no waits"), (2, "local only")):
            be.comm.diag = d
            try:
                row[label] = _slowest(_time_graph(lambda x=x: be.all_reduce(x, None), 20, reps),
                                      None)
            finally:
                be.comm.diag = 0
        rows.append(row)
    # The real kernels still agree afterwards (the ablations kept the epochs in step).
    world = be.ctx.world_size
    y = be.all_reduce(torch.ones(4096, device=device, dtype=torch.bfloat16), None)
    torch.cuda.synchronize()
    be.check()
    if not bool((y == world).all()):
        raise RuntimeError("nvrar_dev --diag: a normal all-reduce after the breakdown is wrong")
    if rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"card": torch.cuda.get_device_name(device),
                                         "triton_one_store_us": floor, "torch_op_us": torch_op,
                                         "rows": rows}, indent=1))
        print(f"\none-shot breakdown, µs per call in a graph of 20: one-store Triton kernel "
              f"{floor:.2f}, one-element torch op {torch_op:.2f}")
        print(f"{'size':>6} {'whole':>7} {'no waits':>9} {'local only':>11}  plan")
        for r in rows:
            print(f"{_h(r['bytes']):>6} {r['whole']:7.2f} {r['no waits']:9.2f} "
                  f"{r['local only']:11.2f}  block {r['plan']['block']} ctas "
                  f"{r['plan']['ctas']} warps {r['plan']['warps']}")


def _save(out: str, rows: list[dict[str, Any]], world: int, per_node: int,
          device: torch.device, floor: float) -> str:
    card = torch.cuda.get_device_name(device)
    result = {
        "card": card, "gpus": world, "ranks_per_node": per_node,
        "emulated_nodes": per_node < world,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "dtype": "bfloat16", "mode": "graph", "rows": rows, "floor_us": floor,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    return card


def _compare(rows: list[dict[str, Any]], title: str, groups: dict[str, Any]) -> None:
    """Print, per size, the best timed plan of each group (name -> predicate on a plan entry)."""
    print("\n" + title)
    for row in rows:
        cells = []
        for name, member in groups.items():
            ok = [e for e in row["plans"] if "us" in e and member(e)]
            b = min(ok, key=lambda e: e["us"]) if ok else None
            cells.append(f"{name} " + (f"{b['us']:6.2f} ({b['label']})" if b else "-"))
        print(f"{_h(row['bytes']):>6}  " + "  ".join(cells))


def _wide_table(rows: list[dict[str, Any]]) -> None:
    """Per size and plan: the 8-byte lamport kernels against the 16-byte ones (``--wide
    both``), and the difference."""
    print("\n16-byte lamport kernels (ARTUNE_NVRAR_WIDE), µs per call: plan, 8-byte, 16-byte, "
          "difference")
    for row in rows:
        pairs: dict[str, dict[bool, float]] = {}
        for e in row["plans"]:
            if "us" in e and e["plan"]["proto"] == "lamport":
                pairs.setdefault(e["label"].rsplit(" wide=", 1)[0], {})[e["wide"]] = e["us"]
        for label, t in pairs.items():
            if len(t) == 2:
                print(f"{_h(row['bytes']):>6}  {t[False]:6.2f} {t[True]:6.2f} "
                      f"{t[True] - t[False]:+6.2f}  {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--ranks-per-node", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--spin", choices=("auto", "on", "off", "both"), default="auto",
                    help="LL waits: the kernels' own choice (auto), per-thread PTX polling "
                         "forced (on), block-wide rounds forced (off), or each plan timed both "
                         "ways forced")
    ap.add_argument("--pdl", choices=("default", "off", "on", "both"), default="default",
                    help="programmatic dependent launch of the peer-address kernels (sm_90+): "
                         "the library's setting (ARTUNE_NVRAR_PDL), off, on, or each plan timed "
                         "both ways")
    ap.add_argument("--wide", choices=("default", "off", "on", "both"), default="default",
                    help="the 16-byte lamport kernels (ARTUNE_NVRAR_WIDE): the library's "
                         "setting, off, on, or each plan timed both ways (off first)")
    ap.add_argument("--lamport", action="store_true",
                    help="time only the lamport one-shot and two-shot plans (chunks of 512-2048 "
                         "elements) besides the defaults")
    ap.add_argument("--diag", action="store_true",
                    help="instead of the plan sweep: where one-shot's time goes at each size "
                         "(the default plan whole, without its waits, without pushes and waits; "
                         "a one-store Triton kernel and a one-element torch op beside it)")
    args = ap.parse_args()
    rank, world, device, cpu = start("nvrar_dev")
    per_node = args.ranks_per_node or world

    from artune.backends.base import GroupContext
    from artune.backends.nvrar import NvrarBackend

    sizes = [_bytes(s) for s in args.sizes.split(",")]
    ctx = GroupContext(group=dist.group.WORLD, cpu_group=cpu, rank=rank, world_size=world,
                       device=device, ranks_per_node=per_node, max_bytes=max(sizes),
                       group_name="nvrar-dev")
    be = NvrarBackend.create(ctx)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device=device).manual_seed(99 + rank)
    floor = _slowest(_time_graph(_floor_kernel(device), 20, args.reps), None)
    if args.diag:
        _diag(be, sizes, floor, args.reps, device, rank, args.out)
        sizes = []
    spins = {"auto": (None,), "on": (True,), "off": (False,),
             "both": (False, True)}[args.spin]
    pdls = {"default": (None,), "off": (False,), "on": (True,),
            "both": (False, True)}[args.pdl]
    wides = {"default": (None,), "off": (False,), "on": (True,),
             "both": (False, True)}[args.wide]
    if any(pdls) and torch.cuda.get_device_capability(device) < (9, 0):
        raise SystemExit("--pdl on/both needs compute capability 9.0 or newer")
    for nbytes in sizes:
        n = nbytes // 2
        x = torch.randn(n, generator=gen, device=device).to(torch.bfloat16)
        ref = x.float()
        dist.all_reduce(ref)
        scale = x.float().abs()
        dist.all_reduce(scale)
        calls = 20 if nbytes <= 4 << 20 else 5
        buf = x.clone()
        nccl = _slowest(_time_graph(lambda buf=buf: dist.all_reduce(buf), calls, args.reps), None)
        row: dict[str, Any] = {"bytes": nbytes, "nccl_us": nccl, "plans": []}
        plans = plans_for(nbytes, ctx.nodes, args.quick, args.lamport) + [{"default": True}]
        variants = [(p, spin, pdl, wide) for p in plans for spin in spins for pdl in pdls
                    for wide in wides]
        for p, spin, pdl, wide in variants:
            params = None if p.get("default") else dict(p)
            label = "default" if params is None else json.dumps(params, sort_keys=True)
            if len(spins) > 1:
                label += " spin=" + ("on" if spin else "off")
            if len(pdls) > 1:
                label += " pdl=" + ("on" if pdl else "off")
            if len(wides) > 1:
                label += " wide=" + ("on" if wide else "off")
            be.comm.spin = spin
            if pdl is not None:
                be.comm.pdl = pdl
            if wide is not None:
                be.comm.wide = wide
            entry: dict[str, Any] = {"plan": be.plan(nbytes, params).__dict__, "label": label,
                                     "spin": spin, "pdl": pdl, "wide": wide}
            row["plans"].append(entry)
            if not be.supports(x, params):  # the same answer on every rank
                entry["skip"] = "supports() is False"
                continue
            # every rank runs the same collectives whatever happens locally
            failure = _run_local(lambda params=params, x=x: be.all_reduce(x, params), be)
            if not _agree(failure[1] is None, None):
                entry["error"] = failure[1] or "failed on another rank"
                continue
            if not _correct(failure[0], ref, scale, None):
                entry["error"] = "wrong result or bits differ across ranks"
                continue
            try:
                us = _time_graph(lambda params=params, x=x: be.all_reduce(x, params), calls,
                                 args.reps)
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                entry["error"] = f"timing: {type(exc).__name__}: {exc}"[:300]
                us = float("nan")
            entry["us"] = _slowest(us, None)
            if entry["us"] != entry["us"]:  # NaN: some rank failed
                entry.pop("us")
                entry.setdefault("error", "timing failed on another rank")
        rows.append(row)
        if rank == 0:  # after every size: a cut-short run still leaves its measurements
            _save(args.out, rows, world, per_node, device, floor)
        if rank == 0:
            ok = [e for e in row["plans"] if "us" in e]
            best = min(ok, key=lambda e: e["us"]) if ok else None
            print(f"[{_h(nbytes)}] nccl {nccl:.1f} us; best nvrar "
                  f"{best['us'] if best else float('nan'):.1f} us {best['label'] if best else ''}",
                  flush=True)
    be.check()
    be.close()

    if rank == 0 and not args.diag:
        card = _save(args.out, rows, world, per_node, device, floor)
        tag = f"{world}x {card}" + (f", {world // per_node} virtual nodes x {per_node} "
                                    "(emulation)" if per_node < world else "")
        print(f"\nNVRAR vs NCCL, bf16, CUDA graph, µs per call (slowest rank), {tag}; "
              f"one-store Triton kernel: {floor:.2f} µs")
        print(f"{'size':>6} {'NCCL':>8} {'default':>8} {'best':>8} {'x NCCL':>7}  best plan")
        for row in rows:
            ok = [e for e in row["plans"] if "us" in e]
            d = next((e["us"] for e in ok if e["label"].startswith("default")
                      and e["spin"] == spins[-1] and e["pdl"] == pdls[-1]
                      and e["wide"] == wides[-1]), float("nan"))
            best = min(ok, key=lambda e: e["us"]) if ok else None
            bad = sum(1 for e in row["plans"] if "error" in e)
            b = best["us"] if best else float("nan")
            print(f"{_h(row['bytes']):>6} {row['nccl_us']:8.1f} {d:8.1f} {b:8.1f} "
                  f"{row['nccl_us'] / b:7.2f}  {best['label'] if best else '-'}"
                  + (f"  [{bad} plans failed]" if bad else ""))
        _compare(rows, "one-shot protocols, best plan per size: LL (flag in every word) vs "
                 "lamport (the data is its own flag)",
                 {p: (lambda e, p=p: e["plan"]["algo"] == "oneshot" and e["plan"]["proto"] == p)
                  for p in ("ll", "lamport")})
        if len(spins) > 1:
            _compare(rows, "one-shot waits, best plan per size: block-wide rounds vs per-thread "
                     "polling", {("on" if v else "off"): (lambda e, v=v: e["spin"] == v
                                                          and e["plan"]["algo"] == "oneshot")
                                 for v in spins})
        if len(pdls) > 1:
            _compare(rows, "programmatic dependent launch, best plan per size: off vs on",
                     {("on" if v else "off"): (lambda e, v=v: e["pdl"] == v) for v in pdls})
        if len(wides) > 1:
            _wide_table(rows)
    dist.barrier(cpu)
    from artune.backends import _nvshmem

    _nvshmem.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
