"""The tune's fused-linear phase: does a row-parallel linear layer run faster as one NVRAR kernel
(``NvrarComm.linear_all_reduce``: the GEMM with the all-reduce in its epilogue) than as the GEMM
followed by the all-reduce the new table routes, at each row count a decode step runs?

    artune tune --linear-model /models/Llama-3.1-8B      # its o_proj and down_proj at TP = ranks
    artune tune --linear-shapes 1024x4096,3584x4096      # K (inputs per rank) x N (outputs)

After the all-reduce tables are built (and validated), every rank times, inside a CUDA graph,
for each layer shape, bf16/fp16 dtype and row count (1, 2, 4, ... 64; ``--quick`` 1, 4, 16, 64):

- ``linear-unfused``: ``torch.nn.functional.linear`` (cuBLAS) then the routed all-reduce
  (``Router.all_reduce`` in graph mode, SGLang's own where the table says so): what the plugin
  runs without the fused kernel;
- ``linear-fused``: the fused kernel, its parameters (block_n, block_k, warps, stages) searched
  with Optuna from the defaults (``--quick``: the defaults only), each set first checked against
  the fp32 sum over the ranks of the per-rank products, with identical bits on every rank.

Each call reads one of several weight copies in turn (``WEIGHT_BYTES`` in all, more than an
H100's or H200's L2), so the weights come from HBM as in a served model. At the end each point's
unfused call and fastest fused set are timed again back to back (alternating which goes first),
and those re-times decide, as the validation pass does for the tables. A row count runs fused
where the fused kernel measured at least ``rel_tol`` faster; a row count between two measured
ones only when both of them do (with the upper one's parameters); one below the smallest
measured, or above the largest, never. The result is the profile's ``linear`` section
(``artune.profile.select_linear`` reads it). Trials are stored in the tune's Optuna storage like
the others (studies ``linear-fused|dtype|KxN|rows|r2``, r2 the fused kernel's revision, and
``linear-unfused|dtype|KxN|rows|ROUTE``,
ROUTE the routed all-reduce: a resume under another routing times the unfused side again), so
``--resume`` continues here too; the back-to-back re-times are not stored.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from artune.autotune import ui
from artune.autotune.crew import _exc_text, _first, element_size, record_from
from artune.autotune.search import Search, params_key
from artune.autotune.shapes import layer_shapes, model_dims, parse_shapes
from artune.kernels.nvrar import LINEAR_BN, SMEM_BYTES, linear_defaults, linear_smem

if TYPE_CHECKING:
    from rich.console import Console

    from artune.autotune.config import TuneConfig
    from artune.autotune.crew import Crew
    from artune.autotune.search import Resumed, Store

__all__ = ["FUSED", "UNFUSED", "DEFAULT_ROWS", "QUICK_ROWS", "parse_shapes",
           "model_dims", "layer_shapes", "linear_space", "build_linear_table", "LinearPhase",
           "linear_trial", "is_linear", "is_current", "fits", "linear_bytes",
           "LINEAR_REVISION"]

FUSED = "linear-fused"
UNFUSED = "linear-unfused"
#: Row counts (tokens of a decode step) measured; the fused kernel takes at most 64.
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 64)
QUICK_ROWS = (1, 4, 16, 64)
#: Bytes of weight copies a timed call cycles through (an H100's L2 is 50 MB, an H200's 60).
WEIGHT_BYTES = 128 << 20
#: ... in at most this many copies (a tiny layer would otherwise take millions).
MAX_COPIES = 64
#: dtypes the fused kernel takes.
LINEAR_DTYPES = ("bfloat16", "float16")
#: The fused kernel's revision, in its studies' names and its records: 2 since its K loop
#: pipelines ``stages`` deep (the 26th session; before, 3 whatever the set said), so a tune
#: resuming one of revision 1 neither reads its fused timings as those of their stages nor
#: mixes them with new ones: it measures the fused side again (the unfused side is kept).
LINEAR_REVISION = 2


def _point(record: dict[str, Any]) -> tuple[str, int, int, int]:
    return record["dtype"], record["k"], record["n"], record["rows"]


def is_linear(record: dict[str, Any]) -> bool:
    """Whether a stored measurement or skip belongs to this phase."""
    return record.get("backend") in (FUSED, UNFUSED)


def is_current(record: dict[str, Any]) -> bool:
    """Whether a record of this phase is of the fused kernel as it is now (the unfused side's
    are, always)."""
    return record.get("backend") != FUSED or record.get("revision") == LINEAR_REVISION


# -- what to measure ----------------------------------------------------------------------------


def linear_bytes(cfg: TuneConfig) -> int:
    """The largest message the phase's fused kernel sends (its rows x N outputs, all-reduced
    in one lamport one-shot): the tune sizes NVRAR's buffers for it as well as for ``--sizes``
    (0 without the phase). N is the model's hidden size for ``--linear-model``, whatever the
    TP size."""
    outs = [n for _, n in cfg.linear_shapes]
    if cfg.linear_model is not None:
        outs.append(cfg.linear_model["hidden"])
    dtypes = [d for d in cfg.dtypes if d in LINEAR_DTYPES]
    if not outs or not dtypes:
        return 0
    rows = max(cfg.linear_rows or (QUICK_ROWS if cfg.quick else DEFAULT_ROWS))
    return rows * max(outs) * max(element_size(d) for d in dtypes)


def linear_space(n: int, max_grid: int) -> dict[str, list[int]]:
    """The fused kernel's search space for N outputs on a GPU of ``max_grid`` CTAs; ``fits``
    admits the sets whose K loop fits in shared memory. ``prefetch`` is not searched: here each
    timed call follows another fused call, which lets dependents launch at once, the
    prefetch's best case, not a served model's (docs/nvrar.md); a profile may set it."""
    return {"block_n": [b for b in (16, 32, 64, 128) if n % b == 0 and n // b <= max_grid],
            "block_k": [64, 128, 256, 512], "warps": [4, 8], "stages": [2, 3, 4, 5]}


def fits(rows: int, dtype: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a set of the fused kernel's parameters gets a trial at ``rows`` rows: its K
    loop's shared memory (``linear_smem``) within an H100's (``linear_problem`` checks the
    GPU's own on every rank, as a skip)."""
    def admit(p: dict[str, Any]) -> bool:
        return linear_smem(rows, p["block_n"], p["block_k"], p["stages"],
                           element_size(dtype)) <= SMEM_BYTES
    return admit


def study(impl: str, dtype: str, k: int, n: int, rows: int) -> str:
    name = f"{impl}|{dtype}|{k}x{n}|{rows}"
    return name + f"|r{LINEAR_REVISION}" if impl == FUSED else name


# -- the table ----------------------------------------------------------------------------------


def build_linear_table(records: list[dict[str, Any]], rel_tol: float,
                       skips: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The profile's ``linear`` section from this phase's measurement records (at a point where
    a side was re-timed back to back with the other, ``"source": "confirm"``, only those
    re-times count for it); where a side has none, the first of its ``skips`` (records with a
    ``reason``) says why."""
    best: dict[tuple[str, int, int], dict[int, dict[str, dict[str, Any]]]] = {}
    records = [r for r in records if is_linear(r)]
    # a side re-timed back to back with the other (``"source": "confirm"``) is judged on that
    confirmed = {(r["backend"], *_point(r)) for r in records if r.get("source") == "confirm"}
    for r in records:
        if (r["backend"], *_point(r)) in confirmed and r.get("source") != "confirm":
            continue
        at = best.setdefault((r["dtype"], r["k"], r["n"]), {}).setdefault(r["rows"], {})
        if r["backend"] not in at or r["latency_us"] < at[r["backend"]]["latency_us"]:
            at[r["backend"]] = r
    why: dict[tuple[str, str, int, int, int], str] = {}
    for s in skips:
        if is_linear(s):
            why.setdefault((s["backend"], s["dtype"], s["k"], s["n"], s["rows"]), s["reason"])
            best.setdefault((s["dtype"], s["k"], s["n"]), {}).setdefault(s["rows"], {})
    out = []
    for (dtype, k, n), by_rows in sorted(best.items()):
        points = []
        for rows in sorted(by_rows):
            f, u = by_rows[rows].get(FUSED), by_rows[rows].get(UNFUSED)
            point = {
                "rows": rows, "unfused_us": u and u["latency_us"],
                "fused_us": f and f["latency_us"], "params": f["params"] if f else None,
                "fused": bool(f and u and f["latency_us"] <= u["latency_us"] * (1 - rel_tol)),
            }
            for side, rec in (("unfused", u), ("fused", f)):
                reason = why.get((f"linear-{side}", dtype, k, n, rows))
                if rec is None and reason:
                    point[f"{side}_why"] = reason
            points.append(point)
        out.append({"dtype": dtype, "k": k, "n": n, "ranges": _row_ranges(points),
                    "points": points})
    return out


def _row_ranges(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row count from 1 to the largest measured: a measured one as measured; one between
    two measured ones fused only when both are (the upper one's parameters); one below the
    smallest measured never. Merged."""
    ranges: list[dict[str, Any]] = []
    lower = None
    for p in points:
        lo = 1 if lower is None else lower["rows"] + 1
        inside = p["fused"] and lower is not None and lower["fused"]
        for rows, fused in ((range(lo, p["rows"]), inside), (range(p["rows"], p["rows"] + 1),
                                                             p["fused"])):
            if not rows:
                continue
            params = dict(p["params"]) if fused else {}
            last = ranges[-1] if ranges else None
            if last and last["fused"] == fused and last["params"] == params:
                last["max_rows"] = rows[-1]
            else:
                ranges.append({"min_rows": rows[0], "max_rows": rows[-1], "fused": fused,
                               "params": params})
        lower = p
    return ranges


# -- rank 0 ---------------------------------------------------------------------------------


class LinearPhase:
    """The fused-linear phase's methods of ``Driver`` (rank 0)."""

    crew: Crew
    cfg: TuneConfig
    con: Console
    spent: dict[str, float]
    #: this phase's records (measurements of ``FUSED`` / ``UNFUSED``), resumed ones included
    linear_records: list[dict[str, Any]]
    #: and its skip records (failed the gate, unsupported, pruned), resumed ones included
    linear_skips: list[dict[str, Any]]

    def _linear_shapes(self) -> list[tuple[int, int]]:
        shapes = list(self.cfg.linear_shapes)
        if self.cfg.linear_model is not None:
            world = self.crew.ctx.world_size
            shapes += [s for s in layer_shapes(self.cfg.linear_model, world) if s not in shapes]
        return shapes

    def _linear_phase(self, store: Store, resumed: Resumed, doc: dict[str, Any]) -> None:
        """Measure and add the profile's ``linear`` section (or say why not, in
        ``doc["linear_skipped"]``)."""
        from artune.profile import Profile, select

        shapes, cfg = self._linear_shapes(), self.cfg
        if not shapes:
            return
        dtypes = [d for d in cfg.dtypes if d in LINEAR_DTYPES]
        nvrar = self.crew.built.get("nvrar")
        why = ("a CPU dry run (the fused kernel needs GPUs)" if cfg.dry_run
               else "nvrar is not built here" if nvrar is None
               else f"no bf16/fp16 among --dtypes {','.join(cfg.dtypes)}" if not dtypes
               else None)
        if why:
            doc["linear_skipped"] = why
            self.con.print(f"fused linear layers not measured: {why}", markup=False)
            return
        t0 = time.perf_counter()
        self.crew.send({"op": "router", "tables": doc["tables"], "dry_run": doc["dry_run"]})
        max_grid = int(getattr(getattr(nvrar, "comm", None), "max_grid", 256))
        rows_list = cfg.linear_rows or (QUICK_ROWS if cfg.quick else DEFAULT_ROWS)
        budget = 1 if cfg.quick else cfg.n_trials
        plan = [(d, k, n, r) for d in dtypes for k, n in shapes for r in rows_list]
        # the all-reduce the unfused side ends with, as the new table routes it: part of its
        # study's name, so a resume under another routing measures it again
        prof = Profile(doc)
        routes = {}
        for d, k, n, r in plan:
            c = select(prof, r * n * element_size(d), d, "graph")
            routes[(d, k, n, r)] = c.backend + (f" {params_key(dict(c.params))}" if c.params
                                                else "")
        progress = ui.Progress(len(plan) * (3 + budget), self.con)
        with progress.running():
            for dtype, k, n, rows in plan:
                progress.describe(f"linear {dtype} {k}x{n} {rows} rows")
                self._linear_point(store, resumed, dtype, k, n, rows,
                                   routes[(dtype, k, n, rows)], max_grid, budget, progress)
            keep = [m for m in self.linear_records if _point(m) in routes and is_current(m)
                    and (m["backend"] == FUSED or m.get("route") == routes[_point(m)])]
            confirmed = self._confirm(build_linear_table(keep, cfg.rel_tol), routes, progress)
        self.crew.send({"op": "linear-done"})
        doc["linear"] = build_linear_table(
            keep + confirmed, cfg.rel_tol,
            [s for s in self.linear_skips if _point(s) in routes and is_current(s)])
        doc["linear_measurements"] = keep + confirmed
        self.spent["linear layers"] = time.perf_counter() - t0

    def _confirm(self, table: list[dict[str, Any]], routes: dict[tuple[str, int, int, int], str],
                 progress: ui.Progress) -> list[dict[str, Any]]:
        """Each point's unfused call and its fastest fused set timed again back to back (in
        alternating order), as the validation pass does for the tables: the search's best of
        several noisy timings would otherwise be compared with one. Kept only where both
        re-times measured (one side's re-time against the other's search would be the bias
        this removes). Not stored (as the validation pass's re-times): a resume times them
        again."""
        found = {(e["dtype"], e["k"], e["n"], p["rows"]): p for e in table for p in e["points"]}
        out: list[dict[str, Any]] = []
        for i, point in enumerate(routes):
            p = found.get(point)
            if p is None or p["unfused_us"] is None or p["fused_us"] is None:
                progress.advance(2)
                continue
            sides = [(UNFUSED, {}), (FUSED, dict(p["params"]))]
            both = []
            for impl, params in sides[::-1] if i % 2 else sides:
                kind, rec = self._linear_trial(impl, params, *point, None, gate=False)
                if kind == "measured":
                    both.append({**rec, "source": "confirm",
                                 **({"route": routes[point]} if impl == UNFUSED else {})})
                progress.advance()
            if len(both) == 2:
                out += both
        return out

    def _linear_point(self, store: Store, resumed: Resumed, dtype: str, k: int, n: int,
                      rows: int, route: str, max_grid: int, budget: int,
                      progress: ui.Progress) -> None:
        name = study(UNFUSED, dtype, k, n, rows) + f"|{route}"
        if params_key({}) not in resumed.done.get(name, set()):
            kind, rec = self._linear_trial(UNFUSED, {}, dtype, k, n, rows, None)
            rec["route"] = route
            if kind == "measured":
                store.add_measurement(name, rec)
                self.linear_records.append(rec)
            else:
                store.add_skip(name, rec)
                self.linear_skips.append(rec)
        progress.advance()
        name = study(FUSED, dtype, k, n, rows)
        space = linear_space(n, max_grid)
        if not space["block_n"]:
            self.linear_skips.append({
                "backend": FUSED, "params": {}, "dtype": dtype, "k": k, "n": n, "rows": rows,
                "revision": LINEAR_REVISION,
                "reason": f"no tile width of 16-128 columns divides N={n} into at most "
                          f"{max_grid} CTAs"})
            progress.advance(budget)
            return
        default = linear_defaults(rows, element_size(dtype), LINEAR_BN if LINEAR_BN in
                                  space["block_n"] else space["block_n"][0])
        if budget == 1:
            space = {key: [v] for key, v in default.items()}
        search = Search(store, name, space, default, budget, resumed.done.get(name, set()),
                        admit=fits(rows, dtype))
        progress.advance(min(budget, len(search.done)))
        while (params := search.next()) is not None:
            kind, rec = self._linear_trial(FUSED, params, dtype, k, n, rows, search)
            if kind == "measured":
                search.finish(rec)
                self.linear_records.append(rec)
            else:
                search.fail(rec, gate=kind == "gate", pruned=kind == "pruned")
                self.linear_skips.append(rec)
            progress.advance()

    def _linear_trial(self, impl: str, params: dict[str, Any], dtype: str, k: int, n: int,
                      rows: int, search: Search | None,
                      gate: bool = True) -> tuple[str, dict[str, Any]]:
        """("measured", record) or (why not: "gate" | "skip" | "pruned", skip record)."""
        cfg = self.cfg
        nbytes = rows * n * element_size(dtype)
        prune = search is not None and bool(search.done)
        decide = None
        if prune and search is not None:
            step = cfg.prune_after

            def decide(value: float) -> bool:
                return search.report(value, step)

        res = self.crew.send({
            "op": "linear", "impl": impl, "params": params, "dtype": dtype, "k": k, "n": n,
            "rows": rows, "mode": "graph", "nbytes": nbytes, "gate": gate and impl == FUSED,
            "reps": cfg.n_reps, "warmup": cfg.n_warmup,
            "prune_after": cfg.prune_after if prune else 0,
        }, decide)
        where = {"dtype": dtype, "mode": "graph", "nbytes": nbytes, "k": k, "n": n, "rows": rows}
        if impl == FUSED:
            where["revision"] = LINEAR_REVISION
        if "skip" in res or "pruned" in res:
            reason = res.get("skip") or (f"pruned after {res['reps']} repetitions: clearly "
                                         "slower than the best parameter set so far")
            kind = "gate" if res.get("gate") else "pruned" if "pruned" in res else "skip"
            return kind, {"backend": impl, "params": params, **where, "reason": reason}
        rec = record_from(res, backend=impl, params=params, dtype=dtype, mode="graph",
                          nbytes=nbytes, reps=cfg.n_reps)
        return "measured", {**rec, **where}


# -- every rank -----------------------------------------------------------------------------


def linear_trial(crew: Crew, cmd: dict[str, Any],
                 decide: Any = None) -> dict[str, Any] | None:
    """One rank's side of a ``linear`` command: the set-up (operands, whether the fused kernel
    takes them), the gate (fused), then ``Crew._measure``; every step that can fail on one rank
    is agreed on before the next collective."""
    import torch
    import torch.nn.functional as F

    router, comm = crew.router, getattr(crew.built.get("nvrar"), "comm", None)
    assert router is not None, "send the 'router' command first"
    error: str | None = None
    call: Callable[[int], Any] | None = None
    ws: list[Any] = []
    try:
        x, ws = _operands(crew, cmd["dtype"], cmd["k"], cmd["n"])
        xr = x[: cmd["rows"]]
        p = dict(cmd["params"])
        if cmd["impl"] == UNFUSED:
            def call(i: int) -> Any:
                return router.all_reduce(F.linear(xr, ws[i]), "graph")
        elif comm is None:
            error = "unsupported: nvrar is not built"
        elif why := comm.linear_problem(xr, ws[0], None, p["block_n"], p["block_k"],
                                        p["stages"]):
            error = f"unsupported: {why}"
        else:
            def call(i: int) -> Any:
                assert comm is not None
                return comm.linear_all_reduce(xr, ws[i], None, p["block_n"], p["block_k"],
                                              p["warps"], p["stages"], p.get("prefetch", 0))
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the weight copies
        error = f"set-up raised {_exc_text(exc)}"
    first = _first(crew.comm.gather_errors(error, "linear: set-up"))
    if first is not None or call is None:
        return {"skip": first or "no call"}
    if cmd.get("gate"):
        with crew._clock("gate"), crew._clock("gate: linear-fused"):
            verdict = _gate(crew, call, xr, ws[0])
        if verdict is not None:
            return {"skip": verdict, "gate": True}
    turn, run = itertools.count(), call
    result = crew._measure(lambda: run(next(turn) % len(ws)), router.capture, cmd, decide)
    torch.cuda.synchronize(crew.ctx.device)
    return result if crew.ctx.rank == 0 else None


def _gate(crew: Crew, call: Any, x: Any, w: Any) -> str | None:
    """``call(0)`` (the fused kernel on weight copy 0, ``w``) against the fp32 sum over the
    ranks of x @ w.T; the same verdict on every rank."""
    import torch
    import torch.distributed as dist

    from artune.autotune import gate

    error, ref = None, None
    try:
        prod = x.float() @ w.float().t()
        ref = torch.stack([prod, prod.abs()])
    except Exception as exc:  # noqa: BLE001
        error = f"the reference raised {_exc_text(exc)}"
    first = _first(crew.comm.gather_errors(error, "linear: gate reference"))
    if first is not None:
        return first
    assert ref is not None
    dist.all_reduce(ref, group=crew.ctx.group)
    y = None
    try:
        y = call(0)
        torch.cuda.synchronize(crew.ctx.device)
    except Exception as exc:  # noqa: BLE001 - any failure excludes the parameter set
        error = f"linear_all_reduce raised {_exc_text(exc)}"
    first = _first(crew.comm.gather_errors(error, "linear: gate"))
    if first is not None:
        return first
    assert y is not None
    return gate.verdict(y, ref, crew.comm, crew.ctx.group)


def _operands(crew: Crew, dtype: str, k: int, n: int) -> tuple[Any, list[Any]]:
    """This rank's x [64, K] and weight copies [N, K] (``WEIGHT_BYTES`` in all), random and
    different on every rank; kept for the next command of the same shape."""
    import torch

    key = (dtype, k, n)
    held = crew._linear_ops
    if held is not None and held[0] == key:
        return held[1], held[2]
    crew._linear_ops = None  # free the last shape's first
    dev, dt = crew.ctx.device, getattr(torch, dtype)
    gen = torch.Generator(device=dev)
    gen.manual_seed(1_000_003 * (crew.cfg.seed + 7) + crew.ctx.rank)
    x = torch.randn(64, k, generator=gen, device=dev).to(dt)
    copies = min(MAX_COPIES, max(1, math.ceil(WEIGHT_BYTES / (n * k * element_size(dtype)))))
    ws = [(torch.randn(n, k, generator=gen, device=dev) / k**0.5).to(dt) for _ in range(copies)]
    crew._linear_ops = (key, x, ws)
    return x, ws
