"""Faults during a tune: a backend that raises or is wrong, a rank killed mid-tune, resume.

The fake backends below are injected into the real CLI with ``--extra-backend
NAME=test_tune_faults:Class`` (tests/ is on the ranks' PYTHONPATH). They are correct where they
run but slow (a sleep per call), so they never win a range: a profile may only route to the
backends artune knows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import run_artune, run_gloo

from artune.backends.gloo import GlooBackend
from artune.profile import load

pytestmark = pytest.mark.slow

BIG = 65536
KILL_MARKER_ENV = "ARTUNE_TEST_KILL_MARKER"


class _Slow(GlooBackend):
    @classmethod
    def search_space(cls, nbytes: int, ctx: Any) -> dict[str, list[Any]]:
        return {}

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        # far above gloo's own time even on a loaded 2-core machine (3 ms was not: a fake
        # then won an eager range there)
        time.sleep(0.02)
        return super().all_reduce(x, params)


class RaisesWhenTimed(_Slow):
    """Passes the gate (its first call at a size), then raises while being timed at BIG."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.calls: dict[int, int] = {}

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        n = x.numel() * x.element_size()
        self.calls[n] = self.calls.get(n, 0) + 1
        if n >= BIG and self.calls[n] > 1:
            raise RuntimeError("illegal memory access (injected)")
        return super().all_reduce(x, params)


class WrongAtBig(_Slow):
    """Right below BIG, off by one at BIG and above."""

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        y = super().all_reduce(x, params)
        return y + 1 if x.numel() * x.element_size() >= BIG else y


class KillsRank1(_Slow):
    """Rank 1 kills itself (SIGKILL) at BIG, once: while the marker file does not exist."""

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        marker = os.environ.get(KILL_MARKER_ENV)
        if marker and self.ctx.rank == 1 and x.numel() * x.element_size() >= BIG:
            if not os.path.exists(marker):
                Path(marker).write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
        return super().all_reduce(x, params)


class Scribbler(_Slow):
    """Passes the gate, then, while being timed, overwrites its input with NaN (as a kernel
    writing out of bounds into a neighbouring allocation would)."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.calls = 0

    def all_reduce(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        self.calls += 1
        y = super().all_reduce(x, params)
        if self.calls > 1:
            x.fill_(float("nan"))
        return y


class Late(_Slow):
    """Set up after the other backends are measured (``late_setup``, as SGLang's is)."""

    late_setup = True


def _extra(*pairs: str) -> list[str]:
    out = []
    for p in pairs:
        out += ["--extra-backend", p]
    return out


def test_raising_and_wrong_backends_are_excluded_with_reason(
    tmp_path: Path, cpu_env: dict[str, str]
) -> None:
    out = tmp_path / "faults.json"
    r = run_artune(
        "tune", "--device", "cpu", "--quick", "--sizes", f"4K,{BIG}", "--modes", "eager",
        "--backends", "gloo,raiser,wrong", "--out", str(out), "--no-validate",
        *_extra("raiser=test_tune_faults:RaisesWhenTimed", "wrong=test_tune_faults:WrongAtBig"),
        env=cpu_env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    prof = load(out)
    skipped = {(s["backend"], s["nbytes"]): s for s in prof.data["skipped"]}
    raised = skipped[("raiser", BIG)]
    assert "illegal memory access (injected)" in raised["reason"] and raised["mode"] == "eager"
    wrong = skipped[("wrong", BIG)]
    assert "max abs error" in wrong["reason"] and wrong["mode"] is None  # the gate
    measured = {(m["backend"], m["nbytes"]) for m in prof.data["measurements"]}
    # Both ran fine at 4K, and the tune went on to measure everything else at BIG.
    assert {("raiser", 4096), ("wrong", 4096), ("gloo", 4096), ("gloo", BIG)} <= measured
    assert ("raiser", BIG) not in measured and ("wrong", BIG) not in measured
    assert prof.backends_used() == ["gloo"]


def _finished(storage: str) -> dict[tuple[str, int], tuple[str, Any]]:
    """(study, trial number) -> (state, start time) of every finished trial."""
    out = {}
    for name in optuna.get_all_study_names(storage):
        if name == "artune-meta":
            continue
        for t in optuna.load_study(study_name=name, storage=storage).trials:
            if t.state.name != "RUNNING" and ("measurement" in t.user_attrs
                                              or "skip" in t.user_attrs):
                out[(name, t.number)] = (t.state.name, t.datetime_start)
    return out


def test_killed_rank_stops_the_tune_and_resume_keeps_measurements(
    tmp_path: Path, cpu_env: dict[str, str]
) -> None:
    out = tmp_path / "killed.json"
    storage = f"sqlite:///{out}.optuna.db"
    args = ("tune", "--device", "cpu", "--quick", "--sizes", f"4K,16K,{BIG}", "--out", str(out),
            "--backends", "gloo,killer", *_extra("killer=test_tune_faults:KillsRank1"))
    env = dict(cpu_env, **{KILL_MARKER_ENV: str(tmp_path / "killed-once")})
    t0 = time.monotonic()
    r = run_artune(*args, env=env, timeout_s=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rank 1" in r.stderr and "SIGKILL" in r.stderr and "--resume" in r.stderr
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f}s to be stopped"
    assert not out.exists()
    before = _finished(storage)
    assert len(before) >= 4 * 2, "the sizes before the kill were measured and stored"

    r2 = run_artune(*args, "--resume", env=env, timeout_s=180)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "resuming from" in r2.stdout
    after = _finished(storage)
    # Nothing measured before the kill was measured again: same trials, same start times.
    assert all(after[k] == v for k, v in before.items())
    # And each study ends with exactly its budget: gloo 3 chunk settings in graph mode and 2 in
    # eager (its graph best, then the default), killer 1.
    per_study: dict[str, int] = {}
    for name, _ in after:
        per_study[name] = per_study.get(name, 0) + 1
    assert len(per_study) == 2 * 3 * 2  # backends x sizes x modes
    want = {"gloo|graph": 3, "gloo|eager": 2}
    assert all(n == want.get(f"{s.split('|')[0]}|{s.split('|')[2]}", 1)
               for s, n in per_study.items()), per_study
    prof = load(out)
    assert {m["nbytes"] for m in prof.data["measurements"]} == {4096, 16384, BIG}


def _dies_and_survives(rank: int, world: int) -> dict[str, Any]:
    import datetime

    import torch.distributed as dist

    from artune.autotune.comm import Comm, HostCollectiveError
    from artune.autotune.runner import RankEnv, _start_heartbeat

    cpu = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=20))
    hb = _start_heartbeat(RankEnv(rank, world, rank, world), 20.0)
    comm = Comm(cpu, rank, world, 20.0, hb)
    comm.barrier("start")
    if rank == 1:
        os._exit(9)  # dies without a word, like a segfault or the OOM killer
    t0 = time.monotonic()
    try:
        comm.broadcast({"op": "trial"}, "sending trial")
        comm.barrier("after")
    except HostCollectiveError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - t0}
    finally:
        if hb is not None:
            hb.stop()
    return {"error": None, "seconds": time.monotonic() - t0}


def test_survivor_names_the_dead_rank_within_bound() -> None:
    """Under torchrun/srun (no artune launcher), a survivor's error names the dead rank."""
    r0, _ = run_gloo(_dies_and_survives, 2, may_die=frozenset({1}), timeout_s=90)
    assert r0["error"] is not None
    assert "rank(s) 1 stopped" in r0["error"] and "--resume" in r0["error"]
    assert r0["seconds"] < 40


def _raw_collective_after_a_death(rank: int, world: int) -> dict[str, Any]:
    import datetime

    import torch
    import torch.distributed as dist

    from artune.autotune.comm import Comm
    from artune.autotune.runner import RankEnv, _start_heartbeat

    cpu = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=20))
    hb = _start_heartbeat(RankEnv(rank, world, rank, world), 20.0)
    comm = Comm(cpu, rank, world, 20.0, hb)
    comm.barrier("start")
    try:
        # Every peer alive: an error of the tune's own is not blamed on a peer.
        own = comm.stopped_by_peer(ValueError("a bug of the tune's own"))
        comm.barrier("checked")
        if rank == 1:
            os._exit(9)
        t0 = time.monotonic()
        try:  # a collective outside Comm, as the gate's and the backends' are
            dist.all_reduce(torch.ones(4), group=cpu)
            dist.all_reduce(torch.ones(4), group=cpu)
        except Exception as exc:  # noqa: BLE001 - what runner.py catches
            says, seconds = comm.stopped_by_peer(exc), time.monotonic() - t0
            # a peer is dead now, but an error raised outside torch.distributed is still the
            # tune's own: not blamed on the peer, and no wait for its heartbeat
            t1 = time.monotonic()
            try:
                raise RuntimeError("a bug of the tune's own")
            except RuntimeError as bug:
                mine = comm.stopped_by_peer(bug)
            return {"own": own, "says": says, "seconds": seconds, "mine": mine,
                    "mine_s": time.monotonic() - t1}
        return {"own": own, "says": "no error", "seconds": time.monotonic() - t0}
    finally:
        if hb is not None:
            hb.stop()


def test_survivor_of_a_raw_collective_names_the_dead_rank() -> None:
    """Found under a real Slurm (srun -n 2, one task SIGKILLed): the gate's own
    dist.all_reduce broke with gloo's "Connection reset by peer" traceback, naming no rank, as
    nothing but Comm's collectives named the dead. Now the rank's error names it."""
    r0, _ = run_gloo(_raw_collective_after_a_death, 2, may_die=frozenset({1}), timeout_s=90)
    assert r0["own"] is None
    assert r0["says"] is not None and "rank(s) 1 stopped" in r0["says"], r0
    assert r0["says"].startswith("rank 0: a collective of the tune failed")
    assert "--resume" in r0["says"] and r0["seconds"] < 40
    assert r0["mine"] is None and r0["mine_s"] < 1.0


class _Store:
    """A stand-in rendezvous store whose writes fail while ``down`` is set."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False

    def set(self, key: str, value: str) -> None:
        if self.down:
            raise RuntimeError("sendBytes failed")
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)


def test_heartbeat_rides_out_a_blip_and_stops_once_the_store_stays_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from artune.autotune import comm

    clock = [0.0]
    monkeypatch.setattr(comm.time, "monotonic", lambda: clock[0])
    store = _Store()
    hb = comm.Heartbeat(store, 1, 3)
    hb._beat()
    store.down = True
    for t in (1.0, 3.0):  # failing for less than HEARTBEAT_STALE_S: keeps beating
        clock[0] = t
        hb._beat()
    assert not hb._stop.is_set()
    store.down = False
    clock[0] = 4.0
    hb._beat()  # back: the failure clock restarts
    store.down = True
    for t in (5.0, 5.0 + comm.HEARTBEAT_STALE_S):
        clock[0] = t
        hb._beat()
    assert not hb._stop.is_set()
    clock[0] = 5.1 + comm.HEARTBEAT_STALE_S
    hb._beat()
    assert hb._stop.is_set()
    # rank 0 never beat, rank 2 did just now: 0 is stale, and the store is not "gone"
    store.down = False
    comm.Heartbeat(store, 2, 3)._beat()
    assert comm.Heartbeat(store, 1, 3).stale_ranks() == [0]


def test_interrupted_run_stops_all_ranks_and_resumes(
    tmp_path: Path, cpu_env: dict[str, str]
) -> None:
    """SIGTERM to `artune tune` (the launcher) stops every rank; --resume finishes the job."""
    import sqlite3
    import subprocess
    import sys

    out = tmp_path / "interrupted.json"
    db = Path(f"{out}.optuna.db")
    args = ["tune", "--device", "cpu", "--sizes", "1K:1M", "--modes", "eager", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "artune.cli", *args], env=cpu_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finished() -> int:
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(db) as con:
                row = con.execute("SELECT COUNT(*) FROM trials WHERE state != 'RUNNING'").fetchone()
            return int(row[0])
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 120
    while finished() < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the tune ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    assert "interrupted" in err and "--resume" in err
    kept = finished()
    assert kept >= 5 and not out.exists()

    r = run_artune(*args, "--resume", env=cpu_env, timeout_s=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert finished() >= kept
    from artune.autotune.config import parse_sizes

    assert {m["nbytes"] for m in load(out).data["measurements"]} == set(parse_sizes("1K:1M"))


def test_a_backend_scribbling_on_the_input_cannot_fail_the_others(
    tmp_path: Path, cpu_env: dict[str, str]
) -> None:
    out = tmp_path / "scribble.json"
    r = run_artune(
        "tune", "--device", "cpu", "--quick", "--sizes", f"4K,{BIG}", "--modes", "eager",
        "--backends", "scribbler,gloo", "--out", str(out), "--no-validate",
        *_extra("scribbler=test_tune_faults:Scribbler"), env=cpu_env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    prof = load(out)
    measured = {(m["backend"], m["nbytes"]) for m in prof.data["measurements"]}
    assert {("gloo", 4096), ("gloo", BIG)} <= measured, prof.data["skipped"]
    assert "input buffer was modified" in r.stderr + r.stdout


def test_a_late_setup_backend_is_set_up_and_measured_after_the_others(
    tmp_path: Path, cpu_env: dict[str, str]
) -> None:
    out = tmp_path / "late.json"
    storage = f"sqlite:///{out}.optuna.db"
    r = run_artune(
        "tune", "--device", "cpu", "--quick", "--sizes", "4K,16K", "--modes", "graph,eager",
        "--backends", "late,gloo", "--out", str(out), *_extra("late=test_tune_faults:Late"),
        env=cpu_env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    prof = load(out)
    measured = {(m["backend"], m["mode"], m["nbytes"]) for m in prof.data["measurements"]
                if m.get("source") != "validation"}
    assert measured == {(b, mo, n) for b in ("gloo", "late") for mo in ("graph", "eager")
                        for n in (4096, 16384)}
    starts = _finished(storage)
    gloo = [t for (study, _), (_, t) in starts.items() if study.startswith("gloo|")]
    late = [t for (study, _), (_, t) in starts.items() if study.startswith("late|")]
    assert gloo and late and max(gloo) < min(late), "late was measured before gloo finished"
    assert prof.data["validation"]  # both validated side by side after the tune


@pytest.mark.parametrize("after_s", [0.5, 4.0])
def test_ctrl_c_to_the_terminal_group_twice_stops_quietly(
    tmp_path: Path, cpu_env: dict[str, str], after_s: float
) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground group (launcher and ranks),
    here twice in a row, early (ranks still importing torch) or mid-tune: the launcher stops
    the ranks and says how to resume; no traceback from any process, exit code 130."""
    import subprocess
    import sys

    out = tmp_path / "ctrl_c.json"
    args = ["tune", "--device", "cpu", "--sizes", "1K:1M", "--modes", "eager", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "artune.cli", *args], env=cpu_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(after_s)
    assert proc.poll() is None, "the tune ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err
