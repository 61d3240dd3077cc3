"""Every environment variable artune reads, in one place.

Only the launcher (``artune launch`` / ``artune tune``) writes to ``os.environ``; everything else
reads through the accessors below, so a reader can find every knob here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ENV", "get", "problems", "NO_MULTICAST_ENV"]


def _bool(value: str) -> bool:
    """Lenient truth of another tool's variable (NCCL_NVLS_ENABLE, ...): anything but
    empty / 0 / false / no / off."""
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _flag(value: str) -> bool:
    """An ``ARTUNE_`` switch: 1 / 0 (or true / false, yes / no, on / off); anything else is
    refused rather than guessed."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0 (or true / false, yes / no, on / off)")


def _seconds(value: str) -> float:
    """A positive, finite number of seconds."""
    v = float(value)
    if not 0 < v < float("inf"):
        raise ValueError("expected a positive number of seconds")
    return v


def _bytes(value: str) -> int:
    """A number of bytes, 0 included (0 turns the algorithm it caps off), with an optional
    binary unit as ``artune env`` prints it: 4194304, 4M, 512K."""
    from artune.autotune.config import parse_size

    if value.strip() == "0":
        return 0
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError("expected a number of bytes (0 or more), e.g. 4194304, 4M or "
                         "512K") from None


def _auto_flag(value: str) -> str:
    """``auto``, or an ``ARTUNE_`` switch (``_flag``) as ``on`` / ``off``."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return "on" if _flag(value) else "off"
    except ValueError:
        raise ValueError("expected auto, 1 or 0 (or true / false, yes / no, on / off)") from None


def _twoshot_pdl(value: str) -> str:
    """How NVRAR's two-shot lamport kernel takes PDL: off, wait or on."""
    v = value.strip().lower()
    if v not in ("off", "wait", "on"):
        raise ValueError("expected off, wait or on")
    return v


def _rows(value: str) -> int:
    """A whole number of rows from 1 to the fused linear layer's limit (64,
    ``artune.kernels.nvrar.LINEAR_MAX_ROWS``; tests/test_sglang_plugin.py checks they agree)."""
    n = int(value)
    if not 1 <= n <= 64:
        raise ValueError("expected a whole number from 1 to 64")
    return n


def _level(value: str) -> str:
    import logging

    v = value.strip().upper()
    if v not in logging.getLevelNamesMapping() or v == "NOTSET":
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return v


# name -> (default, parser, what it does)
ENV: dict[str, tuple[Any, Callable[[str], Any], str]] = {
    "ARTUNE_PROFILE": (
        None,
        str,
        "Profile JSON the SGLang plugin loads (set by `artune launch`). Outside SGLang, give "
        "the custom op a Router with artune.integration.ops.register_router.",
    ),
    "ARTUNE_ROUTE_LOG": (
        None,
        str,
        "Folder: each SGLang process with the plugin writes there which backend took each "
        "all-reduce (group, graph/eager, dtype, size, calls), after every CUDA-graph capture. "
        "Unset (default): nothing is counted.",
    ),
    "ARTUNE_GRAPH_TIMES": (
        None,
        str,
        "Folder: each SGLang process with the plugin (with or without a profile) times every "
        "CUDA-graph replay on the GPU and appends it there (artune/integration/graph_times.py; "
        "~30 bytes per replay, never trimmed: for measuring runs). Unset (default): nothing is "
        "timed.",
    ),
    "ARTUNE_STRICT": (
        True,
        _flag,
        "1: a profile that does not match the live topology is an error; 0: a warning, and SGLang "
        "keeps its own all-reduce selection.",
    ),
    "ARTUNE_TIMEOUT_S": (
        5.0,
        _seconds,
        "Bound on every wait inside artune's device kernels (NVRAR); a peer that does not answer "
        "within it raises an error naming the rank, the peer and the step.",
    ),
    "ARTUNE_COLLECTIVE_TIMEOUT_S": (
        120.0,
        _seconds,
        "Bound on artune's host-side collectives (the tune's, the SGLang plugin's set-up, a "
        "backend's collective close); a dead or stuck rank makes the others fail within it, "
        "naming the rank and the step.",
    ),
    "ARTUNE_NVRAR_ONESHOT_MAX_BYTES": (
        1 << 20,
        _bytes,
        "Largest message NVRAR's one-shot algorithm takes; sizes its receive slots "
        "(LL 4 x and lamport 2 x world size x this many bytes of NVSHMEM heap per rank; "
        "lamport 3 x with ARTUNE_NVRAR_CLEAR_AHEAD). On 2 GPUs, 4M let tuned NVRAR plans "
        "run 24-31 % faster at 1.5-4 MiB (docs/nvrar.md); set it for the tune and for "
        "serving alike.",
    ),
    "ARTUNE_NVRAR_LL_MAX_BYTES": (
        4 << 20,
        _bytes,
        "Largest message NVRAR's two-shot/hierarchical LL protocol takes (LL slots are twice "
        "the payload); larger messages use the signal protocol.",
    ),
    "ARTUNE_NVRAR_PDL": (
        True,
        _flag,
        "Launch NVRAR's peer-address kernels with programmatic dependent launch (sm_90+; each "
        "kernel first waits for the previous grid, only the launch overlaps); 0 turns it off. "
        "On 4x H100 it took 0.3-0.9 us off every best plan (benchmarks/nvrar_dev.py --pdl both). "
        "The two-shot lamport kernel follows ARTUNE_NVRAR_TWOSHOT_PDL instead.",
    ),
    "ARTUNE_NVRAR_TWOSHOT_PDL": (
        "wait",
        _twoshot_pdl,
        "PDL for NVRAR's two-shot lamport kernel, where ARTUNE_NVRAR_PDL is on. wait (default): "
        "it waits for the previous grid under PDL but lets the next one launch only when it "
        "ends; in a served model (TP=4, bs 64, 4x H200, 32nd session) 0.63 % less decode GPU "
        "time than off, and 0.2-0.3 us faster than off back to back at 256K-512K. on: as the "
        "other kernels (the next grid launches at once; in that model the fused add + RMSNorm "
        "after it then ended 3.6 us after it instead of 2.7, 1.3 % of the step). off: no PDL "
        "(docs/nvrar.md, 'PDL and the kernel after the two-shot').",
    ),
    "ARTUNE_NVRAR_WIDE": (
        False,
        _flag,
        "1: NVRAR's 16-bit lamport one-shot and two-shot move 16 bytes per thread (one 16-byte "
        "load or store where the 8-byte kernels issue two; artune/kernels/nvrar_wide.py) where "
        "a call allows it (n a multiple of 8, x and y 16-byte aligned, no fused norm, "
        "ARTUNE_NVRAR_CLEAR_AHEAD off). A local choice: ranks may differ.",
    ),
    "ARTUNE_FUSED_LINEAR": (
        "auto",
        _auto_flag,
        "Row-parallel linear layers and their all-reduce as one NVRAR kernel in the SGLang "
        "plugin (NvrarComm.linear_all_reduce; unquantized bf16/fp16, no bias, inside CUDA-graph "
        "capture, compiled or not). auto: where the profile's linear section measured "
        "it faster (artune tune --linear-model), with its parameters; 1: every such layer of at "
        "most ARTUNE_FUSED_LINEAR_ROWS rows, at the kernel's defaults; 0: never.",
    ),
    "ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED": (
        False,
        _flag,
        "Under torch.compile with inductor's coordinate-descent tuning (SGLang sets it), a "
        "row-parallel layer traced with one row stays SGLang's own by default: inductor makes "
        "its GEMM a reduction fused with the kernels around it. 1: fuse it with its all-reduce "
        "as at other row counts.",
    ),
    "ARTUNE_FUSED_LINEAR_ROWS": (
        16,
        _rows,
        "ARTUNE_FUSED_LINEAR=1: the most rows (tokens) a fused linear layer takes; more go to "
        "SGLang's GEMM and the routed all-reduce.",
    ),
    "ARTUNE_FORWARD_CHECK": (
        True,
        _flag,
        "1: the SGLang plugin reads every routed backend's fault record (a wait its device code "
        "gave up) before each model forward pass and stops the rank on one; 0: no check, a "
        "fault then surfaces at that backend's next eager call only (CUDA-graph replays go on "
        "with wrong sums meanwhile).",
    ),
    "ARTUNE_NVRAR_CLEAR_AHEAD": (
        False,
        _flag,
        "1: NVRAR's lamport slots get three parities (1.5x that region of the NVSHMEM heap) and "
        "each lamport call empties the slots the previous one read while it waits for its "
        "peers, instead of at its own end. Measured on 2x and 4x H100 (docs/nvrar.md): 0.10-0.23 "
        "us faster at 4K-128K on 2 GPUs, no faster on 4; every rank must set it alike (checked "
        "when the backend is built).",
    ),
    "ARTUNE_VALIDATE_CONTROLS": (
        False,
        _flag,
        "1: at each eager point the tune's validation pass also times the routed backend called "
        "directly and a twin of that call, in the same rounds: the router's own cost and what "
        "the timing reads between two identical calls (A/A), per point (router_gap_us, "
        "control_gap_us) and as medians. One or two more timings per eager point, in the same "
        "rounds as the candidates' re-times (which feed the tables), so those rounds differ "
        "from a run without (read on rank 0).",
    ),
    "ARTUNE_LOG_LEVEL": ("INFO", _level, "Log level of the 'artune' logger."),
    "ARTUNE_DISABLE": (False, _flag, "1: the SGLang plugin only logs that it is disabled."),
    "ARTUNE_SGLANG_WARM": (
        True,
        _flag,
        "`artune tune`: build SGLang's custom all-reduce JIT modules in the background while "
        "the ranks start (0: the ranks build them when they first need them).",
    ),
    "ARTUNE_PREIMPORT": (
        True,
        _flag,
        "`artune tune`: import the modules a backend's set-up needs that take seconds (SGLang's "
        "parallel_state) in a background thread while the ranks start, and wait for them before "
        "anything is timed (0: import them when the backend is set up).",
    ),
    "ARTUNE_LAUNCH_TIME": (
        None,
        float,
        "Set by `artune tune` for the ranks it starts (Unix time of the launch), so that the "
        "profile's tune time counts the start-up; not a user setting.",
    ),
    "ARTUNE_SGLANG_HOME": (
        None,
        str,
        "Tests only: where .ci/install-sglang puts the real sglang releases the plugin's CPU "
        "tests import (default ~/.cache/artune/sglang).",
    ),
}

# NVLink multicast (NVLS) must stay off on the machines artune is developed on (DESIGN.md):
# every process artune starts gets these.
NO_MULTICAST_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The parsed value of ``name`` (one of ``ENV``) in ``environ`` (default: this process's),
    or its default when unset or empty."""
    default, parse, _ = ENV[name]
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not valid: {exc}") from exc


def problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """What is wrong with the ``ARTUNE_`` variables set in ``environ`` (default: this
    process's), one line each; empty when every value parses."""
    out = []
    for name in ENV:
        try:
            get(name, environ)
        except ValueError as exc:
            out.append(str(exc))
    return out
