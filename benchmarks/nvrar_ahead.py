"""ARTUNE_NVRAR_CLEAR_AHEAD off vs on, side by side in one process (GPUs, one process per GPU).

    torchrun --nproc-per-node 4 benchmarks/nvrar_ahead.py [--sizes 4K,16K,64K,128K]
        [--large 128K] [--out FILE.md]

Two NVRAR instances, built one after the other with the switch off and on (each its own
NVSHMEM buffer; the switch is read when an instance is built), both at their default plans, bf16,
CUDA graphs. Workloads:

- ``S``: a graph of 32 calls of size S (each call empties what the one before it read, same
  size: what a decode step's all-reduces look like);
- ``L/S``: 16 pairs of a ``--large`` call then a call of size S (the small call pays for
  emptying the large one's slots with its own grid: the worst case of the switch; above
  ``AHEAD_MAX_WORDS`` per source a call clears its own slots and leaves nothing behind).

Each workload is first checked on both instances (every call of the sequence against NCCL's
fp32 sum, identical bits on every rank), then timed in alternating rounds (off, on, on, off,
...), each rank's median over rounds of µs per call, the slowest rank counting. Prints a table
(and writes it with ``--out``): off, on, on minus off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nvrar_dev import _bytes, _correct, _h, _slowest, start  # noqa: E402


def _workloads(sizes: list[int], large: int) -> list[tuple[str, list[int]]]:
    out = [(_h(s), [s] * 32) for s in sizes]
    out += [(f"{_h(large)}/{_h(s)}", [large, s] * 16) for s in sizes if s != large]
    return out


def _graph(be: Any, xs: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
    for x in xs[:4]:  # first uses compile and meet the peers (eager, outside the capture)
        be.all_reduce(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x in xs:
            be.all_reduce(x)
    return g


def _check(be: Any, xs: list[torch.Tensor]) -> bool:
    """Every call of the sequence (eagerly, in order) against NCCL's fp32 sum, bits equal on
    every rank; the same verdict on every rank."""
    ok = True
    for x in xs:
        y = be.all_reduce(x)
        ref, scale = x.float(), x.float().abs()
        dist.all_reduce(ref)
        dist.all_reduce(scale)
        ok &= _correct(y, ref, scale, None)
    torch.cuda.synchronize()
    be.check()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4K,16K,64K,128K")
    ap.add_argument("--large", default="128K")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rank, world, device, cpu = start("nvrar_ahead")

    from artune.backends.base import GroupContext
    from artune.backends.nvrar import NvrarBackend

    sizes = [_bytes(s) for s in args.sizes.split(",")]
    large = _bytes(args.large)
    ctx = GroupContext(group=dist.group.WORLD, cpu_group=cpu, rank=rank, world_size=world,
                       device=device, ranks_per_node=world, max_bytes=max(sizes + [large]),
                       group_name="nvrar-ahead")
    backends = {}
    for mode in ("off", "on"):
        os.environ["ARTUNE_NVRAR_CLEAR_AHEAD"] = "1" if mode == "on" else "0"
        backends[mode] = NvrarBackend.create(ctx)
        assert backends[mode].comm is not None and backends[mode].comm.ahead == (mode == "on")
    gen = torch.Generator(device=device).manual_seed(7 + rank)
    rows = []
    for name, seq in _workloads(sizes, large):
        xs = [torch.randn(n // 2, generator=gen, device=device).to(torch.bfloat16) for n in seq]
        verdict = {m: _check(be, xs) for m, be in backends.items()}
        row: dict[str, Any] = {"workload": name, "calls": len(seq), "correct": verdict}
        if all(verdict.values()):
            graphs = {m: _graph(be, xs) for m, be in backends.items()}
            samples: dict[str, list[float]] = {m: [] for m in backends}
            for r in range(args.rounds):
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                for m in order:
                    a, b = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    graphs[m].replay()  # warm
                    a.record()
                    for _ in range(args.replays):
                        graphs[m].replay()
                    b.record()
                    b.synchronize()
                    samples[m].append(a.elapsed_time(b) * 1e3 / args.replays / len(seq))
            for m in backends:
                row[m] = _slowest(statistics.median(samples[m]), None)
            del graphs
        rows.append(row)
        if rank == 0:
            print(f"[{name}] " + " ".join(f"{m} {row.get(m, float('nan')):.2f}" for m in backends)
                  + f" correct {verdict}", flush=True)
    for be in backends.values():
        be.check()
        be.close()
    if rank == 0:
        card = torch.cuda.get_device_name(device)
        lines = [f"# ARTUNE_NVRAR_CLEAR_AHEAD off vs on — {dt.date.today()}", "",
                 f"{world}x {card}, torch {torch.__version__}; NVRAR at its default plans, "
                 f"bf16, CUDA graph; µs per call (slowest rank's median over {args.rounds} "
                 f"alternating rounds of {args.replays} replays).", "",
                 "| workload | calls | off | on | on - off |", "|---|---|---|---|---|"]
        for r in rows:
            if "off" in r and "on" in r:
                lines.append(f"| {r['workload']} | {r['calls']} | {r['off']:.2f} | "
                             f"{r['on']:.2f} | {r['on'] - r['off']:+.2f} |")
            else:
                lines.append(f"| {r['workload']} | {r['calls']} | WRONG: {r['correct']} | | |")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
