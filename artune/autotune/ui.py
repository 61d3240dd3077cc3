"""What rank 0 of a tune prints: a progress bar with ETA, the validation table, the summary."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from artune.inspect import fmt_us, human_bytes, validation_count, who_validated

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Progress", "console", "print_validation", "print_summary"]


class _Stdout:
    """Standard output that a reader going away (``artune tune ... | head``) does not stop: the
    first broken pipe sends the rest to /dev/null, so the tune runs on and writes its profile."""

    def __init__(self) -> None:
        self._gone = False

    def _drop(self) -> None:
        from artune.log import drop_stdout

        self._gone = True
        drop_stdout()

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return sys.stdout.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self._drop()

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def console() -> Console:
    from rich.console import Console

    # Piped output (logs, tests) keeps full lines instead of a guessed terminal width.
    return Console(file=_Stdout(), width=None if sys.stdout.isatty() else 140)  # type: ignore[arg-type]


class Progress:
    """Progress on rank 0: a rich bar (description, bar, done/total, elapsed, ETA) on a
    terminal; elsewhere (a log file, Slurm, CI), where rich would draw nothing until the end, a
    plain line every PLAIN_EVERY_S seconds and one at the end."""

    #: Seconds between the plain progress lines written when the output is not a terminal.
    PLAIN_EVERY_S = 10.0

    def __init__(self, total: int, con: Console, clock: Any = None) -> None:
        import time

        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _Progress

        self._con = con
        self._plain = not con.is_terminal
        self._clock = clock or time.monotonic
        self._total = total
        self._done = 0
        self._text = "tune"
        self._t0 = self._last = self._clock()
        self._p = _Progress(
            TextColumn("[bold]{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=con,
            disable=self._plain,
        )
        self._task = self._p.add_task("tune", total=total)

    @contextmanager
    def running(self) -> Iterator[Progress]:
        with self._p:
            yield self
        if self._plain:
            self._line()

    def describe(self, text: str) -> None:
        self._text = text
        self._p.update(self._task, description=text)

    def advance(self, n: int = 1) -> None:
        self._done += n
        self._p.advance(self._task, n)
        if self._plain and self._clock() - self._last >= self.PLAIN_EVERY_S:
            self._line()

    def add_total(self, n: int) -> None:
        self._total += n
        task = self._p.tasks[0]
        self._p.update(self._task, total=(task.total or 0) + n)

    def _line(self) -> None:
        now = self._clock()
        self._last = now
        elapsed = now - self._t0
        left = self._total - self._done
        eta = f", ETA {elapsed / self._done * left:.0f} s" if self._done and left > 0 else ""
        pct = 100 * self._done / self._total if self._total else 100.0
        self._con.print(f"progress: {self._done}/{self._total} ({pct:.0f} %), {elapsed:.0f} s"
                        f"{eta}: {self._text}", markup=False, highlight=False)


def _gap(e: dict[str, Any]) -> str:
    """The routed call's gap to the fastest, as the validation judged it (± its spread)."""
    gap = e.get("gap_us")
    if gap is None:
        return "-"
    spread = e.get("gap_spread_us")
    return f"{gap:+.1f}" + (f" ±{spread:.1f}" if spread else "")


def print_validation(entries: list[dict[str, Any]], rel_tol: float, con: Console) -> None:
    """One row per (dtype, mode, size): the routed backend and its time next to the fastest."""
    from rich.table import Table

    if not entries:
        return
    t = Table(
        title="validation: the routed all-reduce (through select()) vs the fastest candidate "
        "called directly, re-timed in the same rounds (the routed choice is among them, so "
        f"noise can put it ahead: a negative gap); tolerance {rel_tol:.0%} or the measured "
        "spread; eager gaps are round-by-round differences",
        title_justify="left",
    )
    for col, just in (
        ("dtype/mode", "left"),
        ("size", "right"),
        ("routed", "left"),
        ("routed µs", "right"),
        ("fastest direct", "left"),
        ("its µs", "right"),
        ("gap µs", "right"),
        ("ok", "center"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for e in entries:
        t.add_row(
            f"{e['dtype']}/{e['mode']}",
            human_bytes(e["nbytes"]),
            who_validated(e, "routed"),
            fmt_us(e.get("routed_us")),
            who_validated(e, "best"),
            fmt_us(e.get("best_us")),
            _gap(e),
            "[green]yes[/green]" if e.get("within")
            else "[yellow]kept[/yellow]" if e.get("kept_incumbent") else "[red]NO[/red]",
        )
    con.print(t)
    con.print(f"validation: {validation_count(entries)}", markup=False)


def print_summary(doc: dict[str, Any], path: str, seconds: float, con: Console) -> None:
    """The dispatch table (as ``artune show`` prints it) and where the profile is."""
    from pathlib import Path

    from artune.inspect import render
    from artune.profile import Profile

    render(Profile(doc, Path(path)), con)
    from artune.autotune.table import VALIDATION

    meas = doc.get("measurements") or []
    n_retimed = sum(1 for m in meas if m.get("source") == VALIDATION)
    n_meas = len(meas) - n_retimed
    n_skip = len(doc.get("skipped") or [])
    label = " (DRY RUN on CPU: not a GPU measurement)" if doc.get("dry_run") else ""
    retimed = f" (+{n_retimed} validation re-times)" if n_retimed else ""
    con.print(f"{n_meas} measurements{retimed}, {n_skip} skipped, {seconds:.1f} s{label}")
    con.print(f"profile written to {path}", style="bold", markup=False)
