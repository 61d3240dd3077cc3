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

    def capture_begin(self, fail: bool = False) -> None:
        if fail:
            raise RuntimeError("capture refused")

    def capture_end(self) -> None:
        pass


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

    devices: list[int] = []
    assert graph_times.install(str(tmp_path / "t"), graph_cls=cls, new_event=new_event,
                               capturing=lambda: capturing[0], thread=False,
                               devices=(lambda: 3, devices.append))
    return {"cls": cls, "events": events, "capturing": capturing, "devices": devices,
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
    assert [(key, us) for _, key, us in series] == [(id(g), 2500.0), (id(g), 2500.0)]
    # the events go back to the pool and are reused, not created again
    g.replay()
    assert len(ev) == 4
    assert rec.device == 3  # the GPU of the timed replays, for the writer thread


def test_nothing_is_queried_while_a_graph_is_captured(timed: dict[str, Any]) -> None:
    """An event query from the writer thread during a capture would invalidate it (CUDA's
    global capture mode): between capture_begin and capture_end, flush writes nothing."""
    g = timed["cls"](1.0)
    g.replay()
    rec = graph_times.installed()
    assert rec is not None
    timed["events"][1].done = True
    other = timed["cls"](2.0)
    other.capture_begin()
    assert rec.captures == 1 and rec.flush() == 0
    other.capture_end()
    assert rec.captures == 0 and rec.flush() == 1
    with pytest.raises(RuntimeError, match="refused"):
        other.capture_begin(fail=True)
    assert rec.captures == 0  # a capture that never began is not counted


def test_a_failing_writer_stops_timing_and_the_replays_go_on(
        timed: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The folder cannot be written: the writer thread logs, stops, drops what it held, and
    later replays run untimed (no events, nothing pending), on the GPU it was set to."""
    timed["path"].mkdir(parents=True)  # a folder where the file should be: every write fails
    g = timed["cls"](1.0)
    g.replay()
    rec = graph_times.installed()
    assert rec is not None
    timed["events"][1].done = True
    monkeypatch.setattr(graph_times, "PERIOD_S", 0.0)
    graph_times.logger.addHandler(caplog.handler)  # the artune logger does not propagate
    try:
        rec.run()  # returns once stopped
    finally:
        graph_times.logger.removeHandler(caplog.handler)
    assert rec.stopped and not rec.pending and timed["devices"] == [3]
    assert "graph times stopped" in caplog.text
    n = len(timed["events"])
    assert g.replay() == "out" and g.replays == 2
    assert len(timed["events"]) == n and not rec.pending


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
    assert rows == {"graph-times-pid1.txt": [(10, 7, 2.5)],
                    "graph-times-pid2.txt": [(11, 8, 2.4)]}
    (tmp_path / "graph-times-pid1.txt").write_text("10 7 2.50\n20 7 2.61\n")
    assert graph_times.read_folder(tmp_path)["graph-times-pid1.txt"] == [(10, 7, 2.5),
                                                                        (20, 7, 2.61)]


def test_replays_written_out_of_launch_order_are_read_in_it(tmp_path: Path) -> None:
    """Two threads replaying could append a later launch first: the windows still hold the
    right replays (window_stats looks them up by launch time)."""
    (tmp_path / "graph-times-pid1.txt").write_text("30 7 3.0\n10 7 1.0\n20 7 2.0\n40 7 4.0\n")
    series = graph_times.read_folder(tmp_path)
    assert [t for t, _, _ in series["graph-times-pid1.txt"]] == [10, 20, 30, 40]
    st = graph_times.window_stats(series, 15, 35)
    assert st is not None and st["replays"] == 2 and st["graph_ms"] == pytest.approx(2.5e-3)


def test_window_stats_take_the_fastest_rank_at_each_step() -> None:
    """Rank a launched first and waited 300 µs per replay for rank b: the window's graph time
    is b's; replays outside the window do not count."""
    a = [(t, 7, 2800.0 + (t % 3)) for t in range(100, 110)] + [(500, 7, 9999.0)]
    b = [(50, 7, 1.0)] + [(t, 7, 2500.0) for t in range(100, 110)]
    st = graph_times.window_stats({"a": a, "b": b}, 100, 109)
    assert st == {"graph_ms": 2.5, "graph_ms_fastest_rank": 2.5,
                  "graph_ms_max": pytest.approx(2.801), "replays": 10, "processes": 2,
                  "graphs": 1, "aligned": True}
    assert graph_times.window_stats({"a": a}, 200, 300) is None


def test_window_stats_when_the_last_launched_rank_changes_from_step_to_step() -> None:
    """Each step another of four ranks launched last (2000 µs); the others waited 300 µs more.
    Every rank's median holds the waits; the fastest rank at each step does not."""
    series = {f"r{r}": [(t, 7, 2000.0 + (0.0 if t % 4 == r else 300.0)) for t in range(100)]
              for r in range(4)}
    st = graph_times.window_stats(series, 0, 99)
    assert st is not None and st["graph_ms"] == pytest.approx(2.0)
    assert st["graph_ms_fastest_rank"] == pytest.approx(2.3) and st["aligned"]
    # ranks with different counts in the window: no step alignment, the fastest rank's median
    series["r0"] = series["r0"][:-1]
    st = graph_times.window_stats(series, 0, 99)
    assert st is not None and not st["aligned"] and st["graph_ms"] == pytest.approx(2.3)


def test_window_stats_keep_each_process_most_replayed_graph() -> None:
    """A second graph in the window (a draft model's, 400 µs, every third step) is left out."""
    rows = [(t, 9 if t % 3 == 0 else 7, 400.0 if t % 3 == 0 else 2500.0)
            for t in range(100, 201)]
    st = graph_times.window_stats({"p": rows}, 100, 200)
    assert st is not None and st["graph_ms"] == pytest.approx(2.5)
    assert st["graphs"] == 2 and st["replays"] == 68  # 101 replays, 33 of them the draft's


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

    def fails(folder: str) -> bool:
        raise NotADirectoryError(folder)

    monkeypatch.delenv("ARTUNE_DISABLE")
    monkeypatch.setattr(graph_times, "install", fails)
    plugin.register()  # a measuring aid that cannot run is a warning, never a failed start


@requires_gpus(1)
def test_real_graph_replays_are_timed_on_the_gpu(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """Installed before the capture, as in a server (the capture goes through the counting
    capture_begin / capture_end), then 20 replays of a graph of one sleep kernel with a slower
    sleep kernel outside it before each replay: the writer thread writes each replay's own
    time (the sleep inside), not the kernel queued before it."""
    import time

    import torch

    monkeypatch.setattr(graph_times, "_STATE", {})
    for name in ("replay", "capture_begin", "capture_end"):  # restored after the test
        monkeypatch.setattr(torch.cuda.CUDAGraph, name, getattr(torch.cuda.CUDAGraph, name))
    assert graph_times.install(str(tmp_path))
    rec = graph_times.installed()
    assert rec is not None
    stream = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1000)  # warm up the kernel before capture
        with torch.cuda.graph(g, stream=stream):
            torch.cuda._sleep(200_000)
        assert rec.captures == 0 and not rec.pending  # the capture itself is not timed
        for _ in range(20):
            torch.cuda._sleep(2_000_000)
            g.replay()
    torch.cuda.synchronize()
    deadline = time.monotonic() + 10 * graph_times.PERIOD_S
    while rec.pending and time.monotonic() < deadline:
        time.sleep(graph_times.PERIOD_S)
    assert not rec.pending and not rec.stopped and rec.device == torch.cuda.current_device()
    (rows,) = graph_times.read_folder(tmp_path).values()
    assert len(rows) == 20 and {key for _, key, _ in rows} == {id(g)}
    alone = statistics.median(us for _, _, us in rows)
    # 200k cycles at 1-2 GHz: 100-200 µs; the 2M-cycle kernel before each replay is not in it
    assert 50 < alone < 400, rows
