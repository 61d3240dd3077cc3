"""The dispatch table ("profile"): versioned JSON, load / validate / save, and ``select()``.

A profile is made by ``artune tune`` on one machine and says, per dtype and per mode
(``graph``: inside CUDA-graph capture/replay, ``eager``: otherwise), which backend is fastest for
each range of message sizes, with the evidence. Layout (schema_version 1)::

    {
      "schema_version": 1,
      "artune_version": "0.1.0",
      "created": "2026-11-26T04:10:00Z",
      "command": "artune tune --nproc-per-node 4",
      "dry_run": false,                       # true for `artune tune --device cpu`
      "fingerprint": {...},                   # artune.topology.fingerprint()
      "fingerprint_id": "9f2c...",            # short hash of the fingerprint's topology part
      "tables": {"bfloat16": {"graph": [      # sorted, non-overlapping, inclusive byte ranges
          {"min_bytes": 1, "max_bytes": 6144, "backend": "nvrar", "params": {...},
           "points": [{"nbytes": 4096, "latency_us": 4.1, "nccl_us": 14.8}], ...}]}},
      "measurements": [...],                  # every timed (backend, params, dtype, mode, size)
      "skipped": [...],                       # every candidate excluded, with the reason
      "validation": [...],                    # the routed all-reduce re-timed against all
      "linear": [                             # optional (`artune tune --linear-model`): per
          {"dtype": "bfloat16", "k": 1024,    # row-parallel layer shape (K inputs per rank, N
           "n": 4096, "ranges": [             # outputs), the row counts whose GEMM and
              {"min_rows": 1, "max_rows": 16, # all-reduce run as one NVRAR kernel
               "fused": true, "params": {...}}, ...],
           "points": [...]}]
    }

``select`` is pure and needs no CUDA: ``select(profile, nbytes, dtype, mode) -> Choice``;
so is ``select_linear(profile, dtype, k, n, rows)``: the fused kernel's parameters, or None.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artune.backends import BACKENDS, DEFAULT_BACKEND
from artune.log import log_once

__all__ = [
    "SCHEMA_VERSION",
    "MODES",
    "DTYPES",
    "Choice",
    "Profile",
    "ProfileError",
    "dtype_name",
    "load",
    "save",
    "select",
    "select_linear",
]

SCHEMA_VERSION = 1
MODES = ("graph", "eager")
DTYPES = ("bfloat16", "float16", "float32")
#: bytes per element of each of DTYPES
ELEMENT_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


#: What a profile without SGLang's own all-reduce needs (``Profile.sglang_unmeasured``).
SGLANG_REMEDY = ("`artune tune --include-sglang` on this machine, where sglang imports on every "
                 "rank, measures it")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Choice:
    """What ``select`` returns: the backend to call and its parameters.

    ``covered`` is False when the profile had nothing for this call and the default backend was
    chosen as a fallback (the SGLang plugin then hands the call to SGLang's own selection).
    """

    backend: str
    params: Mapping[str, Any] = field(default_factory=dict)
    covered: bool = True


@dataclass
class Profile:
    """A loaded, validated profile. ``data`` is the JSON document; ``path`` where it came from."""

    data: dict[str, Any]
    path: Path | None = None
    _index: dict[tuple[str, str], tuple[list[int], list[int], list[Choice]]] = field(
        default_factory=dict, repr=False
    )
    #: (dtype, k, n) -> row -> the fused kernel's parameters (rows it runs fused only)
    _linear: dict[tuple[str, int, int], dict[int, dict[str, Any]]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        self._build_index()

    def _build_index(self) -> None:
        self._index.clear()
        for dtype, modes in self.data.get("tables", {}).items():
            for mode, ranges in modes.items():
                if not ranges:
                    continue
                los = [r["min_bytes"] for r in ranges]
                his = [r["max_bytes"] for r in ranges]
                choices = [Choice(r["backend"], dict(r.get("params") or {})) for r in ranges]
                self._index[(dtype, mode)] = (los, his, choices)
        self._linear.clear()
        for e in self.data.get("linear") or []:
            rows = {r: dict(g["params"]) for g in e["ranges"] if g["fused"]
                    for r in range(g["min_rows"], g["max_rows"] + 1)}
            if rows:
                self._linear[(e["dtype"], e["k"], e["n"])] = rows

    # Convenience accessors used by the CLI, the plugin and the tests.
    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.data.get("fingerprint") or {})

    @property
    def fingerprint_id(self) -> str:
        return str(self.data.get("fingerprint_id", ""))

    @property
    def dry_run(self) -> bool:
        return bool(self.data.get("dry_run", False))

    @property
    def tables(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        tables: dict[str, dict[str, list[dict[str, Any]]]] = self.data.get("tables", {})
        return tables

    def backends_used(self) -> list[str]:
        """Backends any range of the profile routes to, in first-use order."""
        seen: dict[str, None] = {}
        for modes in self.tables.values():
            for ranges in modes.values():
                for r in ranges:
                    seen.setdefault(r["backend"], None)
        return list(seen)

    def max_bytes(self) -> int:
        """Largest message size any range covers, or the fused linear kernel sends (its rows x
        N outputs, all-reduced in one message): buffers are sized from it."""
        tables = [r["max_bytes"] for m in self.tables.values() for rs in m.values() for r in rs]
        fused = [rows * n * ELEMENT_SIZE[dtype] for (dtype, _, n), by_rows in self._linear.items()
                 for rows in by_rows]
        return max(tables + fused, default=0)

    def fallback(self) -> str:
        return "gloo" if self.dry_run else DEFAULT_BACKEND

    def fuses_linear(self) -> bool:
        """Whether some row-parallel layer shape runs fused at some row count."""
        return bool(self._linear)

    def linear_shapes(self) -> set[tuple[str, int, int]]:
        """(dtype, K, N) of every layer shape the linear section measured."""
        return {(e["dtype"], e["k"], e["n"]) for e in self.data.get("linear") or []}

    def sglang_unmeasured(self) -> str | None:
        """Why the tune did not measure SGLang's own all-reduce (the candidate that keeps a
        served model from being slower than SGLang's default), or None when it did, or for a
        CPU dry run (which never can)."""
        if self.dry_run or "sglang" in self.backends_used() or any(
                m.get("backend") == "sglang" for m in self.data.get("measurements") or []):
            return None
        reasons = [s.get("reason") or "no reason recorded"
                   for s in self.data.get("skipped") or [] if s.get("backend") == "sglang"]
        if reasons:
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            return f"the tune skipped it: {reasons[0]}{more}"
        return "it was not among the tune's candidates"


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16 or 'torch.bfloat16' or 'bfloat16' (cached: hot path)."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        name = str(dtype).removeprefix("torch.")
        try:
            _DTYPE_NAMES[dtype] = name
        except TypeError:
            pass
        return name


def select(profile: Profile, nbytes: int, dtype: Any, mode: str) -> Choice:
    """The backend the profile chose for an all-reduce of ``nbytes`` bytes of ``dtype``.

    ``mode`` is "graph" (inside CUDA-graph capture) or "eager". Sizes outside the table, or a
    dtype/mode the profile lacks, go to the profile's fallback (NCCL; gloo for dry runs) with a
    one-time log line and ``covered=False``. Pure: same inputs, same answer, on every rank.
    """
    name = dtype_name(dtype)
    entry = profile._index.get((name, mode))
    if entry is not None:
        los, his, choices = entry
        i = bisect_right(los, nbytes) - 1
        if i >= 0 and nbytes <= his[i]:
            return choices[i]
        log_once(
            f"select:size:{name}:{mode}",
            f"profile has no range for {nbytes} B of {name} ({mode}); sizes outside "
            f"{los[0]}..{his[-1]} B fall back ({profile.fallback()}, or the caller's own choice)",
        )
    else:
        log_once(
            f"select:missing:{name}:{mode}",
            f"profile has no {name}/{mode} table; it falls back ({profile.fallback()}, or the "
            "caller's own choice)",
        )
    return Choice(profile.fallback(), {}, covered=False)


def select_linear(profile: Profile, dtype: Any, k: int, n: int, rows: int) -> dict[str, Any] | None:
    """The fused kernel's parameters (``NvrarComm.linear_all_reduce``'s block_n, block_k, warps,
    stages, and prefetch where the profile sets it) for a row-parallel linear layer of ``k``
    inputs per rank and ``n`` outputs called on ``rows`` rows of ``dtype``, when the profile
    measured the fused kernel faster there; None (the GEMM, then the routed all-reduce)
    otherwise. Pure, as ``select``."""
    params = profile._linear.get((dtype_name(dtype), k, n))
    return None if params is None else params.get(rows)


# ---------------------------------------------------------------------------------------------
# Validation


#: The fused kernel's parameters a ``linear`` range must give (whole numbers; ``prefetch``, 0
#: or 1, is optional: 0 where absent), and the most rows it takes
#: (``artune.kernels.nvrar.LINEAR_MAX_ROWS``; tests/test_tune_linear.py checks).
LINEAR_PARAMS = ("block_n", "block_k", "warps", "stages")
LINEAR_MAX_ROWS = 64
#: ... and the deepest K loop it takes (``artune.kernels.nvrar.LINEAR_STAGES``).
LINEAR_MAX_STAGES = 8


def _validate_linear(entries: Any, path: Path | str | None) -> None:
    if not isinstance(entries, list):
        raise _fail(path, "linear must be a list of layer shapes")
    seen = set()
    for i, e in enumerate(entries):
        where = f"linear[{i}]"
        if not isinstance(e, dict):
            raise _fail(path, f"{where} must be an object")
        dtype, k, n = e.get("dtype"), e.get("k"), e.get("n")
        if dtype not in DTYPES:
            raise _fail(path, f"{where}: dtype {dtype!r} is not one of {DTYPES}")
        if not (_whole(k) and _whole(n)):
            raise _fail(path, f"{where}: k and n must be positive whole numbers, got {k!r}, {n!r}")
        if (dtype, k, n) in seen:
            raise _fail(path, f"{where}: {dtype} {k}x{n} is listed twice")
        seen.add((dtype, k, n))
        ranges = e.get("ranges")
        if not isinstance(ranges, list) or not all(isinstance(g, dict) for g in ranges):
            raise _fail(path, f"{where}.ranges must be a list of objects")
        prev = 0
        for j, g in enumerate(ranges):
            lo, hi = g.get("min_rows"), g.get("max_rows")
            if not (_whole(lo) and _whole(hi) and prev < lo <= hi <= LINEAR_MAX_ROWS):
                raise _fail(path, f"{where}.ranges[{j}]: rows {lo!r}..{hi!r} must be whole "
                                  f"numbers, ascending, after {prev}, at most "
                                  f"{LINEAR_MAX_ROWS}")
            if not isinstance(g.get("fused"), bool):
                raise _fail(path, f"{where}.ranges[{j}]: fused must be true or false")
            params = g.get("params", {})
            if g["fused"] and not (isinstance(params, dict) and all(
                    _whole(params.get(p)) for p in LINEAR_PARAMS)):
                raise _fail(path, f"{where}.ranges[{j}]: a fused range needs params "
                                  f"{', '.join(LINEAR_PARAMS)} (positive whole numbers)")
            if g["fused"] and params["stages"] > LINEAR_MAX_STAGES:
                raise _fail(path, f"{where}.ranges[{j}]: params.stages must be 1.."
                                  f"{LINEAR_MAX_STAGES}, got {params['stages']}")
            prefetch = params.get("prefetch", 0) if isinstance(params, dict) else 0
            if g["fused"] and not (type(prefetch) is int and prefetch in (0, 1)):
                raise _fail(path, f"{where}.ranges[{j}]: params.prefetch must be 0 or 1 "
                                  f"(optional), got {prefetch!r}")
            prev = hi


def _whole(v: Any) -> bool:
    """A positive whole number (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _fail(path: Path | str | None, msg: str) -> ProfileError:
    where = f"profile {path}" if path else "profile"
    return ProfileError(f"{where}: {msg}")


def validate(data: Any, path: Path | str | None = None) -> dict[str, Any]:
    """Check a decoded profile document; returns it, or raises ProfileError naming the problem."""
    if not isinstance(data, dict):
        raise _fail(path, f"top level must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        if "schema_version" not in data:
            raise _fail(path, "has no schema_version: not an artune profile; make one with "
                              "`artune tune`")
        if not isinstance(version, int) or isinstance(version, bool):
            raise _fail(path, f"schema_version {version!r} is not a whole number (this artune "
                              f"reads {SCHEMA_VERSION}): a hand-edited or foreign file? re-run "
                              "`artune tune` to make a new profile")
        if version > SCHEMA_VERSION:
            fix = "it was made by a newer artune: upgrade artune to read it"
        else:
            fix = "re-run `artune tune` to make a new profile"
        raise _fail(path, f"schema_version {version!r} is not supported by this artune (it "
                          f"reads {SCHEMA_VERSION}); {fix}")
    for key in ("fingerprint", "tables"):
        if not isinstance(data.get(key), dict):
            raise _fail(path, f"missing or invalid field {key!r}")
    for dtype, modes in data["tables"].items():
        if not isinstance(modes, dict):
            raise _fail(path, f"tables.{dtype} must map modes to ranges")
        for mode, ranges in modes.items():
            where = f"tables.{dtype}.{mode}"
            if mode not in MODES:
                raise _fail(path, f"{where}: unknown mode {mode!r} (expected one of {MODES})")
            if not isinstance(ranges, list):
                raise _fail(path, f"{where} must be a list of ranges")
            prev_hi = 0
            for i, r in enumerate(ranges):
                if not isinstance(r, dict):
                    raise _fail(path, f"{where}[{i}] must be an object")
                lo, hi, backend = r.get("min_bytes"), r.get("max_bytes"), r.get("backend")
                if not isinstance(lo, int) or not isinstance(hi, int) or lo < 0 or hi < lo:
                    raise _fail(path, f"{where}[{i}]: bad byte range {lo!r}..{hi!r}")
                if lo <= prev_hi and i > 0:
                    raise _fail(
                        path,
                        f"{where}[{i}]: range {lo}..{hi} overlaps or is out of order with the "
                        f"previous one (ending at {prev_hi}); ranges must be sorted and disjoint",
                    )
                if backend not in BACKENDS:  # the registry, with any --extra-backend
                    raise _fail(
                        path,
                        f"{where}[{i}]: unknown backend {backend!r}; known: "
                        f"{', '.join(sorted(BACKENDS))} (a backend a tune added with "
                        "--extra-backend must be registered where its profile is loaded)",
                    )
                if not isinstance(r.get("params", {}), dict):
                    raise _fail(path, f"{where}[{i}]: params must be an object")
                points = r.get("points", [])
                if not isinstance(points, list) or not all(isinstance(q, dict) for q in points):
                    raise _fail(path, f"{where}[{i}]: points must be a list of objects")
                prev_hi = hi
    if "linear" in data:
        _validate_linear(data["linear"], path)
    for key in ("validation", "measurements", "skipped"):  # optional evidence, read by show
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            raise _fail(path, f"{key} must be a list of objects")
    return data


def load(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile; ProfileError (with the path and the reason) otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(p, "is not a text file (not UTF-8): not a profile") from None
    except FileNotFoundError:
        raise _fail(p, "file not found; make one with `artune tune --out PATH`") from None
    except OSError as exc:
        raise _fail(p, f"cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text.rstrip()) - 1 or exc.msg.startswith("Unterminated")
        hint = " (the file looks truncated)" if truncated else ""
        # (json's "Unterminated string starting at" already ends in "at")
        raise _fail(p, f"is not valid JSON{hint}: {exc.msg.removesuffix(' at')} at line "
                       f"{exc.lineno}, column {exc.colno}") from None
    return Profile(validate(data, p), p)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (setting it, even
    back at once, races with threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(data: Mapping[str, Any] | Profile, path: str | os.PathLike[str]) -> Path:
    """Write a profile atomically (temp file in the same folder, fsync, rename): a reader sees
    the old file or the new one, never half of one."""
    doc = data.data if isinstance(data, Profile) else dict(data)
    p = Path(path)
    validate(doc, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        # mkstemp makes the file private (0600); a profile is read by whoever serves with it
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(doc), f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p
