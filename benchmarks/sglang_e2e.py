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
- ``artune_compile`` artune with ``enable_torch_compile=True``.

Per batch size (requests of ``--input-len`` token ids, ``--new-tokens`` greedy tokens, EOS
ignored) it times ``--reps`` pairs of generates, one producing 1 token (prefill) and one
producing N; the per-step decode latency of a rep is (t_N - t_1) / (N - 1). Reported: the median
over reps and its spread (max - min), decode throughput (batch / step) and end-to-end tokens/s.
Before timing it records the first generated step's top-k logprobs of 4 requests; the report
compares every config with ``default`` (max |Δ logprob| over default's top-k tokens, top-1
agreement) next to the same numbers for ``nccl`` vs ``default`` (two correct all-reduces that
sum in different orders: the size of honest bf16 differences).

Writes ``--out`` (JSON: card, date, versions, environment, raw reps and the summary; configs
already in an existing file are kept, so a run may be split over several calls) and prints a
table. The NVLink multicast switches stay off in every engine process. Each config costs an
engine start plus a few seconds per batch size: to fit a time limit, run the configs in several
calls with the same ``--out`` (e.g. ``--configs default,nccl,artune`` then
``--configs artune_nccl,artune_compile``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from artune.envs import NO_MULTICAST_ENV  # noqa: E402

# Llama-3.1-8B's shape (weights are SGLang's dummy init; max_position_embeddings trimmed to
# what the benchmark needs, which only changes the RoPE table and the KV pool's limits).
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
    "max_position_embeddings": 8192,
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
}
TOP_K = 20
CHECK_REQUESTS = 4


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
        disable_cuda_graph=False, random_seed=0, log_level=args.log_level,
    )
    # Decode graphs for exactly the measured batch sizes (field names differ by release).
    if "cuda_graph_bs_decode" in fields:
        kw["cuda_graph_bs_decode"] = bss
    elif "cuda_graph_bs" in fields:
        kw["cuda_graph_bs"] = bss
    if "disable_prefill_cuda_graph" in fields:
        kw["disable_prefill_cuda_graph"] = True
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


def _top_logprobs(engine: Any, args: argparse.Namespace) -> list[list[list[float]]]:
    out = engine.generate(
        input_ids=_prompts(CHECK_REQUESTS, args.input_len, salt=17),
        sampling_params={"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True, top_logprobs_num=TOP_K,
    )
    rows = []
    for o in out:
        first = o["meta_info"]["output_top_logprobs"][0]
        rows.append([[float(lp), int(tok)] for lp, tok, *_ in first])
    return rows


def _time_batch(engine: Any, args: argparse.Namespace, bs: int) -> dict[str, Any]:
    prompts = _prompts(bs, args.input_len)
    n = args.new_tokens

    def gen(tokens: int) -> float:
        sp = {"max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
        t0 = time.perf_counter()
        res = engine.generate(input_ids=prompts, sampling_params=sp)
        dt = time.perf_counter() - t0
        got = [len(r["output_ids"]) for r in res]
        if got != [tokens] * bs:
            raise RuntimeError(f"bs {bs}: asked {tokens} tokens per request, got {got}")
        return dt

    gen(min(n, 32))  # warm-up at this batch size
    reps = []
    for _ in range(args.reps):
        t1 = gen(1)
        tn = gen(n)
        reps.append({"t1_s": t1, "tn_s": tn, "step_ms": (tn - t1) / (n - 1) * 1e3})
    steps = [r["step_ms"] for r in reps]
    med = statistics.median(steps)
    tn_med = statistics.median(r["tn_s"] for r in reps)
    return {
        "batch": bs, "reps": reps, "step_ms": med, "spread_ms": max(steps) - min(steps),
        "decode_tok_s": bs / (med / 1e3), "e2e_tok_s": bs * n / tn_med,
    }


def worker(args: argparse.Namespace) -> int:
    import sglang

    config = args.worker
    kw = _engine_kwargs(args, args.model_dir, config)
    result: dict[str, Any] = {"config": config, "engine_kwargs": kw,
                              "artune_profile": os.environ.get("ARTUNE_PROFILE")}
    t0 = time.perf_counter()
    engine = sglang.Engine(**kw)
    result["startup_s"] = round(time.perf_counter() - t0, 1)
    print(f"[e2e] {config}: engine up in {result['startup_s']} s", flush=True)
    try:
        result["top_logprobs"] = _top_logprobs(engine, args)
        result["batches"] = []
        for bs in args.batch_sizes:
            row = _time_batch(engine, args, bs)
            print(f"[e2e] {config}: bs {bs}: {row['step_ms']:.3f} ms/step "
                  f"(spread {row['spread_ms']:.3f})", flush=True)
            result["batches"].append(row)
    finally:
        engine.shutdown()
    Path(args.worker_out).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per config, then the comparison


def _card() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
        info["torch"] = torch.__version__
    except Exception as exc:  # noqa: BLE001 - informational
        info["torch_error"] = str(exc)
    from importlib import metadata

    for dist in ("sglang", "sglang-kernel", "triton", "nvshmem4py-cu13", "artune"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _compare(ref: list[list[list[float]]], other: list[list[list[float]]]) -> dict[str, Any]:
    """max |Δ logprob| over ref's top-k tokens that other also lists, overlap, top-1 agreement."""
    worst, overlap, top1 = 0.0, [], 0
    for a, b in zip(ref, other, strict=True):
        bmap = {tok: lp for lp, tok in b}
        common = [(lp, bmap[tok]) for lp, tok in a if tok in bmap]
        overlap.append(len(common) / max(1, len(a)))
        worst = max([worst, *[abs(x - y) for x, y in common]])
        top1 += int(a[0][1] == b[0][1])
    return {"max_abs_dlogprob": worst, "min_topk_overlap": min(overlap),
            "top1_agree": top1 / max(1, len(ref))}


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
            for name in ("artune_nccl", "artune"):
                r = runs.get(name)
                if r and r.get("batches"):
                    rel = {b["batch"]: (1 - b["step_ms"] / vn[b["batch"]]) * 100
                           for b in r["batches"] if b["batch"] in vn}
                    doc["comparisons"].setdefault(name, {})["pct_lower_than_nccl"] = rel
                    lines.append(f"{name} lower than nccl by: " + "  ".join(
                        f"bs{bs} {p:.1f}%" for bs, p in sorted(rel.items())))
        ref = base.get("top_logprobs")
        noise = None
        if ref and nccl and nccl.get("top_logprobs"):
            noise = _compare(ref, nccl["top_logprobs"])
            doc["comparisons"].setdefault("nccl", {})["logits"] = noise
        for name, r in runs.items():
            if name == "default" or not ref or not r.get("top_logprobs"):
                continue
            cmp = _compare(ref, r["top_logprobs"])
            limit = max(tol, 4 * noise["max_abs_dlogprob"]) if noise else tol
            cmp["tolerance"] = limit
            cmp["ok"] = cmp["max_abs_dlogprob"] <= limit and cmp["min_topk_overlap"] >= 0.5
            doc["comparisons"].setdefault(name, {})["logits"] = cmp
            lines.append(f"first-step logprobs {name} vs default: max|Δ| "
                         f"{cmp['max_abs_dlogprob']:.2e} (tolerance {limit:.2e}), top-k overlap "
                         f">= {cmp['min_topk_overlap']:.0%}, top-1 agree {cmp['top1_agree']:.0%}"
                         f" -> {'OK' if cmp['ok'] else 'MISMATCH'}")
    return lines


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
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per batch size")
    p.add_argument("--mem", type=float, default=0.6, help="mem_fraction_static")
    p.add_argument("--tol", type=float, default=0.05,
                   help="least tolerance on |Δ logprob| (raised to 4x the nccl-vs-default one)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per config")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode steps are timed between 1 and N)")

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
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
               command=" ".join(sys.argv))
    doc.setdefault("configs", {})

    model_dir = tempfile.mkdtemp(prefix="artune_e2e_llama_")
    (Path(model_dir) / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=1))
    for config in configs:
        env = dict(os.environ, **NO_MULTICAST_ENV)
        env.pop("ARTUNE_PROFILE", None)
        if CONFIGS[config]["artune"]:
            env["ARTUNE_PROFILE"] = args.profile
        res_file = Path(model_dir) / f"{config}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", config,
               "--worker-out", str(res_file), "--model-dir", model_dir,
               "--tp", str(args.tp), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
               "--input-len", str(args.input_len), "--new-tokens", str(args.new_tokens),
               "--reps", str(args.reps), "--mem", str(args.mem), "--log-level", args.log_level]
        print(f"[e2e] {config}: starting ({' '.join(cmd[2:])})", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        if rc == 0 and res_file.exists():
            doc["configs"][config] = json.loads(res_file.read_text())
        else:
            doc["configs"][config] = {"config": config, "error": f"exit code {rc}"}
        doc["configs"][config]["wall_s"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))  # after every config: partial runs survive
    lines = _summarize(doc, args.tol)
    doc["summary"] = lines
    out.write_text(json.dumps(doc, indent=1))
    print("\n".join(lines))
    print(f"[e2e] results: {out}")
    return 0 if all("error" not in r for r in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
