"""``artune launch``: checks before anything starts, then exec of the server (exit code and
signals pass through, the profile and the no-multicast environment reach it).

The server here is a small stand-in script (``server=`` of ``launch.main``) that reports what it
received; the real ``sglang.launch_server`` needs GPUs. Runs on CPU, so profiles are CPU dry-run
profiles whose fingerprint matches this machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import artune_env, run_artune

from artune import profile as profile_mod
from artune import topology
from artune.autotune.table import build_profile
from artune.integration import launch

FAKE_SERVER = textwrap.dedent("""
    import json, os, signal, sys, time
    report = {"pid": os.getpid(), "argv": sys.argv[1:],
              "env": {k: os.environ.get(k) for k in (
                  "ARTUNE_PROFILE", "ARTUNE_STRICT", "NCCL_NVLS_ENABLE",
                  "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "SGLANG_PLUGINS")}}
    if "--sleep" in sys.argv:  # the handler first: the report says the server is ready
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
    path = os.environ["FAKE_SERVER_REPORT"]
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)  # whole or absent for the test that waits on it
    if "--sleep" in sys.argv:
        time.sleep(60)
    sys.exit(int(os.environ.get("FAKE_SERVER_EXIT", "0")))
""")


def _profile(path: Path, world: int = 2) -> Path:
    rec = {"backend": "gloo", "params": {}, "dtype": "float32", "mode": "eager",
           "nbytes": 4096, "rank_medians_us": [9.0] * world, "latency_us": 9.0,
           "spread_us": 0.1, "reps": 10}
    doc = build_profile([rec], [], fingerprint=topology.fingerprint(world, world, device="cpu"),
                        command="artune tune --device cpu (test)", dry_run=True)
    profile_mod.save(doc, path)
    return path


def _run(tmp: Path, profile: Path | None, server_args: list[str], **kw: object
         ) -> tuple[int, str, dict[str, object] | None]:
    server = tmp / "fake_server.py"
    server.write_text(FAKE_SERVER)
    report = tmp / "report.json"
    report.unlink(missing_ok=True)
    code = textwrap.dedent(f"""
        import argparse, sys
        {kw.get("prelude") or ""}
        from artune.integration import launch
        args = argparse.Namespace(profile={str(profile) if profile else None!r},
                                  force={bool(kw.get("force"))!r}, sglang_args={server_args!r})
        sys.exit(launch.main(args, server=[sys.executable, {str(server)!r}]))
    """)
    env = artune_env({"FAKE_SERVER_REPORT": str(report), "CUDA_VISIBLE_DEVICES": ""})
    for k in [k for k in env if k.startswith(("ARTUNE_", "SGLANG_"))]:
        env.pop(k)
    env.update(kw.get("env") or {})  # type: ignore[arg-type]
    r = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True,
                       timeout=120, cwd=tmp)
    started = json.loads(report.read_text()) if report.exists() else None
    return r.returncode, r.stderr, started


def test_starts_the_server_with_the_profile_and_no_multicast(tmp_path: Path) -> None:
    prof = _profile(tmp_path / "p.json")
    code, err, started = _run(tmp_path, prof, ["--model-path", "m", "--tp-size", "2"],
                              env={"FAKE_SERVER_EXIT": "7", "NCCL_NVLS_ENABLE": "1",
                                   "SGLANG_PLUGINS": "other"})
    assert started is not None, err
    assert code == 7  # the server's exit code is the launcher's
    assert started["argv"] == ["--model-path", "m", "--tp-size", "2"]
    env = started["env"]
    assert env["ARTUNE_PROFILE"] == str(prof.resolve())
    assert env["NCCL_NVLS_ENABLE"] == "0"  # overrides the caller's 1
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["SGLANG_PLUGINS"] == "other,artune"  # a whitelist must not drop the plugin
    assert env["ARTUNE_STRICT"] is None
    # one line says what starts with which profile, before the server's own output
    line = next(ln for ln in err.splitlines() if ln.startswith("artune launch: profile"))
    assert str(prof) in line and "matches this machine at TP=2" in line
    assert topology.fingerprint_id(profile_mod.load(prof).fingerprint) in line
    assert "DRY RUN profile" in err  # a CPU dry run's routes say nothing about GPUs


def test_a_local_model_the_linear_section_lacks_gets_a_note(tmp_path: Path) -> None:
    """A local model folder whose row-parallel layers the profile's linear section did not
    measure: a note names the shapes and the tune command; a profile that has them, a hub
    name or ARTUNE_FUSED_LINEAR=0: no note."""
    model = tmp_path / "llama"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps(
        {"hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 14336}))
    prof = _profile(tmp_path / "p.json")
    args = ["--model-path", str(model), "--tp-size", "2"]
    code, err, started = _run(tmp_path, prof, args)
    assert started is not None, err
    assert ("the profile's linear section has no entry for this model's row-parallel layers "
            "at TP=2 (K x N: 2048x4096, 7168x4096)") in err, err
    assert f"`artune tune --linear-model {model}`" in err
    for other, env in ((["--model-path", "meta-llama/Llama-3.1-8B", "--tp-size", "2"], {}),
                       (args, {"ARTUNE_FUSED_LINEAR": "0"}), (args, {"ARTUNE_FUSED_LINEAR": "1"})):
        _, err, started = _run(tmp_path, prof, other, env=env)
        assert started is not None and "linear section" not in err, err
    doc = json.loads(prof.read_text())
    doc["linear"] = [{"dtype": "bfloat16", "k": k, "n": 4096, "ranges": []} for k in (2048, 7168)]
    prof.write_text(json.dumps(doc))
    _, err, started = _run(tmp_path, prof, args)
    assert started is not None and "linear section" not in err, err


def test_a_profile_that_never_measured_sglangs_own_gets_a_note(tmp_path: Path) -> None:
    """A GPU profile whose tune skipped SGLang's own all-reduce (sglang did not import there):
    a note says so and why before the server starts (where SGLang's own is the fastest, the
    server can then be slower than SGLang's default); one that measured it: no note."""
    prof = _profile(tmp_path / "p.json")
    doc = json.loads(prof.read_text())
    doc["dry_run"] = False
    doc["skipped"] = [{"backend": "sglang", "params": {}, "dtype": None, "mode": None,
                       "nbytes": None, "reason": "rank 0: create() failed: "
                       "ModuleNotFoundError: No module named 'openai'"}]
    prof.write_text(json.dumps(doc))
    args = ["--model-path", "m", "--tp-size", "2"]
    code, err, started = _run(tmp_path, prof, args)
    assert started is not None, err
    assert ("has no measurement of SGLang's own all-reduce (the tune skipped it: rank 0: "
            "create() failed: ModuleNotFoundError: No module named 'openai')") in err, err
    assert "`artune tune --include-sglang` on this machine" in err
    # SGLang's custom all-reduce off in this server (abbreviated as argparse allows): no note
    _, err, started = _run(tmp_path, prof, [*args, "--disable-custom-all"])
    assert started is not None and "SGLang's own all-reduce" not in err, err
    doc["measurements"] = [*doc.get("measurements", []), {
        "backend": "sglang", "params": {}, "dtype": "float32", "mode": "eager", "nbytes": 4096,
        "rank_medians_us": [20.0, 20.0], "latency_us": 20.0, "spread_us": 0.1, "reps": 10}]
    prof.write_text(json.dumps(doc))
    _, err, started = _run(tmp_path, prof, args)
    assert started is not None and "SGLang's own all-reduce" not in err, err


def test_launch_needs_none_of_the_tuners_dependencies(tmp_path: Path) -> None:
    """Serving machines need not have Optuna (or anything else only the tuner imports): the
    whole launch path, the linear-section note included, runs with it unimportable. (The 31st
    session's launch on 2x H200 died importing optuna in that note.)"""
    model = tmp_path / "llama"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps(
        {"hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 14336}))
    prof = _profile(tmp_path / "p.json")
    code, err, started = _run(tmp_path, prof, ["--model-path", str(model), "--tp-size", "2"],
                              prelude='sys.modules["optuna"] = None  # unimportable')
    assert started is not None and code == 0, err
    assert "has no entry for this model's row-parallel layers" in err, err


def test_signals_reach_the_server(tmp_path: Path) -> None:
    prof = _profile(tmp_path / "p.json")
    server = tmp_path / "fake_server.py"
    server.write_text(FAKE_SERVER)
    report = tmp_path / "report.json"
    code = textwrap.dedent(f"""
        import argparse, sys
        from artune.integration import launch
        args = argparse.Namespace(profile={str(prof)!r}, force=False,
                                  sglang_args=["--tp-size", "2", "--sleep"])
        sys.exit(launch.main(args, server=[sys.executable, {str(server)!r}]))
    """)
    env = artune_env({"FAKE_SERVER_REPORT": str(report), "CUDA_VISIBLE_DEVICES": ""})
    p = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not report.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert report.exists(), p.communicate(timeout=5)
        assert json.loads(report.read_text())["pid"] == p.pid  # exec: the same process
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 42  # the server's handler ran and chose the exit code
    finally:
        if p.poll() is None:
            p.kill()


def test_missing_profile_fails_before_start(tmp_path: Path) -> None:
    code, err, started = _run(tmp_path, tmp_path / "nope.json", ["--tp-size", "2"])
    assert code == 2 and started is None
    assert "nope.json" in err and "file not found" in err and "artune tune" in err


def test_no_profile_at_all_names_the_remedy(tmp_path: Path) -> None:
    code, err, started = _run(tmp_path, None, ["--tp-size", "2"])
    assert code == 2 and started is None
    assert "--profile" in err and "artune tune --nproc-per-node 2" in err


def test_tp_1_is_refused_with_the_reason(tmp_path: Path) -> None:
    """No --tp: one GPU, no tensor-parallel all-reduce (not "tune with --nproc-per-node 1",
    which tune refuses)."""
    code, err, started = _run(tmp_path, None, ["--model-path", "m"])
    assert code == 2 and started is None
    assert "TP=1" in err and "--tp N" in err and "--nproc-per-node 1" not in err


def test_unreadable_profile_fails_before_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "tables": ')
    code, err, started = _run(tmp_path, bad, ["--tp-size", "2"])
    assert code == 2 and started is None
    assert "not valid JSON" in err


def test_a_gpu_profile_on_this_machine_is_refused_in_one_line(tmp_path: Path) -> None:
    """A reference profile of 4x H100 on this CPU machine: the refusal alone, not buried
    under notes about versions that differ."""
    ref = Path(__file__).resolve().parents[1] / "artune" / "profiles" / "6eeb601b655cf21c.json"
    code, err, started = _run(tmp_path, ref, ["--tp-size", "4"])
    assert code == 2 and started is None
    assert err.startswith(f"artune launch: profile {ref} was made for another machine"), err
    assert "note:" not in err and len(err.strip().splitlines()) == 1


def test_no_profile_on_a_cpu_machine_says_where_to_tune(tmp_path: Path) -> None:
    code, err, started = _run(tmp_path, None, ["--tp-size", "2"])
    assert code == 2 and started is None
    assert "no profile for this machine at TP=2" in err
    assert "on the GPU node that will serve" in err and "dryrun-" in err
    assert err.count("`") % 2 == 0, err  # every quoted command closed, none left dangling


def test_profile_for_another_tp_size_is_refused_unless_forced(tmp_path: Path) -> None:
    prof = _profile(tmp_path / "p.json", world=2)
    code, err, started = _run(tmp_path, prof, ["--tp-size", "4"])
    assert code == 2 and started is None
    assert "world_size: profile has 2, this machine has 4" in err and "--force" in err
    code, err, started = _run(tmp_path, prof, ["--tp-size", "4"], force=True)
    assert code == 0 and started is not None, err
    assert started["env"]["ARTUNE_STRICT"] == "0"  # the plugin warns, SGLang keeps its own


@pytest.mark.parametrize("args, named", [
    (["--enable-symm-mem"], "--enable-symm-mem is refused"),
    (["--enable-nccl-nvls"], "--enable-nccl-nvls is refused"),
    (["--enable-torch-symm-mem"], "--enable-torch-symm-mem is refused"),
    (["--enable-mscclpp"], "--enable-mscclpp is refused"),
    (["--enable-symm"], "--enable-symm (read by SGLang as --enable-symm-mem) is refused"),
    (["--flashinfer-allreduce-fusion-backend=mnnvl"], "mnnvl is refused"),
    (["--flashinfer-allreduce-fusion-backend", "mnnvl"], "mnnvl is refused"),
])
def test_multicast_flags_are_refused_with_the_reason(tmp_path: Path, args: list[str],
                                                     named: str) -> None:
    prof = _profile(tmp_path / "p.json")
    code, err, started = _run(tmp_path, prof, ["--tp-size", "2", *args])
    assert code == 2 and started is None
    assert named in err and "NVLink multicast" in err and "NCCL_NVLS_ENABLE=0" in err


def test_multicast_env_switch_is_refused(tmp_path: Path) -> None:
    prof = _profile(tmp_path / "p.json")
    code, err, started = _run(tmp_path, prof, ["--tp-size", "2"],
                              env={"SGLANG_ENABLE_CUSTOM_ALL_REDUCE_V2_MULTINODE": "1"})
    assert code == 2 and started is None
    assert "SGLANG_ENABLE_CUSTOM_ALL_REDUCE_V2_MULTINODE=1 is refused" in err


def test_a_bad_artune_variable_is_refused_before_the_server_starts(tmp_path: Path) -> None:
    prof = _profile(tmp_path / "p.json")
    code, err, started = _run(tmp_path, prof, ["--tp-size", "2"],
                              env={"ARTUNE_FORWARD_CHECK": "sometimes"})
    assert code == 2 and started is None
    assert "ARTUNE_FORWARD_CHECK='sometimes' is not valid: expected 1 or 0" in err


def test_ordinary_flags_are_not_mistaken_for_multicast_ones() -> None:
    assert launch.check_args(["--enable-torch-compile", "--disable-custom-all-reduce",
                              "--flashinfer-allreduce-fusion-backend", "trtllm"], {}) == []
    assert launch.tp_layout(["--tensor-parallel-size=8", "--nnodes", "2"]) == (8, 4)
    assert launch.tp_layout(["--tp", "4"]) == (4, 4)


def test_a_tp_size_that_cannot_be_read_says_which_flag_and_why() -> None:
    for args, why in ((["--tp", "abc"], "--tp 'abc' is not a whole number"),
                      (["--model-path", "x", "--tp"], "--tp needs a value"),
                      (["--tensor-parallel-size=x"], "--tensor-parallel-size 'x' is not"),
                      (["--tp", "2", "--nnodes", "two"], "--nnodes 'two' is not"),
                      (["--tp", "0"], "must be positive")):
        with pytest.raises(ValueError, match=why):
            launch.tp_layout(args)


def test_a_missing_profile_is_said_before_a_bad_tp_size(tmp_path: Path) -> None:
    r = run_artune("launch", "--profile", str(tmp_path / "nope.json"), "--", "--model-path", "x",
                   env=artune_env({"CUDA_VISIBLE_DEVICES": ""}))
    assert r.returncode == 2 and "file not found" in r.stderr and "TP=" not in r.stderr


def test_cli_launch_checks_the_profile_first(tmp_path: Path) -> None:
    r = run_artune("launch", "--profile", str(tmp_path / "nope.json"), "--", "--tp-size", "2",
                   env=artune_env({"CUDA_VISIBLE_DEVICES": ""}))
    assert r.returncode == 2
    assert "file not found" in r.stderr


REAL_SGLANG_LAUNCH = textwrap.dedent("""
    import argparse, json, os, sys
    from test_sglang_plugin import _stand_ins
    scenario, profile = sys.argv[1], sys.argv[2]
    _stand_ins(None)  # torchvision (0.5.17 imports it; no CPU build here), as the plugin tests
    if scenario == "broken":  # a dependency of SGLang's missing: a broken install
        sys.modules["psutil"] = None
    if scenario == "missing":  # a release without one of the hook points
        import sglang.srt.distributed.parallel_state as ps
        del ps.GroupCoordinator._all_reduce_in_place
    def execvpe(file, argv, env):  # instead of starting the real server
        print("EXEC " + json.dumps(argv[1:]), flush=True)
        sys.exit(0)
    os.execvpe = execvpe
    from artune.integration import launch
    args = argparse.Namespace(profile=profile, force=False,
                              sglang_args=["--model-path", "m", "--tp-size", "2"])
    sys.exit(launch.main(args))
""")


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.5.23", "0.5.17"])
@pytest.mark.parametrize("scenario", ["complete", "missing", "broken"])
def test_launch_checks_the_real_sglang_before_starting_it(version: str, scenario: str,
                                                          tmp_path: Path) -> None:
    """``artune launch`` with no stand-in server: the real SGLang release is imported and its
    hook points checked; a release without one, or an install that does not import, is named
    before anything starts."""
    from conftest import ROOT, TESTS
    from test_sglang_plugin import SGLANG_HOME, _site

    site = _site(version)
    prof = _profile(tmp_path / "p.json")
    script = tmp_path / "launch_real.py"
    script.write_text(REAL_SGLANG_LAUNCH)
    env = artune_env({"CUDA_VISIBLE_DEVICES": ""})
    for k in [k for k in env if k.startswith(("ARTUNE_", "SGLANG_"))]:
        env.pop(k)
    env["PYTHONPATH"] = ":".join(map(str, [site, SGLANG_HOME / "deps", ROOT, TESTS]))
    r = subprocess.run([sys.executable, str(script), scenario, str(prof)], env=env, text=True,
                       capture_output=True, timeout=180, cwd=tmp_path)
    if scenario == "complete":
        assert r.returncode == 0, r.stderr[-3000:]
        assert "EXEC " + json.dumps(["-m", "sglang.launch_server", "--model-path", "m",
                                     "--tp-size", "2"]) in r.stdout
        return
    assert r.returncode == 2 and "EXEC" not in r.stdout, r.stdout + r.stderr[-3000:]
    if scenario == "missing":
        assert "lacks the hook points" in r.stderr
        assert "GroupCoordinator._all_reduce_in_place (needed for" in r.stderr
        assert "0.5.17 to 0.5.23" in r.stderr
    else:
        assert "is installed but does not import" in r.stderr and "psutil" in r.stderr
        assert "lacks the hook points" not in r.stderr and "pip install" not in r.stderr


def test_hook_point_check_tells_a_broken_install_from_an_unsupported_release(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pkgutil

    from artune.integration import sglang as plugin

    def broken(name: str) -> object:
        raise ModuleNotFoundError("No module named 'psutil'", name="psutil")

    monkeypatch.setattr(pkgutil, "resolve_name", broken)
    msg = plugin.hook_point_error()
    assert msg is not None and "does not import cleanly" in msg and "psutil" in msg
    assert "0.5.17 to 0.5.23" not in msg

    def absent(name: str) -> object:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(pkgutil, "resolve_name", absent)
    msg = plugin.hook_point_error()
    assert msg is not None and "lacks the hook points" in msg and "0.5.17 to 0.5.23" in msg
    assert "GroupCoordinator.graph_capture (needed for CUDA-graph capture" in msg
