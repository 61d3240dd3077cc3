"""End-to-end decode benchmark: SGLang's default vs NCCL-only vs artune's profile.

    python benchmarks/sglang_e2e.py --tp 4 --profile profiles/<id>.json \
        --configs default,nccl,artune,artune_nccl,artune_compile --batch-sizes 1,4,16,64

Every config starts its own ``sglang.Engine`` in a fresh subprocess (one engine per process):
``load_format="dummy"``, ``skip_tokenizer_init=True``, a temporary model directory holding only a
Llama-3.1-8B-shaped ``config.json``, ``attention_backend="triton"``, decode CUDA graphs on for
exactly the measured batch sizes. Configs:

- ``default``       SGLang as released (the artune plugin, if installed, is inert: no profile);
- ``nccl``          ``disable_custom_all_reduce=True`` (NCCL only, as SGLang runs across nodes);
- ``artune``        ARTUNE_PROFILE set: every TP all-reduce goes where the profile says;
- ``artune_nccl``   artune with SGLang's custom all-reduce off (its fast path gone);
- ``artune_compile`` artune with ``enable_torch_compile=True``;
- ``artune_fused``, ``artune_nccl_fused``: ``artune`` and ``artune_nccl`` with
  ARTUNE_FUSED_LINEAR=1 (each row-parallel linear layer of at most 16 rows of a captured decode
  step and its all-reduce as one NVRAR kernel, at the kernel's defaults; docs/sglang.md);
  ``artune`` and ``artune_nccl`` themselves fuse where the profile's linear section says
  (ARTUNE_FUSED_LINEAR=auto, the default); ``artune_unfused`` / ``artune_nccl_unfused``: never
  (ARTUNE_FUSED_LINEAR=0);
- ``artune_prefetch``, ``artune_compile_prefetch``: ``artune`` and ``artune_compile`` with the
  profile's fused linear ranges run with ``prefetch=1`` (the weight into L2 before the PDL
  wait, docs/nvrar.md), from a copy of the profile; ``artune_deep``, ``artune_compile_deep``:
  the same with the fused kernel's K loop pipelined 5 stages deep (``stages=5``);
- ``artune_compile_one_row``: ``artune_compile`` with ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED=1
  (the one-row layers fused too, as before the 27th session; ``artune_compile`` leaves them
  to inductor);
- ``default_compile`` SGLang as released with ``enable_torch_compile=True``;
- ``default_again``  ``default`` in another engine, run last: its difference from ``default`` is
  the engine-to-engine noise the "within 1%" comparison has to be read against;
- ``artune_again``   ``artune`` in another engine: with both pairs, the report also compares
  the mean of the two artune engines with the mean of the two default ones;
- ``default_compile_again``, ``artune_compile_again``: the compiled configs in another engine;
- ``artune_inert``   the plugin with the profile re-derived from SGLang's own measurements
  alone: every size keeps SGLang's own all-reduce and only the fallback backend is built (no
  symmetric memory, no NVSHMEM), the hooks and the per-forward fault check stay. Against
  ``default`` and ``artune`` it tells whether a gap between those two comes from the plugin's
  presence or from the backends it builds;
- ``artune_without_sglang`` the profile re-derived without SGLang's own measurements (what the
  plugin routes when SGLang's custom all-reduce is off, ``artune_nccl``), with that custom
  all-reduce left on: every config setting as in ``default``, so against it the only
  difference is whose kernels run the routed all-reduces;
- ``artune_unfused_without_sglang``: ``artune_without_sglang`` with no fused layer
  (ARTUNE_FUSED_LINEAR=0): against ``artune_unfused`` (the profile's routes, SGLang's own at
  the decode sizes where it measured fastest back to back) it shows what the other backends'
  kernels cost in place of SGLang's own in a served step;
- ``artune_inert_again`` ``artune_inert`` in another engine;
- ``artune_inert_nocheck`` ``artune_inert`` with ``ARTUNE_FORWARD_CHECK=0``: the hooks on the
  all-reduce path stay, the per-forward fault check goes.

Per batch size (requests of ``--input-len`` token ids, ``--new-tokens`` greedy tokens, EOS
ignored) it times ``--reps`` pairs of generates, one producing 1 token (prefill) and one
producing N; the per-step decode latency of a rep is (t_N - median t_1) / (N - 1): the prefill
is taken once, as the median over reps, because one slow 1-token call (30 ms at times, 120 ms
once on 4x H100) would otherwise move that rep's step by a third of a millisecond. Reported: the
median over reps and its spread (max - min), decode throughput (batch / step) and end-to-end
tokens/s. The raw times of every rep are kept.

After timing it checks the numbers the all-reduces produce. SGLang's dummy weights (uniform
±1e-3, RMSNorm weights included) leave every layer's all-reduce output below the residual
stream's bf16 resolution and the logits flat (spread ~1e-5): a wrong layer all-reduce would give
the same logprobs. So the worker first sets the RMSNorm weights (``update_weights_from_tensor``,
the same in every config) to ``NORM_WEIGHT`` in the layers and ``FINAL_NORM_WEIGHT`` at the
end: the layers' all-reduces then carry the residual stream and the logprobs spread over units.
It records the top-k logprobs of ``CHECK_STEPS`` greedy tokens of 4 requests: the first from the
(eager) prefill, the others from decode steps in CUDA graphs, the mode that is timed. The report
compares every config with ``default`` (max |Δ logprob| over default's top-k tokens, top-k
overlap, top-1 agreement, over the positions where both generated the same tokens so far) next
to the same numbers for ``nccl`` vs ``default`` (two correct all-reduces that sum in different
orders: the size of honest bf16 differences). For the artune configs it also keeps the plugin's
log lines and whether the plugin reported routing.

Paired mode (``--paired A,B[,...]``, e.g. ``default,artune``, ``default_compile,artune_compile``
or ``default,artune,default_again,artune_again``): the configs' engines run side by side on the
same GPUs (``--paired-mem`` each), and per batch size the parent asks for one rep at a time from
each, the order changing round by round: a rotation, then its reverse (A B, B A, B A, A B,
...; A B C D, D C B A, B C D A, A D C B, ...), so every engine goes before every other
equally often (use an even ``--reps``). Round r
compares every pair of engines' reps, taken seconds apart (the artune config against the
other whichever started first; the later against the earlier when neither or both are artune
configs), so a machine whose speed drifts over minutes (engines of one config differed by up
to 11 % on one 4x H100 machine, twelfth session) moves both alike. Reported per pair and batch
size: the median of the per-round percentages and its distribution-free 95 % interval from
order statistics (``--reps 20`` or more; with fewer than 6 rounds the interval is the full
range), judged against ``--band`` (±1 %): within, slower, faster, no slower, or not resolved
(also when the rounds are too few for a 95 % interval), and the medians of the rounds where
each of the two went first. Every engine gets the same KV pool (``max_total_tokens``: twice the
largest batch's tokens) and ``sleep_on_idle`` (an idle one waits on its sockets instead of
spinning). Pairing cancels drift, not what is fixed to an engine instance or to the start
order: on 4x H100 at TP=4 (thirteenth session) 30 rounds resolved ±0.7 %, while two engines of
one config differed by 0.6 % (uncompiled, bs 1) to 6 % (compiled). So run two engines of each
config (``default,artune,default_again,artune_again``: the two A/A pairs show the engine
effect, the four cross pairs the config effect in both start orders), and read the files
together: ``python benchmarks/e2e_paired.py FILE...`` gives each pair's interval, their hull
per pair of configs, and the effect balanced over the start orders (median and interval; no
verdict where the two orders' hulls do not overlap). The results are written
after every batch size; a worker that does not answer a rep within a minute is killed. The
logprob check runs in every engine after the timing (a check cut short by the budget leaves the
timings standing). With ``--budget-s``, paired mode starts a round only if it and the checks
still fit: fewer rounds than asked, said in the summary, rather than no check.

Writes ``--out`` (JSON: card, date, versions, environment, raw reps and the summary, rewritten
after every config; configs already in an existing file are kept, so a run may be split over
several calls) and prints a table. The NVLink multicast switches stay off in every engine
process. Each config costs an engine start plus a few seconds per batch size: to fit a time
limit, run the configs in several calls with the same ``--out`` (e.g. ``--configs
default,nccl,artune`` then ``--configs artune_nccl,artune_compile``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_paired import (  # noqa: E402
    Served,
    attach_graph_times,
    batch_row,
    echo_log,
    graph_folder,
    graph_times_lag_s,
    kill_worker,
    paired_lines,
    run_paired,
    spawn_worker,
)
from kernel_table import PROFILE_TOKENS, diff_lines, trace_files  # noqa: E402

from artune import envs as artune_envs  # noqa: E402
from artune.envs import NO_MULTICAST_ENV  # noqa: E402

# Llama-3.1-8B's shape (weights are SGLang's dummy init; max_position_embeddings trimmed to
# what the benchmark needs, which only changes the RoPE table and the KV pool's limits; kept
# above original_max_position_embeddings, which transformers 5 checks for llama3 RoPE).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"artune": False, "kw": {}},
    "nccl": {"artune": False, "kw": {"disable_custom_all_reduce": True}},
    "artune": {"artune": True, "kw": {}},
    "artune_nccl": {"artune": True, "kw": {"disable_custom_all_reduce": True}},
    "artune_compile": {"artune": True, "kw": {"enable_torch_compile": True}},
    "default_compile": {"artune": False, "kw": {"enable_torch_compile": True}},
    "default_again": {"artune": False, "kw": {}},
    "artune_again": {"artune": True, "kw": {}},
    "default_compile_again": {"artune": False, "kw": {"enable_torch_compile": True}},
    "artune_compile_again": {"artune": True, "kw": {"enable_torch_compile": True}},
    "artune_fused": {"artune": True, "kw": {}, "env": {"ARTUNE_FUSED_LINEAR": "1"}},
    "artune_nccl_fused": {"artune": True, "kw": {"disable_custom_all_reduce": True},
                          "env": {"ARTUNE_FUSED_LINEAR": "1"}},
    "artune_unfused": {"artune": True, "kw": {}, "env": {"ARTUNE_FUSED_LINEAR": "0"}},
    "artune_nccl_unfused": {"artune": True, "kw": {"disable_custom_all_reduce": True},
                            "env": {"ARTUNE_FUSED_LINEAR": "0"}},
    "artune_prefetch": {"artune": True, "kw": {}, "linear_params": {"prefetch": 1}},
    "artune_compile_prefetch": {"artune": True, "kw": {"enable_torch_compile": True},
                                "linear_params": {"prefetch": 1}},
    "artune_deep": {"artune": True, "kw": {}, "linear_params": {"stages": 5}},
    "artune_compile_deep": {"artune": True, "kw": {"enable_torch_compile": True},
                            "linear_params": {"stages": 5}},
    "artune_compile_one_row": {"artune": True, "kw": {"enable_torch_compile": True},
                               "env": {"ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED": "1"}},
    # the two-shot lamport under PDL's early start, without its early launch of the next kernel
    "artune_twoshot_wait": {"artune": True, "kw": {},
                            "env": {"ARTUNE_NVRAR_TWOSHOT_PDL": "wait"}},
    # NVRAR's lamport slots in three parities, each call emptying its predecessor's
    "artune_ahead": {"artune": True, "kw": {}, "env": {"ARTUNE_NVRAR_CLEAR_AHEAD": "1"}},
    "artune_inert": {"artune": True, "kw": {}, "only": "sglang"},
    "artune_without_sglang": {"artune": True, "kw": {}, "drop": "sglang"},
    "artune_unfused_without_sglang": {"artune": True, "kw": {}, "drop": "sglang",
                                      "env": {"ARTUNE_FUSED_LINEAR": "0"}},
    "artune_inert_again": {"artune": True, "kw": {}, "only": "sglang"},
    "artune_inert_nocheck": {"artune": True, "kw": {}, "only": "sglang",
                             "env": {"ARTUNE_FORWARD_CHECK": "0"}},
}
TOP_K = 20
CHECK_REQUESTS = 4
CHECK_STEPS = 8  # greedy tokens whose top-k logprobs are compared: 1 from prefill, 7 decode steps
NORM_WEIGHT = 1.0  # the layers' RMSNorm weights for the check (SGLang's dummy init: ±1e-3)
FINAL_NORM_WEIGHT = 32.0  # the final RMSNorm's: logits spread over units with lm_head's ±1e-3
PLUGIN_GROUP = "sglang.srt.plugins"


# ---------------------------------------------------------------------------------------------
# Worker: one engine, one config


def _engine_kwargs(args: argparse.Namespace, model_dir: str, config: str) -> dict[str, Any]:
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    bss = sorted(set(args.batch_sizes))
    kw: dict[str, Any] = dict(
        model_path=model_dir, load_format="dummy", skip_tokenizer_init=True, tp_size=args.tp,
        attention_backend="triton", sampling_backend="pytorch", mem_fraction_static=args.mem,
        dtype="bfloat16", disable_cuda_graph=False, random_seed=0, log_level=args.log_level,
    )
    # Decode graphs for exactly the measured batch sizes (field names differ by release).
    if "cuda_graph_bs_decode" in fields:
        kw["cuda_graph_bs_decode"] = bss
    elif "cuda_graph_bs" in fields:
        kw["cuda_graph_bs"] = bss
    if "disable_prefill_cuda_graph" in fields:
        kw["disable_prefill_cuda_graph"] = True
    if getattr(args, "paired_engine", False):
        # Side by side with another engine: the same KV pool in both (else the first one's is
        # sized from an empty GPU and the second's from what is left), and an idle scheduler
        # that waits on its sockets instead of spinning while the other engine is timed.
        kw["max_total_tokens"] = 2 * max(bss) * (args.input_len + args.new_tokens)
        kw["sleep_on_idle"] = True
    kw.update(CONFIGS[config]["kw"])
    if kw.get("enable_torch_compile"):
        kw["torch_compile_max_bs"] = max(bss)
    for forbidden in ("enable_symm_mem", "enable_nccl_nvls", "enable_torch_symm_mem"):
        if kw.get(forbidden):
            raise SystemExit(f"{forbidden} is refused: NVLink multicast must stay off")
    dropped = sorted(k for k in kw if k not in fields)
    for k in dropped:
        kw.pop(k)
    if dropped:
        print(f"[e2e] this ServerArgs has no {dropped}; dropped", flush=True)
    return kw


def _prompts(bs: int, n: int, salt: int = 0) -> list[list[int]]:
    return [[1000 + (i * 7919 + j * 104729 + salt) % 120000 for j in range(n)] for i in range(bs)]


def _plugin_problem(config: str) -> str | None:
    """Why the artune plugin cannot be active in this config's engine (None when it can)."""
    if not CONFIGS[config]["artune"]:
        return None
    from importlib.metadata import entry_points

    if not any(ep.name == "artune" for ep in entry_points(group=PLUGIN_GROUP)):
        return (f"no entry point 'artune' in group {PLUGIN_GROUP}: install artune (pip install "
                f"--no-deps .) where SGLang's plugin loader sees it")
    allowed = os.environ.get("SGLANG_PLUGINS", "")
    if allowed.strip() and "artune" not in {p.strip() for p in allowed.split(",")}:
        return f"SGLANG_PLUGINS={allowed!r} leaves artune out"
    if not artune_envs.get("ARTUNE_PROFILE") or artune_envs.get("ARTUNE_DISABLE"):
        return "ARTUNE_PROFILE is unset or ARTUNE_DISABLE is set"
    return None


def _set_norms(engine: Any) -> None:
    """RMSNorm weights for the logprob check (see the module docstring), in every config alike."""
    import torch

    h = LLAMA_31_8B["hidden_size"]
    one = torch.full((h,), NORM_WEIGHT, dtype=torch.bfloat16)
    named = [(f"model.layers.{i}.{norm}.weight", one)
             for i in range(LLAMA_31_8B["num_hidden_layers"])
             for norm in ("input_layernorm", "post_attention_layernorm")]
    named.append(("model.norm.weight", torch.full((h,), FINAL_NORM_WEIGHT, dtype=torch.bfloat16)))
    res = engine.update_weights_from_tensor(named)
    ok, msg = (res[0], res[1]) if isinstance(res, tuple) else (bool(res), str(res))
    if not ok:
        raise RuntimeError(f"update_weights_from_tensor failed: {msg}")


def _top_logprobs(engine: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per check request: its greedy output ids and, per generated position, the top-k
    [logprob, token id] pairs (position 0 from the prefill, the rest from decode steps)."""
    out = engine.generate(
        input_ids=_prompts(CHECK_REQUESTS, args.input_len, salt=17),
        sampling_params={"max_new_tokens": CHECK_STEPS, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True, top_logprobs_num=TOP_K,
    )
    rows = []
    for o in out:
        top = [[[float(lp), int(tok)] for lp, tok, *_ in (pos or [])]
               for pos in o["meta_info"]["output_top_logprobs"]]
        rows.append({"ids": [int(t) for t in o["output_ids"]], "top": top})
    return rows


def _generate(engine: Any, prompts: list[list[int]], tokens: int) -> float:
    """Seconds for one greedy generate of ``tokens`` tokens per prompt (EOS ignored)."""
    sp = {"max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    res = engine.generate(input_ids=prompts, sampling_params=sp)
    dt = time.perf_counter() - t0
    got = [len(r["output_ids"]) for r in res]
    if got != [tokens] * len(prompts):
        raise RuntimeError(f"bs {len(prompts)}: asked {tokens} tokens per request, got {got}")
    return dt


def _one_rep(engine: Any, args: argparse.Namespace, bs: int) -> dict[str, Any]:
    """One timed rep: the 1-token call, then the N-token call; ``win_ns``: the N-token call's
    time window on the host's monotonic clock, whose graph replays ``attach_graph_times``
    takes."""
    prompts = _prompts(bs, args.input_len)
    t1 = _generate(engine, prompts, 1)
    start = time.monotonic_ns()
    tn = _generate(engine, prompts, args.new_tokens)
    return {"t1_s": t1, "tn_s": tn, "win_ns": [start, time.monotonic_ns()]}


def _warm(engine: Any, args: argparse.Namespace, bs: int) -> None:
    """An untimed generate at this batch size (its first use after the engine start)."""
    _generate(engine, _prompts(bs, args.input_len), min(args.new_tokens, 32))


def _time_batch(engine: Any, args: argparse.Namespace, bs: int) -> dict[str, Any]:
    _warm(engine, args, bs)
    reps = [_one_rep(engine, args, bs) for _ in range(args.reps)]
    return batch_row(bs, reps, args.new_tokens)


def worker(args: argparse.Namespace) -> int:
    config = args.worker
    problem = _plugin_problem(config)
    if problem:  # before the engine start: an inert plugin would time SGLang's own all-reduce
        print(f"[e2e] {config}: the artune plugin would not be active: {problem}", flush=True)
        return 3
    import sglang

    kw = _engine_kwargs(args, args.model_dir, config)
    result: dict[str, Any] = {
        "config": config, "engine_kwargs": kw, "artune_profile": os.environ.get("ARTUNE_PROFILE"),
        "settings": {"tp": args.tp, "input_len": args.input_len, "new_tokens": args.new_tokens,
                     "reps": args.reps, "batch_sizes": args.batch_sizes, "mem": args.mem},
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    out = Path(args.worker_out)

    def save() -> None:  # atomic: the parent may kill this process at any time
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out)

    routes_dir = None
    if CONFIGS[config]["artune"]:  # which backend took each all-reduce (ARTUNE_ROUTE_LOG)
        routes_dir = Path(tempfile.mkdtemp(prefix=f"artune-routes-{config}-"))
        os.environ["ARTUNE_ROUTE_LOG"] = str(routes_dir)
    t0 = time.perf_counter()
    engine = sglang.Engine(**kw)
    result["startup_s"] = round(time.perf_counter() - t0, 1)
    if routes_dir is not None:  # the decode graphs are captured by now
        result["routes"] = _routes_summary(routes_dir)
        save()
    print(f"[e2e] {config}: engine up in {result['startup_s']} s", flush=True)
    if args.result_fd is not None:  # paired mode: the parent says what to time, rep by rep
        with os.fdopen(args.result_fd, "w", buffering=1) as results:
            def emit(obj: dict[str, Any]) -> None:
                results.write(json.dumps(obj) + "\n")
            emit({"ready": True, **result})
            try:
                _serve(engine, args, sys.stdin, emit)
            finally:
                engine.shutdown()
        return 0
    try:
        result["batches"] = []
        for bs in args.batch_sizes:
            row = _time_batch(engine, args, bs)
            print(f"[e2e] {config}: bs {bs}: {row['step_ms']:.3f} ms/step "
                  f"(spread {row['spread_ms']:.3f})", flush=True)
            result["batches"].append(row)
            save()  # the timings done so far survive a timeout or a failing check below
        folder = artune_envs.get("ARTUNE_GRAPH_TIMES")
        if folder:  # each rep's decode graphs' GPU time (graph_times)
            time.sleep(graph_times_lag_s())
            result["batches"] = [
                batch_row(b["batch"], attach_graph_times(b["reps"], folder, args.tp,
                                                         (args.new_tokens - 1) // 2),
                          args.new_tokens) for b in result["batches"]]
            save()
        try:
            _set_norms(engine)
            result["norms"] = {"layers": NORM_WEIGHT, "final": FINAL_NORM_WEIGHT}
            result["top_logprobs"] = _top_logprobs(engine, args)
        except Exception as exc:  # noqa: BLE001 - recorded; the timings stand without the check
            result["check_error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"[e2e] {config}: logprob check failed: {result['check_error']}", flush=True)
        save()
    finally:
        engine.shutdown()
    return 0


def _serve(engine: Any, args: argparse.Namespace, commands: Any,
           emit: Callable[[dict[str, Any]], None]) -> None:
    """Paired mode's worker loop: one command per line from the parent, one JSON answer each
    (``emit``), until ``quit`` or the end of input. ``warm BS``: an untimed generate at that
    batch size; ``rep BS``: one timed rep (``_one_rep``); ``check``: the logprob check's norms,
    then the top-k logprobs; ``profile BS DIR``: one generate under SGLang's profiler, traces
    into DIR (``_profile``). A command that fails answers ``{"error": ...}``; the loop goes on
    (the parent decides)."""
    for line in commands:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            return
        try:
            if cmd[0] == "warm" and len(cmd) == 2:
                _warm(engine, args, int(cmd[1]))
                emit({"warm": int(cmd[1])})
            elif cmd[0] == "rep" and len(cmd) == 2:
                emit(_one_rep(engine, args, int(cmd[1])))
            elif cmd == ["check"]:
                _set_norms(engine)
                emit({"norms": {"layers": NORM_WEIGHT, "final": FINAL_NORM_WEIGHT},
                      "top_logprobs": _top_logprobs(engine, args)})
            elif cmd[0] == "profile" and len(cmd) == 3:
                emit(_profile(engine, args, int(cmd[1]), cmd[2]))
            else:
                emit({"error": f"unknown command {line.strip()!r}"})
        except Exception as exc:  # noqa: BLE001 - answered; the parent records and decides
            emit({"error": f"{type(exc).__name__}: {exc}"[:500]})


def _profile(engine: Any, args: argparse.Namespace, bs: int, folder: str) -> dict[str, Any]:
    """One generate of ``PROFILE_TOKENS`` tokens at batch size ``bs`` under SGLang's profiler
    (GPU activity: kernels and CUDA runtime calls), one trace per TP rank into ``folder``; waits
    (up to 60 s) until every rank's trace is on disk. Untimed: the profiler slows the step."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    engine.start_profile(output_dir=folder, activities=["GPU"], profile_prefix=f"bs{bs}")
    try:
        _generate(engine, _prompts(bs, args.input_len), PROFILE_TOKENS)
    finally:
        engine.stop_profile()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(trace_files(folder)) >= args.tp:
            break
        time.sleep(1)
    return {"profiled": bs, "folder": folder, "steps": PROFILE_TOKENS - 1}


def _routes_summary(folder: Path) -> dict[str, Any] | None:
    """What the plugin's route trace (one file per SGLang process, read by ``artune show
    --routes``'s loader) says took the all-reduces: per mode (graph: inside the captured CUDA
    graphs), backend -> sizes and calls, over all processes. None when no process wrote one."""
    from artune.inspect import load_routes

    try:
        processes, rows = load_routes(str(folder))
    except ValueError:
        return None
    by_mode: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cell = by_mode.setdefault(row["mode"], {}).setdefault(
            row["backend"], {"sizes": [], "calls": 0})
        if row["nbytes"] not in cell["sizes"]:
            cell["sizes"].append(row["nbytes"])
        cell["calls"] += row["calls"]
    return {"processes": processes, "by_mode": {
        mode: {b: {"sizes": sorted(c["sizes"]), "calls": c["calls"]} for b, c in sorted(m.items())}
        for mode, m in sorted(by_mode.items())}}


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per config, then the comparison


def _gpu_mem_used() -> list[int]:
    """MiB in use per GPU (nvidia-smi; [] when it cannot tell)."""
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                            "nounits"], capture_output=True, text=True, timeout=60)
        return [int(x) for x in q.stdout.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def _wait_gpus_released(baseline: list[int], limit_s: float = 60.0) -> None:
    """Wait until every GPU is back near its memory use before the first engine: a dying
    engine's ranks still holding memory would fail the next engine's memory-balance check."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        used = _gpu_mem_used()
        if not baseline or len(used) != len(baseline) or all(
                u <= b + 1024 for u, b in zip(used, baseline, strict=True)):
            return
        time.sleep(2)
    print(f"[e2e] GPUs still hold memory after {limit_s:.0f} s: {_gpu_mem_used()} MiB "
          f"(before the first engine: {baseline})", flush=True)


def _card() -> dict[str, Any]:
    """The card and versions, without touching CUDA here: a CUDA context in this process would
    sit on GPU 0 beside every engine's rank 0."""
    info: dict[str, Any] = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        rows = [r.split(",") for r in q.stdout.splitlines() if r.strip()]
        if rows:
            info.update(gpu=rows[0][0].strip(), gpus=len(rows), driver=rows[0][-1].strip())
    except (OSError, subprocess.SubprocessError) as exc:
        info["gpu_error"] = str(exc)
    from importlib import metadata

    for dist in ("torch", "sglang", "sglang-kernel", "triton", "transformers",
                 "nvshmem4py-cu13", "artune"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _compare(ref: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """max |Δ logprob| over ref's top-k tokens that other also lists, top-k overlap and top-1
    agreement, over the positions where both generated the same tokens so far (position 0 is
    the prefill's, the others are decode steps)."""
    worst, overlap, top1, n, n_decode = 0.0, [], 0, 0, 0
    for a, b in zip(ref, other, strict=True):
        for pos, (ta, tb) in enumerate(zip(a["top"], b["top"], strict=False)):
            if a["ids"][:pos] != b["ids"][:pos]:
                break  # the sequences diverged: later positions see different inputs
            bmap = {tok: lp for lp, tok in tb}
            common = [(lp, bmap[tok]) for lp, tok in ta if tok in bmap]
            overlap.append(len(common) / max(1, len(ta)))
            worst = max([worst, *[abs(x - y) for x, y in common]])
            top1 += int(bool(ta) and bool(tb) and ta[0][1] == tb[0][1])
            n += 1
            n_decode += pos > 0
    return {"max_abs_dlogprob": worst, "min_topk_overlap": min(overlap, default=0.0),
            "top1_agree": top1 / max(1, n), "positions": n, "decode_positions": n_decode}


def _logit_spread(rows: list[dict[str, Any]]) -> float:
    """Smallest (top-1 - top-k) logprob gap at position 0: ~1e-5 means flat logits (SGLang's
    dummy norms), against which no all-reduce error shows."""
    gaps = [r["top"][0][0][0] - r["top"][0][-1][0] for r in rows if r["top"] and r["top"][0]]
    return min(gaps, default=0.0)


def _derived_profile(path: str, folder: Path, only: str | None = None,
                     drop: str | None = None) -> str:
    """A copy of the profile at ``path`` whose tables are re-derived (the plugin's own
    re-derivation) from the measurements of backend ``only`` alone, or of every backend but
    ``drop``; written into ``folder``, its path returned."""
    from artune.integration.sglang_setup import _without
    from artune.profile import load

    profile = load(path)
    measured = {m["backend"] for m in profile.data.get("measurements") or []}
    if only and only not in measured:
        raise SystemExit(f"{path}: no measurements of {only!r} to derive a profile from")
    excluded = sorted(measured - {only}) if only else [drop] if drop else []
    derived = _without(profile, dict.fromkeys(excluded, "left out by sglang_e2e.py"))
    out = folder / f"profile_{'only' if only else 'without'}_{only or drop}.json"
    out.write_text(json.dumps(derived.data, indent=1))
    return str(out)


def _linear_variant_profile(path: str, folder: Path, params: dict[str, int]) -> str:
    """A copy of the profile at ``path`` whose fused linear ranges run with ``params`` over
    their own (e.g. ``{"prefetch": 1}``), checked as a profile; written into ``folder``, its
    path returned. The profile must fuse some layer."""
    from artune.profile import load, validate

    data = json.loads(json.dumps(load(path).data))
    fused = [g for e in data.get("linear") or [] for g in e["ranges"] if g["fused"]]
    if not fused:
        raise SystemExit(f"{path}: no fused linear range to run with {params}")
    for g in fused:
        g["params"] = dict(g["params"], **params)
    validate(data)
    tag = "_".join(f"{k}{v}" for k, v in sorted(params.items()))
    out = folder / f"profile_linear_{tag}.json"
    out.write_text(json.dumps(data, indent=1))
    return str(out)


def _summarize(doc: dict[str, Any], tol: float) -> list[str]:
    runs = doc["configs"]
    lines = []
    bss = sorted({b["batch"] for r in runs.values() for b in r.get("batches", [])})
    head = f"{'config':<16}" + "".join(f"  bs{bs:<3} ms/step (spread)  tok/s" for bs in bss)
    lines.append(f"TP={doc['tp']}  {doc['card'].get('gpu')} x{doc['card'].get('gpus')}  "
                 f"{doc['date']}  (median of {doc['reps']} reps, {doc['new_tokens']} new tokens)")
    lines.append(head)
    for name, r in runs.items():
        cells = {b["batch"]: b for b in r.get("batches", [])}
        row = f"{name:<16}"
        for bs in bss:
            b = cells.get(bs)
            row += (f"  {b['step_ms']:8.3f} ({b['spread_ms']:.3f}) {b['decode_tok_s']:8.0f}"
                    if b else f"  {'-':>27}")
        lines.append(row + (f"   ERROR {r['error']}" if r.get("error") else ""))
    for name, r in runs.items():
        graph = {b["batch"]: b["graph_ms"] for b in r.get("batches", []) if "graph_ms" in b}
        if graph:
            lines.append(f"{name}: decode graph GPU ms/step (the fastest rank at each step, "
                         "median over steps and reps): " + "  ".join(
                             f"bs{bs} {ms:.3f}" for bs, ms in sorted(graph.items())))
        missing = [f"bs{b['batch']} rep {i}: {rep['graph_missing']}"
                   for b in r.get("batches", []) for i, rep in enumerate(b.get("reps", []))
                   if "graph_missing" in rep]
        if missing:
            lines.append(f"{name}: {len(missing)} rep(s) without GPU times: "
                         + "; ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    if doc.get("compile_env"):
        lines.append("compile settings: "
                     + " ".join(f"{k}={v}" for k, v in doc["compile_env"].items()))
    cut = next((r["rounds_cut"] for r in runs.values() if r.get("rounds_cut")), None)
    if cut:
        lines.append(f"fewer rounds than asked: {cut}")
    base = runs.get("default")
    doc["comparisons"] = {}
    if base and base.get("batches"):
        for name, r in runs.items():
            if name == "default" or not r.get("batches"):
                continue
            vs = {b["batch"]: b["step_ms"] for b in base["batches"]}
            rel = {b["batch"]: (b["step_ms"] / vs[b["batch"]] - 1) * 100
                   for b in r["batches"] if b["batch"] in vs}
            doc["comparisons"][name] = {"pct_vs_default": rel}
            lines.append(f"{name} vs default (ms/step, %): "
                         + "  ".join(f"bs{bs} {p:+.1f}%" for bs, p in sorted(rel.items())))
        nccl = runs.get("nccl")
        if nccl and nccl.get("batches"):
            vn = {b["batch"]: b["step_ms"] for b in nccl["batches"]}
            for name in ("artune_nccl", "artune_nccl_fused", "artune", "artune_fused"):
                r = runs.get(name)
                if r and r.get("batches"):
                    rel = {b["batch"]: (1 - b["step_ms"] / vn[b["batch"]]) * 100
                           for b in r["batches"] if b["batch"] in vn}
                    doc["comparisons"].setdefault(name, {})["pct_lower_than_nccl"] = rel
                    lines.append(f"{name} lower than nccl by: " + "  ".join(
                        f"bs{bs} {p:.1f}%" for bs, p in sorted(rel.items())))
        lines += _pooled(runs, doc["comparisons"])
        ref = base.get("top_logprobs")
        noise = None
        spread = _logit_spread(ref) if ref else 0.0
        if ref:
            lines.append(f"logprob check: top-1 - top-{TOP_K} gap >= {spread:.2e} in default"
                         + ("" if spread >= 1e-2 else " (FLAT logits: the check cannot see "
                            "all-reduce errors)"))
        if ref and nccl and nccl.get("top_logprobs"):
            noise = _compare(ref, nccl["top_logprobs"])
            doc["comparisons"].setdefault("nccl", {})["logits"] = noise
        for name, r in runs.items():
            if name == "default" or not ref or not r.get("top_logprobs"):
                continue
            limit = max(tol, 4 * noise["max_abs_dlogprob"]) if noise else tol
            cmp, line = _judge(ref, r["top_logprobs"], limit, f"{name} vs default")
            doc["comparisons"].setdefault(name, {})["logits"] = cmp
            lines.append(line)
    lines += _compile_pair(runs, doc["comparisons"], tol)
    lines += _pair_logprobs(doc, tol)
    lines += paired_lines(doc)
    for pair in (doc.get("paired") or {}).get("pairs", []):
        kb, kt = (runs.get(pair[k], {}).get("kernels") for k in ("base", "test"))
        if kb and kt and kb.get("bs") == kt.get("bs"):
            lines.append(f"bs {kb['bs']}, {kb['steps']} decode steps under the profiler:")
            lines += diff_lines(kb, kt, pair["base"], pair["test"])
    for name, r in runs.items():
        if r.get("profile_error"):
            lines.append(f"{name}: kernel profile failed: {r['profile_error']}")
    for name, r in runs.items():
        for mode, backends in ((r.get("routes") or {}).get("by_mode") or {}).items():
            lines.append(f"{name}: all-reduces in {mode} mode by backend (all ranks): " + "; ".join(
                f"{b} {len(c['sizes'])} sizes {min(c['sizes'])}-{max(c['sizes'])} B, "
                f"{c['calls']} calls" for b, c in backends.items()))
        if r.get("check_error"):
            lines.append(f"{name}: logprob check failed: {r['check_error']}")
        if (CONFIGS.get(name, {}).get("artune") and r.get("batches")
                and "artune_routed" in r and not r["artune_routed"]):
            lines.append(f"{name}: WARNING: the plugin never logged 'routing with': its numbers "
                         f"may be SGLang's own all-reduce (see artune_log)")
    settings = {json.dumps(r["settings"], sort_keys=True) for r in runs.values()
                if r.get("settings")}
    if len(settings) > 1:
        lines.append(f"WARNING: the configs ran with different settings: {sorted(settings)}")
    return lines


def _compile_pair(runs: dict[str, Any], comparisons: dict[str, Any], tol: float) -> list[str]:
    """artune_compile against default_compile (the plugin under torch.compile, same compile
    settings): ms/step per batch size and first-step logprobs; with or without a ``default``
    run beside them."""
    dc, ac = runs.get("default_compile"), runs.get("artune_compile")
    if not (dc and ac and dc.get("batches") and ac.get("batches")):
        return []
    vd = {b["batch"]: b["step_ms"] for b in dc["batches"]}
    rel = {b["batch"]: (b["step_ms"] / vd[b["batch"]] - 1) * 100
           for b in ac["batches"] if b["batch"] in vd}
    out = comparisons.setdefault("artune_compile", {})
    out["pct_vs_default_compile"] = rel
    lines = ["artune_compile vs default_compile (ms/step, %): "
             + "  ".join(f"bs{bs} {p:+.1f}%" for bs, p in sorted(rel.items()))]
    ref, other = dc.get("top_logprobs"), ac.get("top_logprobs")
    if ref and other:
        cmp, line = _judge(ref, other, tol, "artune_compile vs default_compile")
        out["logits_vs_default_compile"] = cmp
        lines.append(line)
    return lines


def _pair_logprobs(doc: dict[str, Any], tol: float) -> list[str]:
    """Each side-by-side pair's test against its base (e.g. artune_nccl vs nccl, artune_deep
    vs artune), except pairs with ``default`` and artune_compile with default_compile, which
    are compared above."""
    runs, lines = doc["configs"], []
    for pair in (doc.get("paired") or {}).get("pairs", []):
        base, test = pair["base"], pair["test"]
        if "default" in (base, test) or {base, test} == {"default_compile", "artune_compile"}:
            continue
        ref, other = (runs.get(k, {}).get("top_logprobs") for k in (base, test))
        if ref and other:
            cmp, line = _judge(ref, other, tol, f"{test} vs {base}")
            doc["comparisons"].setdefault(test, {})[f"logits_vs_{base}"] = cmp
            lines.append(line)
    return lines


def _judge(ref: list[dict[str, Any]], other: list[dict[str, Any]], limit: float,
           what: str) -> tuple[dict[str, Any], str]:
    """``_compare`` judged: within ``limit``, top-k overlap at least half, and logits that are
    not flat (else inconclusive); the comparison and its summary line."""
    cmp = _compare(ref, other)
    cmp["tolerance"] = limit
    cmp["ok"] = (cmp["max_abs_dlogprob"] <= limit and cmp["min_topk_overlap"] >= 0.5
                 and _logit_spread(ref) >= 1e-2)
    line = (f"logprobs {what} ({cmp['positions']} positions, {cmp['decode_positions']} decode): "
            f"max|Δ| {cmp['max_abs_dlogprob']:.2e} (tolerance {limit:.2e}), top-k overlap >= "
            f"{cmp['min_topk_overlap']:.0%}, top-1 agree {cmp['top1_agree']:.0%} -> "
            f"{'OK' if cmp['ok'] else 'MISMATCH or inconclusive'}")
    return cmp, line


def _pooled(runs: dict[str, Any], comparisons: dict[str, Any]) -> list[str]:
    """artune vs default over two engines each (mean ms/step per batch size), beside each
    pair's engine-to-engine difference; nothing unless all four configs have numbers."""
    pairs = {name: runs.get(name) for name in ("default", "default_again", "artune",
                                               "artune_again")}
    if not all(r and r.get("batches") for r in pairs.values()):
        return []
    step = {name: {b["batch"]: b["step_ms"] for b in r["batches"]}  # type: ignore[union-attr]
            for name, r in pairs.items()}
    batches = sorted(set.intersection(*(set(v) for v in step.values())))
    mean = {k: {bs: (step[k][bs] + step[f"{k}_again"][bs]) / 2 for bs in batches}
            for k in ("default", "artune")}
    rel = {bs: (mean["artune"][bs] / mean["default"][bs] - 1) * 100 for bs in batches}
    noise = {k: {bs: abs(step[k][bs] / step[f"{k}_again"][bs] - 1) * 100 for bs in batches}
             for k in ("default", "artune")}
    comparisons["pooled"] = {"pct_artune_vs_default": rel, "engine_to_engine_pct": noise}
    return [
        "artune vs default, mean of two engines each (ms/step, %): "
        + "  ".join(f"bs{bs} {rel[bs]:+.1f}%" for bs in batches),
        "  engine to engine (|first / second - 1|): default "
        + " ".join(f"bs{bs} {noise['default'][bs]:.1f}%" for bs in batches)
        + "; artune " + " ".join(f"bs{bs} {noise['artune'][bs]:.1f}%" for bs in batches),
    ]


def _run_worker(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, list[str]]:
    """Run one worker, echoing its output (and its engine's) and keeping the plugin's log lines.
    On timeout (or an interrupt here) the worker's whole process group is killed, what it
    started included."""
    proc = spawn_worker(cmd, env)
    notes: list[str] = []
    reader = threading.Thread(target=echo_log, args=(proc.stdout, notes), daemon=True)
    reader.start()
    rc = 124
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[e2e] worker timed out after {timeout:.0f} s: killed", flush=True)
    finally:
        kill_worker(proc)
    reader.join(timeout=10)
    return rc, notes


def _compact(doc: dict[str, Any]) -> str:
    """A results file's text: compact JSON (every rep's raw times make the files large, and
    they travel to the GPU machines with the working tree)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n"


def _compile_env() -> dict[str, str]:
    """The settings that steer torch.compile in every engine (inherited from this process):
    e.g. TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN pins inductor's GEMMs to cuBLAS, so the
    ranks and engines of a compiled comparison do not each pick their own autotuned kernels."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("TORCHINDUCTOR_") or k == "SGLANG_TORCH_COMPILE_MODE"}


def _worker_env(args: argparse.Namespace, config: str, model_dir: str) -> dict[str, str]:
    """A config's worker environment: no multicast, its profile (or none), its settings."""
    env = dict(os.environ, **NO_MULTICAST_ENV)
    env.pop("ARTUNE_PROFILE", None)
    if CONFIGS[config]["artune"]:
        env["ARTUNE_PROFILE"] = args.profile
        if CONFIGS[config].get("only") or CONFIGS[config].get("drop"):
            env["ARTUNE_PROFILE"] = _derived_profile(
                args.profile, Path(model_dir), only=CONFIGS[config].get("only"),
                drop=CONFIGS[config].get("drop"))
        if CONFIGS[config].get("linear_params"):  # over a derived profile, if any
            env["ARTUNE_PROFILE"] = _linear_variant_profile(
                env["ARTUNE_PROFILE"], Path(model_dir), CONFIGS[config]["linear_params"])
    env.update(CONFIGS[config].get("env", {}))
    # every engine, artune's or not, times its decode graphs on the GPU (graph_times)
    env["ARTUNE_GRAPH_TIMES"] = str(graph_folder(model_dir, config))
    return env


def _worker_cmd(args: argparse.Namespace, config: str, model_dir: str, res_file: Path,
                mem: float | None = None) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", config,
            "--worker-out", str(res_file), "--model-dir", model_dir,
            "--tp", str(args.tp), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
            "--input-len", str(args.input_len), "--new-tokens", str(args.new_tokens),
            "--reps", str(args.reps), "--mem", str(args.mem if mem is None else mem),
            "--log-level", args.log_level]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--profile", default=os.environ.get("ARTUNE_PROFILE"),
                   help="artune profile for the artune* configs (default: ARTUNE_PROFILE)")
    p.add_argument("--configs", default="default,nccl,artune,artune_nccl,artune_compile",
                   help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--batch-sizes", default="1,4,16,64",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per batch size")
    p.add_argument("--mem", type=float, default=0.6, help="mem_fraction_static")
    p.add_argument("--tol", type=float, default=0.05,
                   help="least tolerance on |Δ logprob| (raised to 4x the nccl-vs-default one)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per config (its worker "
                   "is killed after that)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for this whole call: a worker is killed when it runs out (its "
                   "finished batch sizes are kept), later configs are skipped")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--paired", default=None, metavar="A,B[,...]",
                   help="two or more configs as engines side by side on the same GPUs, one rep "
                   "from each in turn, the order balanced over each two rounds; reports every pair "
                   "round by round with a distribution-free interval of the median (--configs "
                   "is not used). default,artune,default_again,artune_again gives two engines "
                   "of each. Use --reps 20 or more: below 6 rounds the interval is the full "
                   "range")
    p.add_argument("--paired-mem", type=float, default=0.35,
                   help="mem_fraction_static of each engine in paired mode (they share the GPUs)")
    p.add_argument("--band", type=float, default=1.0,
                   help="paired mode: the ± band in %% the interval is judged against")
    p.add_argument("--profile-bs", type=int, default=None, metavar="BS",
                   help="paired mode: after the check, each engine runs one generate at this "
                   "batch size under SGLang's profiler, and the summary lists the decode-graph "
                   "kernels whose GPU time per step differs most between the engines "
                   "(benchmarks/kernel_table.py)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--paired-engine", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode steps are timed between 1 and N)")
    if args.reps < 1 or not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--reps and every --batch-sizes entry must be at least 1")

    configs = [c.strip() for c in (args.paired or args.configs).split(",") if c.strip()]
    if args.paired and (len(configs) < 2 or len(set(configs)) != len(configs)):
        p.error(f"--paired takes two or more different configs, got {args.paired!r}")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if any(CONFIGS[c]["artune"] for c in configs):
        if not args.profile or not Path(args.profile).is_file():
            p.error(f"the artune configs need --profile (an existing file), got {args.profile!r}")
        args.profile = str(Path(args.profile).resolve())

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = Path(args.out or f"benchmarks/results/sglang_e2e_tp{args.tp}_{date[:10]}.json")
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    doc.update(tp=args.tp, date=date, card=_card(), reps=args.reps, input_len=args.input_len,
               new_tokens=args.new_tokens, profile=args.profile, model=LLAMA_31_8B,
               command=" ".join(sys.argv), compile_env=_compile_env())
    doc.setdefault("configs", {})

    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    out.parent.mkdir(parents=True, exist_ok=True)
    baseline = _gpu_mem_used()
    model_dir = tempfile.mkdtemp(prefix="artune_e2e_llama_")
    (Path(model_dir) / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=1))
    args.profile_dir = str(Path(model_dir) / "profiles")
    if args.paired:
        def spawn(config: str) -> Served:
            cmd = _worker_cmd(args, config, model_dir, Path(model_dir) / f"{config}.json",
                              mem=args.paired_mem) + ["--paired-engine"]
            print(f"[e2e] {config}: starting ({' '.join(cmd[2:])})", flush=True)
            return Served(config, cmd, _worker_env(args, config, model_dir))

        def save(results: dict[str, Any], paired: dict[str, Any]) -> None:
            doc["configs"].update(results)
            doc["paired"] = paired
            doc["summary"] = _summarize(doc, args.tol)
            out.write_text(_compact(doc))

        save(*run_paired(args, tuple(configs), spawn, deadline, save,
                         artune={c for c in configs if CONFIGS[c]["artune"]}))
        _wait_gpus_released(baseline)
        configs = []  # nothing left for the one-engine loop below
    for config in configs:
        env = _worker_env(args, config, model_dir)
        res_file = Path(model_dir) / f"{config}.json"
        cmd = _worker_cmd(args, config, model_dir, res_file)
        limit = args.timeout
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic() - 15)
            if limit < 60:
                print(f"[e2e] {config}: skipped, {limit + 15:.0f} s left", flush=True)
                doc["configs"].setdefault(config, {"config": config, "error": "skipped: no time"})
                continue
        print(f"[e2e] {config}: starting ({' '.join(cmd[2:])})", flush=True)
        res_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        rc, notes = _run_worker(cmd, env, limit)
        _wait_gpus_released(baseline)
        # A worker that died after timing leaves its timings in the file: keep them.
        try:
            res = json.loads(res_file.read_text())
        except (OSError, ValueError):
            res = {"config": config}
        if rc != 0:
            res["error"] = "timed out" if rc == 124 else f"exit code {rc}"
        if CONFIGS[config]["artune"]:
            res["artune_log"] = notes
            res["artune_routed"] = any("routing with" in n for n in notes)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        doc["configs"][config] = res
        p_doc = doc.get("paired") or {}
        if config in (p_doc.get("engines") or (p_doc.get("a"), p_doc.get("b"))):
            doc.pop("paired")  # its statistics were of the engine this run replaced
        doc["summary"] = _summarize(doc, args.tol)
        out.write_text(_compact(doc))  # after every config: partial runs survive
    lines = doc["summary"] = _summarize(doc, args.tol)
    out.write_text(_compact(doc))
    print("\n".join(lines))
    print(f"[e2e] results: {out}")
    return 0 if all("error" not in r for r in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
