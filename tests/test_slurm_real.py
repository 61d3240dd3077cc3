"""``artune tune`` under a real Slurm, where one answers (``sinfo``): the tasks of a step are
the tune's ranks. Skipped elsewhere (CI has no Slurm); ``benchmarks/slurm_local.sh`` sets one
up on a Debian machine, and ``benchmarks/slurm_check.sh`` runs the longer checks (concurrent
steps, batch scripts, killed ranks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import artune_env


def _nodes() -> int:
    """Nodes of the default partition (srun's), 0 where no Slurm controller answers or that
    partition is down."""
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        return 0
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %D %a"], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if r.returncode != 0:
        return 0
    nodes = 0
    for line in r.stdout.splitlines():  # one line per partition and node state
        part, count, avail = (line.split() + ["", "", ""])[:3]
        if part.endswith("*") and avail == "up" and count.isdigit():
            nodes += int(count)
    return nodes


NODES = _nodes()
pytestmark = pytest.mark.skipif(NODES == 0, reason="no Slurm controller answers here (sinfo)")


def _srun_tune(tmp_path: Path, *srun_args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "slurm.json"
    # --immediate: on a busy cluster the step is not queued (the test skips instead)
    cmd = ["srun", "--immediate=60", *srun_args, sys.executable, "-m", "artune.cli", "tune",
           "--device", "cpu", "--quick", "--sizes", "4K", "--out", str(out)]
    env = artune_env({"CUDA_VISIBLE_DEVICES": ""})
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0 and "Unable to allocate resources" in r.stderr:
        pytest.skip(f"Slurm gave no resources within 60 s: {r.stderr.strip()[:200]}")
    return r, out


def test_srun_tasks_are_the_ranks_of_one_tune(tmp_path: Path) -> None:
    r, out = _srun_tune(tmp_path, "-N", "1", "-n", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("artune tune: 2 ranks") == 1  # one tune, not one per task
    topo = json.loads(out.read_text())["fingerprint"]["topology"]
    assert (topo["world_size"], topo["nodes"]) == (2, 1)


@pytest.mark.skipif(NODES < 2, reason="the Slurm partition has one node")
def test_srun_over_two_nodes_and_uneven_tasks_refused(tmp_path: Path) -> None:
    r, out = _srun_tune(tmp_path, "-N", "2", "--ntasks-per-node", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    topo = json.loads(out.read_text())["fingerprint"]["topology"]
    assert (topo["world_size"], topo["nodes"], topo["gpus_per_node"]) == (4, 2, 2)
    out.unlink()
    r, out = _srun_tune(tmp_path, "-N", "2", "-n", "3")
    assert r.returncode != 0 and "the same number on every node" in r.stderr
    assert not out.exists()
