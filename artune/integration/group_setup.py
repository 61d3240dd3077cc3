"""Serving a profile on one process group: the checks and the build every caller of the routed
all-reduce needs, collective over the group's CPU (gloo) group (``build_router``). The SGLang
plugin (``sglang_setup.setup_group``) and the custom op's ``artune.integration.ops.setup`` use
it. Steps, each ending in a bounded agreement (``artune.agree.gather``), so that a failure on
any rank is the same error on every rank, never a hang or a silent divergence:

1. every rank loads its profile; the ranks compare hashes (different profiles: an error);
2. the profile must describe the live topology and group size;
3. which of the backends it routes to can run here (the ranks must agree); those that cannot
   are excluded and their sizes go to the next-fastest measured backend, which is checked in
   turn;
4. the backends are built (strictly: a rank where one fails goes on to no collective its
   peers are not in), then prepared (NVRAR compiles its chosen kernels).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from artune import agree
from artune.log import log_once, logger

if TYPE_CHECKING:
    import torch

    from artune.backends.base import Backend, GroupContext
    from artune.profile import Profile
    from artune.router import Router

__all__ = ["GroupSpec", "SetupError", "build_router", "profile_hash", "unavailable_reason",
           "without"]


class SetupError(RuntimeError):
    """The profile cannot be served on this group (raised on every rank alike)."""


@dataclass
class GroupSpec:
    """The group a profile is to be served on, and how its failures read."""

    name: str  # how messages name the group
    group: Any  # torch.distributed group on the device
    cpu_group: Any  # gloo group over the same ranks
    rank: int  # this process's rank in the group
    world_size: int
    device: torch.device
    group_name: str = ""  # the device group's name (symmetric memory's rendezvous)
    extra: dict[str, Any] = field(default_factory=dict)  # GroupContext.extra
    #: what serves the group's all-reduces when the profile does not (for messages)
    keeps: str = "NCCL"
    #: where the profile comes from, for messages (e.g. " (ARTUNE_PROFILE)")
    profile_hint: str = ""


def profile_hash(profile: Profile) -> str:
    blob = json.dumps(profile.data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def without(profile: Profile, excluded: Mapping[str, str]) -> Profile:
    """The profile re-derived from its own measurements without the ``excluded`` backends, so
    their sizes go to the next-fastest measured backend (the profile itself when it carries no
    measurements: those sizes then keep the caller's own all-reduce)."""
    from artune.profile import Profile, validate

    measurements = [m for m in profile.data.get("measurements") or []
                    if m.get("backend") not in excluded]
    data = dict(profile.data)
    if "nvrar" in excluded and data.get("linear"):
        data["linear"] = []  # the fused linear layers are NVRAR's kernel
        if not measurements:
            return Profile(validate(data, profile.path), profile.path)
    if not excluded or not measurements:
        return profile
    from artune.autotune.table import build_tables

    rel_tol = float(profile.data.get("rel_tol") or 0.03)
    margin = float((profile.data.get("incumbent") or {}).get("margin") or 0.0)
    data["tables"] = build_tables(measurements, rel_tol, profile.fallback(), margin)
    data["derived_without"] = dict(excluded)
    return Profile(validate(data, profile.path), profile.path)


def unavailable_reason(backend: str, ctx: GroupContext) -> str | None:
    """Why ``backend`` cannot serve on this rank (None when it can)."""
    from artune.backends import load as load_backend

    try:
        return load_backend(backend).available(ctx)
    except Exception as exc:  # noqa: BLE001 - an unloadable backend is an unavailable one
        return f"cannot be loaded: {type(exc).__name__}: {exc}"


def build_router(
    path: Any,
    spec: GroupSpec,
    *,
    check_topology: bool = True,
    strict: bool = True,
    optional: bool = False,
    unavailable: Callable[[str, GroupContext], str | None] | None = None,
    error: type[Exception] = SetupError,
) -> tuple[Profile, Router] | None:
    """Check the profile at ``path`` on the group and build its router (see the module
    docstring). Collective over ``spec.cpu_group``: call it on every rank of the group.
    Returns (the profile served, possibly re-derived without unavailable backends, and its
    router), or None when the profile describes another topology and ``optional`` (logged at
    info) or not ``strict`` (a warning). Raises ``error`` on every rank alike otherwise.
    ``unavailable(backend, ctx)`` overrides the availability check (None: the backend's own
    ``available``)."""
    from artune import profile as profile_mod
    from artune import topology
    from artune.backends.base import BackendUnavailable, GroupContext
    from artune.router import Router

    name = spec.name

    def gather(obj: Any, what: str) -> list[Any]:
        return agree.gather(spec.cpu_group, obj, f"{name}: {what}", error)

    # 1. Every rank loads its profile; all compare hashes and hosts.
    prof: Profile | None = None
    failure = None
    try:
        prof = profile_mod.load(path)
    except profile_mod.ProfileError as exc:
        failure = str(exc)
    mine = {"host": socket.gethostname(), "hash": profile_hash(prof) if prof else None,
            "path": str(path), "error": failure}
    peers = gather(mine, "profile exchange")
    failed = {r: p["error"] for r, p in enumerate(peers) if p["error"]}
    if failed:
        raise error(f"artune {name}: cannot load the profile: " + "; ".join(
            f"rank {r}: {e}" for r, e in sorted(failed.items())))
    if len({p["hash"] for p in peers}) > 1:
        held = ", ".join(f"rank {r}: {p['hash']} ({p['path']})" for r, p in enumerate(peers))
        raise error(f"artune {name}: ranks hold different profiles ({held}); give every rank "
                    f"the same file{spec.profile_hint} and restart")
    assert prof is not None
    hosts = [p["host"] for p in peers]
    per_node = {h: hosts.count(h) for h in hosts}
    ranks_per_node = hosts.count(mine["host"])
    if len(set(per_node.values())) != 1:
        raise error(f"artune {name}: ranks are spread unevenly over nodes {per_node}; artune "
                    f"profiles assume the same number of ranks on every node")

    # 2. The profile must describe this topology and group size (same verdict on every rank).
    if check_topology:
        device = spec.device
        problems: list[str] = []
        warnings: list[str] = []
        try:
            live = topology.fingerprint(spec.world_size, ranks_per_node, device=device.type,
                                        local_gpu=device.index or 0)
            problems, warnings = topology.compare(prof.fingerprint, live)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            problems = [f"cannot fingerprint this machine: {type(exc).__name__}: {exc}"]
        problems = sorted({p for v in gather(problems, "topology check") for p in v})
        if problems:
            msg = (f"artune {name}: profile {path} was made for another topology: "
                   + "; ".join(problems))
            if optional:
                logger.info("%s; this group keeps %s", msg, spec.keeps)
                return None
            if strict:
                raise error(msg + f". Tune this machine (`artune tune`), or set ARTUNE_STRICT=0 "
                            f"to serve with {spec.keeps}")
            logger.warning("%s; ARTUNE_STRICT=0: this group keeps %s", msg, spec.keeps)
            return None
        for w in warnings:
            log_once(f"setup:version:{name}:{w}",
                     f"artune {name}: version differs from the profile: {w}")

    # 3. Which backends can run here (the ranks must agree), and 4. build them, one at a time
    # with an agreement after each (their construction is collective: a rank where one failed
    # must not go on to the next one's while its peers wait in this one). A backend left out
    # sends its sizes to the next-fastest measured one, which may be one not checked or built
    # yet: repeat until the served profile routes only to checked, built backends.
    ctx = GroupContext(
        group=spec.group, cpu_group=spec.cpu_group, rank=spec.rank,
        world_size=spec.world_size, device=spec.device, ranks_per_node=ranks_per_node,
        max_bytes=prof.max_bytes(), group_name=spec.group_name, extra=dict(spec.extra),
    )
    check = unavailable or unavailable_reason
    excluded: dict[str, str] = {}
    checked: set[str] = set()
    built: dict[str, Backend] = {}
    served = prof

    def exclude(missing: Mapping[str, str]) -> Profile:
        for backend, reason in missing.items():
            logger.warning("artune %s: %s excluded: %s; its sizes go to the next-fastest "
                           "measured backend%s", name, backend, reason,
                           ", and the profile's fused linear layers stay unfused"
                           if backend == "nvrar" and prof.fuses_linear() else "")
        excluded.update(missing)
        try:
            return without(prof, excluded)
        except Exception as exc:  # noqa: BLE001 - deterministic, same on every rank
            _close(built)
            raise error(f"artune {name}: cannot re-derive the profile without "
                        f"{sorted(excluded)}: {exc}") from exc

    while True:
        todo = [b for b in _needed(served) if b not in checked]
        if todo:
            checked.update(todo)
            missing = {b: r for b in todo if (r := check(b, ctx))}
            views = gather(sorted(missing), "backend availability")
            if any(v != views[0] for v in views):
                _close(built)
                raise error(f"artune {name}: ranks disagree on which backends can run: "
                            + "; ".join(f"rank {r} cannot run {v or 'nothing missing'}"
                                        for r, v in enumerate(views)))
            if missing:
                served = exclude(missing)
                continue
        wanted = [b for b in dict.fromkeys([*_needed(served), served.fallback()])
                  if b not in built and b not in excluded and b not in SKIP_BUILD]
        if not wanted:
            break
        for backend in wanted:
            made, failure = _create(backend, ctx)
            failures = gather(failure, f"building {backend}")
            if not any(failures):
                assert made is not None
                built[backend] = made
                continue
            if all(failures) and backend != served.fallback():
                # the same on every rank: like an unavailable backend (its sizes move on)
                served = exclude({backend: f"cannot be built: {failures[0]}"})
                break
            # on some ranks only (or the fallback): nothing to serve with. What was built
            # before is closed on every rank alike; this backend is dropped unclosed where it
            # was built (its close would be a collective the others do not join).
            _close(built)
            raise error(f"artune {name}: building {backend} failed: " + "; ".join(
                f"rank {r}: {e or 'built'}" for r, e in enumerate(failures)))
    try:
        router = Router(served, ctx, built)
    except BackendUnavailable as exc:  # the fallback was excluded: the same on every rank
        _close(built)
        raise error(f"artune {name}: {exc}") from exc
    try:  # every rank holds the same backends: compile NVRAR's variants in parallel
        router.prepare()
    except Exception as exc:  # noqa: BLE001 - an optimisation: first calls compile instead
        logger.warning("artune %s: preparing the backends failed on rank %d (%s); they build "
                       "on first use", name, spec.rank, exc)
    return served, router


def _needed(profile: Profile) -> list[str]:
    """The backends serving ``profile`` takes: those its tables route to, and NVRAR where its
    linear section fuses a layer (the fused kernel is NVRAR's)."""
    used = profile.backends_used()
    return used + ["nvrar"] if profile.fuses_linear() and "nvrar" not in used else used


#: Backends a caller serves itself rather than artune building them (SGLang's own).
SKIP_BUILD = frozenset({"sglang"})


def _create(backend: str, ctx: GroupContext) -> tuple[Backend | None, str | None]:
    """(the backend built on ``ctx``, None) or (None, why it could not be)."""
    from artune.backends import load as load_backend

    try:
        return load_backend(backend).create(ctx), None
    except Exception as exc:  # noqa: BLE001 - BackendUnavailable and worse: agreed on
        return None, f"{type(exc).__name__}: {exc}"


def _close(built: Mapping[str, Backend]) -> None:
    """Close the backends every rank built (the same ones, in the same order, on every rank)."""
    for backend in built.values():
        try:
            backend.close()
        except Exception as exc:  # noqa: BLE001 - the error being raised matters more
            logger.warning("closing %s after a failed set-up: %s", backend.name, exc)


def summary(profile: Profile) -> str:
    """The profile's tables on one line: byte ranges and backends, per dtype and mode."""
    parts = []
    for dtype, modes in sorted(profile.tables.items()):
        for mode, ranges in sorted(modes.items()):
            cells = ", ".join(f"{r['min_bytes']}-{r['max_bytes']} B {r['backend']}" for r in ranges)
            parts.append(f"{dtype}/{mode}: {cells}")
    return "; ".join(parts) or "empty tables"
