"""Rank 0's side of a tune: the plan, the Optuna studies, the profile (the validation pass
is `validation.ValidationPass`, mixed in)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from artune import envs
from artune.autotune import ui
from artune.autotune.config import TuneConfig
from artune.autotune.crew import Crew, actual_nbytes, element_size, record_from
from artune.autotune.linear import LinearPhase, is_linear
from artune.autotune.runner import RankEnv, candidates, out_and_storage
from artune.autotune.search import (
    PRUNE_MARGIN,
    Resumed,
    Search,
    Store,
    StoreExists,
    StoreMismatch,
    combinations,
    params_key,
    study_name,
)
from artune.autotune.validation import VALIDATE_MARGIN, ValidationPass

__all__ = ["Driver", "VALIDATE_MARGIN"]

#: Trials of an eager study whose backend has parameters, when graph mode is tuned too: the
#: graph study's best set, then the default (one the sampler picks when the two are the same;
#: the full budget when the graph study measured nothing to follow). A backend's parameters
#: shape its GPU work, which graph mode measures without host noise; eager adds the host's
#: launch cost, the same for every parameter set of a backend (on 2x H200 eager small
#: messages cost 30-60 µs per call, host-bound, whatever the parameters).
EAGER_FOLLOW_TRIALS = 2


def _skip(backend: str, params: dict[str, Any], dtype: str, mode: str | None, nbytes: int,
          reason: str) -> dict[str, Any]:
    return {"backend": backend, "params": params, "dtype": dtype, "mode": mode,
            "nbytes": nbytes, "reason": reason}


class Driver(ValidationPass, LinearPhase):
    """Runs the tune from rank 0 (the other ranks are in ``Crew.serve``)."""

    def __init__(self, cfg: TuneConfig, crew: Crew, env: RankEnv) -> None:
        self.cfg = cfg
        self.crew = crew
        self.env = env
        self.con = ui.console()
        self.measurements: list[dict[str, Any]] = []
        #: the validation pass's re-times of each candidate (``_validate``, ``_reroute``)
        self.retimed: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.linear_records: list[dict[str, Any]] = []
        self.linear_skips: list[dict[str, Any]] = []
        self._skip_keys: set[tuple[Any, ...]] = set()
        #: --resume: stored measurements this command's plan leaves out of the profile
        self._left_out = 0
        #: (backend, params key, dtype, nbytes) -> None (passed) or the gate failure
        self.gates: dict[tuple[str, str, str, int], str | None] = {}
        #: wall seconds by phase ("setup", "measure <backend>", "validation") on rank 0
        self.spent: dict[str, float] = {}
        self._trial_wall = 0.0  # seconds inside trials (all ranks at work), the rest is search

    # -- entry ---------------------------------------------------------------------------

    def run(self) -> int:
        t0 = time.perf_counter()
        try:
            return self._run(t0)
        except BaseException:
            # Release the other ranks before failing (they would wait for the next command).
            try:
                self.crew.stop(1)
            except Exception:  # noqa: BLE001, S110 - they may be gone already
                pass
            raise

    def _run(self, t0: float) -> int:
        t_start = time.time()
        from artune.topology import fingerprint, fingerprint_id

        cfg, ctx = self.cfg, self.crew.ctx
        try:  # before anything is measured: --linear-model's widths must split over the ranks
            self._linear_shapes()
        except ValueError as exc:
            print(f"artune tune: {exc}", file=sys.stderr, flush=True)
            self.crew.stop(2)
            return 2
        fp = fingerprint(ctx.world_size, ctx.ranks_per_node, cfg.device, self.env.local_rank)
        if cfg.ranks_per_node and cfg.ranks_per_node != self.env.local_world_size:
            fp["topology"]["emulated_nodes"] = True
        fid = fingerprint_id(fp)
        out, url = out_and_storage(cfg, fid)
        try:
            store = Store(
                url,
                resume=cfg.resume,
                meta={"fingerprint_id": fid, "dry_run": cfg.dry_run},
                seed=cfg.seed,
            )
        except (StoreExists, StoreMismatch) as exc:
            print(f"artune tune: {exc}", file=sys.stderr, flush=True)
            self.crew.stop(2)
            return 2
        resumed = store.load() if cfg.resume else Resumed()
        # the fused-linear phase's records are its own (LinearPhase), kept out of the tables
        self.linear_records = [m for m in resumed.measurements if is_linear(m)]
        resumed.measurements = [m for m in resumed.measurements if not is_linear(m)]
        self.linear_skips = [s for s in resumed.skipped if is_linear(s)]
        resumed.skipped = [s for s in resumed.skipped if not is_linear(s)]
        resumed.gate_failures = {k: v for k, v in resumed.gate_failures.items()
                                 if not is_linear({"backend": k[0]})}
        if cfg.resume:
            # the profile of a resumed tune describes the command that resumed it: what was
            # stored for other sizes, dtypes, modes or backends stays out
            sizes, backends = set(cfg.sizes), set(candidates(cfg))
            modes = {*cfg.modes, None}  # None: an exclusion of both modes

            def planned(m: dict[str, Any]) -> bool:
                return (m.get("nbytes") in sizes and m.get("dtype") in cfg.dtypes
                        and m.get("mode") in modes and m.get("backend") in backends)

            kept = [m for m in resumed.measurements if planned(m)]
            kept_skips = [s for s in resumed.skipped if planned(s)]
            left = len(resumed.measurements) - len(kept)
            self.con.print(
                f"resuming from {url}: {len(kept)} measurements and "
                f"{len(kept_skips)} exclusions kept"
                + (f"; {left} stored measurements of other sizes, dtypes, modes or backends "
                   "than this command asks for are left out of the profile" if left else "")
                if resumed.measurements or resumed.skipped else
                f"--resume: {url} holds no all-reduce measurements yet; starting from the "
                "beginning"
            )
            resumed.measurements, resumed.skipped = kept, kept_skips
            self._left_out = left
        self.measurements += resumed.measurements
        n_resumed = len(self.measurements)
        for s in resumed.skipped:
            self._add_skip(s)
        for key, reason in resumed.gate_failures.items():
            self.gates[key] = reason

        self.con.print(
            f"artune tune: {ctx.world_size} ranks on {cfg.device}"
            f"{' (DRY RUN with gloo)' if cfg.dry_run else ''}, {len(cfg.sizes)} sizes "
            f"{cfg.sizes[0]}..{cfg.sizes[-1]} B, dtypes {','.join(cfg.dtypes)}, modes "
            f"{','.join(cfg.modes)}; storage {url}"
        )
        # Backends whose set-up waits on builds outside artune (late_setup: SGLang's nvcc
        # builds, started in the background by `artune tune`) are set up and measured after
        # the others, so that those builds run meanwhile.
        launched = _launch_time()
        if launched is not None:  # process start, imports, torch.distributed and NCCL set-up
            self.spent["start ranks"] = t_start - launched
        early, late = _split_late(candidates(cfg))
        self._setup(early)
        self.con.print("set-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.spent.items()),
                       markup=False)
        plan = self._plan(list(self.crew.built))
        late_plan = self._plan(late)  # from the classes: counted in the bar from the start
        progress = ui.Progress(sum(n for *_, n in plan + late_plan), self.con)
        with progress.running():
            self._measure(store, resumed, plan, progress)
            if late:
                progress.describe(f"set-up: {', '.join(late)}")
                self._setup(late)
                progress.add_total(-sum(n for _, _, b, _, n in late_plan
                                        if b not in self.crew.built))
                self._measure(store, resumed,
                              [p for p in late_plan if p[2] in self.crew.built], progress)
        if not self.crew.built:
            self.con.print("[red]no backend can run here; nothing to tune[/red]")
            self.crew.stop(1)
            return 1

        from artune.autotune.table import build_profile
        from artune.profile import save

        doc = build_profile(
            self.measurements,
            self.skipped,
            fingerprint=fp,
            command=cfg.command,
            dry_run=cfg.dry_run,
            rel_tol=cfg.rel_tol,
            incumbent_margin=cfg.incumbent_margin,
        )
        if self._left_out and Path(out).is_file():
            # a resume that asks for less than the tune stored: the old profile stays beside
            keep = Path(out).with_suffix(".before-resume" + Path(out).suffix)
            shutil.copy2(out, keep)
            self.con.print(f"the profile before this resume, with what it leaves out: {keep}",
                           markup=False)
        save(doc, out)
        in_trials = dict(self.crew.trial_seconds)
        if cfg.validate and doc["tables"]:
            if cfg.resume and len(self.measurements) == n_resumed:
                self.con.print(
                    "--resume: nothing was left to measure (the measurements above are the "
                    "last run's); the validation pass, which is not stored, runs again and "
                    "rewrites the profile's validated numbers and rerouted points",
                    markup=False)
            t_val = time.perf_counter()
            doc["validation"] = self._validate(doc)
            self._reroute(doc)
            self.spent["validation"] = time.perf_counter() - t_val
        if doc["tables"]:
            self._linear_phase(store, resumed, doc)
        measured = sum(v for k, v in self.spent.items() if k.startswith("measure "))
        self.spent["measure: Optuna search and storage"] = max(0.0, measured - self._trial_wall)
        self.spent.update({f"measure: {k}": v for k, v in in_trials.items()})
        self.spent.update({
            f"validation: {k}": v - in_trials.get(k, 0.0)
            for k, v in self.crew.trial_seconds.items() if v - in_trials.get(k, 0.0) > 0.0
        })
        doc["tune_seconds"] = {k: round(v, 2) for k, v in self.spent.items()}
        doc["tune_seconds"]["total"] = round(time.perf_counter() - t0, 2)
        # Wall-clock stamps, so that a caller timing the whole command (benchmarks/tune_time.py)
        # sees what came before the ranks started and after the profile was written.
        doc["tune_clock"] = {"launched_unix": _launch_time(), "finished_unix": time.time()}
        doc["tune_host"] = _host_state()
        save(doc, out)
        store.close()
        if "validation" in doc:
            ui.print_validation(doc["validation"], cfg.rel_tol, self.con)
        ui.print_summary(doc, str(out), time.perf_counter() - t0, self.con)
        # Last: once the others have their stop, they leave without closing anything (runner),
        # so nothing after this may fail on rank 0 alone.
        self.crew.stop(0)
        return 0

    def _setup(self, names: list[str]) -> None:
        """Set up the backends ``names`` on every rank (the skipped ones printed, with why);
        its time adds to the "setup" phase."""
        if not names:
            return
        t_setup = time.perf_counter()
        for s in self.crew.send({"op": "setup", "names": names}):
            self._add_skip(s)
            self.con.print(f"  skipping {s['backend']}: {s['reason']}", markup=False)
        self.spent["setup"] = self.spent.get("setup", 0.0) + time.perf_counter() - t_setup
        self.spent.update({f"setup: {k}": v for k, v in self.crew.setup_seconds.items()
                           if v >= 0.05})

    def _measure(self, store: Store, resumed: Resumed,
                 plan: list[tuple[str, int, str, str, int]], progress: ui.Progress) -> None:
        for dtype, nbytes, name, mode, budget in plan:
            progress.describe(f"{name} {dtype} {mode} {nbytes} B")
            t_study = time.perf_counter()
            self._study(store, resumed, name, dtype, mode, nbytes, progress, budget)
            phase = f"measure {name}"
            self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - t_study

    # -- the plan ------------------------------------------------------------------------

    def _plan(self, names: list[str]) -> list[tuple[str, int, str, str, int]]:
        """(dtype, nbytes, backend, mode, trial budget) in measuring order."""
        cfg = self.cfg
        plan = []
        for dtype in cfg.dtypes:
            for nbytes in sorted({actual_nbytes(s, dtype) for s in cfg.sizes}):
                for name in names:
                    space = self._space(name, nbytes, dtype)
                    budget = min(self._count(name, space, nbytes), cfg.n_trials) if space else 1
                    for mode in cfg.modes:
                        plan.append((dtype, nbytes, name, mode,
                                     min(budget, EAGER_FOLLOW_TRIALS)
                                     if self._follows_graph(mode) and space else budget))
        return plan

    def _cls(self, name: str) -> Any:
        """Backend ``name``'s class (built or, for a late one not yet set up, loaded)."""
        from artune import backends as _backends

        built = self.crew.built.get(name)
        return type(built) if built is not None else _backends.load(name)

    def _space(self, name: str, nbytes: int, dtype: str) -> dict[str, list[Any]]:
        """Backend ``name``'s search space at ``nbytes`` of ``dtype``; with ``--quick``, only its
        launch parameters vary, the others stay at the defaults (built ahead by ``prepare``): no
        trial waits for a build (an NVRAR kernel not built ahead compiles at its first call,
        inside the trial's correctness gate)."""
        cls = self._cls(name)
        size = element_size(dtype)
        space = cls.search_space_for(nbytes, self.crew.ctx, size)
        if not self.cfg.quick or not space:
            return space
        default = cls.default_params_for(nbytes, self.crew.ctx, size)
        return {k: (list(v) if k in cls.launch_params or k not in default else [default[k]])
                for k, v in space.items()}

    def _count(self, name: str, space: dict[str, list[Any]], nbytes: int) -> int:
        """How many parameter sets of ``space`` backend ``name`` admits at ``nbytes``."""
        cls = self._cls(name)
        return sum(cls.admits(c, nbytes, self.crew.ctx) for c in combinations(space))

    def _follows_graph(self, mode: str) -> bool:
        """Whether the eager studies take their parameter sets from the graph ones (see
        ``EAGER_FOLLOW_TRIALS``): graph studies run first at each size."""
        modes = self.cfg.modes
        return mode == "eager" and "graph" in modes and modes.index("graph") < modes.index(mode)

    def _add_skip(self, skip: dict[str, Any]) -> None:
        key = (skip["backend"], params_key(skip.get("params") or {}), skip.get("dtype"),
               skip.get("mode"), skip.get("nbytes"), skip["reason"])
        if key not in self._skip_keys:
            self._skip_keys.add(key)
            self.skipped.append(skip)

    # -- one study -------------------------------------------------------------------------

    def _cmd(self, name: str, params: dict[str, Any], dtype: str, mode: str, nbytes: int,
             prune: bool) -> dict[str, Any]:
        gate = self.gates.get((name, params_key(params), dtype, nbytes), "todo") == "todo"
        return {
            "op": "trial", "backend": name, "params": params, "dtype": dtype, "mode": mode,
            "nbytes": nbytes, "gate": gate, "reps": self.cfg.n_reps,
            "warmup": self.cfg.n_warmup, "prune_after": self.cfg.prune_after if prune else 0,
        }

    def _run_trial(
        self, name: str, params: dict[str, Any], dtype: str, mode: str, nbytes: int,
        search: Search | None,
    ) -> tuple[str, dict[str, Any]]:
        """("measured", record) | ("gate", skip) | ("skip", skip) | ("pruned", skip)."""
        gkey = (name, params_key(params), dtype, nbytes)
        cached = self.gates.get(gkey, "todo")
        if cached not in ("todo", None):
            return "gate", _skip(name, params, dtype, None, nbytes, str(cached))
        prune = search is not None and bool(search.done)
        decide = None
        if prune and search is not None:
            step = self.cfg.prune_after

            def decide(value: float) -> bool:
                return search.report(value, step)

        t_trial = time.perf_counter()
        res = self.crew.send(self._cmd(name, params, dtype, mode, nbytes, prune), decide)
        self._trial_wall += time.perf_counter() - t_trial
        if "skip" in res:
            if res.get("gate"):
                self.gates[gkey] = res["skip"]
                return "gate", _skip(name, params, dtype, None, nbytes, res["skip"])
            return "skip", _skip(name, params, dtype, mode, nbytes, res["skip"])
        self.gates[gkey] = None
        if "pruned" in res:
            skip = _skip(
                name, params, dtype, mode, nbytes,
                f"pruned by Optuna after {res['reps']} repetitions: slowest-rank median more "
                f"than {PRUNE_MARGIN:.0%} above the best parameter set so far",
            )
            skip["median_us"] = res["pruned"]
            return "pruned", skip
        rec = record_from(res, backend=name, params=params, dtype=dtype, mode=mode,
                          nbytes=nbytes, reps=self.cfg.n_reps)
        return "measured", rec

    def _study(self, store: Store, resumed: Resumed, name: str, dtype: str, mode: str,
               nbytes: int, progress: ui.Progress, budget: int) -> None:
        ctx = self.crew.ctx
        cls = type(self.crew.built[name])
        sname = study_name(name, dtype, mode, nbytes)
        done = resumed.done.get(sname, set())
        space = self._space(name, nbytes, dtype)
        if not space:
            if params_key({}) in done:
                progress.advance()
                return
            kind, rec = self._run_trial(name, {}, dtype, mode, nbytes, None)
            if kind == "measured":
                store.add_measurement(sname, rec)
                self.measurements.append(rec)
            else:
                store.add_skip(sname, rec, gate=kind == "gate")
                self._add_skip(rec)
            progress.advance()
            return
        default = cls.default_params_for(nbytes, ctx, element_size(dtype))
        first = [default]
        if self._follows_graph(mode):
            graph = [m for m in self.measurements if m["backend"] == name and m["mode"] == "graph"
                     and m["dtype"] == dtype and m["nbytes"] == nbytes]
            if graph:
                first.insert(0, dict(min(graph, key=lambda m: m["latency_us"])["params"]))
            else:  # nothing to follow (graph mode failed here): the eager study searches itself
                full = min(self._count(name, space, nbytes), self.cfg.n_trials)
                progress.add_total(full - budget)
                budget = full
        search = Search(store, sname, space, default, budget, done, first=first,
                        admit=lambda p: cls.admits(p, nbytes, ctx))
        progress.advance(min(budget, len(search.done)))
        while (params := search.next()) is not None:
            kind, rec = self._run_trial(name, params, dtype, mode, nbytes, search)
            if kind == "measured":
                search.finish(rec)
                self.measurements.append(rec)
            else:
                search.fail(rec, gate=kind == "gate", pruned=kind == "pruned")
                self._add_skip(rec)
            progress.advance()

    # -- validation ----------------------------------------------------------------------

def _split_late(names: list[str]) -> tuple[list[str], list[str]]:
    """(backends set up first, backends set up after those are measured: ``late_setup``)."""
    from artune import backends as _backends

    def late(name: str) -> bool:
        try:
            return bool(_backends.load(name).late_setup)
        except Exception:  # noqa: BLE001 - not importable: the set-up says why, in order
            return False

    flags = {n: late(n) for n in names}
    return [n for n in names if not flags[n]], [n for n in names if flags[n]]


def _host_state() -> dict[str, Any]:
    """What rank 0's process shared its CPU with at the end of the tune: the CPUs it may run on,
    its Python threads and the threads that used the most CPU time. (Kept because eager calls
    are host-bound: on 4x H100 a tune's eager calls read 32-45 µs, and benchmarks/router_eager.py
    33 µs on the same machine, with or without NVSHMEM and SGLang built; no helper thread used
    CPU time worth naming, benchmarks/results/gpu_session_2026-11-26g.md.)"""
    import threading

    try:
        cpus: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    busiest = sorted(thread_cpu_s().items(), key=lambda kv: -kv[1])[:8]
    return {"cpus_allowed": cpus, "cpu_count": os.cpu_count(),
            "python_threads": sorted(t.name for t in threading.enumerate()),
            "busiest_threads_cpu_s": [[n, round(v, 2)] for n, v in busiest]}


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each of this process's threads has used, by thread name
    (threads of one name summed; native threads included: NCCL's, NVSHMEM's proxy, ...).
    Empty where /proc is not there."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _launch_time() -> float | None:
    """When ``artune tune`` started the ranks (Unix time); None under torchrun or srun."""
    try:
        return envs.get("ARTUNE_LAUNCH_TIME")
    except ValueError:
        return None
