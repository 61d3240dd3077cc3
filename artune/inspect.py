"""``artune show PROFILE [--plot FILE.png] [--json] [--routes DIR]``: the dispatch table, on any
machine.

Prints, per dtype and mode, each byte range with its backend, parameters, measured latency, NCCL's
latency at the same sizes and the speedup; then what was skipped and the validation pass. With
``--plot`` draws latency against size (log-log), one line per backend, the chosen backend marked.
With ``--routes`` reads a served model's route trace (the SGLang plugin's ``ARTUNE_ROUTE_LOG``
folder) and shows which backend took each all-reduce, next to what the profile says.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from artune.autotune.table import best_per_backend
from artune.profile import Profile, ProfileError, load

__all__ = ["main", "render", "plot", "plot_path", "human_bytes", "fmt_us", "validation_count",
           "load_routes", "render_routes"]


#: Width of a dispatch table without its params column (borders included).
_TABLE_WIDTH = 80


def human_bytes(n: int) -> str:
    """1536 -> '1.5K', 4096 -> '4K', 1 -> '1B' (binary units, as message sizes are)."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{n}B"


def _span(values: list[float | None], fmt: str, dash: str = "–") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if abs(hi - lo) < 1e-9 else f"{fmt.format(lo)}{dash}{fmt.format(hi)}"


def _size_range(lo: int, hi: int) -> str:
    """Inclusive byte range as a reader wants it: 'n ≤ 128K', '128K < n ≤ 11.3M'."""
    if lo <= 1:
        return f"n ≤ {human_bytes(hi)}"
    return f"{human_bytes(lo - 1)} < n ≤ {human_bytes(hi)}"


def _params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(p.items())) or "-"


def render(profile: Profile, console: Any = None) -> None:
    """Print the profile with rich (tables per dtype/mode, skipped, validation)."""
    from rich.console import Console
    from rich.table import Table

    # Piped output (files, READMEs, tests) must not truncate backend names to a terminal width.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    d = profile.data
    topo = profile.fingerprint.get("topology", {})
    title = (
        f"{topo.get('gpu') or 'CPU (gloo)'} x{topo.get('world_size')} "
        f"({topo.get('nodes')} node(s) x {topo.get('gpus_per_node')})"
    )
    console.print(f"[bold]artune profile[/bold] {profile.path or ''}")
    console.print(f"  machine: {title}   fingerprint: {profile.fingerprint_id}", soft_wrap=True)
    console.print(f"  created: {d.get('created')}", soft_wrap=True)
    console.print(f"  command: {d.get('command')}", soft_wrap=True)
    # The tune's phases; their parts (keys with a colon) stay in the profile's "tune_seconds".
    spent = d.get("tune_seconds") or {}
    phases = {k: v for k, v in spent.items() if k != "total" and ":" not in k}
    if phases:
        total = ""
        if "total" in spent and "start ranks" in spent:
            total = (f"{spent['total'] + spent['start ranks']:.1f} s "
                     f"({spent['total']:.1f} s after the ranks started): ")
        elif "total" in spent:
            total = f"{spent['total']:.1f} s: "
        console.print("  tune time: " + total
                      + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
                      soft_wrap=True, markup=False, highlight=False)
    if profile.dry_run:
        console.print("  [yellow]DRY RUN on CPU processes (gloo): not a GPU measurement[/yellow]")
    for dtype, modes in profile.tables.items():
        for mode, ranges in modes.items():
            params = [_params(r.get("params", {})) for r in ranges]
            # In a terminal too narrow for the parameters beside the numbers, they go under
            # the table as numbered notes, so that nothing is cut short.
            notes = console.width < _TABLE_WIDTH + max(map(len, params), default=1)
            t = Table(title=f"{dtype} / {mode}", title_justify="left")
            for col, just in (
                ("size range (bytes)", "left"),
                ("backend", "left"),
                *([] if notes else [("params", "left")]),
                ("latency µs", "right"),
                (f"{profile.fallback().upper() if profile.dry_run else 'NCCL'} µs", "right"),
                ("speedup", "right"),
            ):
                t.add_column(col, justify=just,  # type: ignore[arg-type]
                             no_wrap=not (notes and just == "right"))
            shown: list[str] = []
            for r, par in zip(ranges, params, strict=True):
                pts = r.get("points", [])
                backend = r["backend"]
                if notes and par != "-":
                    if par not in shown:
                        shown.append(par)
                    backend += f" [{shown.index(par) + 1}]"
                t.add_row(
                    _size_range(r["min_bytes"], r["max_bytes"]),
                    *([backend] if notes else [backend, par]),
                    # narrow: a range may wrap at its dash rather than lose digits to "…"
                    *(_span([p.get(k) for p in pts], f, " – " if notes else "–") for k, f in (
                        ("latency_us", "{:.1f}"), ("nccl_us", "{:.1f}"), ("speedup", "{:.2f}x"))),
                )
            console.print(t)
            for i, par in enumerate(shown, 1):
                console.print(f"  [{i}] {par}", markup=False, highlight=False)
    _render_linear(d, console)
    skipped = d.get("skipped") or []
    if skipped:
        reasons = Counter((s.get("backend"), s.get("reason")) for s in skipped)
        console.print(f"[bold]skipped or failed candidates[/bold] ({len(skipped)}):")
        for (backend, reason), n in reasons.most_common():
            line = f"  {backend}: {reason}" + (f"  (x{n})" if n > 1 else "")
            console.print(line, markup=False, highlight=False)
    validation = d.get("validation") or []
    if validation:
        console.print(f"[bold]validation[/bold]: {validation_count(validation)}",
                      highlight=False)
        moved = [v for v in validation if v.get("rerouted_from")]
        if moved:
            console.print(
                f"  re-routed after the validation pass's re-times, then validated again: "
                f"{len(moved)} point(s)", highlight=False)
            for v in moved:
                was, now = v["rerouted_from"], (v["routed_backend"], v.get("routed_params"))
                same = was["backend"] == now[0]
                console.print(
                    f"    {v['dtype']}/{v['mode']} {human_bytes(v['nbytes'])}: "
                    f"{_route(was['backend'], was.get('params'), same)} -> "
                    f"{_route(*now, same)}", markup=False, highlight=False)
        for v in validation:
            if not v.get("within") and not v.get("kept_incumbent"):
                gap = v.get("gap_us")
                if gap is None:
                    how = ""
                elif v.get("gap_from") == "paired rounds":
                    # the gap is the median of same-round differences; the two medians above
                    # come from all rounds and can even differ the other way
                    how = f" (median same-round gap {gap:+.1f} µs{_controls_text(v)})"
                else:
                    how = f" (gap {gap:+.1f} µs, {v.get('gap_from', 'medians')})"
                console.print(
                    f"  [red]{v['dtype']}/{v['mode']} {human_bytes(v['nbytes'])}: routed "
                    f"{who_validated(v, 'routed')} {fmt_us(v.get('routed_us'))} µs vs "
                    f"{who_validated(v, 'best')} {fmt_us(v.get('best_us'))} µs{how}"
                    f"{' - ' + str(v['error']) if v.get('error') else ''}[/red]"
                )


def _render_linear(d: dict[str, Any], console: Any) -> None:
    """The ``linear`` section: per layer shape and row count, the GEMM + routed all-reduce
    against the fused kernel, and which one the plugin runs."""
    from rich.table import Table

    if d.get("linear_skipped"):
        console.print(f"fused linear layers not measured: {d['linear_skipped']}", markup=False)
    for e in d.get("linear") or []:
        t = Table(title=f"row-parallel linear {e['dtype']} K={e['k']} N={e['n']}: the GEMM + "
                        "routed all-reduce vs one fused NVRAR kernel (graph)",
                  title_justify="left")
        for col in ("rows", "unfused µs", "fused µs", "gain µs", "runs", "best fused set"):
            t.add_column(col, justify="left" if col in ("runs", "best fused set") else "right")
        for p in e.get("points", []):
            u, f = p.get("unfused_us"), p.get("fused_us")
            t.add_row(str(p["rows"]), fmt_us(u), fmt_us(f),
                      "-" if u is None or f is None else f"{u - f:+.1f}",
                      "fused" if p.get("fused") else "unfused", _params(p.get("params") or {}))
        console.print(t)
        for p in e.get("points", []):
            for side in ("unfused", "fused"):
                if p.get(f"{side}_why"):
                    console.print(f"  {p['rows']} rows, {side}: not measured: "
                                  f"{p[f'{side}_why']}", markup=False, highlight=False)
        fused = [f"{g['min_rows']}-{g['max_rows']}" if g["max_rows"] > g["min_rows"]
                 else str(g["min_rows"]) for g in e["ranges"] if g["fused"]]
        console.print(f"  fused at rows {', '.join(fused) if fused else '(none)'}; more rows "
                      "than measured: unfused", markup=False, highlight=False)


def who_validated(e: dict[str, Any], side: str) -> str:
    """A validation row's routed or fastest backend, with its parameters where both sides name
    the same backend with different ones (else a miss would read "gloo vs gloo")."""
    name = str(e.get(f"{side}_backend"))
    params = e.get(f"{side}_params") or {}
    if (e.get("routed_backend") == e.get("best_backend") and params
            and e.get("routed_params") != e.get("best_params")):
        return f"{name} ({_params(params)})"
    return name


def validation_count(entries: list[dict[str, Any]]) -> str:
    """'routed all-reduce within tolerance of the fastest candidate at N/M points' (and how many
    of the others were kept on SGLang's own all-reduce on purpose)."""
    ok = sum(1 for v in entries if v.get("within"))
    kept = sum(1 for v in entries if not v.get("within") and v.get("kept_incumbent"))
    text = (f"routed all-reduce within tolerance of the fastest candidate at {ok}/{len(entries)} "
            "points")
    if kept:
        text += (f"; {kept} more routed to SGLang's own all-reduce, which no candidate beat by "
                 "more than the incumbent margin")
    router = [v["router_gap_us"][0] for v in entries if v.get("router_gap_us")]
    control = [abs(v["control_gap_us"][0]) for v in entries if v.get("control_gap_us")]
    if router or control:
        parts = []
        if router:
            parts.append(f"the router's own cost {statistics.median(router):+.2f} µs "
                         f"(median of {len(router)} points)")
        if control:
            parts.append(f"two identical calls read {statistics.median(control):.2f} µs apart "
                         f"(A/A, median of {len(control)})")
        text += "; eager: " + ", ".join(parts)
    twice = sum(1 for v in entries if v.get("readings") == 2)
    if twice:
        text += (f"; {twice} eager point(s) out of tolerance at the first reading were timed "
                 "again and judged on both readings' rounds")
    return text


def _controls_text(v: dict[str, Any]) -> str:
    """', router +0.4, A/A -1.2' from an eager validation entry's control timings."""
    out = ""
    if v.get("router_gap_us"):
        out += f", router {v['router_gap_us'][0]:+.1f}"
    if v.get("control_gap_us"):
        out += f", A/A {v['control_gap_us'][0]:+.1f}"
    if v.get("readings") == 2:
        out += ", two readings"
    return out


def fmt_us(v: Any) -> str:
    """µs with one decimal, '-' for None."""
    return "-" if v is None else f"{v:.1f}"


def _route(backend: str, params: Any, with_params: bool) -> str:
    """'nvrar' or, where only the parameters changed, 'nvrar(ctas=64 ...)'."""
    if not with_params or not params:
        return backend
    return f"{backend}({' '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def plot(profile: Profile, path: str) -> str:
    """Latency vs size (log-log) per backend, per dtype/mode panel; chosen backend marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = sorted(best_per_backend(profile.data.get("measurements") or []).items())
    if not panels:
        raise ProfileError(f"profile {profile.path}: no measurements to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    colors: dict[str, Any] = {}
    for ax, ((dtype, mode), per_size) in zip(axes[0], panels, strict=True):
        backends = sorted({b for recs in per_size.values() for b in recs})
        for b in backends:
            colors.setdefault(b, f"C{len(colors) % 10}")
            pts = sorted((s, recs[b]["latency_us"]) for s, recs in per_size.items() if b in recs)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colors[b], label=b, lw=1.2)
        for r in profile.tables.get(dtype, {}).get(mode, []):
            shown = [p for p in r.get("points", [])  # a point without both is not drawn
                     if isinstance(p.get("nbytes"), int | float)
                     and isinstance(p.get("latency_us"), int | float)]
            xs = [p["nbytes"] for p in shown]
            ys = [p["latency_us"] for p in shown]
            ax.plot(xs, ys, "o", color=colors.get(r["backend"], "k"), ms=6, mec="k", mew=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(int(v))))
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("latency (µs, slowest rank's median)")
        ax.set_title(f"{dtype} / {mode}  (dots: chosen)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    topo = profile.fingerprint.get("topology", {})
    fig.suptitle(
        f"artune: {topo.get('gpu') or 'CPU dry run'} x{topo.get('world_size')} "
        f"— {profile.data.get('created')}"
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_path(path: str) -> str:
    """``path`` as ``plot`` will write it (``.png`` added when it has no suffix), or a
    ValueError saying why it cannot be written (checked before anything is drawn)."""
    from matplotlib.figure import Figure

    p = Path(path)
    if not p.suffix:
        p = p.with_name(p.name + ".png")
    kinds = Figure().canvas.get_supported_filetypes()
    if p.suffix[1:].lower() not in kinds:
        raise ValueError(f"--plot {path}: matplotlib cannot write {p.suffix!r} files; use one "
                         f"of {', '.join('.' + k for k in sorted(kinds))}")
    if not p.parent.is_dir():
        raise ValueError(f"--plot {path}: folder {str(p.parent)!r} does not exist")
    return str(p)


def load_routes(folder: str) -> tuple[int, list[dict[str, Any]]]:
    """(processes, rows) of a route-trace folder: the calls of each (group, mode, dtype, size,
    backend) summed over the processes' files. ValueError when there is nothing to read."""
    from pathlib import Path

    if not Path(folder).is_dir():
        raise ValueError(f"--routes {folder} is not a folder (the one the SGLang plugin wrote "
                         f"with ARTUNE_ROUTE_LOG=DIR)")
    files = sorted(Path(folder).glob("routes-*.json"))
    if not files:
        raise ValueError(f"no route trace (routes-*.json) in {folder}: serve with "
                         f"ARTUNE_ROUTE_LOG={folder} first")
    calls: Counter[tuple[str, str, str, int, str]] = Counter()
    for f in files:
        try:
            for r in json.loads(f.read_text())["routes"]:
                calls[(r["group"], r["mode"], r["dtype"], int(r["nbytes"]), r["backend"])] += int(
                    r["calls"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{f}: not a route trace ({type(exc).__name__}: {exc})") from None
    rows = [{"group": g, "mode": m, "dtype": d, "nbytes": n, "backend": b, "calls": c}
            for (g, m, d, n, b), c in sorted(calls.items())]
    return len(files), rows


def render_routes(profile: Profile, processes: int, rows: list[dict[str, Any]],
                  console: Any = None) -> int:
    """Print the trace next to the profile's choice for each size; returns how many rows differ
    from it (the plugin may re-derive the table where a backend cannot run: its log says)."""
    from rich.console import Console
    from rich.table import Table

    from artune.integration.sglang import SGLANG_OWN
    from artune.profile import select

    console = console or Console(width=None if sys.stdout.isatty() else 140)
    t = Table(title=f"routes taken ({processes} process(es)): backend per all-reduce",
              title_justify="left")
    for col, just in (("group", "left"), ("mode", "left"), ("dtype", "left"),
                      ("size", "right"), ("backend", "left"), ("calls", "right"),
                      ("profile says", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    differ = 0
    for r in rows:
        choice = select(profile, r["nbytes"], r["dtype"], r["mode"])
        says = choice.backend if choice.covered else "not covered: SGLang's own"
        same = (r["backend"] == choice.backend if choice.covered and choice.backend != "sglang"
                else r["backend"] == SGLANG_OWN)
        differ += not same
        t.add_row(r["group"], r["mode"], r["dtype"], human_bytes(r["nbytes"]), r["backend"],
                  str(r["calls"]), says if same else f"[red]{says} (differs)[/red]")
    console.print(t)
    if differ:
        console.print(f"{differ} row(s) differ from the profile: the plugin re-derives the table "
                      "where a backend cannot run here (its log names it)", highlight=False)
    return differ


def render_graph_times(rows: list[dict[str, Any]], console: Any) -> None:
    """``graph_times.summary``'s rows as a table: per process and graph, the replays and the GPU
    time's median and spread."""
    from rich.table import Table

    t = Table(title=f"CUDA-graph replays ({len({r['process'] for r in rows})} process(es)): "
              "GPU time per replay", title_justify="left")
    for col, just in (("process", "left"), ("graph", "right"), ("replays", "right"),
                      ("median µs", "right"), ("p10 µs", "right"), ("p90 µs", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(r["process"], f"{r['graph']:x}"[-6:], str(r["replays"]),
                  f"{r['median_us']:.1f}", f"{r['p10_us']:.1f}", f"{r['p90_us']:.1f}")
    console.print(t)


def main(args: argparse.Namespace) -> int:
    """Entry of ``artune show``: exit 0, or 2 with a one-line error for a bad profile."""
    graphs = None
    if getattr(args, "graph_times", None):  # read first: a bad folder says so before output
        from artune.integration import graph_times

        try:
            graphs = graph_times.summary(args.graph_times)
        except (ValueError, OSError) as exc:
            print(f"artune show: --graph-times: {exc}", file=sys.stderr)
            return 2
    if args.profile is None:
        if graphs is None:
            print("artune show: give a profile (or --graph-times DIR alone)", file=sys.stderr)
            return 2
        needs = [o for o, v in (("--plot", getattr(args, "plot", None)),
                                ("--json", getattr(args, "json", False)),
                                ("--routes", getattr(args, "routes", None))) if v]
        if needs:
            print(f"artune show: {', '.join(needs)} show a profile: give one", file=sys.stderr)
            return 2
        try:
            render_graph_times(graphs, _console())
        except BrokenPipeError:
            _drop_stdout(_console())
        return 0
    try:
        profile = load(args.profile)
    except ProfileError as exc:
        print(f"artune show: {exc}", file=sys.stderr)
        return 2
    target = None
    if getattr(args, "plot", None):
        try:
            target = plot_path(args.plot)
        except ValueError as exc:
            print(f"artune show: {exc}", file=sys.stderr)
            return 2
    routes = None
    if getattr(args, "routes", None):  # read before anything is printed: a bad folder says so
        try:
            routes = load_routes(args.routes)
        except ValueError as exc:
            print(f"artune show: {exc}", file=sys.stderr)
            return 2
    console = _console()
    try:
        if getattr(args, "json", False):
            json.dump(profile.data, sys.stdout, indent=1)
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            render(profile, console)
    except BrokenPipeError:  # `artune show P | head`: the reader has what it wanted
        _drop_stdout(console)
    if target is not None:
        try:
            # on stderr: with --json, stdout holds the JSON document alone
            print(f"plot written to {plot(profile, target)}", file=sys.stderr)
        except (ProfileError, OSError) as exc:
            print(f"artune show: cannot draw the plot: {exc}", file=sys.stderr)
            return 2
    try:
        if routes is not None:
            render_routes(profile, *routes, console)
        if graphs is not None:
            render_graph_times(graphs, console)
    except BrokenPipeError:
        _drop_stdout(console)
    return 0


def _console() -> Any:
    """rich's Console for ``show``, whose broken pipe raises BrokenPipeError (rich's own
    default exits with status 1 there)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    # Piped output (files, READMEs, tests) must not truncate backend names to a terminal width.
    return _Console(width=None if sys.stdout.isatty() else 140)


def _drop_stdout(console: Any) -> None:
    """The reader of stdout has gone: send what is left there to /dev/null."""
    from artune.log import drop_stdout

    console.quiet = True
    drop_stdout()
