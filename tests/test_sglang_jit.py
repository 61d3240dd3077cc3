"""The background build of SGLang's JIT modules before a tune (artune.backends.sglang_jit), on
CPU: what it builds, when it starts, and that a failed build is reported, never raised."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from artune.backends import sglang_jit


def test_the_builds_a_tp_group_runs_first() -> None:
    assert sglang_jit.modules(4, ["bfloat16", "float16"]) == [
        "ipc", "communicator", "kernel:bfloat16", "kernel:float16"]


def test_not_started_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTUNE_SGLANG_WARM", "0")
    assert sglang_jit.start(4, ["bfloat16"]) is None


def test_not_started_without_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.delenv("ARTUNE_SGLANG_WARM", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert sglang_jit.start(4, ["bfloat16"]) is None


def test_each_builder_calls_sglangs_own_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []
    fake = types.ModuleType(sglang_jit._MOD)
    fake._init_ipc_manager = lambda: calls.append(("ipc", None))  # type: ignore[attr-defined]
    fake._init_communicator = lambda: calls.append(("comm", None))  # type: ignore[attr-defined]
    fake.get_all_reduce_module = lambda dt, w: calls.append(("kernel", (dt, w)))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, sglang_jit._MOD, fake)
    for name in sglang_jit.modules(4, ["bfloat16"]):
        sglang_jit._builder(name, 4)()
    import torch

    assert calls == [("ipc", None), ("comm", None), ("kernel", (torch.bfloat16, 4))]


def test_a_failed_build_exits_1_with_its_name() -> None:
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is importable here: the build would not fail for want of it")
    # No sglang on the CPU test path: the one build fails, named, and nothing raises.
    proc = subprocess.run([sys.executable, "-m", "artune.backends.sglang_jit", "--one", "ipc", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("artune sglang_jit: ipc: ModuleNotFoundError")


def test_stop_ends_the_whole_process_group() -> None:
    """``stop`` ends the builds and whatever they started (nvcc), not only the first process."""
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
         "print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    sglang_jit.stop(proc)
    assert proc.returncode is not None
    import os
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anything left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("a process of the group outlived stop()")
    sglang_jit.stop(None)  # nothing started: nothing to do


def test_each_build_outcome_lands_in_the_log(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``start(log_path=...)``: every module's build reports there, by name (here each fails:
    the child processes have no sglang)."""
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is importable here: the builds would run for real")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "sglang" else real(name, *a))
    log = tmp_path / "out.json.sglang-jit.log"
    proc = sglang_jit.start(2, ["bfloat16"], log_path=log)
    assert proc is not None
    assert proc.wait(timeout=120) == 1
    lines = sorted(log.read_text().splitlines())
    assert [ln.split(":")[1].strip() for ln in lines] == ["communicator", "ipc", "kernel"]
    assert all("ModuleNotFoundError" in ln for ln in lines), lines


def test_the_driver_waits_for_every_build_after_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed build must not end the others: the builds die with the driver, so the driver
    waits for all of them before it exits (it once returned at the first failure)."""
    waited: list[str] = []

    class Build:
        def __init__(self, argv: list[str], **_: object) -> None:
            self.name = argv[argv.index("--one") + 1]

        def wait(self) -> int:
            waited.append(self.name)
            return 1 if self.name == "ipc" else 0  # the first one fails

    monkeypatch.setattr(sglang_jit.subprocess, "Popen", Build)
    assert sglang_jit.main(["2", "bfloat16", "float16"]) == 1
    assert waited == sglang_jit.modules(2, ["bfloat16", "float16"])
