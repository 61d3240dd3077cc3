"""What one ``artune tune`` run measures: sizes, dtypes, modes, backends, budgets, where to store.

Pure Python (no torch): the CLI builds a ``TuneConfig`` in the launching shell and again in every
rank from the same arguments, so all ranks agree on the plan without talking.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TuneConfig",
    "combinations",
    "parse_size",
    "parse_sizes",
    "parse_extra_backend",
    "storage_url",
    "sqlite_path",
    "DEFAULT_SIZES",
    "DEFAULT_SIZES_CPU",
    "QUICK_SIZES",
    "QUICK_SIZES_CPU",
]

#: Full tune on GPUs: 1 KB..256 MB, powers of two with midpoints (issue #2).
DEFAULT_SIZES = "1K:256M"
#: --quick on GPUs: the same span in steps of 4x.
QUICK_SIZES = "1K:256M:4"
#: CPU dry run (gloo over loopback is ~1000x slower than NVLink at large sizes).
DEFAULT_SIZES_CPU = "1K:1M"
QUICK_SIZES_CPU = "1K:256K:4"

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """'4K' -> 4096, '1.5M' -> 1572864, '256' -> 256 (binary units; B/KB/KiB accepted)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected a number with an optional unit, e.g. 4K, 1M")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 1:
        raise ValueError(f"bad size {text!r}: must be at least 1 byte")
    return n


def parse_sizes(text: str) -> list[int]:
    """Message sizes in bytes, ascending and unique.

    ``"1K:256M"``: powers of two from 1K to 256M with the midpoint (1.5x) between each pair;
    ``"1K:256M:4"``: 1K, 4K, 16K, ... (steps of 4x, no midpoints); ``"4K,64K,1M"``: a list.
    """
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"bad size range {text!r}: expected LO:HI or LO:HI:FACTOR")
        lo, hi = parse_size(parts[0]), parse_size(parts[1])
        if hi < lo:
            raise ValueError(f"bad size range {text!r}: the upper end ({hi} B) is below the "
                             f"lower ({lo} B); write the smaller size first, e.g. "
                             f"{parts[1]}:{parts[0]}")
        try:
            factor = int(parts[2]) if len(parts) == 3 else 2
        except ValueError:
            raise ValueError(f"bad size range {text!r}: the factor {parts[2]!r} is not a whole "
                             "number") from None
        if factor < 2:
            raise ValueError(f"bad size range {text!r}: the factor must be at least 2")
        out: list[int] = []
        s = lo
        while s <= hi:
            out.append(s)
            if factor == 2 and s * 3 % 2 == 0 and s * 3 // 2 <= hi:
                out.append(s * 3 // 2)
            s *= factor
        return sorted(set(out))
    sizes = sorted({parse_size(p) for p in text.split(",") if p.strip()})
    if not sizes:
        raise ValueError("no sizes given: use e.g. --sizes 1K:256M or --sizes 4K,64K,1M")
    return sizes


def combinations(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every parameter set of ``space`` (one empty set for an empty space)."""
    names = list(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]


def parse_extra_backend(text: str) -> tuple[str, str]:
    """'name=package.module:Class' -> (name, 'package.module:Class')."""
    name, sep, target = text.partition("=")
    if not sep or not name or ":" not in target:
        raise ValueError(
            f"bad --extra-backend {text!r}: expected NAME=MODULE:CLASS, e.g. "
            "mine=mypkg.allreduce:MyBackend"
        )
    return name.strip(), target.strip()


def storage_url(out: Path, storage: str | None) -> str:
    """The Optuna storage of a tune writing ``out``: ``--storage`` as given, else an SQLite file
    next to the profile (``<out>.optuna.db``)."""
    if storage:
        return storage
    return f"sqlite:///{out.resolve()}.optuna.db"


def sqlite_path(url: str) -> Path | None:
    """The file behind an ``sqlite:///`` URL (None for other storages)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


@dataclass
class TuneConfig:
    """Everything a rank needs to run its part of the tune (same on every rank)."""

    device: str = "cuda"  # "cuda" or "cpu" (gloo dry run)
    sizes: list[int] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])
    modes: list[str] = field(default_factory=lambda: ["graph", "eager"])
    backends: list[str] | None = None  # None: every registered candidate for the device
    #: SGLang's own all-reduce as a candidate: True adds it to ``backends``, False leaves it
    #: out, None (auto) measures it whenever the backends are the defaults (it is skipped, with
    #: the reason, where sglang is not importable)
    include_sglang: bool | None = None
    quick: bool = False
    resume: bool = False
    out: Path | None = None  # None: profiles/<fingerprint_id>.json
    storage: str | None = None  # Optuna storage URL; None: SQLite next to ``out``
    ranks_per_node: int | None = None  # None: LOCAL_WORLD_SIZE
    trials: int | None = None  # parameter sets tried per (backend, dtype, mode, size)
    reps: int | None = None  # timed repetitions per measurement
    warmup: int | None = None
    validate: bool = True
    rel_tol: float = 0.03
    #: how much faster than SGLang's own all-reduce another backend must measure to take a size
    #: from it (artune.autotune.table.INCUMBENT_MARGIN)
    incumbent_margin: float = 0.10
    seed: int = 0
    extra_backends: dict[str, str] = field(default_factory=dict)
    #: the fused-linear phase (artune.autotune.linear): row-parallel layer shapes (K, N) given
    #: with --linear-shapes, the model dimensions read from --linear-model (shapes at TP = the
    #: tune's ranks), and the row counts (empty: the phase's defaults)
    linear_shapes: list[tuple[int, int]] = field(default_factory=list)
    linear_model: dict[str, int] | None = None
    linear_rows: list[int] = field(default_factory=list)
    command: str = "artune tune"

    def __post_init__(self) -> None:
        if not self.sizes:
            self.sizes = parse_sizes(self.default_sizes())

    def default_sizes(self) -> str:
        if self.device == "cpu":
            return QUICK_SIZES_CPU if self.quick else DEFAULT_SIZES_CPU
        return QUICK_SIZES if self.quick else DEFAULT_SIZES

    @property
    def n_trials(self) -> int:
        """Budget of parameter sets per study (a backend without parameters gets one)."""
        return self.trials if self.trials is not None else (3 if self.quick else 6)

    @property
    def n_reps(self) -> int:
        return self.reps if self.reps is not None else (5 if self.quick else 9)

    @property
    def n_warmup(self) -> int:
        return self.warmup if self.warmup is not None else (1 if self.quick else 2)

    @property
    def prune_after(self) -> int:
        """Repetitions after which a parameter set that is clearly slower is pruned."""
        return max(1, min(3, self.n_reps // 2))

    @property
    def dry_run(self) -> bool:
        return self.device == "cpu"
