"""Timing one all-reduce callable on one rank: inside a CUDA graph, or eagerly.

Both modes run ``calls`` back-to-back calls per repetition and report microseconds per call for
each repetition; the caller takes each rank's median and lets the slowest rank count.

- graph: the ``calls`` calls are captured once into a CUDA graph (inputs allocated before
  capture, the backend's ``capture()`` context entered), then each repetition is one replay
  timed with CUDA events. This is how decode runs in SGLang.
- eager: each repetition launches the ``calls`` calls from Python between two CUDA events, so
  host overhead counts whenever it, not the GPU, is the bottleneck.
- On CPU (``--device cpu`` dry runs, gloo) there are no CUDA graphs: both modes time the
  ``calls`` calls with ``time.perf_counter``.

``calls`` is chosen so that one repetition lasts at least ``TARGET_REP_US`` (the first call's
skew between ranks and the event overhead then stay small), and must be the same on every rank
(``agree_calls``): every rank has to issue the same number of collectives. It is capped by the
bytes one repetition moves: a graph keeps every call's output alive (``MAX_GRAPH_OUTPUT_BYTES``),
and an eager repetition of large messages is GPU-bound long before 64 calls
(``EAGER_REP_BYTES``: four calls of 256 MiB take over 5 ms on 4 NVLink GPUs, and the first
call's launch, which no earlier call hides, is under 1% of that).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Timer", "estimate_us", "calls_for", "summarize", "TARGET_REP_US", "MAX_CALLS",
           "EAGER_REP_BYTES"]

#: One repetition (a graph replay, or a batch of eager calls) lasts at least this long.
TARGET_REP_US = 200.0
#: At most this many calls per repetition (tiny messages at ~5 µs each need ~40).
MAX_CALLS = 64
#: Graph outputs stay alive in the graph's memory pool: calls * nbytes is kept below this.
MAX_GRAPH_OUTPUT_BYTES = 512 << 20
#: Eager repetitions move at most this many bytes (at least one call; 4 calls at 256 MiB).
#: With 64 calls at every size, eager timing of 32-256 MiB took about 37 s of a 187 s full tune
#: and 23 s of its validation on 4x H100 (2026-11-26, by the profile's own latencies); capped,
#: about 14 s and 6 s.
EAGER_REP_BYTES = 1 << 30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def estimate_us(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> float:
    """Rough µs per call of ``fn`` after one warm-up call (eager, synchronised)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e6 / calls


def calls_for(est_us: float, nbytes: int, mode: str) -> int:
    """Calls per repetition for a callable taking ``est_us`` per call (see module docstring)."""
    n = max(1, math.ceil(TARGET_REP_US / max(est_us, 1e-3)))
    n = min(n, MAX_CALLS)
    cap = MAX_GRAPH_OUTPUT_BYTES if mode == "graph" else EAGER_REP_BYTES
    return min(n, max(1, cap // max(nbytes, 1)))


def summarize(samples: list[float]) -> tuple[float, float]:
    """(median, spread) of one rank's per-repetition µs; spread is the interquartile range
    (max - min for fewer than 4 samples)."""
    import numpy as np

    arr = np.asarray(samples, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    med = float(np.median(arr))
    if arr.size < 4:
        return med, float(arr.max() - arr.min())
    q1, q3 = np.percentile(arr, [25, 75])
    return med, float(q3 - q1)


class Timer:
    """Times ``fn`` (one all-reduce, no arguments) on this rank: ``prepare`` once, then
    ``sample(n)`` any number of times (so a search can stop early), then ``close``.

    ``capture`` is the backend's ``capture()`` context manager factory, entered around CUDA-graph
    capture. All ranks must make the same calls with the same ``calls``.
    """

    def __init__(
        self,
        fn: Callable[[], Any],
        *,
        mode: str,
        device: torch.device,
        calls: int,
        capture: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        if mode not in ("graph", "eager"):
            raise ValueError(f"Timer: mode must be 'graph' or 'eager', not {mode!r}")
        self.fn = fn
        self.mode = mode
        self.device = device
        self.calls = calls
        self.capture = capture or contextlib.nullcontext
        self._graph: Any = None
        self._outs: list[Any] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def prepare(self, warmup: int = 1) -> None:
        """Capture the graph (graph mode on CUDA) and run ``warmup`` untimed repetitions."""
        if self.cuda and self.mode == "graph":
            import torch

            _sync(self.device)
            graph = torch.cuda.CUDAGraph()
            with self.capture(), torch.cuda.graph(graph):
                # Keep the outputs referenced: they live in the graph's pool.
                self._outs = [self.fn() for _ in range(self.calls)]
            self._graph = graph
        for _ in range(warmup):
            self._run()
        _sync(self.device)

    def _run(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            for _ in range(self.calls):
                self.fn()

    def sample(self, reps: int) -> list[float]:
        """``reps`` repetitions, each as µs per call."""
        out: list[float] = []
        if self.cuda:
            import torch

            pairs = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            _sync(self.device)
            for start, end in pairs:
                start.record()
                self._run()
                end.record()
            pairs[-1][1].synchronize()
            out = [s.elapsed_time(e) * 1e3 / self.calls for s, e in pairs]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                self._run()
                out.append((time.perf_counter() - t0) * 1e6 / self.calls)
        return out

    def close(self) -> None:
        self._outs = []
        if self._graph is not None:
            with contextlib.suppress(Exception):
                self._graph.reset()
            self._graph = None

    def __enter__(self) -> Timer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
