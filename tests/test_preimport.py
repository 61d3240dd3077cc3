"""Background imports of a tune's slow modules (artune.autotune.preimport) and the crew waiting
for them before it times anything."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from artune.autotune.crew import Crew
from artune.autotune.preimport import Preimport, slow_imports
from artune.backends import BACKENDS
from artune.backends.gloo import GlooBackend


class _SlowBackend(GlooBackend):
    name = "slowimp"
    slow_imports: ClassVar[tuple[str, ...]] = ("artune_slowmod", "artune_brokenmod",
                                               "artune_absentpkg.sub")


@pytest.fixture
def slow_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """artune_slowmod (0.3 s to import, notes its thread) and artune_brokenmod (raises)."""
    (tmp_path / "artune_slowmod.py").write_text(
        "import threading, time\ntime.sleep(0.3)\nTHREAD = threading.current_thread().name\n")
    (tmp_path / "artune_brokenmod.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKENDS, "slowimp", f"{__name__}:_SlowBackend")
    for m in ("artune_slowmod", "artune_brokenmod"):
        sys.modules.pop(m, None)
    yield tmp_path
    for m in ("artune_slowmod", "artune_brokenmod"):
        sys.modules.pop(m, None)


def test_slow_imports_lists_installed_modules_of_the_named_backends(slow_modules: Path) -> None:
    # a backend that does not load and a package that is not installed are left out
    assert slow_imports(["gloo", "slowimp", "no-such-backend", "slowimp"]) == [
        "artune_slowmod", "artune_brokenmod"]
    assert slow_imports(["gloo"]) == []


def test_imports_run_in_a_thread_and_a_failure_is_kept_not_raised(
        slow_modules: Path, caplog: pytest.LogCaptureFixture) -> None:
    pre = Preimport.start(["slowimp"])
    assert pre is not None
    log = logging.getLogger("artune")  # (it does not propagate to the root logger)
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="artune"):
            assert pre.wait(30.0) > 0.0
    finally:
        log.removeHandler(caplog.handler)
    assert "background import of artune_brokenmod failed" in caplog.text
    import artune_slowmod  # type: ignore[import-not-found]

    assert artune_slowmod.THREAD == "artune-preimport"
    assert pre.failed == {"artune_brokenmod": "RuntimeError: broken on purpose"}
    assert "artune_brokenmod" not in sys.modules  # the set-up imports it again, and says why
    assert pre.seconds >= 0.3


def test_turned_off_or_nothing_slow_starts_no_thread(slow_modules: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert Preimport.start(["gloo"]) is None
    monkeypatch.setenv("ARTUNE_PREIMPORT", "0")
    before = threading.active_count()
    assert Preimport.start(["slowimp"]) is None
    assert threading.active_count() == before and "artune_slowmod" not in sys.modules


class _Comm:
    world_size = 1

    def gather_errors(self, error: str | None, what: str) -> list[str | None]:
        return [error]

    def gather_floats(self, values: list[float], what: str) -> list[list[float]]:
        return [list(values)]


def test_crew_waits_for_the_imports_before_any_timed_command(monkeypatch) -> None:
    events: list[str] = []

    class _Pre:
        seconds = 1.5

        def wait(self, timeout_s: float | None = None) -> float:
            assert timeout_s is not None and timeout_s > 0  # bounded
            events.append("wait")
            return 0.25

    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0)
    crew = Crew(SimpleNamespace(), ctx, _Comm(), _Pre())  # type: ignore[arg-type]

    def trial(cmd: dict[str, Any], decide: Any) -> str:
        events.append("trial")
        return "timed"

    monkeypatch.setattr(crew, "_trial", trial)
    assert crew.execute({"op": "trial"}) == "timed"
    assert crew.execute({"op": "trial"}) == "timed"
    assert events == ["wait", "trial", "trial"]  # once, first
    assert crew.setup_seconds["wait for background imports"] == 0.25
    assert crew.setup_seconds["background imports (overlapped)"] == 1.5


def test_a_set_up_ends_with_the_wait(monkeypatch) -> None:
    events: list[str] = []

    class _Pre:
        seconds = 0.0

        def wait(self, timeout_s: float | None = None) -> float:
            events.append("wait")
            return 0.0

    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0)
    crew = Crew(SimpleNamespace(dtypes=["float32"], sizes=[1024]), ctx, _Comm(),  # type: ignore[arg-type]
                _Pre())
    monkeypatch.setattr(crew, "_prepare", lambda names: events.append("prepare"))
    crew.execute({"op": "setup", "names": []})
    assert events == ["prepare", "wait"]



def test_a_wait_past_its_bound_raises_naming_the_modules(slow_modules: Path) -> None:
    (slow_modules / "artune_slowmod.py").write_text("import time\ntime.sleep(1.5)\n")
    pre = Preimport.start(["slowimp"])
    assert pre is not None
    with pytest.raises(RuntimeError, match="artune_slowmod.*did not finish within 0 s"):
        pre.wait(0.2)
    pre.wait(30.0)  # (let it finish before the fixture removes the module)
