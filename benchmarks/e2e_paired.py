"""The paired mode of ``sglang_e2e.py``: two or more engines side by side on the same GPUs,
one rep from each in turn, every pair of engines compared round by round (see that file's
docstring for why and how to run it); and ``batch_row``, the per-batch-size numbers both modes
report.

The parent side lives here (the worker processes, the schedule of rounds, the statistics);
the worker's command loop (``_serve``) stays beside the engine code in ``sglang_e2e.py``.
Run on its own, it reads results files of that mode together:

    python benchmarks/e2e_paired.py benchmarks/results/sglang_e2e_*paired*.json [--plot F.png]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def batch_row(bs: int, reps: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """A batch size's numbers from its reps: each rep's step is (t_N - median t_1) / (N - 1)
    (written into the rep), then their median, spread and the throughputs; and over the reps
    that have one (``attach_graph_times``), the median of their decode-graph GPU times."""
    t1_med = statistics.median(r["t1_s"] for r in reps)
    for r in reps:
        r["step_ms"] = (r["tn_s"] - t1_med) / (n - 1) * 1e3
    steps = [r["step_ms"] for r in reps]
    med = statistics.median(steps)
    tn_med = statistics.median(r["tn_s"] for r in reps)
    row = {
        "batch": bs, "reps": reps, "step_ms": med, "spread_ms": max(steps) - min(steps),
        "decode_tok_s": bs / (med / 1e3), "e2e_tok_s": bs * n / tn_med,
    }
    graph = [r["graph_ms"] for r in reps if "graph_ms" in r]
    if graph:  # graph_reps < len(reps): some reps had no usable GPU times (graph_missing)
        row["graph_ms"] = statistics.median(graph)
        row["graph_spread_ms"] = max(graph) - min(graph)
        row["graph_reps"] = len(graph)
    return row


def graph_folder(model_dir: str | os.PathLike[str], config: str) -> str:
    """Where a config's engine writes its graph replays' GPU times (``ARTUNE_GRAPH_TIMES``)."""
    return os.path.join(model_dir, "graph-times", config)


def graph_times_lag_s() -> float:
    """Seconds to let the engines' graph-time writers catch up before reading: two of their
    periods and a margin."""
    from artune.integration.graph_times import PERIOD_S

    return 2 * PERIOD_S + 0.1


def attach_graph_times(reps: list[dict[str, Any]], folder: str | None,
                       processes: int | None = None,
                       min_replays: int | None = None) -> list[dict[str, Any]]:
    """Into each rep with a ``win_ns`` window: the decode graphs' GPU time of its N-token call
    (``artune.integration.graph_times.window_stats``: ``graph_ms`` and the rest), read from
    ``folder``, where ``processes`` TP ranks (when given) each replayed at least
    ``min_replays`` times in the window; otherwise the rep gets ``graph_missing``, the reason
    (no replays: graphs off or the plugin not loaded; a rank missing or cut short: its writer
    behind or stopped). Returns ``reps``. Each rep is judged once: a fresh copy of the raw reps
    each time (``run_paired``'s ``collect`` copies them)."""
    if not folder or not os.path.isdir(folder):
        return reps
    from artune.integration.graph_times import read_folder, window_stats

    series = read_folder(folder)
    for r in reps:
        if "win_ns" not in r:
            continue
        st = window_stats(series, *r["win_ns"])
        if st is None:
            r["graph_missing"] = "no graph replays in the window"
        elif processes is not None and st["processes"] != processes:
            r["graph_missing"] = f"{st['processes']} of {processes} ranks replayed"
        elif min_replays is not None and st["replays"] < min_replays:
            r["graph_missing"] = f"{st['replays']} replays, fewer than {min_replays}"
        else:
            r.update(st)
    return reps


def echo_log(stream: Any, notes: list[str]) -> None:
    """Echo a worker's output (its engine's included) line by line, keeping the first 100 of
    the artune plugin's log lines in ``notes``; returns at the end of the stream."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        if "[artune" in line and len(notes) < 100:
            notes.append(line.rstrip())


def spawn_worker(cmd: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    """Start a worker as the leader of a process group of its own, so that ``kill_worker``
    reaches everything it started (SGLang's schedulers and detokenizer, inductor's compile
    workers), not only the worker: a straggler left on the GPUs would slow every engine timed
    after it."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True,
                            **kw)


def kill_worker(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the worker's whole process group (what is left of it) and reap the worker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Served:
    """One config's engine in its own worker process, timing what the parent asks (paired
    mode). Commands go down the worker's stdin; answers come back as JSON lines on a pipe of
    their own, since the worker's stdout carries the engine's logs."""

    def __init__(self, config: str, cmd: list[str], env: dict[str, str]) -> None:
        r, w = os.pipe()
        self.config = config
        self.graph_times = env.get("ARTUNE_GRAPH_TIMES")  # attach_graph_times reads it
        self.notes: list[str] = []
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = spawn_worker([*cmd, "--result-fd", str(w)], env, stdin=subprocess.PIPE,
                                 pass_fds=(w,))
        os.close(w)
        threading.Thread(target=echo_log, args=(self.proc.stdout, self.notes),
                         daemon=True).start()
        threading.Thread(target=self._pump_answers, args=(r,), daemon=True).start()

    def _pump_answers(self, fd: int) -> None:
        with os.fdopen(fd) as answers:
            for line in answers:
                try:
                    self.answers.put(json.loads(line))
                except ValueError:
                    self.answers.put({"error": f"unreadable answer {line[:200]!r}"})
        self.answers.put(None)  # the worker closed its end: it has ended

    def ask(self, command: str | None, timeout: float) -> dict[str, Any]:
        """Send ``command`` (None: wait for the engine start's answer) and return the answer;
        TimeoutError or RuntimeError naming the config and the command otherwise."""
        what = command or "the engine start"
        if command is not None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            except OSError as exc:
                raise RuntimeError(f"{self.config}: worker gone before {what!r} "
                                   f"(exit {self.proc.poll()})") from exc
        try:
            answer = self.answers.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError(f"{self.config}: no answer to {what!r} within {timeout:.0f} s"
                               ) from None
        if answer is None:
            raise RuntimeError(f"{self.config}: the worker ended (exit {self.proc.wait()}) "
                               f"before answering {what!r}")
        if "error" in answer:
            raise RuntimeError(f"{self.config}: {what}: {answer['error']}")
        return answer

    def close(self, timeout: float = 90.0) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"[e2e] {self.config}: worker did not stop within {timeout:.0f} s: killed",
                  flush=True)
        kill_worker(self.proc)  # also whatever it left behind when it did stop


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``xs``: the order statistics
    [x_(k), x_(n+1-k)] with the largest k whose coverage 1 - 2 P(Bin(n, 1/2) <= k - 1) is at
    least ``level``; k = 1 (the full range) when none is. Returns (low, high, coverage)."""
    xs = sorted(xs)
    n = len(xs)
    if not n:
        raise ValueError("no values")

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def verdict(low: float, high: float, band: float) -> str:
    """What an interval of B-vs-A percentages shows against a ±band (%)."""
    if -band <= low and high <= band:
        return f"within ±{band:g}%"
    if low > band:
        return f"slower by more than {band:g}%"
    if high < -band:
        return f"faster by more than {band:g}%"
    if high <= band:
        return f"no slower than +{band:g}%"
    if low >= -band:
        return f"no faster than -{band:g}%"
    return f"not resolved (interval wider than ±{band:g}% both ways)"


def _judged(pct: list[float], band: float, level: float) -> tuple[float, float, float, str]:
    """``median_ci`` of per-round percentages and its ``verdict`` against ±band: (low, high,
    coverage, verdict), "not resolved" when the rounds are too few for the level."""
    low, high, cover = median_ci(pct, level)
    says = (verdict(low, high, band) if cover >= level else
            f"not resolved ({len(pct)} rounds: too few for a {level:.0%} interval)")
    return low, high, cover, says


def paired_stats(base_row: dict[str, Any], test_row: dict[str, Any], band: float,
                 base_first: list[bool], level: float = 0.95) -> dict[str, Any]:
    """Round by round, the test config's step against the base's (rep r of each, taken
    seconds apart): the percentages, their median, its interval and what that shows against
    ±band; and the medians of the rounds where the base's rep came first and of those where
    the test's did (``base_first``, per round: an order effect shows as a gap)."""
    pct = [(rt["step_ms"] / rb["step_ms"] - 1) * 100
           for rb, rt in zip(base_row["reps"], test_row["reps"], strict=True)]
    low, high, cover, says = _judged(pct, band, level)
    first = [x for x, bf in zip(pct, base_first, strict=False) if bf]
    second = [x for x, bf in zip(pct, base_first, strict=False) if not bf]
    out = {"rounds": len(pct), "pct": pct, "median_pct": statistics.median(pct),
           "interval_pct": [low, high], "coverage": cover, "verdict": says,
           "base_first_median_pct": statistics.median(first) if first else None,
           "test_first_median_pct": statistics.median(second) if second else None}
    # the same rounds, the decode graphs' GPU time instead of the wall-clock step: the rounds
    # where both reps have one
    g = [(rt["graph_ms"] / rb["graph_ms"] - 1) * 100
         for rb, rt in zip(base_row["reps"], test_row["reps"], strict=True)
         if "graph_ms" in rb and "graph_ms" in rt]
    if g:
        g_low, g_high, g_cover, g_says = _judged(g, band, level)
        if len(g) < len(pct):
            g_says += f" ({len(g)} of {len(pct)} rounds with GPU times)"
        out["graph"] = {"rounds": len(g), "pct": g, "median_pct": statistics.median(g),
                        "interval_pct": [g_low, g_high], "coverage": g_cover,
                        "verdict": g_says}
    return out


def round_order(names: tuple[str, ...] | list[str], r: int) -> list[str]:
    """The engines' order in round r: rounds 2k and 2k+1 take the rotation by k and its
    reverse, so over each two rounds every engine goes before every other once (two engines:
    A B, B A, B A, A B, ...), and over 2N rounds each takes each place equally often."""
    k = (r // 2) % len(names)
    order = [*names[k:], *names[:k]]
    return order if r % 2 == 0 else order[::-1]


def _alternating(names: tuple[str, ...] | list[str], r: int) -> list[str]:
    """The order of the first two-engine files (before ``round_order``): A B, B A, A B, ..."""
    return list(names) if r % 2 == 0 else list(names)[::-1]


def pairs_stats(names: tuple[str, ...] | list[str], rows: dict[str, dict[int, dict[str, Any]]],
                artune: frozenset[str] | set[str], band: float,
                order_of: Callable[[Any, int], list[str]] = round_order,
                ) -> list[dict[str, Any]]:
    """Every pair of engines, oriented (``orient``), per batch size both have: the rounds all
    engines finished (``rows[name][bs]["reps"]``, equally many), compared round by round
    (``order_of(names, r)``: the order the engines ran in round r)."""
    out = []
    for i, j in itertools.combinations(range(len(names)), 2):
        base, test = orient(names[i], names[j], artune)
        by_batch = {}
        for bs in sorted(set(rows[base]) & set(rows[test])):
            k = min(len(rows[base][bs]["reps"]), len(rows[test][bs]["reps"]))
            if not k:
                continue
            order = [order_of(names, r) for r in range(k)]
            by_batch[str(bs)] = paired_stats(
                {"reps": rows[base][bs]["reps"][:k]}, {"reps": rows[test][bs]["reps"][:k]},
                band, [o.index(base) < o.index(test) for o in order])
        out.append({"first": names[i], "base": base, "test": test, "by_batch": by_batch})
    return out


def orient(a: str, b: str, artune: frozenset[str] | set[str]) -> tuple[str, str]:
    """(base, test) of two engines started in the order a, b: the artune config is the one
    measured against the other whichever started first, so runs in both orders read alike;
    otherwise b against a (``default_again`` against ``default``)."""
    return (b, a) if a in artune and b not in artune else (a, b)


#: Seconds a worker gets to answer one warm-up or rep (one takes about a second) and the check.
REP_ANSWER_S = 60.0
CHECK_ANSWER_S = 120.0
#: Seconds of a paired run's budget kept for stopping the engines and writing the results.
PAIRED_RESERVE_S = 45.0
#: Seconds per engine kept for the logprob check after the rounds (a few generated tokens per
#: prompt; seconds): with a budget, a round starts only if it and the checks still fit.
CHECK_RESERVE_S = 15.0


def run_paired(args: argparse.Namespace, names: tuple[str, ...],
               spawn: Callable[[str], Served], deadline: float | None,
               save: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
               artune: frozenset[str] | set[str] = frozenset(),
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """All engines up side by side (two or more, started in the order of ``names``), then per
    batch size an untimed warm-up in each and ``args.reps`` rounds of one rep per engine, the
    order changing round by round (``round_order``), then the logprob check in each. Only
    rounds every engine finished count. With a ``deadline``, a round starts only if it and the
    checks still fit (``CHECK_RESERVE_S`` per engine): the rounds are cut short, said in
    ``rounds_cut``, rather than the checks. Returns the configs' results (as the one-engine mode
    writes them) and the statistics of every pair of engines; ``save`` gets them after every
    batch size, so a run cut short keeps what it finished. For the configs in ``artune`` (the
    plugin loaded) the plugin's log lines are kept."""
    reps: dict[str, dict[int, list[dict[str, Any]]]] = {
        n: {bs: [] for bs in args.batch_sizes} for n in names}
    info: dict[str, dict[str, Any]] = {n: {} for n in names}
    served: dict[str, Served] = {}
    state: dict[str, str | None] = {"stopped": None, "check_error": None, "cut": None}

    def left() -> float:
        return math.inf if deadline is None else deadline - time.monotonic() - PAIRED_RESERVE_S

    def ask(n: str, command: str | None, limit: float) -> dict[str, Any]:
        what = command or "the engine start"
        budget = left()
        if budget <= 0:
            raise TimeoutError(f"budget: no time left for {what!r}")
        try:
            return served[n].ask(command, min(limit, budget))
        except TimeoutError as exc:
            if budget >= limit:
                raise  # the worker's own time ran out, not the call's
            # the call's budget cut the wait short: say so, not "no answer within 0 s"
            raise TimeoutError(f"budget: the time ran out waiting for {n}'s answer to "
                               f"{what!r} ({budget:.1f} s were left)") from exc

    def collect() -> tuple[dict[str, Any], dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for n in names:
            results[n] = {"config": n, "paired_with": [m for m in names if m != n], **info[n],
                          "settings": {"tp": args.tp, "input_len": args.input_len,
                                       "new_tokens": args.new_tokens, "reps": args.reps,
                                       "batch_sizes": args.batch_sizes,
                                       "mem": args.paired_mem, "paired": True},
                          "batches": []}
            for key, field in (("stopped", "error"), ("check_error", "check_error"),
                               ("cut", "rounds_cut")):
                if state[key]:
                    results[n][field] = state[key]
            if n in artune and n in served:
                results[n]["artune_log"] = served[n].notes
                results[n]["artune_routed"] = any("routing with" in x for x in served[n].notes)
        rows: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
        if any(getattr(s, "graph_times", None) for s in served.values()):
            time.sleep(graph_times_lag_s())  # the last rep's replays on disk
        done = {bs: min(len(reps[n][bs]) for n in names) for bs in args.batch_sizes}
        for n in names:  # fresh copies of the rounds every engine finished, GPU times attached
            copies = {bs: [dict(r) for r in reps[n][bs][:k]] for bs, k in done.items() if k}
            attach_graph_times([r for c in copies.values() for r in c],
                               getattr(served.get(n), "graph_times", None), args.tp,
                               (args.new_tokens - 1) // 2)
            for bs, c in copies.items():
                rows[n][bs] = batch_row(bs, c, args.new_tokens)
                results[n]["batches"].append(rows[n][bs])
        paired = {"engines": list(names), "band_pct": args.band,
                  "pairs": pairs_stats(names, rows, artune, args.band)}
        return results, paired

    timed_out: set[str] = set()
    current = names[0]
    try:
        for current in names:
            served[current] = spawn(current)
            ready = ask(current, None, args.timeout)
            ready.pop("ready", None)
            info[current] = {k: v for k, v in ready.items() if k != "settings"}
            print(f"[e2e] {current}: up beside the other engine(s)", flush=True)
        checks_s = CHECK_RESERVE_S * len(names)
        for bs in args.batch_sizes:
            if state["cut"]:
                break
            t_bs = time.monotonic()
            for current in names:
                ask(current, f"warm {bs}", REP_ANSWER_S)
            round_s = 0.0
            for r in range(args.reps):
                # the next round (as long as the last one, with a margin) and the logprob
                # checks after the rounds must fit in what is left
                if left() - checks_s < 1.5 * round_s:
                    state["cut"] = (f"budget: bs {bs} stopped after {r} of {args.reps} rounds "
                                    f"(and any larger batch size left out) to keep "
                                    f"{checks_s:.0f} s for the logprob check")
                    print(f"[e2e] {state['cut']}", flush=True)
                    break
                t_round = time.monotonic()
                for current in round_order(names, r):
                    reps[current][bs].append(ask(current, f"rep {bs}", REP_ANSWER_S))
                round_s = time.monotonic() - t_round
            print(f"[e2e] side by side, bs {bs}: {min(len(reps[n][bs]) for n in names)} "
                  f"rounds in {time.monotonic() - t_bs:.0f} s", flush=True)
            if save is not None:
                save(*collect())
        t_check = time.monotonic()
        for current in names:
            try:
                info[current].update(ask(current, "check", CHECK_ANSWER_S))
            except (RuntimeError, TimeoutError) as exc:  # the timings stand without the check
                state["check_error"] = str(exc)[:500]
                print(f"[e2e] logprob check failed: {exc}", flush=True)
                if isinstance(exc, TimeoutError):
                    timed_out.add(current)
                break
        else:
            print(f"[e2e] logprob check in {time.monotonic() - t_check:.0f} s", flush=True)
        if getattr(args, "profile_bs", None) and not state["check_error"]:
            _profile_kernels(args, names, ask, left, info)
    except TimeoutError as exc:
        timed_out.add(current)
        state["stopped"] = str(exc)
        print(f"[e2e] paired run stopped: {exc}", flush=True)
    except RuntimeError as exc:
        state["stopped"] = str(exc)
        print(f"[e2e] paired run stopped: {exc}", flush=True)
    finally:
        for n, proc in served.items():  # a worker that did not answer in time is not waited for
            proc.close(timeout=0 if n in timed_out else 30)
    return collect()


#: Seconds an engine gets to answer ``profile`` (the generate under the profiler, the traces'
#: export); a profile starts only with this much of the budget left.
PROFILE_ANSWER_S = 120.0


def _profile_kernels(args: argparse.Namespace, names: tuple[str, ...],
                     ask: Callable[[str, str | None, float], dict[str, Any]],
                     left: Callable[[], float], info: dict[str, dict[str, Any]]) -> None:
    """After the check: each engine's decode-graph kernels at ``args.profile_bs`` under SGLang's
    profiler (``kernel_table``), into ``info[name]["kernels"]``; a failure is recorded as
    ``profile_error`` and leaves the timings standing. Skipped when the budget is short."""
    from kernel_table import table

    for n in names:
        if left() < PROFILE_ANSWER_S:
            info[n]["profile_error"] = "budget: no time left for the kernel profile"
            continue
        folder = os.path.join(args.profile_dir, n)
        try:
            ans = ask(n, f"profile {args.profile_bs} {folder}", PROFILE_ANSWER_S)
            info[n]["kernels"] = {"bs": args.profile_bs, **table(folder, ans["steps"])}
        except (RuntimeError, TimeoutError, ValueError, OSError) as exc:
            info[n]["profile_error"] = str(exc)[:300]
            print(f"[e2e] {n}: kernel profile failed: {exc}", flush=True)


def sign_note(low: float, high: float, says: str) -> str:
    """' (above 0)' / ' (below 0)' where the interval excludes zero and the verdict against
    the band does not already say which way (within the band, no faster, no slower)."""
    if says.startswith(("slower", "faster")):
        return ""
    return " (above 0)" if low > 0 else " (below 0)" if high < 0 else ""


def paired_lines(doc: dict[str, Any]) -> list[str]:
    p = doc.get("paired")
    if p and "pairs" not in p:  # a file of the first two-engine runs: recomputed
        p = dict(p, engines=[p["a"], p["b"]], pairs=(file_stats(doc) or {}).get("pairs", []))
    if not p or not any(pair["by_batch"] for pair in p.get("pairs", [])):
        return []
    lines = [f"side by side: {len(p['engines'])} engines ({', '.join(p['engines'])}, in start "
             f"order), each rotation of the order followed by its reverse; test vs base, median "
             f"of the per-round % and its distribution-free interval:"]
    for pair in p["pairs"]:
        lines.append(f"  {pair['test']} vs {pair['base']}:")
        for bs, st in sorted(pair["by_batch"].items(), key=lambda kv: int(kv[0])):
            low, high = st["interval_pct"]
            lines.append(f"    bs{bs}: {st['median_pct']:+.2f}% [{low:+.2f}, {high:+.2f}] "
                         f"({st['coverage']:.1%}, {st['rounds']} rounds) -> {st['verdict']}"
                         f"{sign_note(low, high, st['verdict'])}")
            g = st.get("graph")
            if g:
                g_low, g_high = g["interval_pct"]
                lines.append(f"      decode graph GPU time: {g['median_pct']:+.2f}% "
                             f"[{g_low:+.2f}, {g_high:+.2f}] -> {g['verdict']}"
                             f"{sign_note(g_low, g_high, g['verdict'])}")
    return lines


def file_stats(doc: dict[str, Any], band: float = 1.0) -> dict[str, Any] | None:
    """A side-by-side results file's statistics of every pair of engines, recomputed from its
    reps and oriented as ``orient`` says (files of two engines written before ``engines`` and
    the orientation existed read B against A); None for a file of the one-engine mode."""
    p = doc.get("paired")
    if not p:
        return None
    names = list(p.get("engines") or (p["a"], p["b"]))
    configs = doc.get("configs", {})
    artune = {n for n in names if "artune_routed" in configs.get(n, {})}
    rows = {n: {row["batch"]: row for row in configs.get(n, {}).get("batches", [])}
            for n in names}
    order_of = round_order if "engines" in p else _alternating
    return {"engines": names, "pairs": pairs_stats(names, rows, artune, band, order_of)}


def config_of(engine: str) -> str:
    """The config an engine runs: ``default_again`` is another engine of ``default``."""
    return engine.removesuffix("_again")


def across_lines(paths: list[str], band: float = 1.0) -> list[str]:
    """A markdown table of side-by-side results files, one row per pair of engines and batch
    size, then per pair of configs (``config_of``) and batch size the hull of the engine
    pairs' intervals and what it shows: a claim about two configs holds only if it holds in
    every pair of engines, since two engines of one config differ by more than one engine's
    reps do. Where each config was started first in some pair, the order-balanced median (the
    mean of the two start orders' mean medians) is given too, and ``balanced_interval``'s
    interval for the order-balanced effect with what it shows: free of an effect of the start
    order that is the same size both ways."""
    lines = ["| file | test vs base | started first | bs | rounds | median % | interval % "
             "| verdict | decode graph GPU time: median %, interval %, verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    # per (test config, base config, bs): the engine pairs' stats, by whether test went first
    groups: dict[tuple[str, str, int], dict[bool, list[dict[str, Any]]]] = {}
    for path in paths:
        with open(path) as f:
            st = file_stats(json.load(f), band)
        if st is None:
            lines.append(f"| {os.path.basename(path)} | not a side-by-side run | | | | | | | |")
            continue
        for pair in st["pairs"]:
            for bs, s in pair["by_batch"].items():
                low, high = s["interval_pct"]
                g = s.get("graph")
                g_cell = "-"
                if g:
                    g_low, g_high = g["interval_pct"]
                    g_cell = (f"{g['median_pct']:+.2f} [{g_low:+.2f}, {g_high:+.2f}] "
                              f"{g['verdict']}{sign_note(g_low, g_high, g['verdict'])}")
                lines.append(f"| {os.path.basename(path)} | {pair['test']} vs {pair['base']} | "
                             f"{pair['first']} | {bs} | {s['rounds']} | {s['median_pct']:+.2f} "
                             f"| [{low:+.2f}, {high:+.2f}] | {s['verdict']}"
                             f"{sign_note(low, high, s['verdict'])} | {g_cell} |")
                key = (config_of(pair["test"]), config_of(pair["base"]), int(bs))
                groups.setdefault(key, {True: [], False: []})[
                    pair["first"] == pair["test"]].append(s)
    if groups:
        lines += ["", "| test vs base (configs) | bs | engine pairs | hull of the intervals % "
                  "| verdict | order-balanced median % | order-balanced interval % (at least) "
                  "| its verdict |", "|---|---|---|---|---|---|---|---|"]
        for (test, base, bs), orders in sorted(groups.items()):
            low, high = _hull(orders[True] + orders[False])
            n = len(orders[True]) + len(orders[False])
            balanced, b_iv, b_says = "-", "-", "-"
            if orders[True] and orders[False]:
                mean = sum(statistics.fmean(x["median_pct"] for x in orders[o])
                           for o in (True, False)) / 2
                balanced = f"{mean:+.2f}"
                b_low, b_high, b_level = balanced_interval(orders)
                b_iv = f"[{b_low:+.2f}, {b_high:+.2f}] ({b_level:.1%})"
                apart = orders_apart(orders)
                if apart is None:
                    b_says = verdict(b_low, b_high, band)
                    b_says += sign_note(b_low, b_high, b_says)
                else:
                    b_says = (f"none: the start orders' hulls are {apart:.2f} points apart (an "
                              "engine's own effect, as likely as the order's)")
            says = verdict(low, high, band)
            lines.append(f"| {test} vs {base} | {bs} | {n} | [{low:+.2f}, {high:+.2f}] | "
                         f"{says}{sign_note(low, high, says)} | {balanced} | {b_iv} | {b_says} |")
    return lines


def _hull(stats: list[dict[str, Any]]) -> tuple[float, float]:
    """The smallest interval holding every one of these engine pairs' intervals."""
    if not stats:
        raise ValueError("an interval of each start order is needed")
    return (min(x["interval_pct"][0] for x in stats), max(x["interval_pct"][1] for x in stats))


def orders_apart(by_order: dict[bool, list[dict[str, Any]]]) -> float | None:
    """How far apart (percentage points) the hulls of the two start orders' intervals lie
    (``by_order``: engine pairs' stats by whether the test engine started first); None where
    they overlap. Apart, the orders' effects differ by more than their intervals allow, and
    with one engine pair per order nothing tells an effect of the start order from one
    engine's own (two engines of one config differed by 6 % on 4x H100, 2026-11-26): the
    balanced interval's premise is then not shown, and no verdict is drawn from it."""
    (lo_t, hi_t), (lo_f, hi_f) = _hull(by_order[True]), _hull(by_order[False])
    gap = max(lo_t, lo_f) - min(hi_t, hi_f)
    return gap if gap > 0 else None


def balanced_interval(by_order: dict[bool, list[dict[str, Any]]],
                      ) -> tuple[float, float, float]:
    """An interval for the order-balanced effect, from the engine pairs' stats
    (``interval_pct``, ``coverage``) grouped by whether the test engine started first (both
    groups non-empty): (low, high, level).

    If the start order adds about as much to a test-first pair's median effect as it takes
    from a base-first pair's (on 4x H100, 2026-11-26 and 27, the engine started second often
    ran a little slower), half the sum of one pair's effect of each order is free of it.
    When every interval covers its own pair's effect, the hull of each order's intervals
    covers each of its pairs' effects, and the mean of the two hulls' ends covers that half
    sum for any one pair of each order. All intervals cover at once with probability at least
    1 minus the sum of their misses (Bonferroni): that is the level returned."""
    (lo_t, hi_t), (lo_f, hi_f) = _hull(by_order[True]), _hull(by_order[False])
    level = 1 - sum(1 - x["coverage"] for o in (True, False) for x in by_order[o])
    return (lo_t + lo_f) / 2, (hi_t + hi_f) / 2, level


def short_stems(paths: list[str]) -> dict[str, str]:
    """Each results file's name for a plot's labels: without ``.json``, ``sglang_e2e_`` and
    the part before an underscore that every file's name shares (``tp2_h200_paired_graph_``);
    a name left empty keeps its whole stem."""
    stems = {p: os.path.basename(p).removesuffix(".json").removeprefix("sglang_e2e_")
             for p in paths}
    common = os.path.commonprefix(list(stems.values())) if len(set(stems.values())) > 1 else ""
    common = common[:common.rfind("_") + 1]
    return {p: s.removeprefix(common) or s for p, s in stems.items()}


def plot_intervals(paths: list[str], out: str, band: float = 1.0) -> int:
    """A forest plot of ``across_lines``'s rows: one panel per pair of configs, batch sizes
    down the side, each engine pair's median and interval as a point and a bar (filled where
    the test engine was started first), the ±band shaded; where the rounds have GPU times, their
    median and interval in black just below. Returns how many engine pairs' bars it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[tuple[str, str], list[tuple[int, str, bool, dict[str, Any]]]] = {}
    stems = short_stems(paths)
    for path in paths:
        with open(path) as f:
            st = file_stats(json.load(f), band)
        for pair in (st or {}).get("pairs", []):
            key = (config_of(pair["test"]), config_of(pair["base"]))
            for bs, s in pair["by_batch"].items():
                # the panel's title names the configs; an engine of another name (an A/A
                # pair's "_again") is named here
                names = ("" if (pair["test"], pair["base"]) == key
                         else f": {pair['test']} vs {pair['base']}")
                rows.setdefault(key, []).append(
                    (int(bs), stems[path] + names, pair["first"] == pair["test"], s))
    if not rows:
        raise ValueError("no side-by-side results in the files given")
    heights = [len(v) for _, v in sorted(rows.items())]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 0.9 * len(rows) + 0.25 * sum(heights)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    drawn = 0
    for ax, ((test, base), items) in zip(axes[:, 0], sorted(rows.items()), strict=True):
        items.sort(key=lambda t: (t[0], t[1]))
        ax.axvspan(-band, band, color="0.9", zorder=0)
        ax.axvline(0, color="0.5", lw=0.8)
        ticks = []
        for y, (bs, label, test_first, s) in enumerate(items):
            low, high = s["interval_pct"]
            ax.plot([low, high], [y, y], color=f"C{[1, 4, 16, 64].index(bs) % 10}"
                    if bs in (1, 4, 16, 64) else "C5", lw=2)
            ax.plot(s["median_pct"], y, "o", color="k",
                    mfc="k" if test_first else "w", ms=5)
            g = s.get("graph")
            if g:  # the decode graphs' GPU time of the same rounds, just below
                ax.plot(g["interval_pct"], [y + 0.3, y + 0.3], color="k", lw=1)
                ax.plot(g["median_pct"], y + 0.3, "D", color="k", ms=3)
            ticks.append(f"bs {bs}  {label}")
            drawn += 1
        ax.set_yticks(range(len(items)), ticks, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{test} vs {base}", fontsize=9)
    fig.supxlabel(f"step time %: median, 95 % interval (±{band:g} % shaded; filled: test engine "
                  "started first)\nblack, with a diamond, below: the decode graphs' GPU time of "
                  "the same rounds", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Paired results files side by side, each oriented artune against the other "
                    "config, and per pair of configs what all their engine pairs show together.")
    p.add_argument("files", nargs="+", help="results JSON files of sglang_e2e.py --paired")
    p.add_argument("--band", type=float, default=1.0, help="the ± band in %% (default 1)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw every engine pair's interval (one panel per pair of configs)")
    args = p.parse_args(argv)
    print("\n".join(across_lines(args.files, args.band)))
    if args.plot:
        n = plot_intervals(args.files, args.plot, args.band)
        print(f"plot: {args.plot} ({n} intervals)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
