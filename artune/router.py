"""The routed all-reduce: ``select()`` plus the chosen backend, as every caller uses it.

The autotuner's validation pass, the torch custom op and the SGLang plugin all call
``Router.all_reduce`` — one code path, so what was validated is what runs.

    router = Router.build(profile, ctx)        # builds every backend the profile routes to
    router.prepare()                           # optional, collective: compile ahead
    y = router.all_reduce(x)                   # out of place; mode from the capturing stream
    backend, call = router.lookup(x)           # or: the call prepared for x's shape, then
    y = call(x)                                # call it (what all_reduce does)
    router.close()
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from artune import backends as _backends
from artune.backends.base import Backend, BackendUnavailable, GroupContext, remember
from artune.log import log_once, logger
from artune.profile import Choice, Profile, select

if TYPE_CHECKING:
    import torch

__all__ = ["Router", "Decision", "Bound", "current_mode"]

#: Decisions remembered per router (distinct message shapes of a served model are few).
_MAX_DECIDED = 4096


class Decision(NamedTuple):
    """What the profile says for one message shape, and which built backend takes it."""

    choice: Choice  # select()'s answer (covered=False where the profile has nothing)
    backend: Backend | None  # the built backend that takes the message; None when none does
    why: str | None  # why none does ("not covered by the profile", "not built", "not usable")


class Bound(NamedTuple):
    """A built backend and its all-reduce prepared for one message shape (``bind``)."""

    backend: Backend
    call: Callable[[torch.Tensor], torch.Tensor]


def current_mode() -> str:
    """'graph' while the current CUDA stream is capturing, else 'eager'."""
    probe = _capture_probe()
    return "graph" if probe is not None and probe() else "eager"


@functools.cache
def _capture_probe() -> Callable[[], bool] | None:
    """torch's is-the-current-stream-capturing check, or None without CUDA (asked once:
    ``torch.cuda.is_available()`` alone costs about half a microsecond per call)."""
    import torch

    return torch.cuda.is_current_stream_capturing if torch.cuda.is_available() else None


class Router:
    """Dispatches each all-reduce to the backend the profile chose for its size and dtype."""

    def __init__(self, profile: Profile, ctx: GroupContext, built: dict[str, Backend]) -> None:
        self.profile = profile
        self.ctx = ctx
        self.backends = built
        self.fallback = profile.fallback()
        self._fallback_choice = Choice(self.fallback, {}, covered=False)
        #: (nbytes, dtype, mode, device index, contiguous) -> Decision
        self._decided: dict[tuple[Any, ...], Decision] = {}
        #: (shape, dtype, mode, device index, contiguous) -> Bound
        self._bound: dict[tuple[Any, ...], Bound] = {}
        self.closed = False
        if self.fallback not in built:
            raise BackendUnavailable(
                f"artune: rank {ctx.rank}: the fallback backend {self.fallback!r} could not be "
                f"built on group {ctx.group_name or '?'} (the warning logged before says why)"
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
        rank. For serving, ``artune.integration.group_setup.build_router`` builds them one at a
        time with an agreement of the ranks after each instead.
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

    def decide(self, x: torch.Tensor, mode: str | None = None) -> tuple[Decision, bool]:
        """(what the profile says for ``x`` and which built backend takes it, whether this call
        decided it). Decided once per (size, dtype, mode, device, contiguity), then looked up:
        in eager mode every microsecond of Python is on the critical path. The SGLang plugin
        reads the same decisions (it hands what no artune backend takes to SGLang)."""
        key = (x.nbytes, x.dtype, mode or current_mode(), x.get_device(), x.is_contiguous())
        d = self._decided.get(key)
        if d is not None and (d.backend is None or not d.backend.closed):
            return d, False
        return remember(self._decided, key, self._decide(x, key[2]), _MAX_DECIDED), True

    def _decide(self, x: torch.Tensor, mode: str) -> Decision:
        choice = select(self.profile, x.numel() * x.element_size(), x.dtype, mode)
        if not choice.covered:
            return Decision(choice, None, "not covered by the profile")
        backend = self.backends.get(choice.backend)
        if backend is None:
            return Decision(choice, None, "not built")
        if backend.closed:
            return Decision(choice, None, "closed")
        if not backend.supports(x, choice.params):
            return Decision(choice, None, "not usable")
        return Decision(choice, backend, None)

    def _resolve(self, x: torch.Tensor, mode: str | None) -> tuple[Choice, Backend]:
        d, new = self.decide(x, mode)
        if d.backend is not None:
            return d.choice, d.backend
        if new and d.choice.covered:  # select() logs the uncovered sizes itself
            log_once(
                f"router:unsupported:{d.choice.backend}:{x.dtype}",
                f"{d.choice.backend} is {d.why} for {x.numel() * x.element_size()} B of "
                f"{x.dtype}; using {self.fallback}",
                logging.WARNING,
            )
        return self._fallback_choice, self.backends[self.fallback]

    def choose(self, x: torch.Tensor, mode: str | None = None) -> Choice:
        """The choice for ``x``: the profile's, or the fallback when that backend is absent or
        does not take ``x``."""
        return self._resolve(x, mode)[0]

    def all_reduce(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        # The common case, inlined (in eager mode this is on the critical path): one lookup of
        # the call the chosen backend prepared for this shape (``Backend.bind``), which does
        # less per call than ``backend.all_reduce`` would.
        hit = self._bound.get(
            (x.shape, x.dtype, mode or current_mode(), x.get_device(), x.is_contiguous()))
        if hit is not None and not hit[0].closed:
            return hit[1](x)
        return self.lookup(x, mode)[1](x)

    def lookup(self, x: torch.Tensor, mode: str | None = None) -> Bound:
        """(the backend that takes ``x``, its call prepared for x's shape): the profile's
        choice, or the fallback when that backend is absent or does not take ``x``. Bound once
        per (shape, dtype, mode, device, contiguity), then looked up."""
        key = (x.shape, x.dtype, mode or current_mode(), x.get_device(), x.is_contiguous())
        hit = self._bound.get(key)
        if hit is not None and not hit[0].closed:
            return hit
        if self.closed or not self.backends:
            raise RuntimeError(
                f"artune: rank {self.ctx.rank}: all-reduce of {x.nbytes} B on group "
                f"{self.ctx.group_name or '?'} through a router that was "
                f"{'closed' if self.closed else 'detached'}: build a new one (Router.build)")
        choice, backend = self._resolve(x, key[2])
        return remember(self._bound, key, Bound(backend, backend.bind(x, choice.params)),
                        _MAX_DECIDED)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Enter every backend's capture context (around CUDA-graph capture)."""
        with contextlib.ExitStack() as stack:
            for b in self.backends.values():
                stack.enter_context(b.capture())
            yield

    def failure(self) -> str | None:
        """The first fault a built backend recorded on its own (``Backend.failure``), or None."""
        for b in self.backends.values():
            msg = b.failure()
            if msg is not None:
                return msg
        return None

    def detach(self) -> None:
        """Drop the backends without closing them (their owner closes them)."""
        self._decided.clear()
        self._bound.clear()
        self.backends = {}

    def close(self) -> None:
        self.closed = True
        self._decided.clear()
        self._bound.clear()
        for b in self.backends.values():
            b.close()
