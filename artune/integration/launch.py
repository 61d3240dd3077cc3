"""``artune launch -- ARGS``: ``python -m sglang.launch_server ARGS`` with the profile active.

    artune launch --profile profiles/9f2c.json -- --model-path meta-llama/Llama-3.1-8B --tp 4

Before anything starts it checks that the profile exists, is readable and was made for this
machine and this TP size (``--force`` accepts a mismatch: the plugin then warns and leaves
SGLang's own all-reduce in place), that SGLang has the hook points the plugin needs, and that no
argument turns NVLink multicast on. Then it replaces itself with the server (``exec``), with
ARTUNE_PROFILE and the no-multicast environment set: the server's exit code and the signals sent
to it are the launcher's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from artune import envs

if TYPE_CHECKING:
    from artune.profile import Profile

__all__ = ["main", "MULTICAST_FLAGS", "check_args", "server_env", "tp_layout"]

#: SGLang options that turn NVLink multicast (NVLS) on, and why each is refused.
MULTICAST_FLAGS: dict[str, str] = {
    "--enable-symm-mem": "SGLang then sets NCCL_NVLS_ENABLE=1 and NCCL's symmetric kernels use "
    "NVLink multicast",
    "--enable-nccl-nvls": "it turns on NCCL's NVLS (NVLink multicast) algorithms",
    "--enable-torch-symm-mem": "SGLang's torch symmetric-memory all-reduce is a multimem "
    "(NVLink multicast) kernel",
    "--enable-mscclpp": "MSCCL++ picks NVLS (NVLink multicast) all-reduce algorithms on NVSwitch "
    "machines",
}
#: SGLang options whose listed values turn multicast on.
MULTICAST_VALUES: dict[str, dict[str, str]] = {
    "--flashinfer-allreduce-fusion-backend": {
        "mnnvl": "FlashInfer's MNNVL all-reduce uses NVLink multicast memory",
    },
}
#: Environment switches of SGLang that turn multicast on.
MULTICAST_ENV: dict[str, str] = {
    "SGLANG_ENABLE_CUSTOM_ALL_REDUCE_V2_MULTINODE": "SGLang's multi-node custom all-reduce uses "
    "NVLink multicast (MNNVL)",
}
_WHY = ("NVLink multicast must stay off on these machines (it can take the host's GPUs out of "
        "service); artune keeps NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and "
        "NVSHMEM_DISABLE_NVLS=1 set for the server")

_TP_FLAGS = ("--tp-size", "--tensor-parallel-size")


def _names(arg: str, flag: str) -> bool:
    """Whether ``arg`` names ``flag``: exactly, as ``--flag=V``, or abbreviated the way
    argparse (which SGLang's parser uses with abbreviations allowed) would accept it."""
    name = arg.split("=", 1)[0]
    return name.startswith("--") and len(name) > 3 and flag.startswith(name)


def _flag_items(args: Sequence[str], flag: str) -> list[tuple[str, str | None]]:
    """(the spelling given, its value or None when none follows) of each ``--flag V`` or
    ``--flag=V`` (or an abbreviation of it)."""
    out: list[tuple[str, str | None]] = []
    for i, a in enumerate(args):
        if not _names(a, flag):
            continue
        shown, eq, value = a.partition("=")
        out.append((shown, value if eq else (args[i + 1] if i + 1 < len(args) else None)))
    return out


def _flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Values given to ``flag`` as ``--flag V`` or ``--flag=V`` (or an abbreviation of it)."""
    return [v for _, v in _flag_items(args, flag) if v is not None]


def check_args(args: Sequence[str], environ: dict[str, str] | None = None) -> list[str]:
    """Why these server arguments (and environment) cannot be used: [] when they can."""
    environ = dict(os.environ if environ is None else environ)
    problems = []
    for a in args:
        for flag, why in MULTICAST_FLAGS.items():
            if _names(a, flag):
                shown = a.split("=", 1)[0]
                alias = "" if shown == flag else f" (read by SGLang as {flag})"
                problems.append(f"{shown}{alias} is refused: {why}. {_WHY}")
    for flag, values in MULTICAST_VALUES.items():
        for v in _flag_values(args, flag):
            if v in values:
                problems.append(f"{flag} {v} is refused: {values[v]}. {_WHY}")
    for name, why in MULTICAST_ENV.items():
        if envs._bool(environ.get(name, "")):
            problems.append(f"{name}={environ[name]} is refused: {why}. {_WHY}")
    return problems


def tp_layout(args: Sequence[str]) -> tuple[int, int]:
    """(TP size, ranks per node) the server will run with, from its arguments."""
    def last(flags: Sequence[str]) -> int | None:
        got = None
        for flag in flags:
            for shown, v in _flag_items(args, flag):
                if v is None:
                    raise ValueError(f"{shown} needs a value")
                try:
                    got = int(v)
                except ValueError:
                    raise ValueError(f"{shown} {v!r} is not a whole number") from None
        return got

    tp, nnodes = last(_TP_FLAGS), last(("--nnodes",))
    tp, nnodes = (1 if tp is None else tp), (1 if nnodes is None else nnodes)
    if tp < 1 or nnodes < 1:
        raise ValueError(f"TP size {tp} and node count {nnodes} must be positive")
    return tp, max(1, tp // max(1, nnodes))


def server_env(profile: Path, force: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the caller's, plus the profile and the no-multicast settings."""
    env = dict(os.environ if environ is None else environ)
    env.update(envs.NO_MULTICAST_ENV)
    env["ARTUNE_PROFILE"] = str(profile)
    env.pop("ARTUNE_DISABLE", None)
    if force:
        env["ARTUNE_STRICT"] = "0"
    allowed = env.get("SGLANG_PLUGINS", "")
    if allowed.strip() and "artune" not in {p.strip() for p in allowed.split(",")}:
        env["SGLANG_PLUGINS"] = f"{allowed},artune"
    return env


def _find_profile(tp: int, per_node: int) -> Path | None:
    """profiles/<fingerprint id>.json of this machine (working directory, then package data)."""
    from artune import topology

    device = "cuda" if topology.gpu_count() else "cpu"
    fid = topology.fingerprint_id(topology.fingerprint(tp, per_node, device=device))
    for folder in (Path.cwd() / "profiles", Path(__file__).resolve().parents[1] / "profiles"):
        candidate = folder / f"{fid}.json"
        if candidate.is_file():
            return candidate
    return None


def _linear_hint(prof: Profile, args: Sequence[str], tp: int) -> str | None:
    """A note when the served model (a local folder) has row-parallel layers the profile's
    linear section did not measure: they stay unfused, and the tune command that would measure
    them. None otherwise (a hub name, an unreadable config, ARTUNE_FUSED_LINEAR 0 or 1)."""
    from artune.autotune.shapes import layer_shapes, model_dims

    models = _flag_values(args, "--model-path")  # (--model is its abbreviation)
    if not models or envs.get("ARTUNE_FUSED_LINEAR") != "auto":
        return None
    try:
        if not Path(models[-1]).is_dir():
            return None
        shapes = layer_shapes(model_dims(models[-1]), tp)
    except (OSError, ValueError):
        return None
    have = {(k, n) for _, k, n in prof.linear_shapes()}
    missing = [f"{k}x{n}" for k, n in shapes if (k, n) not in have]
    if not missing:
        return None
    return (f"the profile's linear section has no entry for this model's row-parallel layers "
            f"at TP={tp} (K x N: {', '.join(missing)}): they run as GEMM + all-reduce. "
            f"`artune tune --linear-model {models[-1]}` measures them fused (docs/sglang.md)")


def _fail(msg: str, code: int = 2) -> int:
    print(f"artune launch: {msg}", file=sys.stderr, flush=True)
    return code


def main(args: argparse.Namespace, *, server: Sequence[str] | None = None) -> int:
    """Check, then exec the server. ``args``: ``profile`` (path or None), ``force``, and the
    server arguments as ``sglang_args`` (or ``server_args``). ``server`` replaces the command
    ``python -m sglang.launch_server`` (tests); returns only on an error (its exit code)."""
    from artune import profile as profile_mod
    from artune import topology

    sargs = list(getattr(args, "sglang_args", None) or getattr(args, "server_args", None) or [])
    if sargs[:1] == ["--"]:
        sargs = sargs[1:]
    force = bool(getattr(args, "force", False))

    problems = check_args(sargs) + envs.problems()
    if problems:
        return _fail("\n  ".join(["refusing to start SGLang:", *problems]))
    given = getattr(args, "profile", None) or envs.get("ARTUNE_PROFILE")
    if given and not Path(given).is_file():  # the first thing to fix, whatever else is wrong
        try:
            profile_mod.load(given)
        except profile_mod.ProfileError as exc:
            return _fail(str(exc))
    try:
        tp, per_node = tp_layout(sargs)
    except ValueError as exc:
        return _fail(f"cannot read the TP size from the server arguments: {exc}")

    if tp < 2:
        return _fail(f"the server arguments give TP={tp}: a single GPU has no tensor-parallel "
                     "all-reduce to route. Pass --tp N (N > 1) to serve with tensor "
                     "parallelism, or run `python -m sglang.launch_server` directly")
    path = Path(given) if given else _find_profile(tp, per_node)
    if path is None:
        make = f"`artune tune --nproc-per-node {tp}`"
        if not topology.gpu_count():
            make += (" on the GPU node that will serve (no GPU is visible here; `artune tune "
                     "--device cpu` makes only a dry-run profile, `dryrun-<id>.json`, which "
                     "launch does not pick up)")
        return _fail(f"no profile for this machine at TP={tp}: pass --profile PATH (or set "
                     f"ARTUNE_PROFILE), or make one with {make}")
    try:
        prof = profile_mod.load(path)
    except profile_mod.ProfileError as exc:
        return _fail(str(exc))

    device = "cuda" if topology.gpu_count() else "cpu"
    try:
        live = topology.fingerprint(tp, per_node, device=device)
    except Exception as exc:  # noqa: BLE001 - a broken driver is a reason not to start
        return _fail(f"cannot fingerprint this machine: {type(exc).__name__}: {exc}")
    errors, warnings = topology.compare(prof.fingerprint, live)
    if errors:
        msg = f"profile {path} was made for another machine or TP size: " + "; ".join(errors)
        if not force:  # the refusal alone: version notes would only bury it
            return _fail(msg + ". Tune this machine (`artune tune`), or pass --force to start "
                         "anyway (SGLang then keeps its own all-reduce)")
        print(f"artune launch: --force: {msg}; SGLang keeps its own all-reduce", file=sys.stderr)
    for w in warnings:
        print(f"artune launch: note: version differs from the profile: {w}", file=sys.stderr)
    if envs.get("ARTUNE_DISABLE"):
        print("artune launch: note: ARTUNE_DISABLE=1 is dropped for the server: launch serves "
              "with the profile active (run `python -m sglang.launch_server` for SGLang alone)",
              file=sys.stderr)

    if server is None:
        from artune.integration.sglang import hook_point_error

        try:
            import sglang  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            import importlib.util

            why = f"{type(exc).__name__}: {exc}"
            if importlib.util.find_spec("sglang") is not None:
                return _fail(f"sglang is installed but does not import ({why}); repair that "
                             "installation (a dependency is missing or broken)")
            return _fail(f"sglang is not installed ({why}); install it with "
                         "`pip install 'artune[sglang]'`")
        problem = hook_point_error()
        if problem:
            return _fail(problem)
        server = [sys.executable, "-m", "sglang.launch_server"]

    env = server_env(path.resolve(), force)
    cmd = [*server, *sargs]
    if not errors:
        topo = prof.fingerprint.get("topology", {})
        what = f"{topo.get('world_size')}x {topo.get('gpu') or topo.get('device')}"
        shown = " ".join(["python", *server[1:]] if server[0] == sys.executable else server)
        print(f"artune launch: profile {path} ({what}, fingerprint "
              f"{topology.fingerprint_id(prof.fingerprint)}, made {prof.data.get('created', '?')})"
              f" matches this machine at TP={tp}; starting {shown} with NVLink multicast off",
              file=sys.stderr)
    hint = _linear_hint(prof, sargs, tp)
    if hint:
        print(f"artune launch: note: {hint}", file=sys.stderr)
    unmeasured = prof.sglang_unmeasured()
    if unmeasured and not any(_names(a, "--disable-custom-all-reduce") for a in sargs):
        print(f"artune launch: note: {path} has no measurement of SGLang's own all-reduce "
              f"({unmeasured}), so at sizes where SGLang's own is the fastest this server can "
              f"be slower than SGLang's default; {profile_mod.SGLANG_REMEDY}", file=sys.stderr)
    if prof.data.get("dry_run"):
        print(f"artune launch: note: {path} is a DRY RUN profile (`artune tune --device cpu`, "
              "gloo on CPU processes): its routes say nothing about GPU all-reduces; tune on "
              "the GPU node for a real one", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        return _fail(f"cannot start {cmd[0]}: {exc.strerror or exc}", 127)
    return 0  # not reached: exec replaced this process
