"""The tune's validation pass: after the table is built, re-time the routed all-reduce (the
router, as the integration calls it) against every close candidate at each measured point,
rebuild the table with those re-times, and validate again the points that moved.

Eager candidates run in alternating rounds and are compared round by round (``paired_gap``); an
eager point out of tolerance at its first reading is read again and judged on both readings
pooled (``_pool``). ``ARTUNE_VALIDATE_CONTROLS=1`` adds the routed backend called directly and
a twin of that call at each eager point (``_controls``): the router's own cost and what two
identical calls read apart. ``ValidationPass`` is mixed into ``Driver`` (rank 0's side of a
tune), whose crew, config, console and measurements it uses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from artune import envs
from artune.autotune import ui
from artune.autotune.crew import record_from
from artune.autotune.search import params_key
from artune.autotune.table import CONFIRMED, INCUMBENT, VALIDATION, keeps_incumbent
from artune.autotune.timing import summarize

if TYPE_CHECKING:
    from rich.console import Console

    from artune.autotune.config import TuneConfig
    from artune.autotune.crew import Crew

__all__ = ["ValidationPass", "VALIDATE_MARGIN", "paired_gap"]

#: The validation pass re-times the routed all-reduce and every candidate the tune measured
#: within this margin of the fastest at that point (the others keep their tune measurement).
VALIDATE_MARGIN = 0.25


class ValidationPass:
    """The validation pass's methods of ``Driver``."""

    crew: Crew
    cfg: TuneConfig
    con: Console
    #: the tune's measurement records
    measurements: list[dict[str, Any]]
    #: the validation pass's re-times of each candidate (``_validate``, ``_reroute``)
    retimed: list[dict[str, Any]]

    def _validate(
        self, doc: dict[str, Any],
        only: dict[tuple[str, str, int], tuple[str, dict[str, Any]]] | None = None,
    ) -> list[dict[str, Any]]:
        """Re-time the routed all-reduce and every backend's best at each measured point (or
        at the (dtype, mode, nbytes) points in ``only``, each with a (backend, params) that is
        timed there whatever the tune measured). Each candidate's re-time is kept in
        ``self.retimed`` (a measurement with ``"source": "validation"``)."""
        from artune.autotune.table import best_per_backend

        self.crew.send({"op": "router", "tables": doc["tables"], "dry_run": doc["dry_run"]})
        router = self.crew.router
        assert router is not None
        entries: list[dict[str, Any]] = []
        best = best_per_backend(doc["measurements"])
        points = [(k, n, per) for k, per_size in sorted(best.items())
                  for n, per in sorted(per_size.items())
                  if only is None or (*k, n) in only]
        neighbours = _neighbour_routes(doc, best)
        controls_on = envs.get("ARTUNE_VALIDATE_CONTROLS")
        progress = ui.Progress(len(points), self.con)
        with progress.running():
            for (dtype, mode), nbytes, per_backend in points:
                progress.describe(f"validate {dtype} {mode} {nbytes} B")
                # Candidates the tune measured far behind the fastest cannot overtake it on a
                # re-run; they keep their tune measurement ("not_retimed") and cost no time.
                here = {b: r for b, r in per_backend.items() if b in self.crew.built}
                fastest_us = min((r["latency_us"] for r in here.values()), default=0.0)
                cands, behind = [], {}
                forced = only.get((dtype, mode, nbytes)) if only else None
                for b, r in sorted(here.items()):
                    if forced is not None and b == forced[0]:
                        continue  # timed below, with the parameters it was routed with
                    # ... unless it is routed here or at a neighbouring size: one slow eager
                    # measurement (a host hiccup) must not decide a size on its own, and a
                    # size the incumbent rule keeps must keep a re-time of the incumbent
                    if (r["latency_us"] <= fastest_us * (1 + VALIDATE_MARGIN)
                            or b in neighbours.get((dtype, mode, nbytes), ())):
                        cands.append((b, dict(r.get("params") or {})))
                    else:
                        behind[b] = r["latency_us"]
                if forced is not None and forced[0] in self.crew.built:
                    cands.append((forced[0], dict(forced[1])))
                choice = router.choose(self.crew.input(dtype, nbytes), mode)
                n_extra, direct_at = (_controls(mode, choice, cands, self.crew.built)
                                      if controls_on else (0, None))
                cmd = {
                    "op": "validate", "dtype": dtype, "mode": mode, "nbytes": nbytes,
                    "reps": self.cfg.n_reps, "warmup": self.cfg.n_warmup,
                    "entries": [{"backend": None}]
                    + [{"backend": b, "params": p} for b, p in cands]
                    + [{"backend": choice.backend, "params": dict(choice.params)}] * n_extra,
                }
                point = (dtype, mode, nbytes)
                first_retime = len(self.retimed)
                results = self.crew.send(cmd)
                entry = self._judge(point, choice, cands, direct_at if n_extra else -1, results)
                if (mode == "eager" and not entry["within"] and "error" not in entry
                        and not entry.get("kept_incumbent")):
                    # Host-bound calls: one reading can catch a burst of host noise (4x H100:
                    # the router's own cost +0.24 µs over 37 points, +2.2 at one of them, where
                    # two identical calls read an interquartile range of 5 µs). Time the same
                    # calls again and judge on both readings' rounds pooled (not the better
                    # one), with the noise measured within each reading (``_pool``).
                    again = self.crew.send(cmd)
                    del self.retimed[first_retime:]  # the pooled re-times replace them
                    pooled = [_pool(a, b) for a, b in zip(results, again, strict=True)]
                    entry = self._judge(point, choice, cands, direct_at if n_extra else -1,
                                        pooled)
                    entry["readings"] = 2
                entry["not_retimed"] = behind
                entries.append(entry)
                progress.advance()
        return entries

    def _reroute(self, doc: dict[str, Any]) -> None:
        """Rebuild the tables with the validation pass's re-times, which outrank the tune's
        measurements (every close candidate timed again side by side: eager ones in
        alternating rounds, where host speed drifts between the tune's backend-by-backend
        studies). Where that moves a validated point to another backend or parameter set,
        validate those points again with the new routing, once: the profile's validation then
        describes what it routes. The second pass's re-times stay in its entries only."""
        from artune.autotune.table import build_tables
        from artune.profile import Profile

        if not self.retimed:
            return
        measurements = self.measurements + self.retimed
        before = Profile(doc)
        tables = build_tables(measurements, self.cfg.rel_tol, before.fallback(),
                              self.cfg.incumbent_margin)
        after = Profile(dict(doc, tables=tables))
        moved: dict[tuple[str, str, int], tuple[str, dict[str, Any]]] = {}
        for e in doc["validation"]:
            key = (e["dtype"], e["mode"], e["nbytes"])
            if _route(before, *key) != _route(after, *key):
                # the route it had is timed again beside the new one
                moved[key] = (e["routed_backend"], dict(e.get("routed_params") or {}))
        doc["measurements"], doc["tables"] = measurements, tables
        if not moved:
            return
        self.con.print(
            f"validation: the re-times move {len(moved)} point(s) to another backend or "
            "parameter set; validating them again", markup=False)
        again = {(e["dtype"], e["mode"], e["nbytes"]): e
                 for e in self._validate(doc, only=moved)}
        out = []
        for e in doc["validation"]:
            key = (e["dtype"], e["mode"], e["nbytes"])
            if key in again:
                e = dict(again[key], rerouted_from={
                    "backend": e["routed_backend"], "params": e["routed_params"],
                    "routed_us": e["routed_us"], "within": e["within"]})
            out.append(e)
        doc["validation"] = out

    def _judge(self, point: tuple[str, str, int], choice: Any,
               cands: list[tuple[str, dict[str, Any]]], direct_at: int | None,
               results: list[dict[str, Any]]) -> dict[str, Any]:
        """The validation entry from one 'validate' command's results: the routed call, then
        ``cands``, then the controls' extra timings (``direct_at``: -1 without controls, else
        ``_controls``'s index of the direct call among ``cands``, None for an extra)."""
        timed, extra = results[:1 + len(cands)], results[1 + len(cands):]
        entry = self._entry(*point, choice, cands, timed, self.cfg.rel_tol)
        if direct_at != -1:
            direct = timed[1 + direct_at] if direct_at is not None else extra[0]
            entry.update(_control_gaps(timed[0], direct, extra[-1]))
        return entry

    def _entry(self, dtype: str, mode: str, nbytes: int, choice: Any,
               cands: list[tuple[str, dict[str, Any]]], results: list[dict[str, Any]],
               rel_tol: float) -> dict[str, Any]:
        def stat(res: dict[str, Any], b: str, p: dict[str, Any]) -> dict[str, Any] | None:
            if "samples" not in res:
                return None
            rec = record_from(res, backend=b, params=p, dtype=dtype, mode=mode,
                              nbytes=nbytes, reps=self.cfg.n_reps)
            if res.get("readings"):  # pooled (``_pool``): the spread within a reading
                rec["spread_us"] = max(
                    record_from(r, backend=b, params=p, dtype=dtype, mode=mode,
                                nbytes=nbytes, reps=self.cfg.n_reps)["spread_us"]
                    for r in res["readings"])
            return rec

        routed = stat(results[0], choice.backend, dict(choice.params))
        # (record, raw result) of each candidate that was timed
        timed = [(m, res) for (b, p), res in zip(cands, results[1:], strict=True)
                 if (m := stat(res, b, p)) is not None]
        ok = [m for m, _ in timed]
        first_retime = len(self.retimed)
        self.retimed += [dict(m, source=VALIDATION) for m in ok]
        fastest, best_res = min(timed, key=lambda t: t[0]["latency_us"], default=(None, None))
        entry: dict[str, Any] = {
            "dtype": dtype, "mode": mode, "nbytes": nbytes,
            "routed_backend": choice.backend, "routed_params": dict(choice.params),
            "routed_us": routed["latency_us"] if routed else None,
            "routed_spread_us": routed["spread_us"] if routed else None,
            "best_backend": fastest["backend"] if fastest else None,
            "best_params": fastest["params"] if fastest else None,
            "best_us": fastest["latency_us"] if fastest else None,
            "best_spread_us": fastest["spread_us"] if fastest else None,
            "candidates": {m["backend"]: m["latency_us"] for m in ok},
        }
        if routed is None or fastest is None:
            entry["within"] = False
            entry["error"] = results[0].get("skip") if routed is None else "no candidate timed"
            return entry
        r_us, b_us = routed["latency_us"], fastest["latency_us"]
        assert best_res is not None
        paired = paired_gap(results[0], best_res) if mode == "eager" else None
        if paired is not None:
            # Eager candidates ran in alternating rounds: the round-by-round difference
            # cancels the host's drift, which the two medians each carry.
            gap, noise = paired
            entry["gap_from"] = "paired rounds"
            within_reading = [g[1] for ra, rb in zip(results[0].get("readings", ()),
                                                     best_res.get("readings", ()),
                                                     strict=False)
                              if (g := paired_gap(ra, rb)) is not None]
            if within_reading:
                # two readings pooled: the median over all rounds, the noise within a reading
                noise = max(within_reading)
                entry["gap_from"] = "paired rounds of two readings"
        else:
            gap = r_us - b_us
            noise = max(routed["spread_us"] or 0.0, fastest["spread_us"] or 0.0)
            entry["gap_from"] = "medians"
        entry["gap_us"], entry["gap_spread_us"] = gap, noise
        entry["within"] = bool(gap <= b_us * rel_tol or gap <= noise)
        if entry["within"]:
            # The routed backend's re-time says so: where the rebuild finds it tied with
            # another, it keeps the size (table.pick_winners) instead of trading a confirmed
            # route for one that only the tie rule picks.
            for m in self.retimed[first_retime:]:
                if m["backend"] == choice.backend and m["params"] == dict(choice.params):
                    m[CONFIRMED] = True
        if (not entry["within"] and choice.backend == INCUMBENT and self.cfg.incumbent_margin
                and keeps_incumbent({m["backend"]: m for m in ok}, self.cfg.incumbent_margin)):
            # routed to SGLang's own all-reduce on purpose: the table's rule, on these re-times
            entry["kept_incumbent"] = True
        return entry


def _controls(mode: str, choice: Any, cands: list[tuple[str, dict[str, Any]]],
              built: dict[str, Any]) -> tuple[int, int | None]:
    """The extra eager timings of the routed backend called directly: (how many, the index
    in ``cands`` of the candidate that is that call already, or None). The direct call (that
    candidate, else an extra) and its twin (an extra) give the router's own cost (routed vs
    direct) and what the method reads between two identical callables (direct vs twin), in
    the same alternating rounds. None in graph mode, where the router is not on the replay."""
    if mode != "eager" or choice.backend not in built:
        return 0, None
    call = (choice.backend, dict(choice.params))
    at = next((i for i, c in enumerate(cands) if c == call), None)
    return (1 if at is not None else 2), at


def _control_gaps(routed: dict[str, Any], direct: dict[str, Any],
                  twin: dict[str, Any]) -> dict[str, list[float]]:
    """``router_gap_us`` (the routed call minus the routed backend called directly) and
    ``control_gap_us`` (the direct call minus its twin: zero but for the method), each
    [median, interquartile range] of the round-by-round differences; absent where a timing
    failed."""
    out: dict[str, list[float]] = {}
    for key, a, b in (("router_gap_us", routed, direct), ("control_gap_us", direct, twin)):
        g = paired_gap(a, b)
        if g is not None:
            out[key] = [g[0], g[1]]
    return out


def _pool(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two readings of one callable (``Crew`` timing results) as one: each rank's rounds of
    ``a`` then ``b``, and the two readings themselves under ``"readings"`` (their spreads are
    the noise: the pooled rounds' spread would count the shift between the readings as noise
    too). A reading that failed (no ``samples``) is not pooled: ``a`` stands."""
    sa, sb = a.get("samples"), b.get("samples")
    if not sa or not sb or len(sa) != len(sb):
        return a
    return dict(a, samples=[list(x) + list(y) for x, y in zip(sa, sb, strict=True)],
                reps=int(a.get("reps", len(sa[0]))) + int(b.get("reps", len(sb[0]))),
                readings=[a, b])


def paired_gap(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """(median, interquartile range) over rounds of a's minus b's slowest-rank µs, for two
    results of the same alternating rounds (``Crew._measure_alternating``: ``samples`` per rank,
    one value per round); None when they do not cover the same rounds."""
    sa, sb = a.get("samples"), b.get("samples")
    if not sa or not sb or len(sa) != len(sb):
        return None
    rounds = len(sa[0])
    if rounds < 4 or any(len(r) != rounds for r in (*sa, *sb)):
        return None
    diffs = []
    for k in range(rounds):
        va, vb = [r[k] for r in sa], [r[k] for r in sb]
        if not any(math.isnan(v) for v in va + vb):  # a round some rank lacks is left out
            diffs.append(max(va) - max(vb))
    if len(diffs) < 4:
        return None
    med, iqr = summarize(diffs)
    return med, iqr


def _neighbour_routes(doc: dict[str, Any], best: dict[tuple[str, str], dict[int, Any]]
                      ) -> dict[tuple[str, str, int], set[str]]:
    """(dtype, mode, nbytes) -> the backends the tables route that size and the measured sizes
    just below and just above it to."""
    from artune.profile import Profile

    profile = Profile(doc)
    out: dict[tuple[str, str, int], set[str]] = {}
    for (dtype, mode), per_size in best.items():
        sizes = sorted(per_size)
        routes = [_route(profile, dtype, mode, n) for n in sizes]
        for i, n in enumerate(sizes):
            out[(dtype, mode, n)] = {r[0] for r in (routes[i - 1] if i else None, routes[i],
                                                    routes[i + 1] if i + 1 < len(sizes)
                                                    else None) if r is not None}
    return out


def _route(profile: Any, dtype: str, mode: str, nbytes: int) -> tuple[str, str] | None:
    """(backend, params key) that ``select`` gives for a measured point; None if uncovered."""
    from artune.profile import select

    c = select(profile, nbytes, dtype, mode)
    return (c.backend, params_key(dict(c.params))) if c.covered else None
