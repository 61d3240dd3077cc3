"""A tune started by ``srun`` (artune.autotune.slurm): the step's variables give each task its
rank and the rendezvous; a step of one task, or a batch script, launches ranks as a shell does."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import artune_env

from artune.autotune import slurm
from artune.profile import load


def test_host_lists_expand_as_slurm_writes_them() -> None:
    assert slurm.hostnames("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                       "login1"]
    assert slurm.hostnames("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert slurm.hostnames("node7") == ["node7"]
    assert slurm.hostnames("a[009-011]") == ["a009", "a010", "a011"]
    for bad in ("gpu[01-03", "gpu[a-b]"):
        with pytest.raises(ValueError, match="Slurm host list"):
            slurm.hostnames(bad)


def test_tasks_per_node_lists_expand() -> None:
    assert slurm.tasks_per_node("4(x2),3") == [4, 4, 3]
    assert slurm.tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks-per-node"):
        slurm.tasks_per_node("4(2)")


def _step_env(**kw: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    env.update(kw)
    return env


def test_a_task_of_a_step_is_a_rank_with_the_first_node_as_rendezvous() -> None:
    st = slurm.step(_step_env())
    assert st is not None and 20000 <= st.master_port < 30000
    assert st == slurm.Step(rank=5, world_size=8, local_rank=1, local_world_size=4,
                            master_addr="gpu07", master_port=st.master_port, hosts_store=False)
    # every task of the step derives the same port; another step of the job another one
    first = slurm.step(_step_env(SLURM_PROCID="0", SLURM_NODEID="0", SLURM_LOCALID="0"))
    assert first is not None and first.master_port == st.master_port
    other = slurm.step(_step_env(SLURM_STEP_ID="1"))
    assert other is not None and other.master_port != st.master_port
    # the store's host is the first task of the first node, whichever rank it is (srun -m
    # arbitrary may put task 0 elsewhere)
    assert first.hosts_store
    elsewhere = slurm.step(_step_env(SLURM_PROCID="3", SLURM_NODEID="0", SLURM_LOCALID="0"))
    assert elsewhere is not None and elsewhere.hosts_store
    # MASTER_ADDR / MASTER_PORT win when set; rank 0 hosts there, as under torchrun
    given = slurm.step(_step_env(MASTER_ADDR="10.0.0.7", MASTER_PORT="29555"))
    assert given is not None and (given.master_addr, given.master_port) == ("10.0.0.7", 29555)
    assert not given.hosts_store
    given0 = slurm.step(_step_env(MASTER_ADDR="10.0.0.7", SLURM_PROCID="0"))
    assert given0 is not None and given0.hosts_store


def test_no_step_or_one_task_is_not_a_job_of_ranks() -> None:
    assert slurm.step({}) is None
    # an sbatch script: task 0 of the job, but no step of its own
    assert slurm.step({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None
    assert slurm.step(_step_env(SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) is None


def test_steps_that_do_not_add_up_are_named() -> None:
    with pytest.raises(ValueError, match=r"\[4, 3\] tasks on its nodes.*--ntasks-per-node"):
        slurm.step(_step_env(SLURM_STEP_NUM_TASKS="7", SLURM_STEP_TASKS_PER_NODE="4,3"))
    with pytest.raises(ValueError, match="SLURM_NODEID=2"):
        slurm.step(_step_env(SLURM_NODEID="2"))
    with pytest.raises(ValueError, match="NODELIST"):
        slurm.step({k: v for k, v in _step_env().items() if k != "SLURM_STEP_NODELIST"})
    with pytest.raises(ValueError, match="lists 8 tasks but SLURM_STEP_NUM_TASKS is 6"):
        slurm.step(_step_env(SLURM_STEP_NUM_TASKS="6"))
    with pytest.raises(ValueError, match="no host"):
        slurm.step(_step_env(SLURM_STEP_NODELIST=",,"))


def _free_job_port() -> tuple[str, int]:
    """A job id whose derived port (step 0) is free here now."""
    for job in range(4321, 4421):
        port = slurm.port_for(str(job), "0")
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(job), port
    pytest.skip("no free port among the ones these job ids map to")


@pytest.mark.slow
def test_srun_tasks_run_a_cpu_tune_together(tmp_path: Path) -> None:
    """Two tasks of one step, as srun starts them (its variables only, no RANK): they join as
    ranks 0 and 1 through the derived port and write one profile. Task 1 is the node's first
    task here (as srun -m arbitrary may place them), so it hosts the store, not rank 0."""
    job, _ = _free_job_port()
    out = tmp_path / "srun.json"
    procs = []
    for task in range(2):
        env = artune_env({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
                          "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(task),
                          "SLURM_LOCALID": str(1 - task), "SLURM_NODEID": "0",
                          "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost"})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "artune.cli", "tune", "--device", "cpu", "--quick",
             "--sizes", "4K", "--modes", "graph", "--no-validate", "--out", str(out)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (so, se) in zip(procs, outs, strict=True):
        assert p.returncode == 0, so + se
    prof = load(out)
    assert prof.fingerprint["topology"]["world_size"] == 2
    assert all(len(m["rank_medians_us"]) == 2 for m in prof.data["measurements"])


def test_a_step_that_does_not_add_up_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from artune import cli

    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for k, v in _step_env(SLURM_STEP_NUM_TASKS="7", SLURM_STEP_TASKS_PER_NODE="4,3").items():
        monkeypatch.setenv(k, v)
    assert cli.main(["tune", "--device", "cpu"]) == 2
    assert "--ntasks-per-node" in capsys.readouterr().err


def test_a_rank_that_sees_too_few_gpus_is_told_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """srun --gpus-per-task=1 gives each task one GPU: the fingerprint would then describe a
    one-GPU machine, not the node SGLang's ranks see."""
    import torch

    from artune.autotune import runner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # every rank of the node is refused alike, local rank 0 too (none is left waiting)
    for local in range(4):
        env = runner.RankEnv(rank=4 + local, world_size=8, local_rank=local, local_world_size=4)
        with pytest.raises(ValueError, match="4 ranks on this node.*sees 1 GPU.*--gpus-per-node"):
            runner._cuda_index(env)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert runner._cuda_index(runner.RankEnv(7, 8, 3, 4)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("task", [0, 1])
def test_a_task_whose_peer_never_comes_fails_in_bounded_time_naming_itself(
        tmp_path: Path, task: int) -> None:
    """One task of a two-task step starts alone: the store's host (task 0 here) waits for its
    peer, the other cannot reach a store; each exits 1 within the collective timeout with an
    error naming its rank and the rendezvous address."""
    import time

    job, port = _free_job_port()
    env = artune_env({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
                      "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(task),
                      "SLURM_LOCALID": str(task), "SLURM_NODEID": "0",
                      "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost",
                      "ARTUNE_COLLECTIVE_TIMEOUT_S": "4"})
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "artune.cli", "tune", "--device", "cpu", "--quick",
                        "--out", str(tmp_path / "alone.json")], env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"rank {task} of 2: joining the job at localhost:{port} failed" in r.stderr, r.stderr
    assert took < 60
