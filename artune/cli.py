"""``artune``: tune | show | launch | env.

    artune tune [--nproc-per-node N] [--sizes 1K:256M] [--dtypes bfloat16] [--modes graph,eager]
                [--backends nccl,...] [--quick] [--resume] [--out PATH] [--device cpu]
    artune show [PROFILE] [--plot FILE.png] [--json] [--routes DIR] [--graph-times DIR] [--force]
    artune launch [--profile PATH] [--force] -- <sglang.launch_server arguments>
    artune env                     # every ARTUNE_ variable: its value here, default, meaning

``artune tune`` from a shell starts one rank per GPU itself; under torchrun (RANK set) or as a
task of an srun step of several tasks it runs as one rank. The subcommands' modules are
imported only when used.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from artune.autotune.config import TuneConfig

__all__ = ["main", "build_parser", "tune_config"]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


LAUNCH_USAGE = "artune launch [--profile PATH] [--force] -- SGLANG_SERVER_ARGS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="artune",
        description="Measure every all-reduce backend, keep the fastest per size, route to it.",
    )
    from artune import __version__
    from artune.profile import SCHEMA_VERSION

    p.add_argument("--version", action="version",
                   version=f"artune {__version__} (profile schema {SCHEMA_VERSION})")
    sub = p.add_subparsers(dest="command", required=True, metavar="{tune,show,launch,env}")

    t = sub.add_parser(
        "tune",
        help="measure the backends on this machine and write a profile",
        description="Measure every all-reduce backend per size, dtype and mode; write a profile. "
        "From a shell it starts one rank per GPU; under torchrun/srun it runs as one rank.",
    )
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks to start (default: every visible GPU; 2 with --device cpu)")
    t.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the whole pipeline with gloo on CPU processes")
    t.add_argument("--sizes", default=None,
                   help="LO:HI (powers of two with midpoints), LO:HI:FACTOR, or a list 4K,64K,1M "
                   "(default 1K:256M; 1K:256M:4 with --quick; on --device cpu 1K:1M, and "
                   "1K:256K:4 with --quick)")
    t.add_argument("--dtypes", default="bfloat16",
                   help="comma list of bfloat16, float16, float32 (or bf16, fp16, fp32; "
                   "default bfloat16)")
    t.add_argument("--modes", default="graph,eager",
                   help="comma list of graph, eager (default both; graph is tuned first "
                   "either way)")
    t.add_argument("--backends", default=None,
                   help="comma list (default: every registered backend for the device)")
    t.add_argument("--include-sglang", action=argparse.BooleanOptionalAction, default=None,
                   help="measure SGLang's own all-reduce (its default path) as a candidate, so "
                   "that a profile never routes below it (default: yes on GPU tunes unless "
                   "--backends names others; there, where it cannot run, it is skipped with a "
                   "warning and the profile's skipped list gives the reason; asked for by name "
                   "where sglang is not importable, or on --device cpu, it is an error)")
    t.add_argument("--quick", action="store_true", help="fewer sizes, repetitions and trials")
    t.add_argument("--resume", action="store_true",
                   help="continue the tune whose storage is next to --out")
    t.add_argument("--out", type=Path, default=None,
                   help="profile to write (default profiles/<fingerprint>.json)")
    t.add_argument("--storage", default=None,
                   help="Optuna storage URL (default sqlite:///<out>.optuna.db)")
    t.add_argument("--ranks-per-node", type=int, default=None,
                   help="group the ranks into nodes of this many (emulates several nodes)")
    t.add_argument("--trials", type=int, default=None,
                   help="parameter sets tried per backend, size, dtype and mode (default 6; 3 "
                   "with --quick)")
    t.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per measurement (default 9; 5 with --quick)")
    t.add_argument("--warmup", type=int, default=None,
                   help="untimed repetitions first (default 2; 1 with --quick)")
    t.add_argument("--rel-tol", type=_fraction, default=0.03,
                   help="backends closer than this fraction (or the measured spread) count as "
                   "tied (default 0.03)")
    t.add_argument("--incumbent-margin", type=_fraction, default=0.10,
                   help="SGLang's own all-reduce keeps every size where no backend measures "
                   "faster than it by more than this fraction (default 0.10; 0: the fastest "
                   "wins)")
    t.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip re-timing the routed all-reduce after the table is built")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the inputs and the sampler (default 0)")
    t.add_argument("--extra-backend", action="append", default=[], metavar="NAME=MODULE:CLASS",
                   help="add a backend to the registry for this tune (plugins, tests)")
    t.add_argument("--linear-model", default=None, metavar="PATH",
                   help="also measure the model's row-parallel linear layers (attention output "
                        "and MLP down projections at TP = the tune's ranks) fused with their "
                        "all-reduce into one NVRAR kernel against the GEMM + routed all-reduce: "
                        "a Hugging Face model folder or its config.json (readable on every "
                        "node)")
    t.add_argument("--linear-shapes", default=None, metavar="KxN,...",
                   help="as --linear-model, for the layer shapes given: K a rank's inputs, N "
                        "the outputs (e.g. 1024x4096,3584x4096)")
    t.add_argument("--linear-rows", default=None, metavar="R,...",
                   help="row counts (tokens) of those measurements, 1..64 (default "
                        "1,2,4,8,16,32,64; --quick 1,4,16,64)")

    s = sub.add_parser("show", help="print a profile's dispatch table (any machine)")
    s.add_argument("profile", nargs="?", default=None,
                   help="profile JSON (optional with --graph-times alone)")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="draw latency vs size")
    s.add_argument("--json", action="store_true", help="print the profile as JSON")
    s.add_argument("--routes", default=None, metavar="DIR",
                   help="also show which backend took each all-reduce of a served model (the "
                   "folder the SGLang plugin wrote with ARTUNE_ROUTE_LOG=DIR)")
    s.add_argument("--graph-times", default=None, metavar="DIR",
                   help="also show the GPU time of each CUDA graph a served model replayed, per "
                   "process (the folder the SGLang plugin wrote with ARTUNE_GRAPH_TIMES=DIR)")
    s.add_argument("--force", action="store_true",
                   help="no effect: show reads a profile of any topology (accepted so that "
                   "the options of launch can be reused)")

    la = sub.add_parser("launch", help="run sglang.launch_server with the profile active",
                        usage=LAUNCH_USAGE,
                        description="Everything after `--` goes to sglang.launch_server.")
    la.add_argument("--profile", default=None, metavar="PATH",
                    help="profile JSON (default: ARTUNE_PROFILE, else profiles/<fingerprint "
                    "id>.json for this machine, in the working directory, then the reference "
                    "profiles shipped with artune)")
    la.add_argument("--force", action="store_true",
                    help="accept a profile made on another topology")

    sub.add_parser("env", help="list every ARTUNE_ environment variable: its value here, its "
                   "default and what it does",
                   description="List every ARTUNE_ environment variable artune reads: its "
                   "value here (and whether it is valid), its default and what it does. Exits "
                   "2 when a value set here is not valid.")
    return p


def tune_config(args: argparse.Namespace, command: str) -> TuneConfig:
    """A ``TuneConfig`` from parsed ``tune`` arguments; ValueError naming a bad one."""
    from artune.autotune.config import TuneConfig, parse_extra_backend, parse_size, parse_sizes
    from artune.autotune.crew import element_size
    from artune.backends import BACKENDS
    from artune.profile import DTYPES, MODES

    dtypes = [_DTYPE_ALIASES.get(d.lower(), d.lower()) for d in _csv(args.dtypes)]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--dtypes: unknown {bad or 'empty'}; use some of {', '.join(DTYPES)}")
    given = _csv(args.modes)
    if not given or any(m not in MODES for m in given):
        raise ValueError(f"--modes {args.modes!r}: use some of {', '.join(MODES)}")
    # graph first whatever the order given: an eager study takes its parameter sets from the
    # graph study of its size (EAGER_FOLLOW_TRIALS), so `eager,graph` tunes what `graph,eager` does
    modes = [m for m in MODES if m in given]
    extra = dict(parse_extra_backend(e) for e in args.extra_backend)
    backends = _csv(args.backends) if args.backends else None
    known = set(BACKENDS) | set(extra)
    if backends is not None:
        unknown = [b for b in backends if b not in known]
        if unknown or not backends:
            raise ValueError(
                f"--backends: unknown {', '.join(unknown) or 'empty list'}; known backends: "
                f"{', '.join(sorted(known))}"
            )
    for name, value in (("--ranks-per-node", args.ranks_per_node), ("--trials", args.trials),
                        ("--reps", args.reps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, not {args.warmup}")
    linear = _linear_args(args)
    cfg = TuneConfig(
        device=args.device,
        dtypes=dtypes,
        modes=modes,
        backends=backends,
        include_sglang=args.include_sglang,
        quick=args.quick,
        resume=args.resume,
        out=args.out,
        storage=args.storage,
        ranks_per_node=args.ranks_per_node,
        trials=args.trials,
        reps=args.reps,
        warmup=args.warmup,
        validate=args.validate,
        rel_tol=args.rel_tol,
        incumbent_margin=args.incumbent_margin,
        seed=args.seed,
        extra_backends=extra,
        command=command,
        **linear,
    )
    if args.sizes:
        sizes = parse_sizes(args.sizes)
        # the sizes written out (a list, or a range's ends) must be whole elements; a range's
        # own midpoints that are not (3 B between 2 and 4) are left out
        parts = args.sizes.split(":")
        written = sizes if len(parts) == 1 else [parse_size(p) for p in parts[:2]]
        width = max(element_size(d) for d in dtypes)
        odd = [n for n in written if n % width]
        if odd:
            raise ValueError(f"--sizes: {', '.join(map(str, odd))} B is not a whole number of "
                             f"{width}-byte elements ({', '.join(dtypes)})")
        cfg.sizes = [n for n in sizes if n % width == 0]
    return cfg


def _linear_args(args: argparse.Namespace) -> dict[str, Any]:
    """TuneConfig's fused-linear fields from --linear-model / --linear-shapes / --linear-rows."""
    from artune.autotune.shapes import model_dims, parse_shapes
    from artune.profile import LINEAR_MAX_ROWS

    out: dict[str, Any] = {
        "linear_model": model_dims(args.linear_model) if args.linear_model else None,
        "linear_shapes": parse_shapes(args.linear_shapes) if args.linear_shapes else [],
        "linear_rows": [],
    }
    if args.linear_rows:
        given = _csv(args.linear_rows)
        rows = sorted({int(r) for r in given if r.isdigit()})
        if not rows or not all(r.isdigit() for r in given) or not (
                1 <= rows[0] <= rows[-1] <= LINEAR_MAX_ROWS):
            raise ValueError(f"--linear-rows {args.linear_rows!r}: whole numbers from 1 to "
                             f"{LINEAR_MAX_ROWS}, e.g. 1,2,4,8,16")
        if not (args.linear_model or args.linear_shapes):
            raise ValueError("--linear-rows needs --linear-model or --linear-shapes")
        out["linear_rows"] = rows
    return out


def _fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (e.g. 0.1 for 10%)")
    return v


def _gpu_only(names: list[str], extra: Mapping[str, str]) -> str | None:
    """Why none of the backends ``names`` can run on CPU processes, or None when one can (a
    backend added with --extra-backend is taken on trust: its module loads in the ranks)."""
    from artune.backends import load

    if any(n in extra or not load(n).needs_cuda for n in names):
        return None
    return (f"{', '.join(names)} need{'s' if len(names) == 1 else ''} CUDA GPUs; on CPU "
            "processes only gloo runs (leave out --backends, or add gloo to it)")


def _extra_backend_problem(extra: Mapping[str, str]) -> str | None:
    """Why a backend added with --extra-backend cannot load, seen from the shell (its module
    is found, not imported: the ranks import it)."""
    import importlib.util

    for name, target in extra.items():
        module = target.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as exc:
            found, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = f"no module named {module!r}"
        if not found:
            return f"--extra-backend {name}={target}: {why} (is it installed, or on PYTHONPATH?)"
    return None


def _storage_problem(url: str | None) -> str | None:
    """Why --storage URL is not a database URL Optuna can open (its dialect), or None."""
    if not url:
        return None
    try:
        from sqlalchemy.engine import make_url

        make_url(url).get_dialect()
    except Exception as exc:  # noqa: BLE001 - unparsable URL or unknown dialect
        return (f"--storage {url!r} is not a database URL Optuna can use "
                f"({type(exc).__name__}: {exc}); e.g. sqlite:///tune.db or "
                "postgresql://user@host/db")
    return None


def _no_gpu_message() -> str:
    return (
        "artune tune: no CUDA GPU is visible here (torch.cuda.is_available() is False). Run it "
        "on a GPU node, or try the whole workflow on CPU processes with "
        "`artune tune --device cpu` (a dry run with gloo, labelled as such in the profile)."
    )


def _tune(args: argparse.Namespace, tune_argv: list[str]) -> int:
    from artune.autotune.config import sqlite_path, storage_url
    from artune.autotune.runner import candidates, rank_env

    command = "artune " + shlex.join(["tune", *tune_argv])
    try:
        cfg = tune_config(args, command)
    except ValueError as exc:
        print(f"artune tune: {exc}", file=sys.stderr)
        return 2
    from artune import envs

    bad = envs.problems()
    if bad:  # before any rank starts (each would fail on it)
        print("\n".join(f"artune tune: {b}" for b in bad), file=sys.stderr)
        return 2
    try:
        in_job = rank_env() is not None
    except ValueError as exc:  # a Slurm step whose variables do not add up
        print(f"artune tune: {exc}", file=sys.stderr)
        return 2
    if in_job:
        from artune.autotune.runner import run_rank

        return run_rank(cfg)

    # From a shell: check what can be checked before starting any rank.
    if cfg.device == "cuda":
        from artune.topology import gpu_count

        n = gpu_count()
        if n == 0:
            print(_no_gpu_message(), file=sys.stderr)
            return 2
        nproc = args.nproc_per_node if args.nproc_per_node is not None else n
        if nproc > n:
            print(
                f"artune tune: --nproc-per-node {nproc} but only {n} GPU(s) are visible "
                "(see CUDA_VISIBLE_DEVICES); pass --nproc-per-node "
                f"{n} or fewer",
                file=sys.stderr,
            )
            return 2
    else:
        nproc = args.nproc_per_node if args.nproc_per_node is not None else 2
        gpu_only = _gpu_only(candidates(cfg), cfg.extra_backends)
        if gpu_only is not None:
            print(f"artune tune: --device cpu: {gpu_only}", file=sys.stderr)
            return 2
    if args.include_sglang:  # asked for by name: a candidate that cannot run is an error
        import importlib.util

        why = None
        if cfg.device == "cpu":
            why = "SGLang's all-reduce runs on GPUs only; a --device cpu dry run cannot measure it"
        elif importlib.util.find_spec("sglang") is None:
            why = ("sglang is not importable here: install the SGLang release you serve with "
                   "(e.g. pip install 'artune[sglang]')")
        if why:
            print(f"artune tune: --include-sglang: {why}", file=sys.stderr)
            return 2
    if nproc < 2:
        print(f"artune tune: an all-reduce needs at least 2 ranks, not {nproc}", file=sys.stderr)
        return 2
    if cfg.ranks_per_node is not None and nproc % cfg.ranks_per_node:
        print(
            f"artune tune: --ranks-per-node {cfg.ranks_per_node} does not divide the "
            f"{nproc} ranks",
            file=sys.stderr,
        )
        return 2
    cannot = _extra_backend_problem(cfg.extra_backends) or _storage_problem(cfg.storage)
    if cannot:
        print(f"artune tune: {cannot}", file=sys.stderr)
        return 2
    if cfg.out is not None and cfg.out.is_dir():
        print(f"artune tune: --out {cfg.out} is a folder; name the profile file, e.g. "
              f"--out {cfg.out / 'profile.json'}", file=sys.stderr)
        return 2
    if cfg.out is not None:
        try:  # where the profile (and its storage) will go must be a folder that can exist
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"artune tune: --out {cfg.out}: cannot make its folder {cfg.out.parent}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    if cfg.out is not None and not cfg.resume and cfg.out.exists():
        print(f"artune tune: --out {cfg.out} already exists: pass --resume to continue the tune "
              "that wrote it, or name another file, or delete it", file=sys.stderr)
        return 2
    if cfg.out is not None and not cfg.resume:
        path = sqlite_path(storage_url(cfg.out, cfg.storage))
        if path is not None and path.exists():
            print(
                f"artune tune: the tune storage {path} already exists: pass --resume to continue "
                "that tune, or delete the file to start over",
                file=sys.stderr,
            )
            return 2
    from artune.autotune.launcher import launch

    warm = None
    if cfg.device == "cuda" and "sglang" in candidates(cfg):
        # SGLang's JIT builds, off the ranks' path; what they did goes next to the profile
        # (without --out, the profile's folder: its name needs the fingerprint, which the
        # ranks work out)
        from artune.autotune.runner import default_out
        from artune.backends import sglang_jit

        log_path = (cfg.out.with_name(cfg.out.name + ".sglang-jit.log") if cfg.out
                    else default_out("", cfg.dry_run).parent / "sglang-jit.log")
        warm = sglang_jit.start(nproc, cfg.dtypes, log_path=log_path)
    try:
        return launch(["tune", *tune_argv], nproc)
    finally:
        if warm is not None:
            from artune.backends import sglang_jit

            sglang_jit.stop(warm)


def _env() -> int:
    """Print every variable artune reads (``artune.envs.ENV``): name, value here, meaning."""
    import os
    import textwrap

    from artune import envs

    bad = 0
    for name, (default, _, what) in envs.ENV.items():
        raw = os.environ.get(name)
        if raw in (None, ""):
            here = f"{_shown(name, default)} (default)"
        else:
            try:
                here = f"{raw!r} (set: {_shown(name, envs.get(name))})"
            except ValueError as exc:  # envs.get names the variable; the parser says why
                here, bad = f"{raw!r} (set; NOT VALID: {exc.__cause__ or exc})", bad + 1
        print(f"{name} = {here}")
        print(textwrap.fill(what, 96, initial_indent="    ", subsequent_indent="    "))
    if bad:
        print(f"artune env: {bad} variable(s) not valid (above)", file=sys.stderr)
    return 2 if bad else 0


def _shown(name: str, value: object) -> str:
    """A variable's parsed value as the README's table writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if name.endswith("_BYTES") and isinstance(value, int):
        from artune.inspect import human_bytes

        return human_bytes(value)
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # e.g. Ctrl-C while torch imports, before any rank starts
        print("artune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `artune env | head`: the reader has what it wanted
        from artune.log import drop_stdout

        drop_stdout()
        return 141  # as a shell reports a writer stopped by SIGPIPE


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded: list[str] = []
    if argv[:1] == ["launch"] and "--" in argv:
        i = argv.index("--")
        argv, forwarded = argv[:i], argv[i + 1 :]
    parser = build_parser()
    if argv[:1] == ["launch"]:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # launch's own usage line, not the top-level one parser.error prints
            parser.exit(2, f"usage: {LAUNCH_USAGE}\nartune launch: error: unrecognized "
                        f"arguments: {' '.join(unknown)}. The SGLang server arguments go after "
                        f"`--`: artune launch [--profile PATH] -- {' '.join(unknown)}\n")
    else:
        args = parser.parse_args(argv)
    if args.command == "tune":
        return _tune(args, argv[1:])
    if args.command == "show":
        from artune import inspect

        return int(inspect.main(args))
    if args.command == "env":
        return _env()
    if args.command == "launch":
        import importlib

        _launch = importlib.import_module("artune.integration.launch")

        args.server_args = forwarded
        return int(_launch.main(args))
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
