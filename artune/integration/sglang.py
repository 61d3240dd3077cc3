"""The SGLang plugin: every tensor-parallel all-reduce of a served model goes to the backend the
profile chose for its size, dtype and mode (eager, CUDA graph, torch.compile).

Run it the way users do (``artune launch`` sets ARTUNE_PROFILE and the no-multicast env)::

    artune launch --profile profiles/9f2c.json -- --model-path meta-llama/Llama-3.1-8B --tp 4

SGLang finds ``register`` through the entry point ``artune`` in the group
``sglang.srt.plugins`` and calls it first thing in every process (one scheduler per TP rank).
Without ARTUNE_PROFILE it logs one line and does nothing (the measuring aid
``ARTUNE_GRAPH_TIMES``, ``graph_times``, works with or without a profile). With a profile it
registers, through SGLang's ``HookRegistry``:

- AFTER ``initialize_model_parallel``: for the TP group (and the attention-TP group when it is a
  different group of the profile's size) check the profile against the live topology, prove over
  the group's CPU group that every rank holds the same profile, builds the same backends and
  reached the same decision, then build the backends (buffers sized from the profile, before any
  graph capture). A failure on any rank is an error on every rank, never a hang. That setup
  is ``artune.integration.sglang_setup.setup_group``; this module holds the hooks and the hot
  path.
- AROUND ``GroupCoordinator._resolve_outplace_all_reduce_method``: sizes the profile gives to an
  artune backend resolve to the method ``"artune"``; everything else (the profile chose
  ``"sglang"``, or does not cover the size) is SGLang's own resolution, untouched.
- AROUND ``_all_reduce_out_place``: the method ``"artune"`` (and ``"auto"``, which is how
  torch.compile'd graphs arrive) runs the chosen backend.
- AROUND ``_all_reduce_in_place``: routed sizes run the chosen backend and copy back.
- AROUND ``graph_capture``: the backends' ``capture()`` contexts join SGLang's.

The decision is ``select(profile, nbytes, dtype, mode)`` with mode "graph" while the current CUDA
stream is capturing: the same inputs on every rank give the same answer on every rank.
See docs/sglang.md for the versions this supports.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from artune import envs
from artune.backends.base import remember
from artune.log import log_once, logger
from artune.router import current_mode

if TYPE_CHECKING:
    import torch

    from artune.backends.base import Backend
    from artune.profile import Profile
    from artune.router import Decision, Router

__all__ = [
    "ARTUNE_METHOD",
    "HOOK_POINTS",
    "PluginError",
    "SglangIncompatible",
    "register",
    "missing_hook_points",
    "hook_point_error",
    "route_trace",
    "routes",
    "close_all",
    "watch_forward",
]

#: A routed call: the backend and its call prepared for the message's shape (``Router.lookup``).
Hit = tuple["Backend", Callable[["torch.Tensor"], "torch.Tensor"]]

#: The out-of-place method name the plugin resolves routed sizes to.
ARTUNE_METHOD = "artune"

PS = "sglang.srt.distributed.parallel_state"
GC = f"{PS}.GroupCoordinator"

#: (dotted target, what breaks without it). All must exist for the plugin to route.
HOOK_POINTS: tuple[tuple[str, str], ...] = (
    (f"{PS}.initialize_model_parallel", "building the backends on the TP group"),
    (f"{GC}._resolve_outplace_all_reduce_method", "routing eager all-reduces"),
    (f"{GC}._all_reduce_out_place", "running routed and torch.compile'd all-reduces"),
    (f"{GC}._all_reduce_in_place", "routing in-place all-reduces"),
    (f"{GC}.graph_capture", "CUDA-graph capture of the backends"),
)


class PluginError(RuntimeError):
    """The plugin cannot serve with this profile here; the message says why and what to do."""


class SglangIncompatible(SystemExit):
    """This SGLang release lacks a hook point the plugin needs.

    A SystemExit on purpose: SGLang's ``load_plugins()`` catches every ``Exception`` a plugin
    raises and serves on without it, which would silently drop the profile the user asked for.
    """


# ---------------------------------------------------------------------------------------------
# Registration


def missing_hook_points() -> list[str]:
    """The hook points this SGLang lacks, each as 'target (needed for ...)'; a hook point whose
    SGLang module fails to import for another reason (a missing dependency: a broken install,
    not an unsupported release) as 'target: importing it failed (...)'. [] when complete."""
    import pkgutil

    missing = []
    for target, purpose in HOOK_POINTS:
        owner, _, attr = target.rpartition(".")
        try:
            obj = pkgutil.resolve_name(owner)
        except ImportError as exc:
            gone = getattr(exc, "name", None) or ""
            if gone and not owner.startswith(gone) and not gone.startswith("sglang"):
                missing.append(f"{target}: importing it failed ({type(exc).__name__}: {exc})")
            else:
                missing.append(f"{target} (needed for {purpose})")
            continue
        except (AttributeError, ValueError):
            missing.append(f"{target} (needed for {purpose})")
            continue
        if not callable(getattr(obj, attr, None)):
            missing.append(f"{target} (needed for {purpose})")
    return missing


def hook_point_error() -> str | None:
    """Why this SGLang cannot take the plugin (naming each hook point and the remedy), or None."""
    missing = missing_hook_points()
    if not missing:
        return None
    broken = [m for m in missing if ": importing it failed" in m]
    if broken:
        return (f"SGLang {_sglang_version()} does not import cleanly: {'; '.join(broken)}. "
                "Repair that installation (a dependency is missing or broken)")
    return (f"SGLang {_sglang_version()} lacks the hook points the plugin needs: "
            f"{'; '.join(missing)}. artune supports SGLang 0.5.17 to 0.5.23 (docs/sglang.md); "
            "install one of those")


def _sglang_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "unknown"


def register() -> None:
    """Entry point (``sglang.srt.plugins``): register the hooks when a profile is given."""
    if envs.get("ARTUNE_DISABLE"):
        logger.info("artune SGLang plugin: disabled by ARTUNE_DISABLE=1; SGLang keeps its own "
                    "all-reduce")
        return
    times = envs.get("ARTUNE_GRAPH_TIMES")
    if times:
        from artune.integration import graph_times

        try:
            graph_times.install(times)
        except (OSError, RuntimeError, AttributeError) as exc:  # a measuring aid: never fatal
            logger.warning("artune: ARTUNE_GRAPH_TIMES=%s: graph replays are not timed (%s: "
                           "%s)", times, type(exc).__name__, exc)
    path = envs.get("ARTUNE_PROFILE")
    if not path:
        logger.info("artune SGLang plugin: no profile (set ARTUNE_PROFILE or use `artune "
                    "launch`); SGLang keeps its own all-reduce")
        return
    problem = hook_point_error()
    if problem:
        msg = f"artune: {problem}, or unset ARTUNE_PROFILE to serve without artune"
        if envs.get("ARTUNE_STRICT"):
            logger.error("%s", msg)
            raise SglangIncompatible(msg)
        logger.warning("%s; ARTUNE_STRICT=0: SGLang keeps its own all-reduce", msg)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{PS}.initialize_model_parallel", _after_init, HookType.AFTER)
    HookRegistry.register(
        f"{GC}._resolve_outplace_all_reduce_method", _around_resolve, HookType.AROUND
    )
    HookRegistry.register(f"{GC}._all_reduce_out_place", _around_out_place, HookType.AROUND)
    HookRegistry.register(f"{GC}._all_reduce_in_place", _around_in_place, HookType.AROUND)
    HookRegistry.register(f"{GC}.graph_capture", _around_graph_capture, HookType.AROUND)
    with contextlib.suppress(ImportError, AttributeError):
        from sglang.srt.distributed import parallel_state

        if callable(getattr(parallel_state, "destroy_model_parallel", None)):
            HookRegistry.register(f"{PS}.destroy_model_parallel", _before_destroy, HookType.BEFORE)
    from artune.integration import sglang_linear

    fused = envs.get("ARTUNE_FUSED_LINEAR")
    if fused == "on" or (fused == "auto" and sglang_linear.profile_fuses_linear(path)):
        sglang_linear.register_fused_linear()
    logger.info("artune SGLang plugin: hooks registered (SGLang %s, profile %s)",
                _sglang_version(), path)


# ---------------------------------------------------------------------------------------------
# Routing (the hot path)


#: Hits a group remembers (as the router's decisions: a served model's shapes are few).
_MAX_HITS = 4096
#: ``Route._hits``'s answer for a shape not seen yet.
_UNSEEN: Any = object()


@dataclass
class Route:
    """One group's routing: the profile in force there and the backends built on the group."""

    group_name: str
    profile: Profile
    router: Router
    #: (shape, dtype, mode, device index, contiguous) -> Hit, or None for SGLang's own
    _hits: dict[tuple[Any, ...], Hit | None] = field(default_factory=dict)

    def pick(self, x: torch.Tensor) -> Hit | None:
        """(backend, prepared call) when an artune backend takes ``x``; None for SGLang's own.
        The router's decision, made and bound once per message shape."""
        key = (x.shape, x.dtype, current_mode(), x.get_device(), x.is_contiguous())
        hit = self._hits.get(key, _UNSEEN)
        if hit is None or (hit is not _UNSEEN and not hit[0].closed):
            return hit
        return self._pick_new(x, key)

    def _pick_new(self, x: torch.Tensor, key: tuple[Any, ...]) -> Hit | None:
        d, new = self.router.decide(x, key[2])
        hit: Hit | None = None
        if d.backend is not None and d.choice.backend != "sglang":  # "sglang": SGLang's own
            hit = (d.backend, d.backend.bind(x, d.choice.params))
        elif new:
            self._explain(d, x)
        return remember(self._hits, key, hit, _MAX_HITS)

    def _explain(self, d: Decision, x: torch.Tensor) -> None:
        """One log line per kind of size that keeps SGLang's own all-reduce unexpectedly."""
        nbytes, mode = x.numel() * x.element_size(), current_mode()
        if not d.choice.covered:
            log_once(f"sglang:uncovered:{self.group_name}:{x.dtype}:{mode}",
                     f"{self.group_name}: the profile does not cover {nbytes} B of {x.dtype} "
                     f"({mode}); those sizes keep SGLang's own all-reduce")
        elif d.why == "not built" and d.choice.backend != "sglang":
            log_once(f"sglang:unbuilt:{self.group_name}:{d.choice.backend}",
                     f"{self.group_name}: {d.choice.backend} is not built here; its sizes keep "
                     f"SGLang's own all-reduce", logging.WARNING)


_ROUTES: dict[str, Route] = {}


def routes() -> dict[str, Route]:
    """The groups this process routes, by SGLang's group name (e.g. 'tp:0')."""
    return dict(_ROUTES)


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else args[i]


#: The decision ``_around_resolve`` made, handed to the ``_all_reduce_out_place`` call that
#: SGLang makes next with the same tensor: (group, weak reference to the tensor, hit). Saves
#: every eager all-reduce a second decision and its capture-state probe (0.5-0.9 µs each on a
#: 4x H100 host, benchmarks/results/router_eager_4gpu_h100.md). Taken once, then cleared.
_RESOLVED: tuple[str, Any, Hit] | None = None


def _around_resolve(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    global _RESOLVED
    route = _ROUTES.get(self.unique_name)
    if route is not None:
        x = _arg(args, kwargs, 0, "input_")
        hit = route.pick(x)
        if hit is not None:
            _RESOLVED = (self.unique_name, weakref.ref(x), hit)
            return ARTUNE_METHOD
    return original(self, *args, **kwargs)


def _take_resolved(group: str, x: Any) -> Hit | None:
    """The hit ``_around_resolve`` decided for this very tensor on this group, if it was the
    last decision; cleared either way."""
    global _RESOLVED
    last, _RESOLVED = _RESOLVED, None
    if last is not None and last[0] == group and last[1]() is x:
        return last[2]
    return None


def _around_out_place(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    method = _arg(args, kwargs, 1, "outplace_all_reduce_method")
    if method in (ARTUNE_METHOD, "auto"):
        route = _ROUTES.get(self.unique_name)
        x = _arg(args, kwargs, 0, "input_")
        hit = None
        if route is not None:
            if method == ARTUNE_METHOD:
                hit = _take_resolved(self.unique_name, x)
            if hit is None:
                hit = route.pick(x)
        if hit is not None:
            if _TRACE is not None:
                _trace(self.unique_name, x, hit[0].name)
            return hit[1](x)
        if method == ARTUNE_METHOD:  # resolved to us, but the decision changed: SGLang's own
            if _TRACE is not None:
                _trace(self.unique_name, x, SGLANG_OWN)
            return original(self, x, "auto")
    if _TRACE is not None and self.unique_name in _ROUTES:
        _trace(self.unique_name, _arg(args, kwargs, 0, "input_"), SGLANG_OWN)
    return original(self, *args, **kwargs)


def _around_in_place(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    route = _ROUTES.get(self.unique_name)
    if route is not None:
        x = _arg(args, kwargs, 0, "input_")
        hit = route.pick(x)
        if _TRACE is not None:
            _trace(self.unique_name, x, hit[0].name if hit is not None else SGLANG_OWN)
        if hit is not None:
            x.copy_(hit[1](x))
            return None
    return original(self, *args, **kwargs)


#: The TP group's name (set after initialize_model_parallel): the fused linear layers' group
#: (``artune.integration.sglang_linear``).
_TP_GROUP: list[str] = []


# ---------------------------------------------------------------------------------------------
# Route trace (ARTUNE_ROUTE_LOG): which backend took each all-reduce, by mode, dtype and size

#: What the trace calls SGLang's own all-reduce (its custom all-reduce, pynccl, ...).
SGLANG_OWN = "sglang (own)"
#: (group, mode, dtype, nbytes, backend) -> calls; None while tracing is off (then free).
_TRACE: dict[tuple[str, str, str, int, str], int] | None = None


def _trace(group: str, x: Any, backend: str) -> None:
    from artune.profile import dtype_name

    assert _TRACE is not None
    key = (group, current_mode(), dtype_name(x.dtype), x.numel() * x.element_size(), backend)
    _TRACE[key] = _TRACE.get(key, 0) + 1


def _start_trace() -> None:
    """Count from now on, when ``ARTUNE_ROUTE_LOG`` names a folder."""
    global _TRACE
    if envs.get("ARTUNE_ROUTE_LOG") and _TRACE is None:
        _TRACE = {}


def route_trace() -> list[dict[str, Any]]:
    """The trace so far: one row per (group, mode, dtype, size, backend) with its calls; []
    while tracing is off (``ARTUNE_ROUTE_LOG`` unset)."""
    return [{"group": g, "mode": m, "dtype": d, "nbytes": n, "backend": b, "calls": c}
            for (g, m, d, n, b), c in sorted((_TRACE or {}).items())]


def _dump_trace() -> None:
    """Write this process's trace into the ``ARTUNE_ROUTE_LOG`` folder (one file per process,
    rewritten whole, atomically): after every CUDA-graph capture, so the routes inside the
    captured graphs are on disk while the server runs."""
    import os
    from pathlib import Path

    folder = envs.get("ARTUNE_ROUTE_LOG")
    if _TRACE is None or not folder:
        return
    try:
        path = Path(folder) / f"routes-pid{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "routes": route_trace()}))
        tmp.replace(path)
    except OSError as exc:
        log_once("sglang:trace", f"artune: cannot write the route trace to {folder}: {exc}",
                 logging.WARNING)


def _around_graph_capture(
    original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    cm = original(self, *args, **kwargs)
    route = _ROUTES.get(self.unique_name)
    return cm if route is None else _joined(cm, route.router)


@contextlib.contextmanager
def _joined(cm: Any, router: Router) -> Iterator[Any]:
    try:
        with cm as context, router.capture():
            yield context
    finally:
        _dump_trace()


def _before_destroy(*args: Any, **kwargs: Any) -> None:
    close_all()


def close_all() -> None:
    """Close every route's backends (SGLang tears its groups down next); safe to call twice."""
    global _RESOLVED
    _RESOLVED = None  # holds a prepared call (and through it a backend's buffer)
    _TP_GROUP.clear()
    while _ROUTES:
        _, route = _ROUTES.popitem()
        route._hits.clear()
        route.router.close()


# ---------------------------------------------------------------------------------------------
# Setup after initialize_model_parallel


def _after_init(result: Any, *args: Any, **kwargs: Any) -> None:
    from sglang.srt.distributed import parallel_state as ps

    from artune.integration.sglang_setup import setup_group

    tp = ps.get_tp_group()
    setup_group(tp, role="TP")
    if tp.unique_name in _ROUTES:
        from artune.integration.sglang_linear import agree_fused_linear

        agree_fused_linear(tp)
    _TP_GROUP[:] = [tp.unique_name]
    try:
        attn = ps.get_attn_tp_group()
    except (AssertionError, AttributeError, RuntimeError, ValueError):
        attn = None
    if attn is not None and attn is not tp and attn.world_size > 1:
        setup_group(attn, role="attention-TP", optional=True)
    if _ROUTES:
        watch_forward()
    return None


# ---------------------------------------------------------------------------------------------
# Faults recorded by device code (Backend.failure), checked before every forward pass

#: SGLang's model forward pass, in the processes that run the model.
MR = "sglang.srt.model_executor.model_runner"
_WATCHING: list[str] = []


def watch_forward() -> bool:
    """Check every route's backends before each of SGLang's model forward passes.

    A backend whose device code gave up a wait (NVRAR after ``ARTUNE_TIMEOUT_S``) records it
    in host memory and skips its later waits, so that nothing hangs; its next eager call
    raises. CUDA-graph replays run no such call, so without this check a server that decodes
    only from graphs would go on with wrong sums. With it, the rank stops at the next pass;
    the pass whose wait ran out (and, with SGLang's overlap scheduler, the one launched
    meanwhile) has already produced its tokens. Hooked (SGLang's HookRegistry) here, after
    ``initialize_model_parallel``, only where SGLang's model runner is already loaded: the
    model's processes; not at all with ARTUNE_FORWARD_CHECK=0. True when the check is in
    place."""
    import sys

    if _WATCHING:
        return True
    if not envs.get("ARTUNE_FORWARD_CHECK"):
        logger.warning("artune: ARTUNE_FORWARD_CHECK=0: backend faults are not checked before "
                       "each forward pass; they surface at their next eager call only")
        return False
    runner = getattr(sys.modules.get(MR), "ModelRunner", None)
    if runner is None or not callable(getattr(runner, "forward", None)):
        logger.info("artune: SGLang's model runner is not loaded in this process; backend "
                    "faults surface at their next eager call only")
        return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    target = f"{MR}.ModelRunner.forward"
    if target in getattr(HookRegistry, "_patched", ()):
        # Another plugin's hooks are applied there already, and HookRegistry applies a target
        # once: wrap what is there now, keeping theirs.
        inner = runner.forward

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            _before_forward(*args, **kwargs)
            return inner(*args, **kwargs)

        runner.forward = forward
    else:
        HookRegistry.register(target, _before_forward, HookType.BEFORE)
        HookRegistry.apply_hooks()  # patches only what is not patched yet
    _WATCHING.append(target)
    return True


def _before_forward(*args: Any, **kwargs: Any) -> None:
    for route in list(_ROUTES.values()):  # close_all() may empty it from another thread
        msg = route.router.failure()
        if msg is not None:
            raise PluginError(
                f"{msg}. artune stops this rank before its next forward pass: after a wait that "
                f"ran out, the backend's calls (CUDA-graph replays included) no longer compute "
                f"correct sums ({route.group_name})"
            )
    return None
