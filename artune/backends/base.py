"""The contract every all-reduce backend implements.

A backend is built once per process group (``Backend.create``), sized for the largest message it
will see, and then answers the same few questions as every other backend:

- ``available(ctx) -> str | None``  (class method) why it cannot run here, or None;
- ``search_space(nbytes, ctx)``     (class method) its tunable parameters for Optuna, name ->
                                    list of choices ({} for a backend with none);
- ``launch_params``                 (class attribute, optional) the parameters that change only
                                    how a call is launched, not what is built (``--quick``
                                    searches only these);
- ``late_setup``                    (class attribute, optional) set up after the others in a
                                    tune (its set-up waits on builds outside artune);
- ``slow_imports``                  (class attribute, optional) modules its set-up imports that
                                    take seconds; a tune imports them in the background while
                                    the ranks start;
- ``search_space_for(nbytes, ctx, elem_size)``, ``default_params_for(...)`` (class methods,
                                    optional) the same for messages of ``elem_size``-byte
                                    elements, which the tuner calls; by default the two above;
- ``admits(params, nbytes, ctx)``   (class method, optional) whether one combination of those
                                    choices is a distinct, valid parameter set (the tuner never
                                    spends a trial on one it rejects);
- ``supports(x, params) -> bool``   whether it takes this tensor (dtype, size, alignment);
- ``all_reduce(x, params) -> Tensor`` the sum over the group, out of place: never mutates ``x``,
                                    same bits on every rank, no allocation when ``out`` is given;
- ``bind(x, params) -> call``       optional: ``all_reduce`` prepared for tensors of x's shape,
                                    dtype, device and contiguity (``call(y)`` for such a ``y``),
                                    with what depends only on those worked out once; the router
                                    binds once per message shape and then calls (the default
                                    binds ``params`` to ``all_reduce``);
- ``capture()``                     context manager entered around CUDA-graph capture;
- ``prepare(messages)``             optional, collective: build ahead what the first call of each
                                    (dtype, nbytes, params) would build lazily (compiled kernels);
- ``close()``                       frees what it holds; safe to call twice.

A backend that cannot run says why through ``available`` and is skipped; it never raises in the
hot path for an input it said it supports, and never hangs (waits are bounded).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

__all__ = ["Backend", "GroupContext", "Params", "BackendUnavailable", "remember"]

Params = Mapping[str, Any]


def _bound_all_reduce(all_reduce: Callable[[torch.Tensor, Params | None], torch.Tensor],
                      params: Params | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``all_reduce`` with ``params`` bound (a closure: a positional call costs less than a
    ``functools.partial`` with a keyword)."""
    return lambda x: all_reduce(x, params)


K = TypeVar("K")
V = TypeVar("V")


def remember(cache: dict[K, V], key: K, value: V, limit: int) -> V:
    """Keep ``value`` under ``key`` in a per-shape cache of at most ``limit`` entries; a full
    cache starts afresh (a served model's shapes are few, but eager prefill sizes vary: a
    cache that stopped growing would decide every new shape again on every call)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


class BackendUnavailable(RuntimeError):
    """Raised by ``Backend.create`` when a backend cannot be built on this group."""


@dataclass
class GroupContext:
    """What a backend needs to know about the group it reduces over.

    ``group`` is a torch.distributed group on the device (NCCL on GPUs, gloo on CPUs);
    ``cpu_group`` a gloo group over the same ranks for host-side agreement.
    ``ranks_per_node`` groups the ranks into (possibly virtual) nodes for hierarchical backends.
    """

    group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device
    ranks_per_node: int
    max_bytes: int
    group_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node


class Backend(ABC):
    """Base class of all backends; see the module docstring for the contract."""

    name: ClassVar[str]
    #: True when the backend runs on GPUs only (skipped for ``--device cpu``).
    needs_cuda: ClassVar[bool] = True
    #: True when every rank gets the same bits by construction (fixed reduction order). The
    #: autotune gate checks it either way: a backend whose ranks disagree is excluded.
    identical_bits: ClassVar[bool] = True
    #: Parameters of ``search_space`` that change only how a call is launched (no compile, no
    #: buffer): ``artune tune --quick`` searches these and keeps the others at the defaults.
    launch_params: ClassVar[tuple[str, ...]] = ()
    #: True when ``create`` may wait on builds outside artune (SGLang's nvcc builds, which
    #: ``artune tune`` starts in the background): a tune sets it up and measures it after the
    #: other backends, so that those builds run while the others are measured.
    late_setup: ClassVar[bool] = False
    #: Modules ``available``/``create`` import that take seconds (SGLang's parallel_state: 5-7 s
    #: on 4x H100): ``artune tune`` imports them in a background thread while its ranks start
    #: and set up the other backends, and waits for it before timing anything.
    slow_imports: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: GroupContext) -> None:
        self.ctx = ctx
        self.closed = False

    @classmethod
    @abstractmethod
    def available(cls, ctx: GroupContext) -> str | None:
        """None when the backend can run on ``ctx``, else a one-line reason it cannot."""

    @classmethod
    def search_space(cls, nbytes: int, ctx: GroupContext) -> dict[str, list[Any]]:
        """Tunable parameters at message size ``nbytes``: name -> choices. Empty: none."""
        return {}

    @classmethod
    def admits(cls, params: Params, nbytes: int, ctx: GroupContext) -> bool:
        """Whether ``params`` (one combination of ``search_space``) is worth a trial: False for
        a combination the backend would refuse or run exactly as another one."""
        return True

    @classmethod
    def default_params(cls, nbytes: int, ctx: GroupContext) -> dict[str, Any]:
        """Parameters used when the profile gives none (good without tuning)."""
        return {k: v[0] for k, v in cls.search_space(nbytes, ctx).items()}

    @classmethod
    def search_space_for(cls, nbytes: int, ctx: GroupContext, elem_size: int
                         ) -> dict[str, list[Any]]:
        """``search_space`` for messages of ``elem_size``-byte elements (what the tuner asks); a
        backend whose choices depend on the element size overrides it."""
        return cls.search_space(nbytes, ctx)

    @classmethod
    def default_params_for(cls, nbytes: int, ctx: GroupContext, elem_size: int
                           ) -> dict[str, Any]:
        """``default_params`` for messages of ``elem_size``-byte elements (what the tuner
        asks); a backend whose defaults depend on the element size overrides it."""
        return cls.default_params(nbytes, ctx)

    @classmethod
    def create(cls, ctx: GroupContext) -> Backend:
        """Build the backend on ``ctx``; raises ``BackendUnavailable`` with the reason."""
        reason = cls.available(ctx)
        if reason is not None:
            raise BackendUnavailable(f"{cls.name}: {reason}")
        return cls(ctx)

    def supports(self, x: torch.Tensor, params: Params | None = None) -> bool:
        return x.is_contiguous() and x.numel() * x.element_size() <= self.ctx.max_bytes

    @abstractmethod
    def all_reduce(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Sum of ``x`` over the group, as a new tensor of x's shape and dtype."""

    def bind(self, x: torch.Tensor,
             params: Params | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``all_reduce`` with ``params``, prepared for tensors of x's shape, dtype, device and
        contiguity: the returned call takes any such tensor (the router keeps one per message
        shape, so per-call work that depends only on those belongs here)."""
        return _bound_all_reduce(self.all_reduce, params)

    def prepare(self, messages: Sequence[tuple[str, int, Params]]) -> int:
        """Collective (every rank calls it with the same ``messages``): build ahead of time what
        the first ``all_reduce`` of each (dtype name, nbytes, params) would otherwise build
        lazily. Returns how many things this rank built; the default builds nothing."""
        return 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Entered around CUDA-graph capture of calls to ``all_reduce``."""
        yield

    def failure(self) -> str | None:
        """A fault this backend's device code recorded on its own (a wait inside a kernel that
        ran out, say), as the error message; None when there is none. Cheap and without a
        device sync: called once per model forward pass by the SGLang plugin, because CUDA-graph
        replays run no host code that could raise it. The default records nothing."""
        return None

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank={self.ctx.rank}/{self.ctx.world_size}>"

    @property
    def who(self) -> str:
        """How errors name this backend's call: the backend and the rank."""
        return f"artune {self.name} (rank {self.ctx.rank} of {self.ctx.world_size})"
