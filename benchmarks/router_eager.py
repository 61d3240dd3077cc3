"""What the routed call adds to an eager all-reduce, in place (GPUs, one process per GPU).

    torchrun --nproc-per-node 4 benchmarks/router_eager.py [--backend symm_one_shot]
        [--sizes 4K,64K,1M] [--out FILE.md]

The tune's validation pass found the routed eager call (``Router.all_reduce``: the decision
lookup, then the backend) 1-3.5 µs above the same backend called directly at host-bound sizes
on 4x H100, where ``benchmarks/select_speed.py`` puts the router's own Python at 0.5-0.8 µs
on the same host in a tight loop. This times, in alternating rounds (the order rotating, a
multiple of the variants), eager calls of:

- ``direct``: ``backend.all_reduce(x, params)``;
- ``routed``: ``router.all_reduce(x, "eager")``, as the validation pass and the plugin call it;
- ``routed_probe``: ``router.all_reduce(x)``, the mode probed from the stream,

and reports per variant the slowest rank's median µs per call and the median over rounds of
its difference from ``direct`` in the same round.

``--also nvrar,nvshmem_reduce,sglang`` builds those backends too (never called), so the process
holds what a tune's rank holds (NVSHMEM and its threads, SGLang's modules). On 4x H100
(2026-11-26, seventh session, `router_eager_also_4gpu_h100.md`) it made no difference: 32-33 µs
per direct call either way, as inside that machine's tunes. The busiest threads of rank 0
during the timed rounds are printed with the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from artune.autotune.config import parse_sizes  # noqa: E402
from artune.autotune.driver import thread_cpu_s  # noqa: E402
from artune.autotune.table import build_profile  # noqa: E402
from artune.backends import load  # noqa: E402
from artune.backends.base import GroupContext  # noqa: E402
from artune.envs import NO_MULTICAST_ENV  # noqa: E402
from artune.profile import Profile  # noqa: E402
from artune.router import Router  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="symm_one_shot")
    ap.add_argument("--sizes", default="4K,64K,1M")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--calls", type=int, default=100, help="calls per round and variant")
    ap.add_argument("--also", default="", help="backends to build but not call (a, b, ...)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test with --backend gloo")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    os.environ.update(NO_MULTICAST_ENV)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    cpu_group = dist.new_group(backend="gloo")
    sizes = parse_sizes(args.sizes)
    world_group = dist.group.WORLD
    assert world_group is not None
    ctx = GroupContext(group=world_group, cpu_group=cpu_group, rank=rank, world_size=world,
                       device=device, ranks_per_node=world, max_bytes=max(sizes),
                       group_name=world_group.group_name)
    backend = load(args.backend).create(ctx)
    fallback = "nccl" if cuda else "gloo"
    other = load(fallback).create(ctx) if args.backend != fallback else backend
    ms = [{"backend": args.backend, "params": {}, "dtype": "bfloat16", "mode": m, "nbytes": s,
           "latency_us": 1.0, "spread_us": 0.0} for m in ("eager", "graph") for s in sizes]
    fp = {"topology": {"device": "cuda"}, "versions": {}}
    prof = Profile(build_profile(ms, [], fingerprint=fp, command="router_eager",
                                 dry_run=not cuda))
    router = Router(prof, ctx, {args.backend: backend, fallback: other})
    extra = [load(n).create(ctx) for n in filter(None, args.also.split(","))]
    cpu0, t_start = thread_cpu_s(), time.perf_counter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
        d = router.decide(x, "eager")[0]
        assert d.backend is backend, d
        variants = {
            "direct": lambda x=x: backend.all_reduce(x, {}),
            "routed": lambda x=x: router.all_reduce(x, "eager"),
            "routed_probe": lambda x=x: router.all_reduce(x),
        }
        names = list(variants)
        for fn in variants.values():  # warm-up
            for _ in range(20):
                fn()
        sync()
        per: dict[str, list[float]] = {n: [] for n in names}
        rounds = -(-args.rounds // len(names)) * len(names)
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                dist.barrier(group=cpu_group)
                sync()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    variants[n]()
                sync()
                per[n].append((time.perf_counter() - t0) / args.calls * 1e6)
        gathered: list[dict[str, list[float]] | None] = [None] * world
        dist.all_gather_object(gathered, per, group=cpu_group)
        if rank == 0:
            slow = {n: [max(g[n][i] for g in gathered if g) for i in range(rounds)]
                    for n in names}
            for n in names:
                diff = [a - b for a, b in zip(slow[n], slow["direct"], strict=True)]
                rows.append((nbytes, n, statistics.median(slow[n]), statistics.median(diff)))
    wall = time.perf_counter() - t_start
    cpu1 = thread_cpu_s()
    busy = sorted(((n, cpu1[n] - cpu0.get(n, 0.0)) for n in cpu1), key=lambda kv: -kv[1])[:6]
    if rank == 0:
        lines = [
            f"# Routed vs direct eager all-reduce — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d}",
            "",
            f"{torch.cuda.get_device_name(device) if cuda else 'CPU'} x{world}, "
            f"torch {torch.__version__}, "
            f"backend {args.backend}, {rounds} alternating rounds of {args.calls} calls, "
            "slowest rank per round.",
            "",
            "| size | variant | µs per call (median) | minus direct, same round (median) |",
            "|---|---|---|---|",
        ] + [f"| {n} | {v} | {us:.2f} | {d:+.2f} |" for n, v, us, d in rows] + [
            "",
            f"Also built (not called): {args.also or 'nothing'}. Rank 0's busiest threads over "
            f"the {wall:.1f} s of timing (CPU s): "
            + ", ".join(f"{n} {v:.2f}" for n, v in busy),
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    router.close()
    for b in extra:
        b.close()
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
