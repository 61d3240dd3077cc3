"""Import the slow modules of a tune's backends in the background while the ranks start.

SGLang's ``parallel_state`` takes 5-7 s to import on 4x H100 (the "check sglang" phase of
benchmarks/results/tune_time_4gpu_*_h100.json), all of it on the tune's critical path when the
``sglang`` candidate is set up. Each rank starts a thread that imports the modules the tune's
backends name in ``Backend.slow_imports`` as soon as it starts, while it joins the process group
and sets up the other backends (mostly waits on rendezvous, NVSHMEM and compilers), and waits
for the thread before it times anything: an import holding the interpreter lock would slow the
host-bound eager calls being timed.

Nothing depends on the thread succeeding: a module that fails to import here is imported again
by the backend's set-up, which then reports the real error (a failed import leaves nothing
behind in ``sys.modules``). ``ARTUNE_PREIMPORT=0`` turns it off.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from artune import envs
from artune.log import logger

if TYPE_CHECKING:
    import torch

__all__ = ["Preimport", "slow_imports"]

#: Imported on the main thread before the background thread starts: what both SGLang's import
#: and artune's own backends pull in (Triton, torch's symmetric memory, CUDA Python).
_SHARED = ("triton.language", "torch.distributed._symmetric_memory", "cuda.bindings.driver")


def slow_imports(names: Iterable[str]) -> list[str]:
    """The ``slow_imports`` of the backends ``names`` that are installed, in order, once each."""
    from artune import backends as _backends

    out: list[str] = []
    for name in names:
        try:
            mods = _backends.load(name).slow_imports
        except Exception:  # noqa: BLE001, S112 - its set-up reports why it cannot load
            continue
        for m in mods:
            if m not in out and _installed(m):
                out.append(m)
    return out


def _installed(module: str) -> bool:
    """Whether ``module``'s top-level package is installed (nothing imported)."""
    try:
        return importlib.util.find_spec(module.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


class Preimport:
    """A background thread importing ``modules`` (with ``device`` as its current CUDA device,
    so that nothing an import does lands on GPU 0 of every rank)."""

    def __init__(self, modules: list[str], device: torch.device | None = None) -> None:
        self.modules = modules
        self.failed: dict[str, str] = {}
        self.seconds = 0.0
        self._device = device
        self._thread = threading.Thread(target=self._run, name="artune-preimport", daemon=True)

    @classmethod
    def start(cls, backend_names: Iterable[str],
              device: torch.device | None = None) -> Preimport | None:
        """Start importing the slow modules of ``backend_names``; None when there are none or
        ``ARTUNE_PREIMPORT=0``."""
        if not envs.get("ARTUNE_PREIMPORT"):
            return None
        modules = slow_imports(backend_names)
        if not modules:
            return None
        # Packages both this thread and the main thread's set-up import, imported here first:
        # two threads importing one package's modules in different orders can each get the
        # other's half-initialised module (Python breaks such an import deadlock that way).
        for shared in filter(_installed, _SHARED):
            try:
                importlib.import_module(shared)
            except Exception:  # noqa: BLE001, S112 - the backends that need it report it
                continue
        self = cls(modules, device)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        if self._device is not None and self._device.type == "cuda":
            import torch

            torch.cuda.set_device(self._device)  # per thread
        for m in self.modules:
            try:
                importlib.import_module(m)
            except BaseException as exc:  # noqa: BLE001 - reported again by the set-up
                self.failed[m] = f"{type(exc).__name__}: {exc}"
        self.seconds = time.perf_counter() - t0

    def wait(self, timeout_s: float | None = None) -> float:
        """Block until the imports are done (at most ``timeout_s``: then raise, naming them);
        the seconds spent waiting here. Imports that failed are logged (their backend's
        set-up imports them again and reports why)."""
        t0 = time.perf_counter()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(
                f"artune tune: the background import of {', '.join(self.modules)} did not finish "
                f"within {timeout_s:.0f} s (ARTUNE_PREIMPORT=0 imports them in the set-up "
                "instead)")
        for m, why in self.failed.items():
            logger.info("background import of %s failed (%s); its backend's set-up imports it "
                        "again", m, why)
        return time.perf_counter() - t0
