"""One rank of ``artune tune``: join the group, then drive (rank 0) or follow (the others).

Started once per GPU by ``artune tune`` itself, by torchrun -- anything that sets RANK,
WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE), MASTER_ADDR and MASTER_PORT -- or by srun, whose
own variables say the same (``artune.autotune.slurm``)::

    torchrun --nproc-per-node 4 -m artune.cli tune --quick
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 artune tune

Rank 0 owns the Optuna storage and the plan: for each dtype, size, backend and mode it picks the
parameter set to try, all ranks gate and time it together (``crew.Crew``), and rank 0 stores the
result as the trial's ``user_attrs``. Then it builds the dispatch table (``table.build_profile``),
saves it, re-times the routed all-reduce against every candidate (the validation pass), saves
again and prints the summary.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from artune import envs
from artune.autotune.comm import Comm, Heartbeat, HostCollectiveError
from artune.autotune.config import TuneConfig, storage_url
from artune.autotune.crew import Crew, actual_nbytes
from artune.autotune.preimport import Preimport
from artune.backends import BACKENDS
from artune.backends.base import GroupContext

__all__ = ["RankEnv", "rank_env", "run_rank", "candidates", "register_extra_backends"]


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    #: where the rendezvous store listens, when not in MASTER_ADDR / MASTER_PORT (a Slurm
    #: step), and whether this rank hosts it (there: not always rank 0)
    master_addr: str | None = None
    master_port: int | None = None
    hosts_store: bool = False


def rank_env() -> RankEnv | None:
    """This process's place in the job from the launcher's variables (torchrun's, else a Slurm
    step's of several tasks); None outside a job. A Slurm step whose variables cannot be read
    is a ValueError."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from artune.autotune import slurm

        st = slurm.step(os.environ)
        if st is None:
            return None
        return RankEnv(st.rank, st.world_size, st.local_rank, st.local_world_size,
                       st.master_addr, st.master_port, st.hosts_store)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE",
                                                                         world)))
    return RankEnv(rank, world, local_rank, local_world)


def _rendezvous(env: RankEnv, timeout: _dt.timedelta) -> dict[str, object]:
    """``init_process_group``'s rendezvous arguments: the environment's (torchrun, artune's
    launcher: rank 0 hosts the store), or a store on the Slurm step's first node, hosted by
    the task there."""
    import torch.distributed as dist

    if env.master_addr is None:
        return {"init_method": "env://"}
    assert env.master_port is not None
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=env.hosts_store, timeout=timeout)
    return {"store": store}


def _cuda_index(env: RankEnv) -> int:
    """This rank's GPU: its local rank among the GPUs every task of the node sees. A task that
    sees fewer (Slurm's --gpus-per-task binds one each) would describe another machine than the
    one SGLang's ranks see: refused, with the fix."""
    import torch

    n = torch.cuda.device_count()
    if env.local_world_size > n:  # (alike on every rank of the node: none is left waiting)
        raise ValueError(
            f"rank {env.rank}: {env.local_world_size} ranks on this node (LOCAL_WORLD_SIZE, "
            f"or the Slurm step's tasks per node) but it sees {n} GPU(s): every rank must see "
            "all of its node's GPUs, as SGLang's ranks do (with srun: --gpus-per-node N, not "
            "--gpus-per-task; CUDA_VISIBLE_DEVICES the same on every rank)"
        )
    return env.local_rank


def register_extra_backends(extra: dict[str, str]) -> None:
    """Add ``--extra-backend NAME=MODULE:CLASS`` entries to the backend registry (this process)."""
    for name, target in extra.items():
        BACKENDS[name] = target


def candidates(cfg: TuneConfig) -> list[str]:
    """The backends a tune measures: ``--backends``, else every registered one for the device
    (gloo only on CPU, everything but gloo on GPUs) plus any ``--extra-backend``; then
    ``--include-sglang`` adds SGLang's own all-reduce and ``--no-include-sglang`` drops it."""
    if cfg.backends:
        names = list(dict.fromkeys(cfg.backends))
    elif cfg.device == "cpu":
        names = ["gloo", *cfg.extra_backends]
    else:
        names = [n for n in BACKENDS if n != "gloo"]
    if cfg.include_sglang and "sglang" not in names:
        names.append("sglang")
    if cfg.include_sglang is False:
        names = [n for n in names if n != "sglang"]
    return names


def run_rank(cfg: TuneConfig) -> int:
    """Run this process's rank of the tune, then exit the process with its code (0, 1 on
    failure, 2 on bad usage): never returns."""
    import torch
    import torch.distributed as dist

    env = rank_env()
    if env is None:
        raise RuntimeError(
            "run_rank: RANK/WORLD_SIZE are not set; start ranks with `artune tune`, torchrun or "
            "srun"
        )
    _no_multicast()
    register_extra_backends(cfg.extra_backends)
    timeout_s = float(envs.get("ARTUNE_COLLECTIVE_TIMEOUT_S"))
    timeout = _dt.timedelta(seconds=timeout_s)
    preimport = None
    if cfg.device == "cuda":
        try:
            index = _cuda_index(env)
        except ValueError as exc:  # every rank of the node finds the same: none waits
            print(f"artune tune: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        preimport = Preimport.start(candidates(cfg), device)
    else:
        device = torch.device("cpu")
    try:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", rank=env.rank,
                                world_size=env.world_size, timeout=timeout,
                                device_id=device if cfg.device == "cuda" else None,
                                **_rendezvous(env, timeout))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a peer or the store never came: say where
        where = (f"{env.master_addr}:{env.master_port}" if env.master_addr else
                 f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"artune tune: rank {env.rank} of {env.world_size}: joining the job at {where} "
              f"failed within {timeout_s:.0f} s (ARTUNE_COLLECTIVE_TIMEOUT_S): "
              f"{type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        os._exit(1)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    heartbeat = _start_heartbeat(env, timeout_s)
    comm = Comm(cpu_group, env.rank, env.world_size, timeout_s, heartbeat)
    world = dist.group.WORLD
    assert world is not None
    from artune.autotune.linear import linear_bytes

    ctx = GroupContext(
        group=world,
        cpu_group=cpu_group,
        rank=env.rank,
        world_size=env.world_size,
        device=device,
        ranks_per_node=cfg.ranks_per_node or env.local_world_size,
        max_bytes=max(max(actual_nbytes(s, d) for s in cfg.sizes for d in cfg.dtypes),
                      linear_bytes(cfg)),
        group_name=world.group_name,
    )
    crew = Crew(cfg, ctx, comm, preimport)
    code = 1
    try:
        if env.rank == 0:
            from artune.autotune.driver import Driver

            code = Driver(cfg, crew, env).run()
        else:
            code = crew.serve()
    except HostCollectiveError as exc:
        print(f"artune tune: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:
        # A raw collective (a backend's, the gate's) broken by a rank that died: under srun or
        # torchrun no launcher names it, so this rank does. Anything else keeps its traceback.
        says = comm.stopped_by_peer(exc)
        if says is None:
            raise
        print(f"artune tune: {says}", file=sys.stderr, flush=True)
    finally:
        if code != 0:
            crew.close()
        if heartbeat is not None:
            heartbeat.stop()
    if code == 0:
        # Every rank is done with the store and the groups before any leaves (rank 0 hosts the
        # store: a peer still talking to it when it exits dies in C++ teardown with "terminate
        # called without an active exception", seen in CI). After the barrier nothing is left
        # to say, and process-exit destructors of c10d's threads are skipped. So is closing
        # the backends: every rank is past its last collective, and what they hold (NCCL and
        # SGLang's groups, NVSHMEM, IPC mappings) goes with the process. (The 2-3 s between
        # the profile being written and `artune tune` returning on 4x H100 included closing
        # them one by one.)
        try:
            dist.barrier(group=cpu_group)
        except Exception as exc:  # noqa: BLE001 - the tune's work is saved; report and leave
            print(f"artune tune: rank {env.rank}: final barrier failed: {exc}", file=sys.stderr)
    # On failure a peer may be dead: tearing NCCL down could wait on it. Leave now either way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _no_multicast() -> None:
    """NVLink multicast stays off in every rank, also under torchrun/srun (DESIGN.md): set before
    CUDA, NCCL or NVSHMEM start in this process. This is the rank's launch step, the one place
    besides the launcher that writes these variables."""
    for key, value in envs.NO_MULTICAST_ENV.items():
        old = os.environ.get(key)
        if old is not None and old != value:
            print(
                f"artune tune: {key}={old} overridden to {value}: NVLink multicast must stay off "
                "on these machines (DESIGN.md)",
                file=sys.stderr,
            )
        os.environ[key] = value


def _start_heartbeat(env: RankEnv, timeout_s: float) -> Heartbeat | None:
    """A heartbeat in the rendezvous store (None where it cannot be reached)."""
    import torch.distributed as dist

    addr = env.master_addr or os.environ.get("MASTER_ADDR")
    port = env.master_port or os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        stores = [
            dist.TCPStore(
                addr, int(port), is_master=False,
                timeout=_dt.timedelta(seconds=min(timeout_s, 10.0)),
            )
            for _ in range(2)
        ]
        return Heartbeat(stores[0], env.rank, env.world_size, check_store=stores[1]).start()
    except Exception:  # noqa: BLE001 - naming dead ranks is a nicety, not a requirement
        return None


def default_out(fingerprint_id: str, dry_run: bool) -> Path:
    return Path("profiles") / f"{'dryrun-' if dry_run else ''}{fingerprint_id}.json"


def out_and_storage(cfg: TuneConfig, fingerprint_id: str) -> tuple[Path, str]:
    out = cfg.out or default_out(fingerprint_id, cfg.dry_run)
    return out, storage_url(out, cfg.storage)

