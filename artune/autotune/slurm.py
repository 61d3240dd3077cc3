"""A tune's ranks from a Slurm job step: ``srun`` without torchrun's variables.

    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 artune tune

``srun`` starts one task per rank but sets only its own variables (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_TASKS_PER_NODE``,
``SLURM_STEP_NODELIST``, ...), not RANK / WORLD_SIZE / MASTER_ADDR. ``step()`` reads them: the
rank is the task; the rendezvous store is hosted by the first task of the step's first node
(``SLURM_NODEID`` 0, ``SLURM_LOCALID`` 0: on that host whatever the task distribution, which
task 0 is not under ``-m arbitrary``), on a port derived from the job and step ids so that
every task picks the same one without talking first and concurrent steps differ
(``MASTER_ADDR`` / ``MASTER_PORT``, when set, win, rank 0 hosting there as under torchrun:
e.g. where node names do not resolve).
A step of one task is not a job of ranks: ``artune tune`` started that way launches one rank
per GPU itself, as from a shell. The batch script of an
``sbatch`` job is task 0 of the job but not of a step (no ``SLURM_STEP_NUM_TASKS``), so a tune
started there also launches its own ranks on that node.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

__all__ = ["Step", "step", "hostnames", "tasks_per_node", "port_for"]

#: The rendezvous port range a job id maps into (outside Linux's default ephemeral range,
#: 32768-60999, so an outgoing connection cannot hold it).
_PORT_BASE, _PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class Step:
    """This task's place in the step and where its rank 0 listens."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    #: whether this task hosts the rendezvous store (the first task of the first node)
    hosts_store: bool


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm host list: ``"gpu[01-03,07],login1"`` -> gpu01 gpu02 gpu03 gpu07 login1;
    several bracket groups in one name multiply out (``"r[1-2]n[1-2]"``); zero padding is kept.
    """
    out: list[str] = []
    for name in _split_top(nodelist):
        parts = re.split(r"(\[[^\]]*\])", name)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("[") and part.endswith("]"):
                choices.append(_expand_range(part[1:-1], nodelist))
            elif part:
                choices.append([part])
        out.extend("".join(p) for p in product(*choices))
    return out


def _split_top(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    names, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            names.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in the Slurm host list {nodelist!r}")
    names.append(cur)
    return [n for n in names if n]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"cannot read {item!r} in the Slurm host list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's tasks-per-node list: ``"4(x2),3"`` -> [4, 4, 3]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise ValueError(f"cannot read the Slurm tasks-per-node list {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def port_for(job_id: str, step_id: str = "") -> int:
    """The rendezvous port every task of a step derives alike from the job and step ids."""
    return _PORT_BASE + zlib.crc32(f"{job_id}.{step_id}".encode()) % _PORT_SPAN


def step(environ: Mapping[str, str]) -> Step | None:
    """This task's ``Step`` inside an ``srun`` step of several tasks; None outside one (no
    step, or a step of one task). A step whose variables cannot be read is a ValueError that
    names the variable."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS")
    if tasks is None or "SLURM_PROCID" not in environ:
        return None
    try:
        world = int(tasks)
        if world < 2:
            return None
        rank = int(environ["SLURM_PROCID"])
        local_rank = int(environ.get("SLURM_LOCALID", "0"))
        node = int(environ.get("SLURM_NODEID", "0"))
        per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", str(world)))
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
        hosts = hostnames(nodelist)
        if not hosts:
            raise ValueError(f"no host in the node list {nodelist!r}")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot read this Slurm step's variables: {exc}") from exc
    if sum(per_node) != world:
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE lists {sum(per_node)} tasks but "
                         f"SLURM_STEP_NUM_TASKS is {world}")
    if not 0 <= node < len(per_node):
        raise ValueError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE lists "
                         f"{len(per_node)} node(s)")
    if len(set(per_node)) > 1:
        raise ValueError(f"the step runs {per_node} tasks on its nodes: artune's node groups "
                         "need the same number on every node (srun --ntasks-per-node)")
    port = int(environ.get("MASTER_PORT") or port_for(environ.get("SLURM_JOB_ID", ""),
                                                      environ.get("SLURM_STEP_ID", "")))
    if environ.get("MASTER_ADDR"):  # the user's address: rank 0 hosts there, as under torchrun
        return Step(rank, world, local_rank, per_node[node], environ["MASTER_ADDR"], port,
                    hosts_store=rank == 0)
    return Step(rank, world, local_rank, per_node[node], hosts[0], port,
                hosts_store=node == 0 and local_rank == 0)
