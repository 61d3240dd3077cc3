"""The SGLang plugin's setup of one group (``setup_group``), after SGLang's
``initialize_model_parallel``, collective over the group's CPU (gloo) group: every rank proves
it holds the same profile, the profile is checked against the live topology and group size,
the backends it routes to are checked and built on the group, and the group's ``Route`` is
registered for the hot path in ``artune.integration.sglang``. See docs/sglang.md ("How the
plugin hooks SGLang") for the steps and their errors.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from artune import agree, envs
from artune.integration.sglang import _ROUTES, PluginError, Route, _start_trace
from artune.log import log_once, logger

if TYPE_CHECKING:
    from artune.profile import Profile

__all__ = ["setup_group"]


def _profile_hash(profile: Profile) -> str:
    blob = json.dumps(profile.data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _gather(group: Any, obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj`` over SGLang's CPU group, bounded (``artune.agree.gather``): a rank
    that died or hangs is a PluginError naming the step on the others."""
    return agree.gather(group, obj, what, PluginError)


def _sglang_fast_path(gc: Any) -> bool:
    """Whether SGLang's own fast all-reduce (what `artune tune` measured as "sglang") is live."""
    ca = getattr(gc, "ca_comm", None)
    return ca is not None and not getattr(ca, "disabled", True)


def _without(profile: Profile, excluded: Mapping[str, str]) -> Profile:
    """The profile re-derived from its own measurements without the ``excluded`` backends, so
    their sizes go to the next-fastest measured backend (the profile itself when it carries no
    measurements: those sizes then keep SGLang's own all-reduce)."""
    from artune.profile import Profile, validate

    measurements = [m for m in profile.data.get("measurements") or []
                    if m.get("backend") not in excluded]
    if not excluded or not measurements:
        return profile
    from artune.autotune.table import build_tables

    data = dict(profile.data)
    rel_tol = float(profile.data.get("rel_tol") or 0.03)
    margin = float((profile.data.get("incumbent") or {}).get("margin") or 0.0)
    data["tables"] = build_tables(measurements, rel_tol, profile.fallback(), margin)
    data["derived_without"] = dict(excluded)
    return Profile(validate(data, profile.path), profile.path)


def _unavailable(backend: str, ctx: Any, gc: Any) -> str | None:
    """Why ``backend`` cannot serve on this rank's group (None when it can)."""
    from artune.backends import load as load_backend

    if backend == "sglang":
        if _sglang_fast_path(gc):
            return None
        return ("SGLang's custom all-reduce is off in this server (e.g. "
                "--disable-custom-all-reduce), so its measured times do not apply")
    try:
        return load_backend(backend).available(ctx)
    except Exception as exc:  # noqa: BLE001 - an unloadable backend is an unavailable one
        return f"cannot be loaded: {type(exc).__name__}: {exc}"


def setup_group(gc: Any, role: str = "TP", optional: bool = False) -> Route | None:
    """Check the profile on SGLang's group ``gc`` and build its route (collective over
    ``gc.cpu_group``: call it on every rank of the group). None when the group keeps SGLang's
    own all-reduce (size not in the profile for an ``optional`` group, or ARTUNE_STRICT=0 and
    a topology mismatch). Raises PluginError, on every rank alike, when it cannot serve."""
    from artune import profile as profile_mod
    from artune import topology
    from artune.backends.base import GroupContext
    from artune.router import Router

    name = f"{gc.unique_name} ({role}, {gc.world_size} ranks)"
    strict = bool(envs.get("ARTUNE_STRICT"))
    path = envs.get("ARTUNE_PROFILE")

    # 1. Every rank loads its profile; all compare hashes and hosts.
    prof: Profile | None = None
    error = None
    try:
        prof = profile_mod.load(path)
    except profile_mod.ProfileError as exc:
        error = str(exc)
    mine = {"host": socket.gethostname(), "hash": _profile_hash(prof) if prof else None,
            "path": str(path), "error": error}
    peers = _gather(gc.cpu_group, mine, f"{name}: profile exchange")
    failed = {r: p["error"] for r, p in enumerate(peers) if p["error"]}
    if failed:
        raise PluginError(f"artune {name}: cannot load the profile: " + "; ".join(
            f"rank {r}: {e}" for r, e in sorted(failed.items())))
    hashes = {p["hash"] for p in peers}
    if len(hashes) > 1:
        held = ", ".join(f"rank {r}: {p['hash']} ({p['path']})" for r, p in enumerate(peers))
        raise PluginError(
            f"artune {name}: ranks hold different profiles ({held}); give every rank the same "
            f"file (ARTUNE_PROFILE) and restart")
    assert prof is not None
    hosts = [p["host"] for p in peers]
    per_node = {h: hosts.count(h) for h in hosts}
    ranks_per_node = hosts.count(mine["host"])
    if len(set(per_node.values())) != 1:
        raise PluginError(f"artune {name}: ranks are spread unevenly over nodes {per_node}; "
                          f"artune profiles assume the same number of ranks on every node")

    # 2. The profile must describe this topology and group size (same verdict on every rank).
    device = gc.device
    problems: list[str] = []
    warnings: list[str] = []
    try:
        live = topology.fingerprint(gc.world_size, ranks_per_node, device=device.type,
                                    local_gpu=device.index or 0)
        problems, warnings = topology.compare(prof.fingerprint, live)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        problems = [f"cannot fingerprint this machine: {type(exc).__name__}: {exc}"]
    verdicts = _gather(gc.cpu_group, problems, f"{name}: topology check")
    problems = sorted({p for v in verdicts for p in v})
    if problems:
        msg = (f"artune {name}: profile {path} was made for another topology: "
               + "; ".join(problems))
        if optional:
            logger.info("%s; this group keeps SGLang's own all-reduce", msg)
            return None
        if strict:
            raise PluginError(msg + ". Tune this machine (`artune tune`), or set ARTUNE_STRICT=0 "
                              "to serve with SGLang's own all-reduce")
        logger.warning("%s; ARTUNE_STRICT=0: SGLang keeps its own all-reduce here", msg)
        return None
    for w in warnings:
        log_once(f"sglang:version:{w}", f"artune {name}: version differs from the profile: {w}")

    # 3. Which of the profile's backends can run here (must agree on every rank).
    ctx = GroupContext(
        group=gc.device_group, cpu_group=gc.cpu_group, rank=gc.rank_in_group,
        world_size=gc.world_size, device=device, ranks_per_node=ranks_per_node,
        max_bytes=prof.max_bytes(), group_name=getattr(gc.device_group, "group_name", ""),
        extra={"sglang_group": gc, "sglang_group_name": gc.unique_name},
    )
    # A backend left out sends its sizes to the next-fastest measured one, which may be one
    # not checked yet: check until the served profile routes only to checked backends.
    excluded: dict[str, str] = {}
    checked: set[str] = set()
    served = prof
    while todo := [b for b in served.backends_used() if b not in checked]:
        checked.update(todo)
        missing = {b: r for b in todo if (r := _unavailable(b, ctx, gc))}
        views = _gather(gc.cpu_group, sorted(missing), f"{name}: backend availability")
        if any(v != views[0] for v in views):
            raise PluginError(f"artune {name}: ranks disagree on which backends can run: "
                              + "; ".join(f"rank {r} cannot run {v or 'nothing missing'}"
                                          for r, v in enumerate(views)))
        if not missing:
            break
        for backend, reason in missing.items():
            logger.warning("artune %s: %s excluded: %s; its sizes go to the next-fastest "
                           "measured backend", name, backend, reason)
        excluded.update(missing)
        try:
            served = _without(prof, excluded)
        except Exception as exc:  # noqa: BLE001 - deterministic, same on every rank
            raise PluginError(f"artune {name}: cannot re-derive the profile without "
                              f"{sorted(excluded)}: {exc}") from exc

    # 4. Build the backends (before any graph capture); every rank must build the same set.
    router: Router | None = None
    error = None
    try:
        router = Router.build(served, ctx, strict=True)
    except Exception as exc:  # noqa: BLE001 - BackendUnavailable and worse: told to every rank
        error = f"{type(exc).__name__}: {exc}"
    built = sorted(router.backends) if router is not None else None
    results = _gather(gc.cpu_group, (built, error), f"{name}: backend build")
    if any(e for _, e in results) or any(b != results[0][0] for b, _ in results):
        if router is not None:
            router.close()
        raise PluginError(f"artune {name}: building the backends failed or differed: " + "; ".join(
            f"rank {r}: {e or 'built ' + ', '.join(b or [])}" for r, (b, e) in enumerate(results)))
    assert router is not None
    try:  # every rank holds the same backends: compile NVRAR's variants in parallel
        router.prepare()
    except Exception as exc:  # noqa: BLE001 - an optimisation: first calls compile instead
        logger.warning("artune %s: preparing the backends failed on rank %d (%s); they build "
                       "on first use", name, gc.rank_in_group, exc)
    route = Route(gc.unique_name, served, router)
    _start_trace()
    old = _ROUTES.pop(gc.unique_name, None)
    if old is not None:
        old.router.close()
    _ROUTES[gc.unique_name] = route
    if gc.rank_in_group == 0:
        logger.info("artune %s: routing with %s (fingerprint %s): %s", name, path,
                    prof.fingerprint_id or "?", _summary(served))
    return route


def _summary(profile: Profile) -> str:
    parts = []
    for dtype, modes in sorted(profile.tables.items()):
        for mode, ranges in sorted(modes.items()):
            cells = ", ".join(f"{r['min_bytes']}-{r['max_bytes']} B {r['backend']}" for r in ranges)
            parts.append(f"{dtype}/{mode}: {cells}")
    return "; ".join(parts) or "empty tables"
