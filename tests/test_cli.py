"""`artune` CLI: argument errors, the no-GPU and too-many-ranks messages, delegation."""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import pytest
from conftest import requires_gpus, run_artune

from artune import cli


@pytest.fixture
def shell_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if started from a shell: no launcher variables."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)


def _no_launch(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], int]]:
    calls: list[tuple[list[str], int]] = []
    import artune.autotune.launcher as launcher

    monkeypatch.setattr(launcher, "launch", lambda argv, n: calls.append((list(argv), n)) or 0)
    return calls


def test_no_gpu_says_how_to_proceed(
    shell_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import artune.topology

    monkeypatch.setattr(artune.topology, "gpu_count", lambda: 0)
    calls = _no_launch(monkeypatch)
    assert cli.main(["tune"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "artune tune --device cpu" in err
    assert calls == []


def test_nproc_larger_than_gpus(
    shell_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import artune.topology

    monkeypatch.setattr(artune.topology, "gpu_count", lambda: 2)
    calls = _no_launch(monkeypatch)
    assert cli.main(["tune", "--nproc-per-node", "4"]) == 2
    err = capsys.readouterr().err
    assert "--nproc-per-node 4 but only 2 GPU(s)" in err and "2 or fewer" in err
    assert calls == []
    # Within the GPUs present, and by default one rank per GPU, it launches.
    assert cli.main(["tune", "--quick"]) == 0
    assert calls == [(["tune", "--quick"], 2)]


def test_bad_arguments_exit_2(shell_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tune", "--device", "cpu", "--nproc-per-node", "1"]) == 2
    assert "at least 2 ranks" in capsys.readouterr().err
    assert cli.main(["tune", "--device", "cpu", "--backends", "nccl,bogus"]) == 2
    assert "unknown bogus" in capsys.readouterr().err
    assert cli.main(["tune", "--device", "cpu", "--nproc-per-node", "3",
                     "--ranks-per-node", "2"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_refused_before_any_rank_starts(
    shell_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Mistakes a shell can see are refused before the ranks start (no partial tune whose
    failure would then advise --resume)."""
    calls = _no_launch(monkeypatch)
    assert cli.main(["tune", "--device", "cpu", "--nproc-per-node", "0"]) == 2
    assert "at least 2 ranks, not 0" in capsys.readouterr().err
    assert cli.main(["tune", "--device", "cpu", "--backends", "nccl"]) == 2
    err = capsys.readouterr().err
    assert "nccl needs CUDA GPUs" in err and "gloo" in err
    assert cli.main(["tune", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")  # a file where --out needs a folder
    assert cli.main(["tune", "--device", "cpu", "--out", str(tmp_path / "a-file" / "p.json")]) == 2
    assert "cannot make its folder" in capsys.readouterr().err
    assert cli.main(["tune", "--device", "cpu", "--sizes", "3,4K"]) == 2
    assert "3 B is not a whole number of 2-byte elements" in capsys.readouterr().err
    assert cli.main(["tune", "--device", "cpu", "--sizes", "1K:2M:x"]) == 2
    assert "the factor 'x' is not a whole number" in capsys.readouterr().err
    assert calls == []
    assert cli.main(["tune", "--device", "cpu", "--backends", "nccl,gloo"]) == 0
    assert calls == [(["tune", "--device", "cpu", "--backends", "nccl,gloo"], 2)]


def test_existing_storage_without_resume(
    shell_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = _no_launch(monkeypatch)
    out = tmp_path / "p.json"
    Path(f"{out}.optuna.db").write_bytes(b"")
    assert cli.main(["tune", "--device", "cpu", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err and calls == []
    assert cli.main(["tune", "--device", "cpu", "--out", str(out), "--resume"]) == 0
    assert calls == [(["tune", "--device", "cpu", "--out", str(out), "--resume"], 2)]


def test_show_delegates_and_reports_bad_profiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from _profiles import profile_doc

    from artune.profile import save

    p = save(profile_doc(), tmp_path / "p.json")
    assert cli.main(["show", str(p)]) == 0
    assert "symm_two_shot" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "tables": ')
    assert cli.main(["show", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_launch_forwards_everything_after_dashdash(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []
    fake = types.ModuleType("artune.integration.launch")
    fake.main = lambda args: seen.append(args) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "artune.integration.launch", fake)
    import artune.integration

    monkeypatch.setattr(artune.integration, "launch", fake, raising=False)
    argv = ["launch", "--profile", "p.json", "--force", "--", "--model-path", "m", "--tp", "4"]
    assert cli.main(argv) == 0
    assert seen[0].profile == "p.json" and seen[0].force
    assert seen[0].server_args == ["--model-path", "m", "--tp", "4"]


def test_console_script_help_runs_without_gpu() -> None:
    r = run_artune("--help")
    assert r.returncode == 0 and "tune" in r.stdout and "show" in r.stdout
    r = run_artune("tune", "--help")
    assert r.returncode == 0 and "--nproc-per-node" in r.stdout and "--resume" in r.stdout


@requires_gpus(1)
def test_nproc_larger_than_real_gpus() -> None:
    import torch

    n = torch.cuda.device_count()
    r = run_artune("tune", "--nproc-per-node", str(n + 1))
    assert r.returncode == 2 and f"only {n} GPU(s)" in r.stderr


def test_rank_0s_usage_error_is_not_followed_by_resume_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rank 0 explains a usage error (exit 2); a peer that leaves first (exit 1, its group torn
    down) must not turn that into "rank 1 failed ... rerun with --resume"."""
    from artune.autotune.launcher import launch

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$RANK" = 0 ] && { sleep 0.5; exit 2; }\nexit 1\n')
    fake.chmod(0o755)
    assert launch(["tune"], 2, python=str(fake)) == 2
    assert "--resume" not in capsys.readouterr().err
    # a peer that fails on its own, rank 0 failing next on the lost peer: the peer is named
    both = tmp_path / "python_both"
    # (rank 0 fails 2 s later, well inside the launcher's grace for it, and far enough
    # apart that one poll of a stalled launcher cannot see both at once)
    both.write_text('#!/bin/sh\n[ "$RANK" = 0 ] && { sleep 2; exit 1; }\nexit 1\n')
    both.chmod(0o755)
    assert launch(["tune"], 2, python=str(both)) == 1
    assert "rank 1 " in capsys.readouterr().err
    # a peer that fails on its own while rank 0 runs on: named, with the advice
    slow = tmp_path / "python_slow"
    slow.write_text('#!/bin/sh\n[ "$RANK" = 0 ] && { sleep 30; exit 0; }\nexit 1\n')
    slow.chmod(0o755)
    assert launch(["tune"], 2, python=str(slow), grace_s=1.0) == 1
    err = capsys.readouterr().err
    assert "rank 1" in err and "--resume" in err


def test_an_interrupted_launch_exits_130_even_if_ctrl_c_comes_again_later(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C stops the ranks and returns 130; a terminal's second Ctrl-C may land after that,
    while the process is on its way out. It must stay ignored: restoring Python's handler there
    turned the exit into a death by SIGINT (-2) in a CI run of the two-Ctrl-C test."""
    import signal
    import threading
    import time

    from artune.autotune.launcher import launch

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert launch(["tune"], 2, python=str(fake), grace_s=1.0) == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # the late second Ctrl-C: nothing raised
        time.sleep(0.05)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    assert "interrupted; stopped all ranks" in capsys.readouterr().err


def test_size_ranges_keep_their_whole_element_midpoints() -> None:
    """A range's own midpoints that are not whole elements are left out (3 B between 2 and 4
    in bf16; 6 B between 4 and 8 in fp32); the sizes written out must be whole elements."""
    def sizes(*argv: str) -> list[int]:
        args = cli.build_parser().parse_args(["tune", "--device", "cpu", *argv])
        return cli.tune_config(args, "artune tune").sizes

    assert sizes("--sizes", "2:16") == [2, 4, 6, 8, 12, 16]
    assert sizes("--sizes", "4:16", "--dtypes", "fp32") == [4, 8, 12, 16]
    with pytest.raises(ValueError, match="2 B is not a whole number of 4-byte elements"):
        sizes("--sizes", "2:16", "--dtypes", "bf16,fp32")


def test_launch_without_dashdash_says_where_sglangs_arguments_go(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["launch", "--model-path", "m", "--tp", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "go after `--`" in err
    assert "artune launch [--profile PATH] -- --model-path m --tp 2" in err
    assert err.startswith("usage: artune launch ")  # launch's usage, not the top-level one


def test_version_names_the_package_and_the_profile_schema(
        capsys: pytest.CaptureFixture[str]) -> None:
    from artune import __version__
    from artune.profile import SCHEMA_VERSION

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"artune {__version__} (profile schema {SCHEMA_VERSION})")


def test_env_lists_every_variable_with_its_value_here(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from artune.envs import ENV

    monkeypatch.setenv("ARTUNE_TIMEOUT_S", "7.5")
    monkeypatch.delenv("ARTUNE_STRICT", raising=False)
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ENV:
        assert f"\n{name} = " in "\n" + out, name
    assert "ARTUNE_TIMEOUT_S = '7.5' (set: 7.5)" in out and "ARTUNE_STRICT = 1 (default)" in out
    assert "ARTUNE_PROFILE = unset (default)" in out
    assert "ARTUNE_NVRAR_ONESHOT_MAX_BYTES = 1M (default)" in out


@pytest.mark.parametrize("raw,want", [("4M", 4 << 20), ("512K", 512 << 10), ("4194304", 4 << 20),
                                      ("0", 0), (" 2MiB ", 2 << 20)])
def test_byte_variables_take_the_units_env_prints(raw: str, want: int) -> None:
    """``artune env`` shows byte caps as 1M; the same spelling sets them."""
    from artune.envs import get

    assert get("ARTUNE_NVRAR_ONESHOT_MAX_BYTES", {"ARTUNE_NVRAR_ONESHOT_MAX_BYTES": raw}) == want


@pytest.mark.parametrize("raw", ["-1", "4Q", "lots", "1.5.2M"])
def test_a_bad_byte_variable_says_what_it_takes(raw: str) -> None:
    from artune.envs import get

    with pytest.raises(ValueError, match="expected a number of bytes .* 4M or 512K"):
        get("ARTUNE_NVRAR_LL_MAX_BYTES", {"ARTUNE_NVRAR_LL_MAX_BYTES": raw})


def test_env_says_which_values_are_not_valid_and_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ARTUNE_STRICT", "maybe")
    monkeypatch.setenv("ARTUNE_TIMEOUT_S", "abc")
    monkeypatch.setenv("ARTUNE_COLLECTIVE_TIMEOUT_S", "-3")
    monkeypatch.setenv("ARTUNE_LOG_LEVEL", "LOUD")
    assert cli.main(["env"]) == 2
    out, err = capsys.readouterr()
    assert "ARTUNE_STRICT = 'maybe' (set; NOT VALID: expected 1 or 0" in out
    assert "ARTUNE_TIMEOUT_S = 'abc' (set; NOT VALID:" in out
    assert "ARTUNE_COLLECTIVE_TIMEOUT_S = '-3' (set; NOT VALID: expected a positive" in out
    assert "ARTUNE_LOG_LEVEL = 'LOUD' (set; NOT VALID: expected DEBUG, INFO" in out
    assert "4 variable(s) not valid" in err


def test_a_bad_variable_is_refused_before_any_rank_starts(
        shell_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    calls = _no_launch(monkeypatch)
    monkeypatch.setenv("ARTUNE_COLLECTIVE_TIMEOUT_S", "abc")
    assert cli.main(["tune", "--device", "cpu", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("artune tune: ARTUNE_COLLECTIVE_TIMEOUT_S='abc' is not valid: could "
                           "not convert string to float: 'abc'")
    assert calls == []


def test_a_bad_log_level_does_not_break_importing_artune() -> None:
    """The plugin imports artune in every SGLang rank: a bad ARTUNE_LOG_LEVEL warns and logs
    at INFO instead of failing the import."""
    import subprocess
    import sys

    from conftest import artune_env

    r = subprocess.run([sys.executable, "-c", "import artune.log as l; print(l.logger.level)"],
                       env=artune_env({"ARTUNE_LOG_LEVEL": "LOUD"}), text=True,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "20"
    assert "ARTUNE_LOG_LEVEL='LOUD' is not valid" in r.stderr and "logging at INFO" in r.stderr


def test_readme_names_every_environment_variable() -> None:
    """The README's table of variables keeps up with artune.envs (what the code reads)."""
    from pathlib import Path

    from artune.envs import ENV

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [n for n in ENV if f"| `{n}` |" not in readme] == []


def test_an_extra_backend_or_storage_that_cannot_work_is_refused_before_any_rank(
        shell_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    calls = _no_launch(monkeypatch)
    assert cli.main(["tune", "--device", "cpu", "--quick", "--extra-backend",
                     "foo=no_such_pkg_xyz.mod:Baz"]) == 2
    err = capsys.readouterr().err
    assert "--extra-backend foo=no_such_pkg_xyz.mod:Baz:" in err and "no_such_pkg_xyz" in err
    assert cli.main(["tune", "--device", "cpu", "--quick", "--storage", "bogus://x"]) == 2
    assert "--storage 'bogus://x' is not a database URL" in capsys.readouterr().err
    assert calls == []


def test_a_reader_going_away_is_no_traceback() -> None:
    """`artune env | head -2`: no BrokenPipeError traceback, the status a shell gives a writer
    stopped by SIGPIPE."""
    import subprocess

    proc = subprocess.run(f"{sys.executable} -m artune.cli env | head -1; "
                          "echo status=${PIPESTATUS[0]}", shell=True, capture_output=True,
                          text=True, executable="/bin/bash",
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[1] in ("status=0", "status=141"), proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_include_sglang_by_name_that_cannot_run_is_an_error(tmp_path: Path) -> None:
    """`--include-sglang` asked for by name on a CPU dry run: refused before any rank starts
    (by default the candidate is only skipped where it cannot run)."""
    r = run_artune("tune", "--device", "cpu", "--quick", "--include-sglang",
                   "--out", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "--include-sglang" in r.stderr and "GPUs only" in r.stderr
    assert not (tmp_path / "p.json.optuna.db").exists()


def test_free_port_is_outside_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendezvous port of a shell-launched tune is not one the kernel may give an outgoing
    connection meanwhile (rank 0 then fails with EADDRINUSE): outside the ephemeral range, and
    free; with no room outside it, a free port all the same."""
    import socket

    from artune.autotune import launcher

    lo, hi = launcher._ephemeral_range()
    for _ in range(20):
        port = launcher.free_port()
        assert not lo <= port <= hi, (port, lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free right after
    # the spans drawn from: below the range from 20000, above it to 65535; none where the
    # range leaves no room (then bind(0): a free port all the same)
    assert launcher._spans(32768, 60999) == [(20000, 32768), (61000, 65536)]
    assert launcher._spans(25000, 65535) == [(20000, 25000)]
    assert launcher._spans(10000, 65535) == []
    monkeypatch.setattr(launcher, "_ephemeral_range", lambda: (1024, 65535))
    port = launcher.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
