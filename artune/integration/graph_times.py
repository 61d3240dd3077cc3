"""The GPU time of every CUDA-graph replay of a process (``ARTUNE_GRAPH_TIMES=<folder>``).

A served model decodes by replaying one captured graph per step. What artune changes (the
all-reduces, the fused linear layers) runs inside those graphs, so the graph's GPU time is the
part of a decode step artune can move; the step's wall-clock time adds the scheduler's CPU
work, which varies with the host's load by far more than 1 %. With the variable set, the SGLang
plugin (with or without a profile, so a default engine is measured the same way) wraps
``torch.cuda.CUDAGraph.replay``: a CUDA event before and after each replay on the current
stream, and a background thread appends, once both have completed, one line per replay to
``<folder>/graph-times-pid<PID>.txt``::

    <time.monotonic_ns() when the replay was launched> <id of the graph> <GPU µs>

``time.monotonic_ns`` is one clock for every process of the host, so a benchmark can take the
replays of a time window (``window_stats``). A rank whose replay starts before its peers' waits
inside the graph at the first collective: its time includes that wait; the rank launched last
measures the graph itself (``window_stats`` reports the fastest and the slowest rank).

Cost: two event records per replay on the host (a few µs, off the GPU's critical path), and
a thread that wakes every ``PERIOD_S``. Graph captures are not timed, nor replays during one.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["install", "installed", "read_folder", "summary", "window_stats", "PERIOD_S"]

logger = logging.getLogger("artune")

#: Seconds between the background thread's writes.
PERIOD_S = 0.25
_STATE: dict[str, Any] = {}


class _Recorder:
    """Pending (launch ns, graph id, start event, end event) in launch order, written out once
    both events completed; the events are reused."""

    def __init__(self, path: Path, new_event: Callable[[], Any]) -> None:
        self.path = path
        self.new_event = new_event
        self.pending: collections.deque[tuple[int, int, Any, Any]] = collections.deque()
        self.free: collections.deque[Any] = collections.deque()
        self.lock = threading.Lock()  # one writer at a time (the thread, or flush())

    def wrap(self, replay: Callable[..., Any],
             capturing: Callable[[], bool]) -> Callable[..., Any]:
        @functools.wraps(replay)
        def timed_replay(graph: Any, *args: Any, **kwargs: Any) -> Any:
            if capturing():
                return replay(graph, *args, **kwargs)
            start = self.free.pop() if self.free else self.new_event()
            end = self.free.pop() if self.free else self.new_event()
            t = time.monotonic_ns()
            start.record()
            out = replay(graph, *args, **kwargs)
            end.record()
            self.pending.append((t, id(graph), start, end))
            return out

        timed_replay.__artune_graph_times__ = True  # type: ignore[attr-defined]
        return timed_replay

    def flush(self) -> int:
        """Write every replay whose end event has completed, in launch order; the count."""
        lines = []
        with self.lock:
            while self.pending and self.pending[0][3].query():
                t, key, start, end = self.pending.popleft()
                lines.append(f"{t} {key} {start.elapsed_time(end) * 1e3:.2f}\n")
                self.free.extend((start, end))
            if lines:
                with self.path.open("a") as f:
                    f.writelines(lines)
        return len(lines)

    def run(self) -> None:
        while True:
            time.sleep(PERIOD_S)
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - a measuring aid must not stop the server
                logger.warning("artune: graph times stopped (%s: %s)", type(exc).__name__, exc)
                return


def install(folder: str, graph_cls: Any = None, new_event: Callable[[], Any] | None = None,
            capturing: Callable[[], bool] | None = None, thread: bool = True) -> bool:
    """Time every replay of ``graph_cls`` (``torch.cuda.CUDAGraph``) in this process from now
    on, into ``folder``; once per process (False when already installed). ``new_event``
    (``torch.cuda.Event(enable_timing=True)``) and ``capturing``
    (``torch.cuda.is_current_stream_capturing``) are the defaults' seams for tests."""
    if _STATE:
        return False
    import torch

    cls = graph_cls if graph_cls is not None else torch.cuda.CUDAGraph
    path = Path(folder) / f"graph-times-pid{os.getpid()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = _Recorder(path, new_event or functools.partial(torch.cuda.Event, enable_timing=True))
    timed = rec.wrap(cls.replay, capturing or torch.cuda.is_current_stream_capturing)
    cls.replay = timed  # type: ignore[method-assign]
    _STATE.update(recorder=rec, cls=cls)
    if thread:
        threading.Thread(target=rec.run, name="artune-graph-times", daemon=True).start()
    logger.info("artune: timing every CUDA-graph replay of this process into %s", path)
    return True


def installed() -> _Recorder | None:
    """This process's recorder, if ``install`` ran."""
    return _STATE.get("recorder")


def _replays(path: Path) -> list[tuple[int, int, float]]:
    """A file's replays as (launch ns, graph id, GPU µs), in launch order; an unfinished last
    line (being written) and anything unreadable are left out."""
    rows = []
    lines = path.read_text().split("\n")[:-1]  # the part after the last newline: unfinished
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            try:
                rows.append((int(parts[0]), int(parts[1]), float(parts[2])))
            except ValueError:
                continue
    return rows


def read_folder(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every process's replays in ``folder``: file name -> [(launch ns, GPU µs)] in launch
    order."""
    return {path.name: [(t, us) for t, _, us in _replays(path)]
            for path in sorted(Path(folder).glob("graph-times-pid*.txt"))}


def summary(folder: str | Path) -> list[dict[str, Any]]:
    """Per process (file) and graph: replays and the GPU time's median, 10th and 90th
    percentile in µs, the graphs of a process in order of their median (in a decode engine,
    one graph per captured batch size: the larger, the longer). ValueError when ``folder``
    holds no times."""
    files = sorted(Path(folder).glob("graph-times-pid*.txt")) if Path(folder).is_dir() else []
    if not files:
        raise ValueError(f"no graph times (graph-times-pid*.txt) in {folder}: serve with "
                         f"ARTUNE_GRAPH_TIMES={folder} first")
    out = []
    for path in files:
        by_graph: dict[int, list[float]] = {}
        for _, key, us in _replays(path):
            by_graph.setdefault(key, []).append(us)
        rows: list[dict[str, Any]] = []
        for key, times in by_graph.items():
            q = (statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1
                 else times * 9)
            rows.append({"process": path.stem.removeprefix("graph-times-"), "graph": key,
                         "replays": len(times), "median_us": statistics.median(times),
                         "p10_us": q[0], "p90_us": q[-1]})
        out += sorted(rows, key=lambda r: r["median_us"])
    return out


def window_stats(series: dict[str, list[tuple[int, float]]], start_ns: int,
                 end_ns: int) -> dict[str, Any] | None:
    """The replays launched in [start_ns, end_ns] by each process that replayed there: the
    median GPU time per process, in ms; ``graph_ms`` is the fastest process's (the rank
    launched last waits least inside the graph), ``graph_ms_max`` the slowest's, ``replays``
    the fewest replays of a process. None when no process replayed in the window."""
    medians, counts = [], []
    for rows in series.values():
        us = [u for t, u in rows if start_ns <= t <= end_ns]
        if us:
            medians.append(statistics.median(us) / 1e3)
            counts.append(len(us))
    if not medians:
        return None
    return {"graph_ms": min(medians), "graph_ms_max": max(medians), "replays": min(counts),
            "processes": len(medians)}
