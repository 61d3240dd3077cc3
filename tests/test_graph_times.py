"""artune.integration.graph_times (ARTUNE_GRAPH_TIMES) with a stand-in graph class and events:
what a replay records, what is written when, and the window statistics a benchmark reads."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_gpus

from artune.integration import graph_times


class _Event:
    """A CUDA event's interface: ``record``, ``query``, ``elapsed_time`` (ms), on a clock the
    test moves; ``done`` says whether the GPU has reached it."""

    clock = [0.0]

    def __init__(self) -> None:
        self.at: float | None = None
        self.done = False

    def record(self) -> None:
        self.at = _Event.clock[0]
        self.done = False

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: _Event) -> float:
        assert self.at is not None and end.at is not None and end.done
        return end.at - self.at


class _Graph:
    """A graph whose replay takes ``ms`` on the stand-in clock."""

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self.replays = 0

    def replay(self) -> str:
        self.replays += 1
        _Event.clock[0] += self.ms
        return "out"


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Replays of a fresh copy of ``_Graph`` timed into tmp_path (no thread: the test flushes)."""
    monkeypatch.setattr(graph_times, "_STATE", {})
    cls = type("Graph", (_Graph,), {})
    events: list[_Event] = []
    capturing = [False]

    def new_event() -> _Event:
        events.append(_Event())
        return events[-1]

    assert graph_times.install(str(tmp_path / "t"), graph_cls=cls, new_event=new_event,
                               capturing=lambda: capturing[0], thread=False)
    return {"cls": cls, "events": events, "capturing": capturing,
            "path": tmp_path / "t" / f"graph-times-pid{os.getpid()}.txt"}


def test_each_replay_is_written_once_its_end_event_has_completed(timed: dict[str, Any]) -> None:
    g = timed["cls"](2.5)
    assert g.replay() == "out" and g.replays == 1  # the replay itself runs, its result returned
    assert g.replay() == "out"
    rec = graph_times.installed()
    assert rec is not None
    ev = timed["events"]
    assert len(ev) == 4 and len(rec.pending) == 2
    assert rec.flush() == 0 and not timed["path"].exists()  # the GPU has not reached them
    ev[1].done = True  # the first replay's end: written; the second waits, in launch order
    assert rec.flush() == 1
    ev[3].done = True
    assert rec.flush() == 1 and not rec.pending
    rows = graph_times.read_folder(timed["path"].parent)
    (name, series), = rows.items()
    assert name == timed["path"].name
    assert [us for _, us in series] == [2500.0, 2500.0]
    assert series[0][0] <= series[1][0]
    # the events go back to the pool and are reused, not created again
    g.replay()
    assert len(ev) == 4


def test_replays_during_a_capture_are_not_timed_and_install_is_once(
        timed: dict[str, Any]) -> None:
    timed["capturing"][0] = True
    g = timed["cls"](1.0)
    g.replay()
    rec = graph_times.installed()
    assert rec is not None and not rec.pending and not timed["events"]
    assert graph_times.install("elsewhere", graph_cls=timed["cls"]) is False
    assert getattr(timed["cls"].replay, "__artune_graph_times__", False)


def test_an_unfinished_last_line_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "graph-times-pid1.txt").write_text("10 7 2.50\n20 7 2.6")
    (tmp_path / "graph-times-pid2.txt").write_text("11 8 2.40\nnot a line\n")
    (tmp_path / "other.txt").write_text("5 5 5\n")
    rows = graph_times.read_folder(tmp_path)
    # "20 7 2.6" may be the start of "20 7 2.61": without its newline it is not read yet
    assert rows == {"graph-times-pid1.txt": [(10, 2.5)], "graph-times-pid2.txt": [(11, 2.4)]}
    (tmp_path / "graph-times-pid1.txt").write_text("10 7 2.50\n20 7 2.61\n")
    assert graph_times.read_folder(tmp_path)["graph-times-pid1.txt"] == [(10, 2.5), (20, 2.61)]


def test_window_stats_take_each_process_median_and_the_fastest_process() -> None:
    """Rank a launched first and waited 300 µs per replay for rank b: the window's graph time
    is b's median; replays outside the window do not count."""
    a = [(t, 2800.0 + (t % 3)) for t in range(100, 110)] + [(500, 9999.0)]
    b = [(t, 2500.0) for t in range(100, 110)] + [(50, 1.0)]
    st = graph_times.window_stats({"a": a, "b": b}, 100, 109)
    assert st == {"graph_ms": 2.5, "graph_ms_max": pytest.approx(2.801), "replays": 10,
                  "processes": 2}
    assert graph_times.window_stats({"a": a}, 200, 300) is None


def test_the_plugin_installs_it_with_or_without_a_profile(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """ARTUNE_GRAPH_TIMES works in a default engine (no profile: nothing else is hooked) and is
    off unless set; ARTUNE_DISABLE=1 turns it off with the rest."""
    from artune.integration import sglang as plugin

    calls: list[str] = []
    monkeypatch.setattr(graph_times, "install", lambda folder: calls.append(folder) or True)
    monkeypatch.delenv("ARTUNE_PROFILE", raising=False)
    monkeypatch.delenv("ARTUNE_GRAPH_TIMES", raising=False)
    monkeypatch.delenv("ARTUNE_DISABLE", raising=False)
    plugin.register()
    assert calls == []
    monkeypatch.setenv("ARTUNE_GRAPH_TIMES", str(tmp_path))
    plugin.register()
    assert calls == [str(tmp_path)]
    monkeypatch.setenv("ARTUNE_DISABLE", "1")
    plugin.register()
    assert calls == [str(tmp_path)]


@requires_gpus(1)
def test_real_graph_replays_are_timed_on_the_gpu(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """A captured graph of one sleep kernel, replayed 20 times with a slower sleep kernel
    outside it before each replay: each line holds the graph's own time (the sleep inside),
    not the kernel queued before it."""
    import torch

    monkeypatch.setattr(graph_times, "_STATE", {})
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", torch.cuda.CUDAGraph.replay)
    stream = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1000)  # warm up the kernel before capture
        with torch.cuda.graph(g, stream=stream):
            torch.cuda._sleep(200_000)
    torch.cuda.synchronize()
    assert graph_times.install(str(tmp_path), thread=False)
    rec = graph_times.installed()
    assert rec is not None
    with torch.cuda.stream(stream):
        for _ in range(20):
            torch.cuda._sleep(2_000_000)
            g.replay()
    torch.cuda.synchronize()
    assert rec.flush() == 20
    (rows,) = graph_times.read_folder(tmp_path).values()
    alone = statistics.median(us for _, us in rows)
    # 200k cycles at 1-2 GHz: 100-200 µs; the 2M-cycle kernel before each replay is not in it
    assert 50 < alone < 400, rows
