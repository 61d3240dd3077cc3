"""A real tune: `artune tune --device cpu` with 2 gloo ranks, a real Optuna study, a profile."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import run_artune

from artune.autotune.table import build_tables
from artune.profile import load, select

pytestmark = pytest.mark.slow


def test_cpu_dry_run_tune_end_to_end(tmp_path: Path, cpu_env: dict[str, str]) -> None:
    out = tmp_path / "dry.json"
    args = ("tune", "--device", "cpu", "--quick", "--sizes", "4K,64K", "--out", str(out),
            "--linear-shapes", "64x128")
    r = run_artune(*args, env=cpu_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"profile written to {out}" in r.stdout.replace("\n", "")
    # the fused linear layers need GPUs: said, and the profile has no linear section
    assert "fused linear layers not measured: a CPU dry run" in r.stdout
    assert "validation: routed all-reduce within tolerance of the fastest candidate at" in r.stdout

    prof = load(out)
    topo = prof.fingerprint["topology"]
    assert prof.dry_run and topo["device"] == "cpu" and topo["world_size"] == 2
    assert prof.data["command"].startswith("artune tune --device cpu --quick")
    assert "linear" not in prof.data and "GPUs" in prof.data["linear_skipped"]
    assert set(prof.tables["bfloat16"]) == {"graph", "eager"}
    assert select(prof, 4096, "bfloat16", "eager").backend == "gloo"
    assert not select(prof, 1 << 30, "bfloat16", "eager").covered  # beyond the table

    ms = [m for m in prof.data["measurements"] if m.get("source") != "validation"]
    retimed = [m for m in prof.data["measurements"] if m.get("source") == "validation"]
    # the validation pass re-timed gloo at each of the 4 points; the tables are what the
    # measurements give, those re-times outranking the tune's
    assert sorted((m["mode"], m["nbytes"]) for m in retimed) == sorted(
        (mo, n) for mo in ("graph", "eager") for n in (4096, 65536))
    assert build_tables(prof.data["measurements"], fallback="gloo") == prof.tables
    points = {(m["mode"], m["nbytes"]) for m in ms}
    assert points == {(mo, n) for mo in ("graph", "eager") for n in (4096, 65536)}
    for m in ms:
        assert m["backend"] == "gloo" and len(m["rank_medians_us"]) == 2
        assert m["latency_us"] == max(m["rank_medians_us"]) > 0 and m["spread_us"] >= 0
    # Graph studies tried all 3 chunk settings (measured, or pruned with the reason); eager ones
    # the graph study's best and the default (driver.EAGER_FOLLOW_TRIALS).
    pruned = [s for s in prof.data["skipped"] if s["reason"].startswith("pruned")]
    tried = ms + pruned
    for mode, count in (("graph", 3), ("eager", 2)):
        for n in (4096, 65536):
            assert sum(1 for t in tried if t["mode"] == mode and t["nbytes"] == n) == count
    val = prof.data["validation"]
    assert len(val) == 4 and all(v["routed_backend"] == "gloo" for v in val)
    assert all(v["routed_us"] > 0 and v["best_us"] > 0 for v in val)
    # the controls (ARTUNE_VALIDATE_CONTROLS) are off by default
    assert not any("router_gap_us" in v or "control_gap_us" in v for v in val)
    host = prof.data["tune_host"]  # rank 0's CPUs and Python threads at the end
    assert host["cpu_count"] >= 1 and "MainThread" in host["python_threads"]

    # The Optuna storage next to the profile is the measurement store.
    storage = f"sqlite:///{out}.optuna.db"
    names = [n for n in optuna.get_all_study_names(storage) if n != "artune-meta"]
    assert sorted(names) == sorted(f"gloo|bfloat16|{mo}|{n}" for mo in ("graph", "eager")
                                   for n in (4096, 65536))
    trials = [t for n in names for t in optuna.load_study(study_name=n, storage=storage).trials]
    assert len(trials) == 2 * 3 + 2 * 2
    for n in (4096, 65536):  # each eager study began with its graph study's best set
        best = min((m for m in ms if m["mode"] == "graph" and m["nbytes"] == n),
                   key=lambda m: m["latency_us"])
        eager = optuna.load_study(study_name=f"gloo|bfloat16|eager|{n}", storage=storage)
        assert min(eager.trials, key=lambda t: t.number).user_attrs["params"] == best["params"]
    assert sum("measurement" in t.user_attrs for t in trials) == len(ms)

    # Same command again: the storage exists, so it asks for --resume (and starts no rank).
    again = run_artune(*args, env=cpu_env)
    assert again.returncode == 2 and "--resume" in again.stderr

    shown = run_artune("show", str(out), env=cpu_env)
    assert shown.returncode == 0 and "DRY RUN" in shown.stdout
    assert json.loads(run_artune("show", str(out), "--json", env=cpu_env).stdout)["dry_run"]


def test_storage_url_elsewhere_holds_the_studies(tmp_path: Path, cpu_env: dict[str, str]
                                                 ) -> None:
    """``--storage URL``: the Optuna studies live there (not next to --out), and --resume reads
    them back from there."""
    out = tmp_path / "p.json"
    db = tmp_path / "elsewhere" / "studies.db"
    db.parent.mkdir()
    args = ("tune", "--device", "cpu", "--quick", "--sizes", "4K", "--modes", "eager",
            "--out", str(out), "--storage", f"sqlite:///{db}")
    r = run_artune(*args, env=cpu_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert db.exists() and not (tmp_path / "p.json.optuna.db").exists()
    names = optuna.get_all_study_names(f"sqlite:///{db}")
    assert "gloo|bfloat16|eager|4096" in names
    again = run_artune(*args, "--resume", env=cpu_env)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stdout + again.stderr
    # a finished tune resumed: nothing measured again, and it says the validation reruns
    assert "nothing was left to measure" in " ".join(again.stdout.split())
    assert "nothing was left to measure" not in " ".join(r.stdout.split())


def test_resume_with_fewer_sizes_describes_only_those(tmp_path: Path, cpu_env: dict[str, str]
                                                      ) -> None:
    """A resumed tune's profile covers what its own command asks for: measurements stored by
    the first run at other sizes are left out, and the run says how many."""
    out = tmp_path / "p.json"
    base = ("tune", "--device", "cpu", "--quick", "--modes", "eager", "--out", str(out))
    first = run_artune(*base, "--sizes", "4K,64K", env=cpu_env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert {m["nbytes"] for m in load(out).data["measurements"]} == {4096, 65536}
    again = run_artune(*base, "--sizes", "4K", "--resume", env=cpu_env)
    assert again.returncode == 0, again.stdout + again.stderr
    text = " ".join(again.stdout.split())
    assert "stored measurements of other sizes, dtypes, modes or backends" in text
    assert {m["nbytes"] for m in load(out).data["measurements"]} == {4096}
    assert not select(load(out), 65536, "bfloat16", "eager").covered
    # the profile it replaced stays beside it, and the run says where
    kept = tmp_path / "p.before-resume.json"
    assert str(kept) in text
    assert {m["nbytes"] for m in load(kept).data["measurements"]} == {4096, 65536}
    # a profile copied in without its storage is not overwritten by a fresh tune either
    copy = tmp_path / "copy.json"
    copy.write_bytes(out.read_bytes())
    fresh = run_artune(*base[:-1], str(copy), "--sizes", "4K", env=cpu_env)
    assert fresh.returncode == 2 and "already exists" in fresh.stderr and "--resume" in fresh.stderr
    assert copy.read_bytes() == out.read_bytes()


def test_validation_controls_on_time_the_router_and_an_a_a_pair(
        tmp_path: Path, cpu_env: dict[str, str]) -> None:
    """ARTUNE_VALIDATE_CONTROLS=1: each eager validation point also carries the routed
    backend's direct call against the routed one (the router's own cost) and against a twin
    of itself (A/A); graph points, where the router is not on the replay, do not."""
    out = tmp_path / "controls.json"
    r = run_artune("tune", "--device", "cpu", "--quick", "--sizes", "4K,16K", "--out", str(out),
                   env=dict(cpu_env, ARTUNE_VALIDATE_CONTROLS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    val = load(out).data["validation"]
    assert {v["mode"] for v in val} == {"eager", "graph"}
    for v in val:
        if v["mode"] == "graph":
            assert "router_gap_us" not in v and "control_gap_us" not in v
        else:
            assert len(v["router_gap_us"]) == 2 and len(v["control_gap_us"]) == 2, v
            assert v["control_gap_us"][1] >= 0  # an interquartile range
    assert "two identical calls read" in r.stdout.replace("\n", " ")


def test_a_finished_tune_leaves_its_storage_as_one_file(tmp_path: Path,
                                                        cpu_env: dict[str, str]) -> None:
    """The SQLite storage's write-ahead log is folded into the file at the end: no -wal or
    -shm file is left beside it, and the file alone holds every trial."""
    out = tmp_path / "p.json"
    r = run_artune("tune", "--device", "cpu", "--quick", "--sizes", "4K", "--modes", "eager",
                   "--out", str(out), env=cpu_env)
    assert r.returncode == 0, r.stdout + r.stderr
    db = Path(f"{out}.optuna.db")
    assert db.exists()
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    assert "gloo|bfloat16|eager|4096" in optuna.get_all_study_names(f"sqlite:///{db}")


def test_a_reader_going_away_does_not_stop_the_tune(tmp_path: Path, cpu_env: dict[str, str]
                                                    ) -> None:
    """`artune tune ... | head -1`: the tune runs on with its output dropped and writes its
    profile (it used to end with rank 0's broken pipe, reported as another rank's exit)."""
    import shlex
    import subprocess
    import sys

    out = tmp_path / "p.json"
    cmd = (f"{shlex.quote(sys.executable)} -m artune.cli tune --device cpu --quick --sizes 4K "
           f"--out {shlex.quote(str(out))} | head -1; echo status=${{PIPESTATUS[0]}}")
    r = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True,
                       env=cpu_env, timeout=300)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("artune tune:"), r.stdout
    assert lines[1] == "status=0", r.stdout + r.stderr
    assert load(out).data["tables"] and "exited" not in r.stderr, r.stderr
