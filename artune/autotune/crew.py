"""What every rank of a tune executes: rank 0 sends a command, all ranks run it together.

Commands (dicts broadcast over the gloo ``cpu_group``):

- ``setup``: load, check and build the candidate backends (agreed on by all ranks);
- ``trial``: correctness gate (optional) then timing of one (backend, params, dtype, mode, size);
- ``router``: build the routed all-reduce (``artune.router.Router``) from the new tables;
- ``validate``: time the routed all-reduce and each candidate's best at one size;
- ``linear`` / ``linear-done``: time a row-parallel linear layer fused or not
  (``artune.autotune.linear``), then free its operands;
- ``stop``: leave the loop with an exit code.

Only rank 0 gets the gathered results back; the others return None. Each step that can fail on
one rank (a backend raising, an unsupported size) is agreed on before the next collective, so
ranks never diverge in the collectives they issue.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from artune import backends as _backends
from artune import envs
from artune.autotune import gate
from artune.autotune.comm import Comm
from artune.autotune.timing import Timer, calls_for, estimate_us, summarize
from artune.backends.base import Backend, GroupContext
from artune.log import logger
from artune.profile import ELEMENT_SIZE, Profile

if TYPE_CHECKING:
    import torch

    from artune.autotune.config import TuneConfig
    from artune.autotune.preimport import Preimport
    from artune.router import Router

#: Timed repetitions of one measurement stop short of this much wall time (at least MIN_REPS).
MEASURE_BUDGET_US = 1.5e6
MIN_REPS = 3

__all__ = ["Crew", "element_size", "actual_nbytes"]

def element_size(dtype: str) -> int:
    try:
        return ELEMENT_SIZE[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}; use one of {', '.join(ELEMENT_SIZE)}"
        ) from None


def actual_nbytes(nbytes: int, dtype: str) -> int:
    """The message size measured for a requested ``nbytes`` (whole elements, at least one)."""
    es = element_size(dtype)
    return max(1, nbytes // es) * es


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Crew:
    """One rank's executor; see the module docstring."""

    def __init__(self, cfg: TuneConfig, ctx: GroupContext, comm: Comm,
                 preimport: Preimport | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.comm = comm
        self.built: dict[str, Backend] = {}
        self.router: Router | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._pristine: dict[str, torch.Tensor] = {}
        self._last_trial = "none yet"
        #: wall seconds of each backend's build and prepare on this rank
        self.setup_seconds: dict[str, float] = {}
        #: wall seconds inside trials by step (gate, capture, timing) on this rank
        self.trial_seconds: dict[str, float] = {}
        #: slow imports running in the background since the rank started (waited for before
        #: anything is timed)
        self._preimport = preimport
        #: the fused-linear phase's operands: ((dtype, K, N), x, weight copies)
        self._linear_ops: tuple[tuple[str, int, int], Any, list[Any]] | None = None

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        """Ranks other than 0: run rank 0's commands until ``stop``; its exit code."""
        while True:
            cmd = self.comm.broadcast(None, "waiting for rank 0's next command")
            if cmd["op"] == "stop":
                return int(cmd.get("code", 0))
            self.execute(cmd)

    def send(self, cmd: dict[str, Any], decide: Callable[[float], bool] | None = None) -> Any:
        """Rank 0: broadcast ``cmd``, run it here too, return the gathered result."""
        self.comm.broadcast(cmd, f"sending {cmd['op']}")
        return self.execute(cmd, decide)

    def stop(self, code: int = 0) -> None:
        self.comm.broadcast({"op": "stop", "code": code}, "sending stop")

    def execute(self, cmd: dict[str, Any], decide: Callable[[float], bool] | None = None) -> Any:
        op = cmd["op"]
        if op == "setup":
            return self._setup(cmd["names"])
        self._join_preimport()  # (after the first set-up, a no-op)
        if op == "trial":
            return self._trial(cmd, decide)
        if op == "router":
            return self._router(cmd)
        if op == "validate":
            return self._validate(cmd)
        if op == "linear":
            from artune.autotune.linear import linear_trial

            return linear_trial(self, cmd, decide)
        if op == "linear-done":
            self._linear_ops = None
            return None
        raise ValueError(f"unknown tune command {op!r}")

    def close(self) -> None:
        if self.router is not None:
            self.router.detach()
        for b in self.built.values():
            try:
                b.close()
            except Exception:  # noqa: BLE001, S110 - closing must not mask the real error
                pass
        self.built.clear()

    @contextlib.contextmanager
    def _clock(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.trial_seconds[step] = (
                self.trial_seconds.get(step, 0.0) + time.perf_counter() - t0
            )

    # -- inputs --------------------------------------------------------------------------

    def input(self, dtype: str, nbytes: int) -> torch.Tensor:
        """This rank's random input of ``nbytes`` bytes of ``dtype`` (a view of one buffer per
        dtype, allocated once at the largest size; never zeros, different on every rank)."""
        import torch

        buf = self._inputs.get(dtype)
        if buf is None:
            numel = actual_nbytes(self.ctx.max_bytes, dtype) // element_size(dtype)
            seed = 1_000_003 * (self.cfg.seed + 1) + self.ctx.rank
            buf = gate.random_input(numel, getattr(torch, dtype), self.ctx.device, seed)
            self._inputs[dtype] = buf
            self._pristine[dtype] = buf.clone()
        return buf[: actual_nbytes(nbytes, dtype) // element_size(dtype)]

    def _restore_input(self, dtype: str, x: torch.Tensor) -> None:
        """Undo writes into the shared input buffer by an earlier trial (a faulty backend writing
        out of bounds), so that one bad candidate cannot fail every later one."""
        import torch

        ref = self._pristine[dtype][: x.numel()]
        if not torch.equal(x, ref):
            logger.warning(
                "rank %d: the tune's %s input buffer was modified after trial %s; restored it "
                "(a backend wrote outside its own buffers)", self.ctx.rank, dtype, self._last_trial
            )
            self._inputs[dtype].copy_(self._pristine[dtype])

    # -- setup ---------------------------------------------------------------------------

    def _why_not(self, name: str) -> str | None:
        try:
            cls = _backends.load(name)
        except Exception as exc:  # noqa: BLE001 - e.g. a backend not written or not installed
            target = _backends.BACKENDS.get(name, name)
            return f"cannot import {target}: {_exc_text(exc)}"
        try:
            return cls.available(self.ctx)
        except Exception as exc:  # noqa: BLE001
            return f"available() raised {_exc_text(exc)}"

    def _setup(self, names: list[str]) -> list[dict[str, Any]] | None:
        """Build every candidate that all ranks can build; rank 0 gets the skip records."""
        skipped: list[dict[str, Any]] = []

        def skip(name: str, reason: str) -> None:
            skipped.append(
                {"backend": name, "params": {}, "dtype": None, "mode": None, "nbytes": None,
                 "reason": reason}
            )

        for name in names:
            t0 = time.perf_counter()
            why = self._why_not(name)  # imports the backend's module (SGLang's: seconds)
            self.setup_seconds[f"check {name}"] = time.perf_counter() - t0
            errors = self.comm.gather_errors(why, f"setup {name}: available")
            bad = [(r, e) for r, e in enumerate(errors) if e is not None]
            if bad:
                r, e = bad[0]
                skip(name, e if len(bad) == self.comm.world_size else f"rank {r}: {e}")
                continue
            error = None
            t0 = time.perf_counter()
            try:
                self.built[name] = _backends.load(name).create(self.ctx)
            except Exception as exc:  # noqa: BLE001 - includes BackendUnavailable
                error = f"create() failed: {_exc_text(exc)}"
            errors = self.comm.gather_errors(error, f"setup {name}: create")
            bad = [(r, e) for r, e in enumerate(errors) if e is not None]
            if bad:
                b = self.built.pop(name, None)
                if b is not None:
                    b.close()
                skip(name, f"rank {bad[0][0]}: {bad[0][1]}")
            self.setup_seconds[f"build {name}"] = time.perf_counter() - t0
            for part, sec in getattr(self.built.get(name), "setup_parts", {}).items():
                self.setup_seconds[f"build {name}: {part}"] = sec
        self._prepare([n for n in names if n in self.built])
        self._join_preimport()
        return skipped if self.ctx.rank == 0 else None

    def _join_preimport(self) -> None:
        """Wait for the background imports (before anything is timed: an import holding the
        interpreter lock would slow host-bound eager calls)."""
        pre, self._preimport = self._preimport, None
        if pre is not None:
            timeout_s = float(envs.get("ARTUNE_COLLECTIVE_TIMEOUT_S"))
            self.setup_seconds["wait for background imports"] = pre.wait(timeout_s)
            self.setup_seconds["background imports (overlapped)"] = pre.seconds

    def _prepare(self, names: list[str]) -> None:
        """Let each backend of ``names`` build ahead what its default parameters use (NVRAR:
        those kernel variants, compiled in parallel across the node's ranks)."""
        cfg, ctx = self.cfg, self.ctx
        for name in names:
            backend = self.built[name]
            t0 = time.perf_counter()
            error, count = None, 0
            try:
                # Only the defaults (every study measures them first): building every variant
                # of the search space ahead cost more than building on first use (4x H100,
                # 2026-11-26: 28 s ahead for NVRAR's whole space, ~11 s lazily in a full tune).
                msgs = [
                    (dtype, nbytes,
                     type(backend).default_params_for(nbytes, ctx, element_size(dtype)))
                    for dtype in cfg.dtypes
                    for nbytes in sorted({actual_nbytes(s, dtype) for s in cfg.sizes})
                ]
                count = backend.prepare(msgs)
            except Exception as exc:  # noqa: BLE001 - lazy building still works
                error = _exc_text(exc)
            first = _first(self.comm.gather_errors(error, f"setup {name}: prepare"))
            if first is not None:
                logger.warning("%s: prepare() failed (%s); its first calls build lazily",
                               name, first)
            elif count and ctx.rank == 0:
                logger.info("%s: prepared %d item(s) on rank 0 in %.1f s", name, count,
                            time.perf_counter() - t0)
            self.setup_seconds[f"prepare {name}"] = time.perf_counter() - t0

    # -- one trial -----------------------------------------------------------------------

    def _trial(self, cmd: dict[str, Any], decide: Callable[[float], bool] | None) -> Any:
        backend = self.built[cmd["backend"]]
        params = dict(cmd["params"])
        x = self.input(cmd["dtype"], cmd["nbytes"])
        self._restore_input(cmd["dtype"], x)
        self._last_trial = (
            f"{cmd['backend']} {params} {cmd['dtype']} {cmd['mode']} {cmd['nbytes']} B"
        )
        try:
            ok = bool(backend.supports(x, params))
            error = None if ok else "supports() is False"
        except Exception as exc:  # noqa: BLE001
            error = f"supports() raised {_exc_text(exc)}"
        errors = self.comm.gather_errors(error, "trial: supports")
        first = _first(errors)
        if first is not None:
            return {"skip": f"unsupported: {first}"}
        if cmd.get("gate"):
            with self._clock("gate"), self._clock(f"gate: {cmd['backend']}"):  # total, part
                verdict = gate.check(backend, params, x, self.comm, self.ctx.group)
            if verdict is not None:
                return {"skip": verdict, "gate": True}
        return self._measure(
            lambda: backend.all_reduce(x, params),
            backend.capture,
            cmd,
            decide,
        )

    def _agree(
        self, error: str | None, values: list[float], what: str
    ) -> tuple[str | None, list[list[float]]]:
        """One collective in the common case: every rank's ``values`` (same length everywhere),
        or the first rank's error (then a second collective fetches the texts)."""
        rows = self.comm.gather_floats([0.0 if error is None else 1.0, *values], what)
        if any(r[0] for r in rows):
            return _first(self.comm.gather_errors(error, what)), []
        return None, [r[1:] for r in rows]

    def _estimate(self, fn: Callable[[], Any]) -> tuple[str | None, float]:
        """(the first rank's error, or None; the slowest rank's rough µs per call of ``fn``):
        one synchronised eager call first, errors agreed on every rank."""
        error, est = None, math.nan
        try:
            with self._clock("eager estimate"):
                est = estimate_us(fn, self.ctx.device)
        except Exception as exc:  # noqa: BLE001
            error = f"all_reduce raised {_exc_text(exc)}"
        first, rows = self._agree(error, [est], "timing: estimate")
        return first, (math.nan if first is not None else max(r[0] for r in rows))

    def _measure(
        self,
        fn: Callable[[], Any],
        capture: Callable[[], Any],
        cmd: dict[str, Any],
        decide: Callable[[float], bool] | None = None,
    ) -> dict[str, Any]:
        """Time ``fn`` on all ranks; rank 0 gets {"samples": per-rank lists, "calls": n} or
        {"skip": reason} or {"pruned": slowest median, "reps": n}.

        One synchronised eager call comes first (errors agreed, lazy set-up kept out of the
        capture). Calls per repetition: on GPUs the most ``calls_for`` allows at the size (graph
        pool, eager bytes per repetition; the same for every candidate); on CPU sized from that
        call, checked on one real repetition and raised once, by recapturing, when it was too
        short."""
        mode, nbytes = cmd["mode"], cmd["nbytes"]
        reps, warmup, prune_after = cmd["reps"], cmd["warmup"], cmd.get("prune_after", 0)
        device = self.ctx.device
        error: str | None = None
        first, slowest = self._estimate(fn)
        if first is not None:
            return {"skip": first}
        # On GPUs every candidate gets the same, largest calls per repetition at a size: a count
        # sized from a synchronised eager call would leave each backend a different share of the
        # replay launch in its per-call time (seen on 4x H200, 2026-11-26). CPU dry runs size it
        # from the estimate, to keep gloo runs short.
        est_us = 1e-3 if device.type == "cuda" else slowest
        calls = calls_for(est_us, nbytes, mode)
        timer = Timer(fn, mode=mode, device=device, calls=calls, capture=capture)
        try:
            for attempt in range(2):
                error, probe = None, math.nan
                try:
                    with self._clock(f"{mode} capture + warm-up"):
                        timer.prepare(warmup)
                        probe = timer.sample(1)[0]
                except Exception as exc:  # noqa: BLE001
                    error = f"{mode} timing raised {_exc_text(exc)}"
                first, rows = self._agree(error, [probe], f"timing: {mode} warm-up")
                if first is not None:
                    return {"skip": first}
                better = calls_for(max(r[0] for r in rows), nbytes, mode)
                if attempt == 1 or better < 2 * calls:
                    break
                timer.close()
                calls = better
                timer = Timer(fn, mode=mode, device=device, calls=calls, capture=capture)
            # A very slow candidate (a poor parameter set at a large size) gets fewer repetitions
            # rather than holding the tune for many seconds; it has lost anyway.
            rep_us = max(r[0] for r in rows) * calls
            if rep_us * reps > MEASURE_BUDGET_US and reps > MIN_REPS:
                reps = max(MIN_REPS, int(MEASURE_BUDGET_US // rep_us))
                prune_after = min(prune_after, reps - 1)
            samples: list[float] = []
            phases = [prune_after, reps - prune_after] if 0 < prune_after < reps else [reps]
            for i, n in enumerate(phases):
                error = None
                try:
                    with self._clock(f"{mode} timed repetitions"):
                        samples += timer.sample(n)
                except Exception as exc:  # noqa: BLE001
                    error = f"{mode} timing raised {_exc_text(exc)}"
                last = i == len(phases) - 1
                values = (samples + [math.nan] * reps)[:reps] if last else [
                    summarize(samples)[0] if samples else math.nan]
                first, rows = self._agree(error, values, f"timing: {mode}")
                if first is not None:
                    return {"skip": first}
                if not last:
                    slowest = max(r[0] for r in rows)
                    flag = 1.0 if (decide is not None and decide(slowest)) else 0.0
                    if self.comm.max(flag, "timing: prune decision"):
                        return {"pruned": slowest, "reps": n}
        finally:
            timer.close()
        return {"samples": rows, "calls": calls, "reps": reps}

    # -- validation ----------------------------------------------------------------------

    def _router(self, cmd: dict[str, Any]) -> None:
        from artune.router import Router

        profile = Profile({"tables": cmd["tables"], "dry_run": cmd["dry_run"]})
        fallback = profile.fallback()
        error = None
        if fallback not in self.built:
            try:
                self.built[fallback] = _backends.load(fallback).create(self.ctx)
            except Exception as exc:  # noqa: BLE001
                error = f"the fallback {fallback!r} cannot be built: {_exc_text(exc)}"
        first = _first(self.comm.gather_errors(error, "router: fallback"))
        if first is not None:
            raise RuntimeError(f"artune tune: validation pass: {first}")
        self.router = Router(profile, self.ctx, dict(self.built))

    def _validate(self, cmd: dict[str, Any]) -> list[dict[str, Any]] | None:
        assert self.router is not None, "send the 'router' command first"
        router = self.router
        x = self.input(cmd["dtype"], cmd["nbytes"])
        self._restore_input(cmd["dtype"], x)
        mode = cmd["mode"]
        fns, captures = [], []
        for entry in cmd["entries"]:
            if entry["backend"] is None:
                fns.append(lambda: router.all_reduce(x, mode))
                captures.append(router.capture)
            else:
                backend = self.built[entry["backend"]]
                fns.append(_bind(backend, x, dict(entry["params"])))
                captures.append(backend.capture)
        if mode == "eager":
            results = self._measure_alternating(fns, cmd)
        else:
            results = [self._measure(fn, cap, cmd) for fn, cap in zip(fns, captures, strict=True)]
        return results if self.ctx.rank == 0 else None

    def _measure_alternating(self, fns: list[Callable[[], Any]],
                             cmd: dict[str, Any]) -> list[dict[str, Any]]:
        """Eager timing of several callables in rounds, one repetition of each per round, with
        the same calls per repetition: eager latency is host-bound, and host speed drifts over
        seconds (clocks, other processes), which timing one callable after the other would
        charge to whichever ran in the slower second. Results as ``_measure``'s."""
        nbytes, reps, warmup = cmd["nbytes"], cmd["reps"], cmd["warmup"]
        device = self.ctx.device
        out: list[dict[str, Any]] = [{} for _ in fns]
        ests: dict[int, float] = {}
        for i, fn in enumerate(fns):
            first, slowest = self._estimate(fn)
            if first is not None:
                out[i] = {"skip": first}
            else:
                ests[i] = slowest
        if not ests:
            return out
        # As _measure: on GPUs the most calls per repetition; on CPU sized from the fastest.
        calls = calls_for(1e-3 if device.type == "cuda" else min(ests.values()), nbytes, "eager")
        timers: dict[int, Timer] = {}
        for i in ests:
            t = Timer(fns[i], mode="eager", device=device, calls=calls)
            error = None
            try:
                with self._clock("eager capture + warm-up"):
                    t.prepare(warmup)
            except Exception as exc:  # noqa: BLE001
                error = f"eager timing raised {_exc_text(exc)}"
            first, _ = self._agree(error, [], "timing: eager warm-up")
            if first is not None:
                out[i] = {"skip": first}
                t.close()
            else:
                timers[i] = t
        got: dict[int, list[list[float]]] = {i: [] for i in timers}  # per repetition, per rank
        # Each round starts with the next candidate, and the rounds are a multiple of the
        # candidates, so every candidate takes every position equally often (while none is
        # dropped): an effect of the position (the first runs right after the agreement
        # collective) is no bias between them.
        rounds = -(-reps // max(1, len(timers))) * max(1, len(timers))
        try:
            for rep in range(rounds):
                order = list(timers)
                k = rep % len(order) if order else 0
                for i in order[k:] + order[:k]:
                    error, value = None, math.nan
                    try:
                        with self._clock("eager timed repetitions"):
                            value = timers[i].sample(1)[0]
                    except Exception as exc:  # noqa: BLE001
                        error = f"eager timing raised {_exc_text(exc)}"
                    # Agreed after every repetition: a rank whose call raised must not leave
                    # its peers waiting inside the next candidate's collective; only the
                    # candidate that failed is dropped.
                    first, rows = self._agree(error, [value], "timing: eager")
                    if first is not None:
                        out[i] = {"skip": first}
                        timers.pop(i).close()
                    else:
                        got[i].append([r[0] for r in rows])
        finally:
            for t in timers.values():
                t.close()
        for i in timers:
            out[i] = {"samples": [list(r) for r in zip(*got[i], strict=True)], "calls": calls,
                      "reps": len(got[i])}
        return out


def _bind(backend: Backend, x: torch.Tensor, params: dict[str, Any]) -> Callable[[], Any]:
    return lambda: backend.all_reduce(x, params)


def _first(errors: list[str | None]) -> str | None:
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not bad:
        return None
    r, e = bad[0]
    return e if len(bad) == len(errors) else f"rank {r}: {e}"


def record_from(
    res: dict[str, Any], *, backend: str, params: dict[str, Any], dtype: str, mode: str,
    nbytes: int, reps: int,
) -> dict[str, Any]:
    """The measurement record (issue #2's interface) from ``_measure``'s gathered samples."""
    stats = [summarize([v for v in row if not math.isnan(v)]) for row in res["samples"]]
    medians = [s[0] for s in stats]
    slow = max(range(len(medians)), key=lambda r: medians[r])
    return {
        "backend": backend,
        "params": params,
        "dtype": dtype,
        "mode": mode,
        "nbytes": nbytes,
        "rank_medians_us": medians,
        "latency_us": medians[slow],
        "spread_us": stats[slow][1],
        "reps": res.get("reps", reps),
        "calls_per_rep": res["calls"],
    }
