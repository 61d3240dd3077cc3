"""``artune launch`` against a real SGLang server, as an ML engineer runs it (GPU machine).

    python benchmarks/launch_check.py --tp 2 --profile artune/profiles/<id>.json [--out FILE.md]

What it checks, in order, each a row of the report:

1. refusals before anything starts: ``--enable-symm-mem`` (NVLink multicast) and ``--tp 1``
   exit with code 2 and the reason, within seconds;
2. ``artune launch --profile P -- <server args>`` (dummy Llama-3.1-8B-shaped weights, triton
   attention, decode CUDA graphs for batch 1 and 4, no tokenizer) becomes healthy
   (``GET /health``) within ``--timeout`` seconds;
3. ``POST /generate`` with token ids (4 requests, greedy, ``--new-tokens`` each, EOS ignored)
   returns that many tokens per request, and the same ids again on a second identical request
   (greedy decoding is deterministic on one server);
4. the plugin routed in every TP rank: its "routing with" line (logged by the group's rank 0)
   is in the server's log, and every TP rank wrote a route trace (``ARTUNE_ROUTE_LOG``) naming
   the backend of each graph and eager all-reduce (the report lists the trace);
5. SIGTERM to the launcher's PID (``artune launch`` execs the server: the same process) stops
   the server within 60 s, its exit status is reported (SGLang 0.5.17 ends its own process tree
   with SIGKILL after draining: -9), and the GPUs' memory is released.

Writes a Markdown report with the card and date (``--out``) and prints it; exit code 0 only if
every check passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglang_e2e import LLAMA_31_8B, _card, _gpu_mem_used  # noqa: E402

from artune.inspect import load_routes  # noqa: E402


def _launch_cmd(profile: str, server_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "artune.cli", "launch", "--profile", profile, "--", *server_args]


def _refusal(profile: str, server_args: list[str], expect: str) -> tuple[bool, str]:
    """Run a launch that must be refused before anything starts: (passed, what happened)."""
    t0 = time.monotonic()
    p = subprocess.run(_launch_cmd(profile, server_args), capture_output=True, text=True,
                       timeout=120)
    took = time.monotonic() - t0
    msg = (p.stderr.strip().splitlines() or [""])[-1][:200]
    ok = p.returncode == 2 and expect in p.stderr and took < 60
    return ok, f"exit {p.returncode} after {took:.1f} s: {msg}"


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except (urllib.error.URLError, OSError):
        return 0


def _post(url: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _output_ids(resp: Any) -> list[list[int]]:
    items = resp if isinstance(resp, list) else [resp]
    return [list(it.get("output_ids") or []) for it in items]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds to become healthy")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    profile = str(Path(args.profile).resolve())
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        """Record a check and print it at once (a call cut short still shows how far it got)."""
        checks.append((name, ok, detail))
        print(f"[launch_check] {name}: {'yes' if ok else 'NO'} ({detail})", flush=True)

    work = Path(tempfile.mkdtemp(prefix="artune_launch_"))
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=1))
    trace = work / "routes"

    check("refuses --enable-symm-mem before starting",
          *_refusal(profile, ["--model-path", str(model), "--tp", str(args.tp),
                              "--enable-symm-mem"], "--enable-symm-mem is refused"))
    check("refuses TP=1 before starting",
          *_refusal(profile, ["--model-path", str(model), "--tp", "1"], "TP=1"))

    server_args = ["--model-path", str(model), "--load-format", "dummy", "--skip-tokenizer-init",
                   "--tp", str(args.tp), "--attention-backend", "triton",
                   "--mem-fraction-static", "0.6", "--cuda-graph-bs", "1", "4",
                   "--disable-prefill-cuda-graph", "--port", str(args.port),
                   "--log-level", "info",
                   # deterministic greedy repeats: no prefix-cache path on the second request
                   # (dummy weights give near-tied logits), the sampler sglang_e2e.py uses
                   "--disable-radix-cache", "--sampling-backend", "pytorch", "--random-seed", "0"]
    env = dict(os.environ, ARTUNE_ROUTE_LOG=str(trace))
    # the server's log lands next to the report from the start (a call cut short keeps it)
    log_path = (Path(args.out).parent if args.out else work) / "launch_server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    baseline = _gpu_mem_used()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_launch_cmd(profile, server_args), env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    healthy = False
    while time.monotonic() - t0 < args.timeout and proc.poll() is None:
        if _get(f"{base}/health") == 200:
            healthy = True
            break
        time.sleep(2)
    up_s = time.monotonic() - t0
    check("server healthy", healthy,
          f"after {up_s:.0f} s" if healthy else f"not after {up_s:.0f} s (exit code {proc.poll()})")

    if healthy:
        ids = [[1000 + (i * 7919 + j * 104729) % 120000 for j in range(128)] for i in range(4)]
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": args.new_tokens,
                                                      "temperature": 0.0, "ignore_eos": True}}
        try:
            t1 = time.monotonic()
            first = _output_ids(_post(f"{base}/generate", body))
            took = time.monotonic() - t1
            second = _output_ids(_post(f"{base}/generate", body))
            lens = [len(o) for o in first]
            ok = lens == [args.new_tokens] * 4 and first == second
            check("generate: 4 requests, greedy", ok,
                  f"{lens} tokens in {took:.2f} s; repeat identical: {first == second}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            check("generate: 4 requests, greedy", False, f"{type(exc).__name__}: {exc}")

    # Stop it as a user's Ctrl-C / service manager would: SIGTERM to the launcher's PID.
    t2 = time.monotonic()
    running = proc.poll() is None
    if running:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
        stopped = True
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        stopped = False
    stop_s = time.monotonic() - t2
    released = False
    for _ in range(15):
        used = _gpu_mem_used()
        if not baseline or all(u <= b + 1024 for u, b in zip(used, baseline, strict=False)):
            released = True
            break
        time.sleep(2)
    check("SIGTERM stops the server", running and stopped and released,
          f"exit status {rc} after {stop_s:.1f} s; GPU memory released: {released}"
          if running else f"the server was not running (exit status {rc})")

    text = log_path.read_text(errors="replace")
    routed = [ln.strip() for ln in text.splitlines() if "routing with" in ln]
    try:
        processes, rows = load_routes(str(trace))
    except ValueError:
        processes, rows = 0, []
    modes = sorted({r["mode"] for r in rows})
    backends = sorted({f"{r['mode']}:{r['backend']}" for r in rows})
    # The plugin logs "routing with" once per group (its rank 0); every TP rank that routed
    # writes its own trace file.
    check("plugin routed in every TP rank", bool(routed) and processes >= args.tp and bool(rows),
          f"{len(routed)} 'routing with' line(s); route traces from {processes} process(es): "
          f"{', '.join(backends) or 'none'} ({len(rows)} rows, modes {modes})")

    card = _card()
    lines = [f"# `artune launch` with a real SGLang server — {dt.date.today()}", "",
             f"{card.get('gpu', 'no GPU')} x{card.get('gpus', 0)}, SGLang {card.get('sglang')}, "
             f"torch {card.get('torch')}; TP={args.tp}, profile `{Path(args.profile).name}`, dummy "
             f"Llama-3.1-8B shape.", "",
             "| check | passed | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {detail} |" for name, ok, detail in checks]
    if routed:
        lines += ["", "Plugin line (the group's rank 0): `" + routed[0][:300] + "`"]
    if rows:
        lines += ["", f"Route trace, summed over {processes} process(es):", "",
                  "| group | mode | dtype | bytes | backend | calls |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['mode']} | {r['dtype']} | {r['nbytes']} | {r['backend']} "
                  f"| {r['calls']} |" for r in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
