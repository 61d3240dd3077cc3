"""Time ``artune.select()`` on the CPU (target: under 2 µs per call), and what the routed call
adds over calling the chosen backend directly.

    python benchmarks/select_speed.py [--out benchmarks/results/select_speed.md]

Uses a profile with many ranges (every power of two and midpoint from 1 KB to 256 MB, three
dtypes, two modes) and message sizes drawn at random, dtypes given as torch.dtype objects, as
the SGLang hook passes them. The routed call is ``Router.all_reduce(x, mode)`` against the same
backend's ``all_reduce(x, params)``, on one CPU tensor (the decision is cached after the first
call, as in serving), over backends that return at once and over backends doing the host-side
tensor work of a symm one-shot call.
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
from artune.backends.base import Backend, GroupContext  # noqa: E402
from artune.profile import Profile, select  # noqa: E402
from artune.router import Router  # noqa: E402


class _Instant(Backend):
    """A backend whose all-reduce returns its input: only the calling path is timed."""

    name = "instant"
    needs_cuda = False

    @classmethod
    def available(cls, ctx: GroupContext) -> str | None:
        return None

    def supports(self, x: torch.Tensor, params: object = None) -> bool:
        return True

    def all_reduce(self, x: torch.Tensor, params: object = None) -> torch.Tensor:
        return x


class _HostWork(_Instant):
    """A backend doing the host-side tensor work of the symm one-shot call (an output,
    offset and alignment reads, a copy in place of the collective): the router's cost beside
    the work of a real eager call, where caches are less warm than in the bare loop."""

    name = "host_work"

    def all_reduce(self, x: torch.Tensor, params: object = None) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if int(x.storage_offset()) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0:
            out.copy_(x)
        return out


class _Prepared(_Instant):
    """A backend shaped like the symm ones since ``Backend.bind``: the call for one message
    shape is prepared once (here: an output allocation and a copy, the view looked up), its
    own ``all_reduce`` keeps the prepared call per shape, and the router keeps it too."""

    name = "prepared"

    def __init__(self, ctx: GroupContext) -> None:
        super().__init__(ctx)
        self._bound: dict[tuple[object, ...], object] = {}

    def all_reduce(self, x: torch.Tensor, params: object = None) -> torch.Tensor:
        call = self._bound.get((x.shape, x.dtype, x.get_device(), x.is_contiguous()))
        return (call or self.bind(x))(x)  # type: ignore[operator, no-any-return]

    def bind(self, x: torch.Tensor, params: object = None):  # type: ignore[no-untyped-def]
        key = (x.shape, x.dtype, x.get_device(), x.is_contiguous())
        call = self._bound.get(key)
        if call is None:
            empty_like = torch.empty_like

            def call(t: torch.Tensor) -> torch.Tensor:
                out = empty_like(t)
                if not t.data_ptr() % 16 and not t.storage_offset() * t.element_size() % 16:
                    out.copy_(t)
                return out

            self._bound[key] = call
        return call


def _per_call(fn: object, calls: int) -> float:
    """Median over 5 runs of µs per call of ``fn()``."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()  # type: ignore[operator]
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def _router_overhead(prof: Profile, calls: int, device: torch.device,
                     kind: type[Backend] = _Instant) -> tuple[float, float, float]:
    """(direct µs, routed µs with the mode given, routed µs with the mode probed) per call,
    over backends of class ``kind``."""
    ctx = GroupContext(group=None, cpu_group=None, rank=0, world_size=2,  # type: ignore[arg-type]
                       device=device, ranks_per_node=2, max_bytes=256 << 20)
    names = {r["backend"] for m in prof.tables.values() for rows in m.values() for r in rows}
    built: dict[str, Backend] = {n: kind(ctx) for n in names | {prof.fallback()}}
    router = Router(prof, ctx, built)
    x = torch.zeros(2048, dtype=torch.bfloat16, device=device)
    choice = router.choose(x, "eager")
    backend, params = built[choice.backend], choice.params
    direct = _per_call(lambda: backend.all_reduce(x, params), calls)
    given = _per_call(lambda: router.all_reduce(x, "eager"), calls)
    probed = _per_call(lambda: router.all_reduce(x), calls)
    return direct, given, probed


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
    ap.add_argument("--device", default="cpu",
                    help="where the routed call's tensor lives (cuda: the capture probe is real)")
    args = ap.parse_args()
    device = torch.device(args.device)
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
    probe = ("torch.cuda.is_current_stream_capturing" if torch.cuda.is_available()
             else "None without CUDA")
    lines += [
        "",
        f"Routed call vs the chosen backend called directly (4 KiB bf16 tensor on {device}; "
        f"the capture probe is {probe}):",
        "",
        "| backends | call | µs per call | added by the router |",
        "|---|---|---|---|",
    ]
    for kind, what in ((_Instant, "return at once"),
                       (_HostWork, "a one-shot call's host-side tensor work (no bind)"),
                       (_Prepared, "the same work, prepared per shape (bind)")):
        direct, given, probed = _router_overhead(prof, args.calls, device, kind)
        lines += [
            f"| {what} | backend.all_reduce(x, params) | {direct:.3f} | - |",
            f"| {what} | router.all_reduce(x, 'eager') | {given:.3f} | {given - direct:.3f} |",
            f"| {what} | router.all_reduce(x) | {probed:.3f} | {probed - direct:.3f} |",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
