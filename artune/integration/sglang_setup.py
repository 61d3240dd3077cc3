"""The SGLang plugin's setup of one group (``setup_group``), after SGLang's
``initialize_model_parallel``: ``group_setup.build_router`` over the group's CPU (gloo) group
(every rank proves it holds the same profile, the profile is checked against the live topology
and group size, the backends it routes to are checked and built on the group), then the group's
``Route`` is registered for the hot path in ``artune.integration.sglang``. See docs/sglang.md
("How the plugin hooks SGLang") for the steps and their errors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from artune import envs
from artune.integration.group_setup import GroupSpec, build_router, summary, unavailable_reason
from artune.integration.group_setup import without as _without  # noqa: F401 - benchmarks use it
from artune.integration.sglang import _ROUTES, PluginError, Route, _start_trace
from artune.log import log_once, logger
from artune.profile import SGLANG_REMEDY

if TYPE_CHECKING:
    from artune.backends.base import GroupContext

__all__ = ["setup_group"]


def _sglang_fast_path(gc: Any) -> bool:
    """Whether SGLang's own fast all-reduce (what `artune tune` measured as "sglang") is live."""
    ca = getattr(gc, "ca_comm", None)
    return ca is not None and not getattr(ca, "disabled", True)


def setup_group(gc: Any, role: str = "TP", optional: bool = False) -> Route | None:
    """Check the profile on SGLang's group ``gc`` and build its route (collective over
    ``gc.cpu_group``: call it on every rank of the group). None when the group keeps SGLang's
    own all-reduce (size not in the profile for an ``optional`` group, or ARTUNE_STRICT=0 and
    a topology mismatch). Raises PluginError, on every rank alike, when it cannot serve."""
    name = f"{gc.unique_name} ({role}, {gc.world_size} ranks)"
    path = envs.get("ARTUNE_PROFILE")

    def unavailable(backend: str, ctx: GroupContext) -> str | None:
        if backend != "sglang":
            return unavailable_reason(backend, ctx)
        if _sglang_fast_path(gc):
            return None
        return ("SGLang's custom all-reduce is off in this server (e.g. "
                "--disable-custom-all-reduce), so its measured times do not apply")

    spec = GroupSpec(
        name=name, group=gc.device_group, cpu_group=gc.cpu_group, rank=gc.rank_in_group,
        world_size=gc.world_size, device=gc.device,
        group_name=getattr(gc.device_group, "group_name", ""),
        extra={"sglang_group": gc, "sglang_group_name": gc.unique_name},
        keeps="SGLang's own all-reduce", profile_hint=" (ARTUNE_PROFILE)",
    )
    built = build_router(path, spec, strict=bool(envs.get("ARTUNE_STRICT")), optional=optional,
                         unavailable=unavailable, error=PluginError)
    if built is None:
        return None
    served, router = built
    route = Route(gc.unique_name, served, router)
    _start_trace()
    old = _ROUTES.pop(gc.unique_name, None)
    if old is not None:
        old.router.close()
    _ROUTES[gc.unique_name] = route
    if gc.rank_in_group == 0:
        logger.info("artune %s: routing with %s (fingerprint %s): %s", name, path,
                    served.fingerprint_id or "?", summary(served))
        unmeasured = served.sglang_unmeasured()
        if unmeasured and _sglang_fast_path(gc):
            log_once(f"sglang-unmeasured:{path}",
                     f"artune {name}: {path} has no measurement of SGLang's own all-reduce "
                     f"({unmeasured}): where it is the fastest, this server can be slower than "
                     f"SGLang's default; {SGLANG_REMEDY}", logging.WARNING)
    return route
