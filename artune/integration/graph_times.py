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
measures the graph itself (``window_stats`` takes the fastest rank at each step).

Cost: two event records per replay on the host (host calls, not GPU work; not measured on
their own), and a thread that wakes every ``PERIOD_S``. Graph captures are not timed, nor
replays during one. A failure here (the folder cannot be written, ...) is logged and turns the
timing off; it never stops the server.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
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
    both events completed; the events are reused.

    The writer thread queries events: it first makes the GPU of the timed replays its current
    device (otherwise its first query would open a CUDA context on GPU 0 from every rank's
    process), and it queries nothing while a graph is being captured in this process (an event
    query from another thread would invalidate a capture in CUDA's global capture mode)."""

    def __init__(self, path: Path, new_event: Callable[[], Any],
                 current_device: Callable[[], int], set_device: Callable[[int], None]) -> None:
        self.path = path
        self.new_event = new_event
        self.current_device = current_device
        self.set_device = set_device
        self.device: int | None = None  # the GPU of the first timed replay
        self.pending: collections.deque[tuple[int, int, Any, Any]] = collections.deque()
        self.free: collections.deque[Any] = collections.deque()
        self.lock = threading.Lock()  # one flush at a time; no capture begins during one
        self.captures = 0  # captures in progress in this process
        self.stopped = False

    def _event(self) -> Any:
        try:
            return self.free.pop()
        except IndexError:
            return self.new_event()

    def wrap(self, replay: Callable[..., Any],
             capturing: Callable[[], bool]) -> Callable[..., Any]:
        @functools.wraps(replay)
        def timed_replay(graph: Any, *args: Any, **kwargs: Any) -> Any:
            if self.stopped or capturing():
                return replay(graph, *args, **kwargs)
            if self.device is None:
                self.device = self.current_device()
            start, end = self._event(), self._event()
            t = time.monotonic_ns()
            start.record()
            out = replay(graph, *args, **kwargs)
            end.record()
            self.pending.append((t, id(graph), start, end))
            return out

        timed_replay.__artune_graph_times__ = True  # type: ignore[attr-defined]
        return timed_replay

    def wrap_capture(self, begin: Callable[..., Any], end: Callable[..., Any],
                     ) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``capture_begin`` and ``capture_end`` counting the captures in progress."""
        @functools.wraps(begin)
        def capture_begin(graph: Any, *args: Any, **kwargs: Any) -> Any:
            with self.lock:  # waits for a flush that is querying events
                self.captures += 1
            try:
                return begin(graph, *args, **kwargs)
            except BaseException:
                with self.lock:
                    self.captures -= 1
                raise

        @functools.wraps(end)
        def capture_end(graph: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return end(graph, *args, **kwargs)
            finally:
                with self.lock:
                    self.captures -= 1

        return capture_begin, capture_end

    def flush(self) -> int:
        """Write every replay whose end event has completed, in launch order; the count. Nothing
        while a capture is in progress."""
        lines = []
        with self.lock:
            if self.captures:
                return 0
            while self.pending and self.pending[0][3].query():
                t, key, start, end = self.pending.popleft()
                lines.append(f"{t} {key} {start.elapsed_time(end) * 1e3:.2f}\n")
                self.free.extend((start, end))
            if lines:
                with self.path.open("a") as f:
                    f.writelines(lines)
        return len(lines)

    def stop(self, exc: BaseException) -> None:
        """No more timing (the replays run as they are), after the writer failed."""
        self.stopped = True
        self.pending.clear()
        logger.warning("artune: graph times stopped (%s: %s); replays are no longer timed",
                       type(exc).__name__, exc)

    def run(self) -> None:
        """The writer thread: a flush every PERIOD_S, on the timed replays' GPU."""
        on_device = False
        while not self.stopped:
            time.sleep(PERIOD_S)
            try:
                if not on_device and self.device is not None:
                    self.set_device(self.device)
                    on_device = True
                if on_device:
                    self.flush()
            except Exception as exc:  # noqa: BLE001 - a measuring aid must not stop the server
                self.stop(exc)

    def at_exit(self) -> None:
        """The replays of the last PERIOD_S, at interpreter exit (best effort)."""
        with contextlib.suppress(Exception):
            if not self.stopped:
                self.flush()


def install(folder: str, graph_cls: Any = None, new_event: Callable[[], Any] | None = None,
            capturing: Callable[[], bool] | None = None, thread: bool = True,
            devices: tuple[Callable[[], int], Callable[[int], None]] | None = None) -> bool:
    """Time every replay of ``graph_cls`` (``torch.cuda.CUDAGraph``) in this process from now
    on, into ``folder``; once per process (False when already installed). ``new_event``
    (``torch.cuda.Event(enable_timing=True)``), ``capturing``
    (``torch.cuda.is_current_stream_capturing``) and ``devices`` (``torch.cuda``'s
    current_device and set_device) are the defaults' seams for tests."""
    if _STATE:
        return False
    import torch

    cls = graph_cls if graph_cls is not None else torch.cuda.CUDAGraph
    path = Path(folder) / f"graph-times-pid{os.getpid()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    current, set_device = devices or (torch.cuda.current_device, torch.cuda.set_device)
    rec = _Recorder(path, new_event or functools.partial(torch.cuda.Event, enable_timing=True),
                    current, set_device)
    timed = rec.wrap(cls.replay, capturing or torch.cuda.is_current_stream_capturing)
    begin, end = rec.wrap_capture(cls.capture_begin, cls.capture_end)
    cls.replay, cls.capture_begin, cls.capture_end = timed, begin, end  # type: ignore[method-assign]
    _STATE["recorder"] = rec
    atexit.register(rec.at_exit)
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


def read_folder(folder: str | Path) -> dict[str, list[tuple[int, int, float]]]:
    """Every process's replays in ``folder``: file name -> [(launch ns, graph id, GPU µs)]
    sorted by launch time (``window_stats`` looks windows up by it)."""
    return {path.name: sorted(_replays(path))
            for path in sorted(Path(folder).glob("graph-times-pid*.txt"))}


def summary(folder: str | Path) -> list[dict[str, Any]]:
    """Per process (file) and graph: replays and the GPU time's median, 10th and 90th
    percentile in µs, the graphs of a process in order of their median (in a decode engine,
    one graph per captured batch size: the larger, the longer). ValueError when ``folder``
    holds no times."""
    series = read_folder(folder) if Path(folder).is_dir() else {}
    if not series:
        raise ValueError(f"no graph times (graph-times-pid*.txt) in {folder}: serve with "
                         f"ARTUNE_GRAPH_TIMES={folder} first")
    out = []
    for name, replays in series.items():
        by_graph: dict[int, list[float]] = {}
        for _, key, us in replays:
            by_graph.setdefault(key, []).append(us)
        rows: list[dict[str, Any]] = []
        for key, times in by_graph.items():
            p10, p90 = times[0], times[0]
            if len(times) > 1:
                q = statistics.quantiles(times, n=10, method="inclusive")
                p10, p90 = q[0], q[-1]
            rows.append({"process": Path(name).stem.removeprefix("graph-times-"), "graph": key,
                         "replays": len(times), "median_us": statistics.median(times),
                         "p10_us": p10, "p90_us": p90})
        out += sorted(rows, key=lambda r: r["median_us"])
    return out


def window_stats(series: dict[str, list[tuple[int, int, float]]], start_ns: int,
                 end_ns: int) -> dict[str, Any] | None:
    """The replays launched in [start_ns, end_ns], per process of ``series`` (``read_folder``:
    sorted by launch time) that replayed there, of its most replayed graph in the window (a
    decode engine replays one graph per batch size; others, e.g. a draft model's, are left out;
    ``graphs`` says how many a process replayed there). Returns, in ms:

    - ``graph_ms``: where every process replayed that graph equally often (``aligned``), the
      median over the steps of the fastest process's time at each step: a rank that launched
      a step's replay before its peers waits inside the graph for them, the one launched last
      measures the graph itself; otherwise ``graph_ms_fastest_rank``;
    - ``graph_ms_fastest_rank`` / ``graph_ms_max``: the fastest / slowest process's median;
    - ``replays`` (the fewest of a process) and ``processes``.

    None when no process replayed in the window."""
    times, graphs = [], 0
    for rows in series.values():
        lo = bisect.bisect_left(rows, start_ns, key=lambda r: r[0])
        hi = bisect.bisect_right(rows, end_ns, key=lambda r: r[0])
        inside = [(key, us) for _, key, us in rows[lo:hi]]
        if not inside:
            continue
        counts = collections.Counter(key for key, _ in inside)
        graphs = max(graphs, len(counts))
        top = counts.most_common(1)[0][0]
        times.append([us for key, us in inside if key == top])
    if not times:
        return None
    medians = [statistics.median(t) / 1e3 for t in times]
    aligned = len({len(t) for t in times}) == 1
    per_step = (statistics.median(min(step) for step in zip(*times, strict=True)) / 1e3
                if aligned else min(medians))
    return {"graph_ms": per_step, "graph_ms_fastest_rank": min(medians),
            "graph_ms_max": max(medians), "replays": min(len(t) for t in times),
            "processes": len(times), "graphs": graphs, "aligned": aligned}
