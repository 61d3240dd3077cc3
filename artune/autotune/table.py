"""From measurements to the dispatch table: the winner per size, noise-proof, merged into ranges.

Input: the harness's measurement records, one per (backend, params, dtype, mode, nbytes)::

    {"backend": "nvrar", "params": {...}, "dtype": "bfloat16", "mode": "graph", "nbytes": 4096,
     "rank_medians_us": [...], "latency_us": 4.1, "spread_us": 0.1, "reps": 50}

Rules (issue #2): per size the fastest backend (its best parameter set) wins; where several are
within the measured noise of the fastest (the larger of their spreads, and never less than
``rel_tol`` of the fastest), the one chosen for the next smaller size is kept, else the one that
wins the next larger size, else the fallback (NCCL), else the fastest. A route the validation pass
confirmed at a size (a re-time marked ``"confirmed"``: the routed call measured within tolerance
of the fastest there) keeps it while tied with the fastest, before every other rule. Otherwise
SGLang's own all-reduce (``INCUMBENT``, what a server runs without artune) keeps every size where
no backend beats it by more than ``incumbent_margin`` (default 10%): on 4x H100 NVRAR measured
5% faster than it at 512 KiB in CUDA graphs, yet a served model whose 512 KiB all-reduces went to
NVRAR decoded 4.7% and 4.9% slower per step in two engines
(benchmarks/results/sglang_e2e_tp4_h100_nvrar_512k.json, batch 64). Where the validation pass
re-timed candidates side by side (``"source": "validation"``), only those re-times compete at
that size. Each measured size owns the byte range up to the geometric midpoint to the next
measured size; the first range starts at 1 byte, the last ends at the largest measured size
(beyond it: the fallback). Adjacent ranges with the same backend and parameters are merged.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from artune import __version__
from artune.backends import DEFAULT_BACKEND
from artune.profile import SCHEMA_VERSION, validate
from artune.topology import fingerprint_id

__all__ = ["best_per_backend", "pick_winners", "build_tables", "build_profile", "VALIDATION",
           "CONFIRMED",
           "INCUMBENT", "INCUMBENT_MARGIN"]

#: ``source`` of a measurement made by the validation pass (see ``best_per_backend``).
VALIDATION = "validation"
#: Set (True) on a validation re-time of the backend the point was routed to, when the routed
#: call measured within tolerance of the fastest there (see ``pick_winners``).
CONFIRMED = "confirmed"
#: The candidate a profile only routes away from on clear evidence: SGLang's own all-reduce.
INCUMBENT = "sglang"
#: How much faster (relative to the incumbent) another backend must measure to take a size.
INCUMBENT_MARGIN = 0.10

Record = Mapping[str, Any]


def best_per_backend(
    measurements: Iterable[Record],
) -> dict[tuple[str, str], dict[int, dict[str, Record]]]:
    """(dtype, mode) -> nbytes -> backend -> that backend's fastest measurement there.

    A re-time by the validation pass (``"source": "validation"``: every close candidate timed
    again side by side, eager ones in alternating rounds) outranks the tune's measurements of
    that backend at that point, the last such re-time counting."""
    out: dict[tuple[str, str], dict[int, dict[str, Record]]] = defaultdict(dict)
    for m in measurements:
        lat = m.get("latency_us")
        if lat is None or not math.isfinite(lat):
            continue
        per_size = out[(m["dtype"], m["mode"])].setdefault(int(m["nbytes"]), {})
        cur = per_size.get(m["backend"])
        if (cur is None or m.get("source") == VALIDATION
                or (cur.get("source") != VALIDATION and lat < cur["latency_us"])):
            per_size[m["backend"]] = m
    return dict(out)


def _tied(cands: Mapping[str, Record], rel_tol: float) -> tuple[str, set[str]]:
    """The fastest backend and every backend within noise of it (itself included)."""
    best = min(cands, key=lambda b: (cands[b]["latency_us"], b))
    lb = cands[best]["latency_us"]
    sb = cands[best].get("spread_us") or 0.0
    tied = set()
    for b, rec in cands.items():
        margin = max(sb, rec.get("spread_us") or 0.0, rel_tol * lb)
        if rec["latency_us"] <= lb + margin:
            tied.add(b)
    return best, tied


def _competing(per_backend: Mapping[str, Record]) -> Mapping[str, Record]:
    """The backends that compete at one size: where the validation pass re-timed candidates
    side by side, those re-times only (the others were far behind the fastest in the tune, and
    a stale tune number must not win against fresh ones); elsewhere every backend."""
    retimed = {b: r for b, r in per_backend.items() if r.get("source") == VALIDATION}
    return retimed or per_backend


def keeps_incumbent(per_backend: Mapping[str, Record], margin: float) -> bool:
    """Whether the incumbent was measured here and no backend beats it by more than ``margin``
    of its latency. (Its spread does not widen the margin: a 4x H100 quick tune measured
    SGLang's eager path at 64-75 µs with spreads of half that, against 32-43 µs for
    symm_one_shot, and a margin widened by that spread kept it.)"""
    inc = per_backend.get(INCUMBENT)
    if inc is None:
        return False
    best = min(r["latency_us"] for r in per_backend.values())
    return best >= inc["latency_us"] * (1 - margin)


def pick_winners(
    per_size: Mapping[int, Mapping[str, Record]], rel_tol: float = 0.03, fallback: str = "nccl",
    incumbent_margin: float = 0.0,
) -> dict[int, Record]:
    """nbytes -> the chosen measurement, by the rules in the module docstring.

    Sizes are walked in ascending order. A route the validation confirmed at a size keeps it
    while tied with the fastest (a re-time must not move a route it found within tolerance:
    neither the incumbent rule nor the neighbours' choice, each of which moved such a point on
    4x H100, to a route the second validation found slower). This is a policy over the
    incumbent rule too: a confirmed route other than the incumbent was chosen by the first
    build, i.e. past the incumbent margin in the tune, and a re-time that reads the two level
    is no evidence to move back. Otherwise the incumbent keeps the
    sizes where nothing beats it by more than ``incumbent_margin``; elsewhere, among backends
    tied with the fastest, the one chosen for the previous size is kept (so alternating noise
    cannot split a range), else the one that wins the next size outright, else the fallback,
    else the fastest.
    """
    sizes = [s for s in sorted(per_size) if per_size[s]]
    raw = {s: _tied(per_size[s], rel_tol) for s in sizes}
    winners: dict[int, Record] = {}
    prev: str | None = None
    for i, s in enumerate(sizes):
        best, tied = raw[s]
        choice = best
        confirmed = sorted(b for b in tied if per_size[s][b].get(CONFIRMED))
        if confirmed:
            winners[s] = per_size[s][confirmed[0]]
            prev = confirmed[0]
            continue
        if incumbent_margin > 0:
            if keeps_incumbent(per_size[s], incumbent_margin):
                choice = INCUMBENT
            # otherwise the incumbent wins nothing through a tie: a wide spread of its own
            # would let the neighbour rules keep it where it is clearly slower
            tied = tied - {INCUMBENT}
        if choice != INCUMBENT and len(tied) > 1:
            nxt = raw[sizes[i + 1]][0] if i + 1 < len(sizes) else None
            if prev in tied:
                choice = prev
            elif nxt in tied:
                choice = nxt
            elif fallback in tied:
                choice = fallback
        winners[s] = per_size[s][choice]
        prev = choice
    return winners


def _point(rec: Record, nccl: Record | None) -> dict[str, Any]:
    nccl_us = nccl["latency_us"] if nccl is not None else None
    return {
        "nbytes": int(rec["nbytes"]),
        "latency_us": rec["latency_us"],
        "spread_us": rec.get("spread_us"),
        "nccl_us": nccl_us,
        "speedup": (nccl_us / rec["latency_us"]) if nccl_us and rec["latency_us"] > 0 else None,
    }


def _ranges(
    per_size: Mapping[int, Mapping[str, Record]], winners: Mapping[int, Record], fallback: str
) -> list[dict[str, Any]]:
    sizes = sorted(winners)
    ranges: list[dict[str, Any]] = []
    for i, s in enumerate(sizes):
        lo = 1 if i == 0 else ranges[-1]["max_bytes"] + 1
        hi = s if i == len(sizes) - 1 else max(s, math.isqrt(s * sizes[i + 1]))
        rec = winners[s]
        point = _point(rec, per_size[s].get(fallback))
        params = dict(rec.get("params") or {})
        last = ranges[-1] if ranges else None
        if last is not None and last["backend"] == rec["backend"] and last["params"] == params:
            last["max_bytes"] = hi
            last["points"].append(point)
        else:
            ranges.append(
                {
                    "min_bytes": lo,
                    "max_bytes": hi,
                    "backend": rec["backend"],
                    "params": params,
                    "points": [point],
                }
            )
    return ranges


def build_tables(
    measurements: Iterable[Record], rel_tol: float = 0.03, fallback: str = DEFAULT_BACKEND,
    incumbent_margin: float = 0.0,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """dtype -> mode -> sorted, disjoint, merged ranges (the profile's "tables")."""
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (dtype, mode), per_size in sorted(best_per_backend(measurements).items()):
        winners = pick_winners({n: _competing(per) for n, per in per_size.items()}, rel_tol,
                               fallback, incumbent_margin)
        if winners:
            tables.setdefault(dtype, {})[mode] = _ranges(per_size, winners, fallback)
    return tables


def build_profile(
    measurements: Iterable[Record],
    skipped: Iterable[Record],
    *,
    fingerprint: dict[str, Any],
    command: str,
    dry_run: bool,
    validation: list[dict[str, Any]] | None = None,
    rel_tol: float = 0.03,
    incumbent_margin: float = 0.0,
) -> dict[str, Any]:
    """A complete, validated profile document (save it with ``artune.profile.save``)."""
    measurements = [dict(m) for m in measurements]
    fallback = "gloo" if dry_run else DEFAULT_BACKEND
    doc = {
        "schema_version": SCHEMA_VERSION,
        "artune_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "dry_run": dry_run,
        "fingerprint": fingerprint,
        "fingerprint_id": fingerprint_id(fingerprint),
        "rel_tol": rel_tol,
        "incumbent": {"backend": INCUMBENT, "margin": incumbent_margin},
        "tables": build_tables(measurements, rel_tol, fallback, incumbent_margin),
        "measurements": measurements,
        "skipped": [dict(s) for s in skipped],
        "validation": list(validation or []),
    }
    return validate(doc)
