"""The routed all-reduce: ``select()`` plus the chosen backend, as every caller uses it.

The autotuner's validation pass, the torch custom op and the SGLang plugin all call
``Router.all_reduce`` — one code path, so what was validated is what runs.

    router = Router.build(profile, ctx)        # builds every backend the profile routes to
    router.prepare()                           # optional, collective: compile ahead
    y = router.all_reduce(x)                   # out of place; mode from the capturing stream
    router.close()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from artune import backends as _backends
from artune.backends.base import Backend, BackendUnavailable, GroupContext
from artune.log import log_once, logger
from artune.profile import Choice, Profile, select

if TYPE_CHECKING:
    import torch

__all__ = ["Router", "current_mode"]

#: Decisions remembered per router (distinct message shapes of a served model are few).
_MAX_DECIDED = 4096


def current_mode() -> str:
    """'graph' while the current CUDA stream is capturing, else 'eager'."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "graph"
    return "eager"


class Router:
    """Dispatches each all-reduce to the backend the profile chose for its size and dtype."""

    def __init__(self, profile: Profile, ctx: GroupContext, built: dict[str, Backend]) -> None:
        self.profile = profile
        self.ctx = ctx
        self.backends = built
        self.fallback = profile.fallback()
        #: (nbytes, dtype, mode, device index, contiguous) -> (choice, backend)
        self._decided: dict[tuple[Any, ...], tuple[Choice, Backend]] = {}
        if self.fallback not in built:
            raise BackendUnavailable(
                f"the fallback backend {self.fallback!r} could not be built on this group"
            )

    @classmethod
    def build(
        cls,
        profile: Profile,
        ctx: GroupContext,
        names: Iterable[str] | None = None,
        skip: Iterable[str] = ("sglang",),
    ) -> Router:
        """Build the backends the profile routes to (or ``names``) plus the fallback.

        A backend that cannot be built here is left out with a warning: its ranges go to the
        fallback. Every rank must see the same outcome, so availability must not depend on the
        rank (the plugin checks this with a collective before serving).
        """
        wanted = list(names) if names is not None else profile.backends_used()
        wanted.append(profile.fallback())
        built: dict[str, Backend] = {}
        for name in dict.fromkeys(wanted):
            if name in skip:
                continue
            try:
                built[name] = _backends.load(name).create(ctx)
            except BackendUnavailable as exc:
                logger.warning("%s; its sizes go to %s", exc, profile.fallback())
        return cls(profile, ctx, built)

    def prepare(self) -> None:
        """Collective, once every rank is known to hold the same backends: let each build ahead
        what the profile's ranges will use (NVRAR compiles its chosen kernel variants, split
        across the node's ranks, instead of one by one on first use)."""
        for name, backend in self.backends.items():
            msgs = [
                (dtype, r["min_bytes"], dict(r.get("params") or {}))
                for dtype, modes in self.profile.tables.items()
                for rows in modes.values()
                for r in rows
                if r["backend"] == name
            ]
            if msgs:
                backend.prepare(msgs)

    def choose(self, x: torch.Tensor, mode: str | None = None) -> Choice:
        """The choice for ``x``: the profile's, or the fallback when that backend is absent or
        does not take ``x``."""
        return self._lookup(x, mode)[0]

    def _lookup(self, x: torch.Tensor, mode: str | None) -> tuple[Choice, Backend]:
        """Decided once per (size, dtype, mode, device, contiguity), then looked up: in eager
        mode every microsecond of Python is on the critical path."""
        key = (x.numel() * x.element_size(), x.dtype, mode or current_mode(), x.get_device(),
               x.is_contiguous())
        hit = self._decided.get(key)
        if hit is None or hit[1].closed:
            hit = self._decide(x, key[2])
            if len(self._decided) < _MAX_DECIDED:
                self._decided[key] = hit
        return hit

    def _decide(self, x: torch.Tensor, mode: str) -> tuple[Choice, Backend]:
        nbytes = x.numel() * x.element_size()
        choice = select(self.profile, nbytes, x.dtype, mode)
        backend = self.backends.get(choice.backend)
        if backend is None or not backend.supports(x, choice.params):
            log_once(
                f"router:unsupported:{choice.backend}:{x.dtype}",
                f"{choice.backend} is {'not built' if backend is None else 'not usable'} for "
                f"{nbytes} B of {x.dtype}; using {self.fallback}",
                logging.WARNING,
            )
            choice = Choice(self.fallback, {}, covered=False)
            backend = self.backends[self.fallback]
        return choice, backend

    def all_reduce(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        choice, backend = self._lookup(x, mode)
        return backend.all_reduce(x, choice.params)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Enter every backend's capture context (around CUDA-graph capture)."""
        with contextlib.ExitStack() as stack:
            for b in self.backends.values():
                stack.enter_context(b.capture())
            yield

    def detach(self) -> None:
        """Drop the backends without closing them (their owner closes them)."""
        self._decided.clear()
        self.backends = {}

    def close(self) -> None:
        self._decided.clear()
        for b in self.backends.values():
            b.close()
