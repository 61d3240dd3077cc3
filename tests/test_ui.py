"""The tune's progress where the output is not a terminal (a log file, Slurm, CI): rich draws
no bar there until the end, so plain lines come every PLAIN_EVERY_S seconds, and at the end."""

from __future__ import annotations

import io

from rich.console import Console

from artune.autotune.ui import Progress


def test_plain_progress_lines_without_a_terminal() -> None:
    buf = io.StringIO()
    now = [0.0]
    p = Progress(8, Console(file=buf, width=140), clock=lambda: now[0])
    with p.running():
        p.describe("bfloat16 graph 4K nccl")
        for _ in range(6):
            now[0] += 4.0
            p.advance()
        p.add_total(2)
        for _ in range(4):
            now[0] += 4.0
            p.advance()
    lines = buf.getvalue().splitlines()
    # every 10 s (at 12, 24, 36 s of 4 s steps), then the end; the total grew by 2
    assert lines == [
        "progress: 3/8 (38 %), 12 s, ETA 20 s: bfloat16 graph 4K nccl",
        "progress: 6/8 (75 %), 24 s, ETA 8 s: bfloat16 graph 4K nccl",
        "progress: 9/10 (90 %), 36 s, ETA 4 s: bfloat16 graph 4K nccl",
        "progress: 10/10 (100 %), 40 s: bfloat16 graph 4K nccl",
    ], lines


def test_a_terminal_gets_the_bar_not_the_lines() -> None:
    buf = io.StringIO()
    now = [0.0]
    p = Progress(3, Console(file=buf, width=140, force_terminal=True), clock=lambda: now[0])
    with p.running():
        for _ in range(3):
            now[0] += 20.0
            p.advance()
    assert "progress:" not in buf.getvalue() and "3/3" in buf.getvalue()
