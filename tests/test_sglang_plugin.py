"""The SGLang plugin against the REAL sglang package (0.5.23 and 0.5.17), on CPU gloo ranks.

Each test starts one worker process per TP rank. A worker loads the plugin the way SGLang does
(its real ``load_plugins()`` finds artune's entry point, declared in pyproject.toml), builds
SGLang's real process groups with ``init_distributed_environment`` + ``initialize_model_parallel``
over gloo (the plugin's AFTER hook runs there), then calls the hooked ``GroupCoordinator`` methods
as SGLang's all-reduce ops do. sglang comes from the folders ``.ci/install-sglang`` fills; only the
workers put them on their path.

Two modules are stood in for, both outside what is tested (see .ci/install-sglang):
``torchvision`` (0.5.17 imports it at import time; no CPU build exists for this torch) and
``sglang.srt.layers.sampler``, which ``initialize_model_parallel`` imports for one constant and
which drags in every model config. On CPU, SGLang's public ``all_reduce`` short-circuits to gloo
before any hook point, so the workers call the hook points the way the custom ops
``sglang::outplace_all_reduce`` / ``inplace_all_reduce`` do (those ops exist for CUDA only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TESTS, free_port

from artune import envs, topology
from artune import profile as profile_mod
from artune.autotune.table import build_profile
from artune.backends.base import Backend
from artune.integration import sglang as plugin
from artune.integration import sglang_linear as linear_hook

SGLANG_HOME = Path(envs.get("ARTUNE_SGLANG_HOME") or Path.home() / ".cache/artune/sglang")
VERSIONS = ("0.5.23", "0.5.17")
WORLD = 2
KB = 1024


def _site(version: str) -> Path:
    site = SGLANG_HOME / version
    if not (site / ".artune-complete").is_file() or not (SGLANG_HOME / "deps").is_dir():
        msg = f"real sglang {version} is not installed under {SGLANG_HOME}: run .ci/install-sglang"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return site


# ---------------------------------------------------------------------------------------------
# Profiles (CPU dry-run profiles: the gloo backend is the only one that runs here)


def _rec(backend: str, nbytes: int, lat: float, dtype: str = "float32", mode: str = "eager",
         params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"backend": backend, "params": params or {}, "dtype": dtype, "mode": mode,
            "nbytes": nbytes, "rank_medians_us": [lat] * WORLD, "latency_us": lat,
            "spread_us": 0.1, "reps": 10}


#: What a Router reads of its GroupContext in the pure routing tests (rank and group name).
_CTX = types.SimpleNamespace(rank=0, group_name="tp:0")

def _measurements(extra: str | None = None, second: str | None = None) -> list[dict[str, Any]]:
    """gloo measured at 1-64 KiB of float32 (eager and graph); ``extra`` measured faster at 4 KiB
    and above, slower below; ``second`` between the two there (the next-fastest)."""
    ms = []
    for mode in ("eager", "graph"):
        for n in (1 * KB, 4 * KB, 16 * KB, 64 * KB):
            ms.append(_rec("gloo", n, 50.0, mode=mode, params={"chunks": 1}))
            if extra:
                ms.append(_rec(extra, n, 5.0 if n >= 4 * KB else 500.0, mode=mode))
            if second:
                ms.append(_rec(second, n, 10.0 if n >= 4 * KB else 500.0, mode=mode))
    return ms


def _write_profile(path: Path, world: int = WORLD, extra: str | None = None,
                   command: str = "artune tune --device cpu (test)",
                   second: str | None = None) -> Path:
    fp = topology.fingerprint(world, world, device="cpu")
    doc = build_profile(_measurements(extra, second), [], fingerprint=fp, command=command,
                        dry_run=True)
    profile_mod.save(doc, path)
    return path


# ---------------------------------------------------------------------------------------------
# Worker side (runs in the subprocesses)


def _stand_ins(tmp: Path) -> None:
    """The two import-only stand-ins named in the module docstring, when the real ones fail."""
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a CUDA build that cannot load
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv.__path__ = []  # type: ignore[attr-defined]
        io = types.ModuleType("torchvision.io")

        def decode_jpeg(*a: Any, **k: Any) -> Any:
            raise RuntimeError("torchvision stand-in (CPU test): decode_jpeg is not available")

        io.decode_jpeg = decode_jpeg  # type: ignore[attr-defined]
        tv.io = io  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": tv, "torchvision.io": io})
    sampler = types.ModuleType("sglang.srt.layers.sampler")
    sampler.SYNC_TOKEN_IDS_ACROSS_TP = False  # type: ignore[attr-defined]
    sys.modules["sglang.srt.layers.sampler"] = sampler


def _dist_info(tmp: Path) -> None:
    """artune's installed-package metadata with the entry points pyproject.toml declares, so
    SGLang's loader (importlib.metadata) finds the plugin as it would after `pip install`."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    groups = meta["project"]["entry-points"]
    info = tmp / "artune-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: artune\nVersion: 0.0.0\n")
    lines = []
    for group, eps in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(tmp))


def _count_calls(route: plugin.Route) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, backend in route.router.backends.items():
        inner = backend.all_reduce

        def counted(x: Any, params: Any = None, _inner: Any = inner, _name: str = name) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _inner(x, params)

        backend.all_reduce = counted  # type: ignore[method-assign]
    return counts


def _scenario_serve(tp: Any, rank: int, out: dict[str, Any]) -> None:
    """Routed sizes go to artune's backend, others to SGLang's own; results are exact sums."""
    import torch

    from artune.backends.sglang_native import _parallel_state

    route = plugin.routes().get(tp.unique_name)
    out["routes"] = sorted(plugin.routes())
    if route is None:
        return
    out["served_backends"] = route.profile.backends_used()
    counts = _count_calls(route)
    decides = [0]
    inner_decide = route.router.decide

    def counted_decide(*a: Any, **k: Any) -> Any:
        decides[0] += 1
        return inner_decide(*a, **k)

    route.router.decide = counted_decide  # type: ignore[method-assign]

    def data(n: int, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(rank)
        return (torch.randn(n, generator=g) * 10).round().to(dtype)  # exact sums in any order

    def expect(n: int, dtype: torch.dtype) -> torch.Tensor:
        total = torch.zeros(n, dtype=torch.float64)
        for r in range(tp.world_size):
            g = torch.Generator().manual_seed(r)
            total += (torch.randn(n, generator=g) * 10).round().to(dtype).double()
        return total

    checks: dict[str, Any] = {}
    for label, n, dtype in (("covered_f32_8k", 2048, torch.float32),
                            ("uncovered_f32_1m", 1 << 18, torch.float32),
                            ("lacking_f16_8k", 4096, torch.float16)):
        x = data(n, dtype)
        keep = x.clone()
        before = dict(counts)
        d0 = decides[0]
        method = tp._resolve_outplace_all_reduce_method(x)
        row: dict[str, Any] = {"resolve": method}
        if method == plugin.ARTUNE_METHOD:
            y = tp._all_reduce_out_place(x, method)
            # the out-of-place call takes the decision the resolve made: one per all-reduce
            row["decides"] = decides[0] - d0
            row["outplace_ok"] = bool(torch.equal(y.double(), expect(n, dtype)))
            row["input_kept"] = bool(torch.equal(x, keep))
            y = tp._all_reduce_out_place(x, "auto")  # how torch.compile'd graphs arrive
            row["auto_ok"] = bool(torch.equal(y.double(), expect(n, dtype)))
        z = x.clone()
        tp._all_reduce_in_place(z)
        row["inplace_ok"] = bool(torch.equal(z.double(), expect(n, dtype)))
        row["artune_calls"] = sum(counts.values()) - sum(before.values())
        checks[label] = row
    out["checks"] = checks

    entered = []
    inner_capture = route.router.capture

    def capture() -> Any:
        entered.append(True)
        return inner_capture()

    route.router.capture = capture  # type: ignore[method-assign]
    stream = types.SimpleNamespace(wait_stream=lambda s: None)
    try:
        with tp.graph_capture(_parallel_state().GraphCaptureContext(stream)):
            pass
        out["capture_entered"] = bool(entered)
    except Exception as exc:  # noqa: BLE001 - SGLang's own capture may need a GPU
        out["capture_entered"] = bool(entered)
        out["capture_error"] = f"{type(exc).__name__}: {exc}"
    out["trace"] = plugin.route_trace()


def _scenario_watch(tp: Any, out: dict[str, Any]) -> None:
    """A model runner loaded after the groups (as in SGLang's model processes): the plugin hooks
    its forward pass through the real HookRegistry; a backend fault stops the next pass."""
    import sys

    route = plugin.routes()[tp.unique_name]

    class ModelRunner:  # stands for sglang.srt.model_executor.model_runner.ModelRunner
        def forward(self, batch: Any) -> str:
            return f"forward {batch}"

    sys.modules[plugin.MR] = types.SimpleNamespace(ModelRunner=ModelRunner)  # type: ignore
    out["watching"] = plugin.watch_forward()
    runner = ModelRunner()
    out["healthy"] = runner.forward(1)
    backend = next(iter(route.router.backends.values()))
    backend.failure = lambda: "rank 9 waited 5 s for rank 8 in the one-shot exchange"
    try:
        runner.forward(2)
        out["faulty"] = "ran"
    except plugin.PluginError as exc:
        out["faulty"] = str(exc)


def _stand_in_linear_module(version: str) -> None:
    """``sglang.srt.layers.linear`` as the fused-linear hook sees it, for SGLang releases whose
    module cannot be imported here (it needs transformers): RowParallelLinear with that release's
    forward (the unquantized GEMM, then, unless skipped, the TP all-reduce: SGLang's real one; or
    its quantized one for non-decode batches when quantized communications are on, here the same
    sum plus 1000 so that it shows), the MLP-skip flag, ``get_exec``, and in 0.5.23 the layer's
    group (no ``tp_size``) and ``get_forward`` (sequence parallelism)."""
    import sys

    import torch
    from sglang.srt.distributed import tensor_model_parallel_all_reduce

    mod = types.ModuleType("sglang.srt.layers.linear")
    state = types.SimpleNamespace(skip=False, sp_active=False, comm=types.SimpleNamespace(
        enable_quant_communications=True))
    by_group = version != "0.5.17"

    class UnquantizedLinearMethod:
        def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
            return torch.nn.functional.linear(x, layer.weight, bias)

    class RowParallelLinear(torch.nn.Module):
        def __init__(self, k: int, n: int, tp: Any, parallel_group: str | None = None) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n, k, dtype=torch.bfloat16),
                                             requires_grad=False)
            self.register_parameter("bias", None)
            self.input_is_parallel, self.reduce_results = True, True
            self.use_dp_attention_reduce = self.use_decode_attn_tp = self.skip_bias_add = False
            self.quant_method = UnquantizedLinearMethod()
            if by_group:
                self.tp_group, self.parallel_group = tp, parallel_group
            else:
                self.tp_size = tp.world_size

        def forward(self, input_: Any, skip_all_reduce: bool = False, forward_batch: Any = None,
                    output_tensor: Any = None) -> Any:
            tp_size = self.tp_group.world_size if by_group else self.tp_size
            if by_group and state.sp_active and tp_size > 1:
                raise AssertionError("sequence parallelism: a reduce-scatter, not this test's")
            out = self.quant_method.apply(self, input_, bias=None)
            if (self.reduce_results and tp_size > 1 and not skip_all_reduce
                    and not should_skip_mlp_all_reduce()):
                quant = (forward_batch is not None
                         and not forward_batch.forward_mode.is_decode_or_idle()
                         and get_exec().comm.enable_quant_communications)
                if by_group and self.parallel_group == "tp":
                    out = self.tp_group.all_reduce(out)
                else:
                    out = tensor_model_parallel_all_reduce(out)
                if quant:
                    out = out + 1000
            return out, None

    def should_skip_mlp_all_reduce() -> bool:
        return state.skip

    def get_exec() -> Any:
        return state

    def get_forward() -> Any:
        return state

    for obj in (UnquantizedLinearMethod, RowParallelLinear):
        obj.__module__ = mod.__name__
    mod.__dict__.update(RowParallelLinear=RowParallelLinear, state=state,
                        UnquantizedLinearMethod=UnquantizedLinearMethod,
                        should_skip_mlp_all_reduce=should_skip_mlp_all_reduce, get_exec=get_exec,
                        tensor_model_parallel_all_reduce=tensor_model_parallel_all_reduce)
    if by_group:
        mod.get_forward = get_forward
    sys.modules[mod.__name__] = mod


def _scenario_linear_compile(tp: Any, rank: int, out: dict[str, Any]) -> None:
    """Two row-parallel layers of SGLang's shape (the stand-in module), hooked through SGLang's
    real HookRegistry, under torch.compile(fullgraph=True): inside a "capture" the custom op runs
    the fused kernel (a stand-in that sums over the group with gloo and counts), outside one
    SGLang's real TP all-reduce; an extend batch that SGLang all-reduces quantized keeps SGLang's
    forward. bf16 values are small integers, so every sum is exact."""
    import sys

    import torch
    import torch.distributed as dist

    from artune.integration import sglang_linear

    out["fused_hooked"] = bool(sglang_linear._FUSED_HOOKED)
    mod = sys.modules["sglang.srt.layers.linear"]
    out["forward_wrapped"] = hasattr(mod.RowParallelLinear.forward, "__wrapped__")

    class SumComm:  # stands in for NvrarComm.linear_all_reduce on CPU
        calls = 0

        def linear_problem(self, *args: Any) -> None:
            return None

        def linear_all_reduce(self, x: Any, w: Any, out_: Any, *params: int) -> Any:
            SumComm.calls += 1
            y = x @ w.t()
            dist.all_reduce(y, group=tp.cpu_group)
            return y

    route = plugin.routes()[tp.unique_name]
    route.router.backends["nvrar"] = types.SimpleNamespace(comm=SumComm(), closed=False)
    mode = ["graph"]
    plugin.current_mode = lambda: mode[0]

    class Mode:
        def __init__(self, decode: bool) -> None:
            self.decode = decode

        def is_decode_or_idle(self) -> bool:
            return self.decode

    o_proj = mod.RowParallelLinear(64, 128, tp)
    down_proj = mod.RowParallelLinear(32, 16, tp, parallel_group="tp")

    def block(x: Any, batch: Any) -> Any:
        h, _ = o_proj(x, forward_batch=batch)
        return down_proj(h[:, :32] / h[0, 0], False, batch)[0]

    graphs: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        from torch._dynamo.backends.common import aot_autograd

        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    f = torch.compile(block, backend=backend, fullgraph=True, dynamic=False)
    x = torch.full((4, 64), float(rank + 1), dtype=torch.bfloat16)
    decode = types.SimpleNamespace(forward_mode=Mode(True))
    y = f(x, decode)  # inside a "capture": fused
    out["captured"] = [y.float().unique().tolist(), SumComm.calls]
    mode[0] = "eager"  # a warm-up run: SGLang's all-reduce
    y = f(x, decode)
    out["warm_up"] = [y.float().unique().tolist(), SumComm.calls]
    op = torch.ops.artune.sglang_row_linear
    out["ops_in_graph"] = sum(n.target in (op, op.default) for n in graphs[0].graph.nodes)
    mode[0] = "graph"
    extend = types.SimpleNamespace(forward_mode=Mode(False))
    graphs.clear()
    y = torch.compile(block, backend=backend, fullgraph=True, dynamic=False)(x, extend)
    out["extend_quantized"] = [y.float().unique().tolist(), SumComm.calls,
                               sum(n.target in (op, op.default) for n in graphs[0].graph.nodes)]
    if hasattr(mod, "get_forward"):  # 0.5.23: sequence parallelism keeps SGLang's forward
        mod.state.sp_active = True
        graphs.clear()
        try:
            torch.compile(block, backend=backend, fullgraph=True, dynamic=False)(x, decode)
        except Exception as exc:  # noqa: BLE001 - the stand-in's reduce-scatter refusal
            out["sequence_parallel"] = [type(exc).__name__, "reduce-scatter" in str(exc)]


def worker(rank: int, world: int, port: int, version: str, tmp: str, scenario: str) -> None:
    """One TP rank: load the plugin as SGLang does, build SGLang's groups, run ``scenario``."""
    import logging

    from artune.backends.sglang_native import _init_model_parallel

    out: dict[str, Any] = {"rank": rank, "version": None}
    tmpdir = Path(tmp) / f"rank{rank}"
    tmpdir.mkdir(parents=True, exist_ok=True)
    _stand_ins(tmpdir)
    _dist_info(tmpdir)
    logging.basicConfig(level=logging.WARNING)
    try:
        from importlib import metadata

        out["version"] = metadata.version("sglang")
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.plugins import load_plugins

        if scenario == "missing_hook":
            del ps.GroupCoordinator._all_reduce_in_place  # as in a release without it
        if scenario == "linear_compile":
            _stand_in_linear_module(version)
        load_plugins()
        out["hooked"] = hasattr(ps.GroupCoordinator._resolve_outplace_all_reduce_method,
                                "__wrapped__")
        if scenario == "missing_hook":
            return
        t0 = time.monotonic()
        ps.init_distributed_environment(world_size=world, rank=rank, local_rank=rank,
                                        distributed_init_method=f"tcp://127.0.0.1:{port}",
                                        backend="gloo")
        if scenario == "attn_dp":
            _init_model_parallel(ps, world, rank, attn_dp=2)
            out["attn_tp_size"] = ps.get_attn_tp_group().world_size
            out["routes"] = sorted(plugin.routes())
            return
        _init_model_parallel(ps, world, rank)
        out["init_s"] = round(time.monotonic() - t0, 2)
        tp = ps.get_tp_group()
        out["tp"] = tp.unique_name
        if scenario == "linear":
            from artune.integration import sglang_linear

            out["fused_hooked"] = bool(sglang_linear._FUSED_HOOKED)
            try:  # (CI's CPU set of SGLang's dependencies lacks transformers, which it needs)
                import importlib

                importlib.import_module("sglang.srt.layers.linear")
            except Exception as exc:  # noqa: BLE001
                out["linear_import"] = f"{type(exc).__name__}: {exc}"
            return
        if scenario == "watch":
            _scenario_watch(tp, out)
            return
        if scenario == "linear_compile":
            _scenario_linear_compile(tp, rank, out)
            return
        _scenario_serve(tp, rank, out)
        try:
            ps.destroy_model_parallel()  # the plugin's BEFORE hook closes its routes first
        except ModuleNotFoundError as exc:  # 0.5.23 imports model configs (transformers) here
            out["destroy_note"] = str(exc)
        out["routes_after_destroy"] = sorted(plugin.routes())
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["error_type"] = type(exc).__name__
        import traceback

        out["traceback"] = traceback.format_exc()[-3000:]
    finally:
        _leave_together()
        print("RESULT " + json.dumps(out), flush=True)
        os._exit(0)


def _leave_together() -> None:
    """Wait for every rank before exiting: rank 0 hosts the rendezvous store, and leaving while a
    peer still talks to it resets that peer's connection."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
            pass


# ---------------------------------------------------------------------------------------------
# Test side


def _run(version: str, tmp: Path, scenario: str = "serve", world: int = WORLD,
         env: dict[str, str] | None = None, per_rank_env: dict[int, dict[str, str]] | None = None,
         timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run ``world`` workers; their results in rank order. Fails if any worker outlives
    ``timeout_s`` (nothing may hang)."""
    site = _site(version)
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("ARTUNE_", "SGLANG_")) and k not in ("RANK", "WORLD_SIZE")}
    base["PYTHONPATH"] = os.pathsep.join(map(str, [site, SGLANG_HOME / "deps", ROOT, TESTS]))
    base["CUDA_VISIBLE_DEVICES"] = ""
    base.update(env or {})
    procs = []
    for rank in range(world):
        code = (f"from test_sglang_plugin import worker; "
                f"worker({rank}, {world}, {port}, {version!r}, {str(tmp)!r}, {scenario!r})")
        penv = dict(base, **(per_rank_env or {}).get(rank, {}))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=penv, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for rank, p in enumerate(procs):
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still running after {timeout_s}s (scenario {scenario})")
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"rank {rank} printed no result:\n{stdout}\n{stderr[-4000:]}"
            res = json.loads(lines[-1][len("RESULT "):])
            res["stderr"] = stderr
            results.append(res)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in results:
        assert r["version"] == version, r
    return results


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    """Every supported release: where the hook points and initialize_model_parallel differ."""
    return str(request.param)


@pytest.fixture
def current() -> str:
    """The current release only: artune's own fault handling, the same on every release."""
    return VERSIONS[0]


def test_without_profile_the_plugin_only_logs(version: str, tmp_path: Path) -> None:
    res = _run(version, tmp_path)
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert r["hooked"] is False
        assert r["routes"] == []
        assert "no profile" in r["stderr"]


def test_routes_profile_sizes_to_artune_and_the_rest_to_sglang(version: str,
                                                               tmp_path: Path) -> None:
    prof = _write_profile(tmp_path / "p.json")
    trace_dir = tmp_path / "routes"
    res = _run(version, tmp_path, env={"ARTUNE_PROFILE": str(prof),
                                       "ARTUNE_ROUTE_LOG": str(trace_dir)})
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert r["hooked"] is True
        assert r["routes"] == [r["tp"]]
        # ARTUNE_ROUTE_LOG: which backend took each call (out of place, "auto" as
        # torch.compile'd graphs send it, in place), written when the capture context closed
        trace = {(t["mode"], t["dtype"], t["nbytes"], t["backend"]): t["calls"]
                 for t in r["trace"] if t["group"] == r["tp"]}
        assert trace == {("eager", "float32", 8192, "gloo"): 3,
                         ("eager", "float32", 1 << 20, plugin.SGLANG_OWN): 1,
                         ("eager", "float16", 8192, plugin.SGLANG_OWN): 1}, r["trace"]
    dumped = [json.loads(f.read_text())["routes"] for f in sorted(trace_dir.glob("*.json"))]
    assert len(dumped) == len(res) and all(d == res[0]["trace"] for d in dumped), dumped
    for r in res:
        c = r["checks"]
        covered = c["covered_f32_8k"]
        assert covered == {"resolve": "artune", "decides": 1, "outplace_ok": True,
                           "input_kept": True, "auto_ok": True, "inplace_ok": True,
                           "artune_calls": 3}, covered
        # Beyond the profile's sizes, and a dtype it lacks: SGLang's own choice, exact too.
        for label in ("uncovered_f32_1m", "lacking_f16_8k"):
            assert c[label]["resolve"] is None, c[label]
            assert c[label]["inplace_ok"] is True and c[label]["artune_calls"] == 0, c[label]
        assert "does not cover" in r["stderr"]
        assert r["capture_entered"] is True, r.get("capture_error")
        assert r["routes_after_destroy"] == []


def test_a_backend_fault_stops_the_next_forward_pass(current: str, tmp_path: Path) -> None:
    """CUDA-graph replays run no artune code: a fault a backend's kernel recorded (a timed-out
    wait) must stop the rank at its next model forward pass, through SGLang's HookRegistry."""
    prof = _write_profile(tmp_path / "p.json")
    res = _run(current, tmp_path, scenario="watch", env={"ARTUNE_PROFILE": str(prof)})
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert r["watching"] is True
        assert r["healthy"] == "forward 1"
        assert "rank 9 waited 5 s for rank 8" in r["faulty"], r["faulty"]
        assert "stops this rank before its next forward pass" in r["faulty"]


def test_forward_check_off_leaves_the_forward_pass_alone(current: str, tmp_path: Path) -> None:
    """ARTUNE_FORWARD_CHECK=0: no hook on the forward pass (a recorded fault goes unnoticed
    there), and the plugin says so."""
    prof = _write_profile(tmp_path / "p.json")
    res = _run(current, tmp_path, scenario="watch",
               env={"ARTUNE_PROFILE": str(prof), "ARTUNE_FORWARD_CHECK": "0"})
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert r["watching"] is False
        assert r["healthy"] == "forward 1" and r["faulty"] == "ran", r
        assert "ARTUNE_FORWARD_CHECK=0" in r["stderr"]


def test_before_forward_passes_healthy_routes_and_names_the_fault() -> None:
    doc = build_profile([_rec("gloo", 4 * KB, 9.0)], [],
                        fingerprint=topology.fingerprint(2, 2, device="cpu"), command="t",
                        dry_run=True)
    prof = profile_mod.Profile(doc)
    gloo = _FakeBackend("gloo")
    from artune.router import Router

    route = plugin.Route("tp:0", prof, Router(prof, _CTX, {"gloo": gloo}))  # type: ignore
    plugin._ROUTES["tp:0"] = route
    try:
        assert plugin._before_forward(object(), 1) is None
        gloo.failure = lambda: "rank 1 waited 5 s for rank 0"  # type: ignore[method-assign]
        with pytest.raises(plugin.PluginError, match=r"rank 1 waited 5 s for rank 0.*tp:0"):
            plugin._before_forward(object(), 1)
    finally:
        plugin._ROUTES.pop("tp:0", None)


def test_profile_for_another_tp_size_is_an_error_on_every_rank(current: str,
                                                               tmp_path: Path) -> None:
    prof = _write_profile(tmp_path / "p4.json", world=4)
    res = _run(current, tmp_path, env={"ARTUNE_PROFILE": str(prof)})
    for r in res:
        assert r.get("error_type") == "PluginError", r.get("error")
        assert "world_size: profile has 4, this machine has 2" in r["error"]
        assert "ARTUNE_STRICT=0" in r["error"]


def test_strict_off_turns_a_mismatch_into_sglangs_own_selection(current: str,
                                                               tmp_path: Path) -> None:
    prof = _write_profile(tmp_path / "p4.json", world=4)
    res = _run(current, tmp_path, env={"ARTUNE_PROFILE": str(prof), "ARTUNE_STRICT": "0"})
    for r in res:
        assert "error" not in r, r["error"]
        assert r["routes"] == []
        assert "world_size" in r["stderr"] and "keeps SGLang's own" in r["stderr"]


def test_ranks_holding_different_profiles_fail_together(current: str, tmp_path: Path) -> None:
    a = _write_profile(tmp_path / "a.json")
    b = _write_profile(tmp_path / "b.json", command="another tune")
    res = _run(current, tmp_path, per_rank_env={0: {"ARTUNE_PROFILE": str(a)},
                                                1: {"ARTUNE_PROFILE": str(b)}}, timeout_s=90)
    for r in res:
        assert r.get("error_type") == "PluginError", r.get("error")
        assert "ranks hold different profiles" in r["error"]
        assert str(a) in r["error"] and str(b) in r["error"]


def test_a_profile_that_fuses_linear_layers_hooks_them_on_every_rank_alike(
        current: str, tmp_path: Path) -> None:
    """A profile whose linear section fuses a layer: registration hooks RowParallelLinear on
    every rank (the real SGLang's module; where that module does not import, as without
    transformers, no rank hooks it); a rank with ARTUNE_FUSED_LINEAR=0 while its peers follow
    the profile fails every rank with the difference named. A profile without it: no hook."""
    path = _write_profile(tmp_path / "lin.json")
    doc = json.loads(path.read_text())
    doc["linear"] = [{"dtype": "bfloat16", "k": 64, "n": 128, "ranges": [
        {"min_rows": 1, "max_rows": 4, "fused": True,
         "params": {"block_n": 32, "block_k": 64, "warps": 4, "stages": 3}}]}]
    path.write_text(json.dumps(doc))
    res = _run(current, tmp_path, "linear", env={"ARTUNE_PROFILE": str(path)}, timeout_s=90)
    importable = "linear_import" not in res[0]
    for r in res:
        assert r.get("error") is None, r.get("traceback")
        assert r["fused_hooked"] is importable and ("linear_import" not in r) is importable, r
    res = _run(current, tmp_path, "linear", env={"ARTUNE_PROFILE": str(path)},
               per_rank_env={1: {"ARTUNE_FUSED_LINEAR": "0"}}, timeout_s=90)
    hook = "on" if importable else "off"
    for r in res:
        assert r.get("error_type") == "PluginError", r.get("error")
        assert (f"ranks differ in the fused linear layers (rank 0: ARTUNE_FUSED_LINEAR=auto, "
                f"hook {hook}; rank 1: ARTUNE_FUSED_LINEAR=off, hook off)") in r["error"]
    plain = _write_profile(tmp_path / "plain.json")
    for r in _run(current, tmp_path, "linear", env={"ARTUNE_PROFILE": str(plain)}, timeout_s=90):
        assert r.get("error") is None and r["fused_hooked"] is False, r


def test_fused_linear_layers_under_torch_compile_through_sglangs_hook_registry(
        version: str, tmp_path: Path) -> None:
    """ARTUNE_FUSED_LINEAR=1 with SGLang's real HookRegistry and TP group (gloo) and a stand-in
    of the release's linear module (0.5.17: layers by tp_size; 0.5.23: by group, with sequence
    parallelism): a compiled block of two row-parallel layers traces both into
    torch.ops.artune.sglang_row_linear without a graph break, runs the fused kernel (stand-in)
    inside a "capture" and SGLang's real TP all-reduce outside one, with the same sums on every
    rank; an extend batch that SGLang all-reduces quantized keeps SGLang's forward."""
    path = _write_profile(tmp_path / "p.json")
    res = _run(version, tmp_path, "linear_compile", timeout_s=150,
               env={"ARTUNE_PROFILE": str(path), "ARTUNE_FUSED_LINEAR": "1"})
    for r in res:
        assert r.get("error") is None, r.get("traceback")
        assert r["fused_hooked"] and r["forward_wrapped"], r
        # o_proj: 64 ones times (1 + 2) summed over the ranks, normalised; down_proj: 32 x 2
        assert r["captured"] == [[64.0], 2] and r["ops_in_graph"] == 2, r
        assert r["warm_up"] == [[64.0], 2], r  # SGLang's all-reduce, no fused call
        assert r["extend_quantized"] == [[1064.0], 2, 0], r
        if version != "0.5.17":  # layers by group: sequence parallelism reached SGLang's forward
            assert r["sequence_parallel"][1], r


def test_one_rank_without_a_readable_profile_fails_every_rank(current: str,
                                                             tmp_path: Path) -> None:
    good = _write_profile(tmp_path / "good.json")
    res = _run(current, tmp_path, per_rank_env={
        0: {"ARTUNE_PROFILE": str(good)},
        1: {"ARTUNE_PROFILE": str(tmp_path / "missing.json")},
    }, timeout_s=90)
    for r in res:
        assert r.get("error_type") == "PluginError", r.get("error")
        assert "rank 1:" in r["error"] and "file not found" in r["error"]


def test_unavailable_backend_is_excluded_and_the_rest_served(current: str,
                                                            tmp_path: Path) -> None:
    # The profile prefers nvshmem_reduce from 4 KiB up; it cannot run here (no CUDA/NVSHMEM).
    prof = _write_profile(tmp_path / "nv.json", extra="nvshmem_reduce")
    assert "nvshmem_reduce" in profile_mod.load(prof).backends_used()
    res = _run(current, tmp_path, env={"ARTUNE_PROFILE": str(prof)})
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert "nvshmem_reduce excluded" in r["stderr"]
        assert r["served_backends"] == ["gloo"]
        assert r["checks"]["covered_f32_8k"]["resolve"] == "artune"
        assert r["checks"]["covered_f32_8k"]["outplace_ok"] is True


def test_sglang_candidate_without_sglangs_fast_path_is_rederived(current: str,
                                                                tmp_path: Path) -> None:
    # "sglang" measured fastest from 4 KiB, but here (CPU) SGLang has no custom all-reduce,
    # so those numbers do not apply: the next-fastest measured backend takes the sizes.
    prof = _write_profile(tmp_path / "sg.json", extra="sglang")
    res = _run(current, tmp_path, env={"ARTUNE_PROFILE": str(prof)})
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert "sglang excluded" in r["stderr"]
        assert r["served_backends"] == ["gloo"]


def test_a_backend_that_takes_over_an_excluded_ones_sizes_is_checked_too(
        current: str, tmp_path: Path) -> None:
    # "sglang" fastest from 4 KiB, nvshmem_reduce next: without SGLang's fast path (CPU) its
    # sizes go to nvshmem_reduce, which was not among the profile's routes and cannot run here
    # either: it is checked and excluded in turn, and gloo serves.
    prof = _write_profile(tmp_path / "sg2.json", extra="sglang", second="nvshmem_reduce")
    assert "nvshmem_reduce" not in profile_mod.load(prof).backends_used()
    res = _run(current, tmp_path, env={"ARTUNE_PROFILE": str(prof)})
    for r in res:
        assert "error" not in r, r["error"] + r["stderr"][-3000:]
        assert "sglang excluded" in r["stderr"] and "nvshmem_reduce excluded" in r["stderr"]
        assert r["served_backends"] == ["gloo"]


def test_release_without_the_hook_points_fails_clearly(version: str, tmp_path: Path) -> None:
    prof = _write_profile(tmp_path / "p.json")
    res = _run(version, tmp_path, scenario="missing_hook", env={"ARTUNE_PROFILE": str(prof)})
    for r in res:
        assert r.get("error_type") == "SglangIncompatible", r
        assert "GroupCoordinator._all_reduce_in_place" in r["error"]
        assert "0.5.17 to 0.5.23" in r["error"]
    res = _run(version, tmp_path, scenario="missing_hook",
               env={"ARTUNE_PROFILE": str(prof), "ARTUNE_STRICT": "0"})
    for r in res:
        assert "error" not in r and r["hooked"] is False, r


# ---------------------------------------------------------------------------------------------
# Pure routing decisions (no sglang needed)


class _FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def supports(self, x: Any, params: Any = None) -> bool:
        return bool(x.is_contiguous())

    def all_reduce(self, x: Any, params: Any = None) -> Any:
        return x * 2

    bind = Backend.bind  # the contract's default: all_reduce with params bound

    def failure(self) -> str | None:
        return None


def test_route_hands_sglang_and_uncovered_sizes_back() -> None:
    import torch

    doc = build_profile(
        [_rec("sglang", 4 * KB, 5.0), _rec("gloo", 4 * KB, 9.0),
         _rec("gloo", 64 * KB, 9.0), _rec("sglang", 64 * KB, 50.0)],
        [], fingerprint=topology.fingerprint(2, 2, device="cpu"), command="t", dry_run=True)
    prof = profile_mod.Profile(doc)
    gloo = _FakeBackend("gloo")
    from artune.router import Router

    router = Router(prof, _CTX, {"gloo": gloo})  # type: ignore[arg-type, dict-item]
    route = plugin.Route("tp:0", prof, router)
    assert route.pick(torch.zeros(1024)) is None  # 4 KiB: SGLang's own measured fastest
    decided: list[Any] = []
    inner = router.decide
    router.decide = lambda *a, **k: decided.append(a) or inner(*a, **k)  # type: ignore
    assert route.pick(torch.zeros(1024)) is None and decided == []  # remembered, not re-decided
    hit = route.pick(torch.ones(16 * KB))  # 64 KiB: gloo, its call bound for the shape
    assert hit is not None and hit[0] is gloo and torch.equal(hit[1](torch.ones(16 * KB)),
                                                              torch.full((16 * KB,), 2.0))
    assert route.pick(torch.zeros(16 * KB)) is hit  # remembered
    gloo.closed = True  # a closed backend's remembered hit is not used: decided again
    assert route.pick(torch.zeros(16 * KB)) is not hit
    gloo.closed = False
    assert route.pick(torch.zeros(1 << 20)) is None  # beyond the table
    assert route.pick(torch.zeros(1024, dtype=torch.float16)) is None  # dtype not in the table
    assert route.pick(torch.zeros(32 * KB)[::2]) is None  # the backend does not take it


# ---------------------------------------------------------------------------------------------
# The "sglang" candidate (artune/backends/sglang_native.py): when SGLang writes into its input


def ca_in_place_worker(version: str) -> None:
    """Subprocess: ``_ca_reduces_in_place`` against the REAL custom all-reduce v2 selection code
    of ``version`` (its tuned H200 table), without a GPU: the device queries the table reads
    are answered as on an H200 (SM 9.0, 132 SMs); multicast off, as artune requires."""
    out: dict[str, Any] = {"version": version}
    try:
        import torch

        from artune.backends.sglang_native import _ca_reduces_in_place

        _stand_ins(Path("."))
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # type: ignore[assignment]
        torch.cuda.get_device_properties = (  # type: ignore[assignment]
            lambda *a, **k: types.SimpleNamespace(multi_processor_count=132))
        from sglang.srt.distributed.device_communicators import custom_all_reduce_v2 as v2
        from sglang.srt.distributed.device_communicators.configs.custom_all_reduce_v2 import (
            get_all_reduce_config,
        )

        table: dict[str, bool] = {}
        for world in (2, 4, 8):
            ca = object.__new__(v2.CustomAllReduceV2)
            ca.config = get_all_reduce_config(world)._replace(num_mc_blocks=None)
            ca.override_algo = None
            for inside in (True, False):  # inside / outside SGLang's ca.capture()
                ca._can_use_graph = lambda inside=inside: inside
                for kib in (4, 256, 384, 512, 1024, 16384):
                    for capturing in (True, False):
                        key = f"w{world} {kib}K capturing={capturing} ca.capture={inside}"
                        table[key] = _ca_reduces_in_place(ca, kib * KB, capturing)
        out["table"] = table
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        import traceback

        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    print("RESULT " + json.dumps(out), flush=True)


def test_candidate_knows_where_sglangs_custom_all_reduce_writes_into_its_input(
        version: str) -> None:
    site = _site(version)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARTUNE_", "SGLANG_"))}
    env["PYTHONPATH"] = os.pathsep.join(map(str, [site, SGLANG_HOME / "deps", ROOT, TESTS]))
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = f"from test_sglang_plugin import ca_in_place_worker; ca_in_place_worker({version!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True,
                          timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in res, res["error"]
    in_place = sorted(k for k, v in res["table"].items() if v)
    # Only inside a graph captured within ca.capture(), and only where the tuned H200 table
    # picks two-shot over registered inputs: above 384 KiB on 4 ranks, 128 KiB on 8; never on
    # 2 ranks below 16 MiB (one-shot push up to there).
    assert in_place == sorted(
        f"w{w} {k}K capturing=True ca.capture=True"
        for w, sizes in ((4, (512, 1024, 16384)), (8, (256, 384, 512, 1024, 16384)))
        for k in sizes
    ), in_place


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


class _FakeCA:
    """A custom all-reduce in 0.5.17's shape: two-shot over registered inputs above 384 KiB."""

    override_algo = None

    def _can_use_graph(self) -> bool:
        return True

    def _pick_algo(self, nbytes: int, can_use_graph: bool) -> tuple[_Named, _Named]:
        if nbytes <= 384 * KB:
            return _Named("ONE_SHOT_PUSH"), _Named("EAGER")
        return _Named("TWO_SHOT_PULL"), _Named("GRAPH" if can_use_graph else "EAGER")


class _FakeGroup:
    """SGLang's GroupCoordinator as the candidate uses it; in-place methods double the input."""

    def __init__(self, method: str | None, capturing: bool) -> None:
        self.method = method
        self.capturing = capturing
        self.ca_comm = _FakeCA()
        self.seen: list[Any] = []
        self.capture_depth = 0

    def _resolve_outplace_all_reduce_method(self, x: Any) -> str | None:
        return self.method

    def _all_reduce_out_place(self, x: Any, method: str) -> Any:
        self.seen.append(x)
        if method == "ca" and self.capturing and x.numel() * x.element_size() > 384 * KB:
            return x.mul_(2)  # two-shot over registered inputs: the sum lands in the input
        if method == "pymscclpp":
            return x.mul_(2)
        return x * 2

    def _all_reduce_in_place(self, x: Any) -> None:
        self.seen.append(x)
        x.mul_(2)

    def graph_capture(self, stream: Any = None) -> Any:
        import contextlib

        @contextlib.contextmanager
        def ctx() -> Any:
            self.capture_depth += 1
            yield
            self.capture_depth -= 1

        return ctx()


def _candidate(method: str | None, capturing: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    from artune.backends import sglang_native

    monkeypatch.setattr(sglang_native, "_capturing", lambda: capturing)
    b = object.__new__(sglang_native.SglangBackend)
    b.group = _FakeGroup(method, capturing)
    b._captures = 1 if capturing else 0
    return b


@pytest.mark.parametrize("capturing", [True, False])
@pytest.mark.parametrize("kib", [4, 512])
@pytest.mark.parametrize("method", ["ca", None, "pymscclpp", "torch_symm_mem"])
def test_candidate_never_writes_its_input(method: str | None, kib: int, capturing: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    b = _candidate(method, capturing, monkeypatch)
    x = torch.arange(kib * KB // 4, dtype=torch.float32)
    keep = x.clone()
    y = b.all_reduce(x)
    assert torch.equal(x, keep)
    assert torch.equal(y, keep * 2) and y.data_ptr() != x.data_ptr()
    (passed,) = b.group.seen
    # SGLang sees the caller's tensor itself wherever it does not write into it (the zero-copy
    # path a served model takes); a copy only where it would.
    copied = method in (None, "pymscclpp") or (method == "ca" and capturing and kib > 384)
    assert (passed.data_ptr() != x.data_ptr()) is copied


def test_candidate_capture_refuses_to_start_inside_a_capture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    b = _candidate("ca", True, monkeypatch)
    with pytest.raises(RuntimeError, match="before torch.cuda.graph"):
        with b.capture():
            pass
    assert b.group.capture_depth == 0


@pytest.mark.parametrize(
    ("links", "visible", "preset", "expected"),
    [
        ([["X", "NV18"], ["NV18", "X"]], None, None, "1"),  # all NVLink: trust the driver
        ([["X", "PIX"], ["PIX", "X"]], None, None, None),  # PCIe: SGLang's probe runs
        ([["X", "NV18"], ["NV18", "X"]], "2,3", None, "1"),  # a subset, links of those two
        ([["X", "NV18"], ["NV18", "X"]], None, "0", "0"),  # the user's setting wins
    ],
)
def test_sglang_candidate_skips_the_peer_probe_only_over_nvlink(
    monkeypatch: pytest.MonkeyPatch, links: list[list[str]], visible: str | None,
    preset: str | None, expected: str | None,
) -> None:
    import torch

    from artune import topology
    from artune.backends import sglang_native

    for var, value in (("CUDA_VISIBLE_DEVICES", visible), ("SGLANG_SKIP_P2P_CHECK", preset)):
        monkeypatch.setenv(var, "recorded")  # the test's changes are undone afterwards
        if value is None:
            monkeypatch.delenv(var)
        else:
            monkeypatch.setenv(var, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(topology, "link_matrix", lambda n: links)
    sglang_native._trust_nvlink_peer_access()
    assert os.environ.get("SGLANG_SKIP_P2P_CHECK") == expected


def test_watch_forward_wraps_a_forward_another_plugin_patched_already(monkeypatch) -> None:
    """HookRegistry applies a target once: when ModelRunner.forward is patched already, the
    check wraps what is there (keeping the other plugin's hook) instead of vanishing."""
    calls: list[str] = []

    class ModelRunner:
        def forward(self, batch: Any) -> str:
            calls.append("theirs")
            return f"forward {batch}"

    target = f"{plugin.MR}.ModelRunner.forward"
    registry = types.SimpleNamespace(_patched={target}, register=None, apply_hooks=None)
    fake = types.SimpleNamespace(HookRegistry=registry, HookType=types.SimpleNamespace())
    for name in ("sglang", "sglang.srt", "sglang.srt.plugins"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", fake)
    monkeypatch.setitem(sys.modules, plugin.MR, types.SimpleNamespace(ModelRunner=ModelRunner))
    monkeypatch.setattr(plugin, "_WATCHING", [])
    seen: list[Any] = []
    monkeypatch.setattr(plugin, "_before_forward", lambda *a, **k: seen.append(a))
    assert plugin.watch_forward() is True
    runner = ModelRunner()
    assert runner.forward(3) == "forward 3"
    assert calls == ["theirs"] and len(seen) == 1 and seen[0][1] == 3


# ---------------------------------------------------------------------------------------------
# Fused linear layers: which RowParallelLinear calls become one NVRAR kernel


class UnquantizedLinearMethod:  # named as SGLang's: the plain bf16/fp16 GEMM
    pass


class _FakeComm:
    """Stands in for NvrarComm: the sum of two equal ranks, or a reason to refuse."""

    def __init__(self, problem: str | None = None) -> None:
        self.problem, self.calls, self.params = problem, 0, None

    def linear_problem(self, x: Any, w: Any, out: Any, block_n: int, block_k: int,
                       stages: int) -> str | None:
        return self.problem

    def linear_all_reduce(self, x: Any, w: Any, out: Any, *params: int) -> Any:
        self.calls += 1
        self.params = params
        return 2 * (x @ w.t())


#: A profile whose linear section runs fp32 4 x 8 layers fused at 1-8 rows.
_LINEAR_PROFILE = {
    "schema_version": 1, "fingerprint": {}, "tables": {},
    "linear": [{"dtype": "float32", "k": 4, "n": 8, "ranges": [
        {"min_rows": 1, "max_rows": 8, "fused": True,
         "params": {"block_n": 16, "block_k": 64, "warps": 8, "stages": 2}},
        {"min_rows": 9, "max_rows": 64, "fused": False, "params": {}}]}],
}


def _fused_setup(monkeypatch: pytest.MonkeyPatch, comm: _FakeComm | None,
                 mode: str = "graph", switch: str = "1", dtype: str = "float32",
                 prefetch: int | None = None) -> None:
    from artune.profile import Profile, validate

    be = None if comm is None else types.SimpleNamespace(comm=comm, closed=False)
    router = types.SimpleNamespace(backends={} if be is None else {"nvrar": be})
    data = json.loads(json.dumps(_LINEAR_PROFILE))
    data["linear"][0]["dtype"] = dtype
    if prefetch is not None:
        data["linear"][0]["ranges"][0]["params"]["prefetch"] = prefetch
    profile = Profile(validate(data))
    monkeypatch.setattr(plugin, "_ROUTES", {"tp:0": types.SimpleNamespace(router=router,
                                                                          profile=profile)})
    monkeypatch.setattr(plugin, "_TP_GROUP", ["tp:0"])
    monkeypatch.setattr(plugin, "current_mode", lambda: mode)
    monkeypatch.setattr(plugin, "_TRACE", None)
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR", switch)


def _layer(**over: Any) -> Any:
    import torch

    attrs = dict(reduce_results=True, tp_size=2, input_is_parallel=True, bias=None,
                 skip_bias_add=False, use_dp_attention_reduce=False, use_decode_attn_tp=False,
                 quant_method=UnquantizedLinearMethod(), weight=torch.ones(8, 4))
    attrs.update(over)
    return types.SimpleNamespace(**attrs)


def test_fused_linear_takes_only_what_every_rank_sees_alike(monkeypatch) -> None:
    """A row-parallel call goes to the fused kernel only with all of: few enough rows, a plain
    layer that all-reduces over TP, a CUDA-graph capture, NVRAR built and taking the shapes;
    anything else keeps SGLang's forward (the hook calls ``original``)."""
    import torch

    comm = _FakeComm()
    _fused_setup(monkeypatch, comm)
    x = torch.ones(3, 4)
    layer = _layer()

    def original(self: Any, *args: Any, **kwargs: Any) -> str:
        return "sglang's forward"

    y, bias = linear_hook._around_row_linear(original, layer, x)
    assert torch.equal(y, torch.full((3, 8), 8.0)) and bias is None and comm.calls == 1
    y, _ = linear_hook._around_row_linear(original, layer, x, forward_batch=object())
    assert comm.calls == 2
    refused = [
        ((torch.ones(17, 4),), {}, layer),  # more rows than ARTUNE_FUSED_LINEAR_ROWS (16)
        ((torch.ones(0, 4),), {}, layer),
        ((torch.ones(4, 3).t(),), {}, layer),  # not contiguous
        ((torch.ones(2, 2, 4),), {}, layer),
        ((x, True), {}, layer),  # skip_all_reduce
        ((x,), {"output_tensor": torch.empty(3, 8)}, layer),
        ((x,), {"something_new": 1}, layer),  # a keyword this hook does not know
        ((x,), {}, _layer(bias=torch.ones(8))),
        ((x,), {}, _layer(tp_size=1)),
        ((x,), {}, _layer(reduce_results=False)),
        ((x,), {}, _layer(input_is_parallel=False)),
        ((x,), {}, _layer(use_dp_attention_reduce=True)),
        ((x,), {}, _layer(quant_method=object())),
    ]
    for args, kwargs, lay in refused:
        got = linear_hook._around_row_linear(original, lay, *args, **kwargs)
        assert got == "sglang's forward", (args, kwargs)
    assert comm.calls == 2
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR_ROWS", "2")
    assert linear_hook._fused_linear(layer, x, (), {}) is None
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR_ROWS", "16")
    for mode in ("eager", "compiled"):  # outside a capture: SGLang's forward
        _fused_setup(monkeypatch, comm, mode)
        assert linear_hook._fused_linear(layer, x, (), {}) is None
    _fused_setup(monkeypatch, _FakeComm("out must be 16-byte aligned"))
    assert linear_hook._fused_linear(layer, x, (), {}) is None
    _fused_setup(monkeypatch, None)  # NVRAR not built on the TP group
    assert linear_hook._fused_linear(layer, x, (), {}) is None
    _fused_setup(monkeypatch, comm)
    monkeypatch.setattr(plugin, "_TP_GROUP", [])  # before initialize_model_parallel
    assert linear_hook._fused_linear(layer, x, (), {}) is None
    from artune.kernels.nvrar import LINEAR_DEFAULTS, LINEAR_MAX_ROWS

    _fused_setup(monkeypatch, comm)  # ARTUNE_FUSED_LINEAR=1: the kernel's defaults
    assert linear_hook._fused_linear(layer, x, (), {}) == (comm, LINEAR_DEFAULTS)
    # SGLang's MLP-skip flag, and an extend batch whose all-reduce SGLang quantizes
    _linear_module(monkeypatch, quant_comms=True)
    linear_hook._LINEAR_MODULE[0].should_skip_mlp_all_reduce = lambda: True
    assert linear_hook._fused_linear(layer, x, (), {}) is None
    _linear_module(monkeypatch, quant_comms=True)
    extend = types.SimpleNamespace(forward_mode=_Mode(decode=False))
    assert linear_hook._fused_linear(layer, x, (None, extend), {}) is None
    assert linear_hook._fused_linear(layer, x, (), {"forward_batch": extend}) is None
    decode = types.SimpleNamespace(forward_mode=_Mode(decode=True))
    assert linear_hook._fused_linear(layer, x, (False, decode), {}) == (comm, LINEAR_DEFAULTS)
    _linear_module(monkeypatch, quant_comms=False)
    assert linear_hook._fused_linear(layer, x, (False, extend), {}) == (comm, LINEAR_DEFAULTS)
    assert linear_hook._fused_linear(layer, x, (False, None, None, "more"), {}) is None
    # SGLang 0.5.23's layers: no tp_size, a group (TP, attention TP or replicated) instead
    tp = types.SimpleNamespace(unique_name="tp:0", world_size=2)

    def layer_023(**over: Any) -> Any:
        lay = _layer(**{"tp_group": tp, "parallel_group": None, **over})
        del lay.tp_size
        return lay

    for lay in (layer_023(), layer_023(parallel_group="tp")):
        assert linear_hook._fused_linear(lay, x, (), {}) == (comm, LINEAR_DEFAULTS)
    for lay in (layer_023(parallel_group="attn_tp"), layer_023(parallel_group="replicated"),
                layer_023(tp_group=types.SimpleNamespace(unique_name="attn_tp:0", world_size=2)),
                layer_023(tp_group=types.SimpleNamespace(unique_name="tp:0", world_size=1)),
                layer_023(tp_group=None)):
        assert linear_hook._fused_linear(lay, x, (), {}) is None, lay
    sequence_parallel = types.SimpleNamespace(sp_active=True)
    linear_hook._LINEAR_MODULE[0].get_forward = lambda: sequence_parallel
    assert linear_hook._fused_linear(layer_023(), x, (), {}) is None
    sequence_parallel.sp_active = False
    assert linear_hook._fused_linear(layer_023(), x, (), {}) == (comm, LINEAR_DEFAULTS)
    # 64 rows: the defaults' K loop one stage shallower, to fit an H100's shared memory
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR_ROWS", "64")
    x64 = x.new_zeros(64, x.shape[1], dtype=torch.bfloat16)  # (fp32 would be refused)
    assert linear_hook._fused_linear(layer, x64, (), {}) == (
        comm, dict(LINEAR_DEFAULTS, stages=LINEAR_DEFAULTS["stages"] - 1))

    # the setting's bound is the kernel's
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR_ROWS", str(LINEAR_MAX_ROWS))
    assert envs.get("ARTUNE_FUSED_LINEAR_ROWS") == LINEAR_MAX_ROWS
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR_ROWS", str(LINEAR_MAX_ROWS + 1))
    with pytest.raises(ValueError, match="ARTUNE_FUSED_LINEAR_ROWS='65' is not valid"):
        envs.get("ARTUNE_FUSED_LINEAR_ROWS")


def test_fused_linear_follows_the_profile(monkeypatch, tmp_path) -> None:
    """ARTUNE_FUSED_LINEAR=auto (the default): a call runs fused exactly where the profile's
    linear section says (its shape, dtype and row count), with the parameters stored there;
    0 turns it off. The hook is registered only for a profile that fuses something."""
    import torch

    comm = _FakeComm()
    _fused_setup(monkeypatch, comm, switch="auto")
    layer = _layer()

    def original(self: Any, *args: Any, **kwargs: Any) -> str:
        return "sglang's forward"

    y, _ = linear_hook._around_row_linear(original, layer, torch.ones(8, 4))
    assert torch.equal(y, torch.full((8, 8), 8.0)) and comm.params == (16, 64, 8, 2, 0)
    other = _FakeComm()
    _fused_setup(monkeypatch, other, switch="auto", prefetch=1)  # a profile that prefetches
    linear_hook._around_row_linear(original, layer, torch.ones(8, 4))
    assert other.params == (16, 64, 8, 2, 1)
    _fused_setup(monkeypatch, comm, switch="auto")
    for x, lay in ((torch.ones(9, 4), layer),  # rows the profile leaves unfused
                   (torch.ones(3, 4, dtype=torch.float64), _layer(  # a dtype it lacks
                       weight=torch.ones(8, 4, dtype=torch.float64))),
                   (torch.ones(3, 4), _layer(weight=torch.ones(16, 4)))):  # another shape
        assert linear_hook._around_row_linear(original, lay, x) == "sglang's forward"
    assert comm.calls == 1
    logged: list[str] = []
    monkeypatch.setattr(plugin, "log_once", lambda key, msg, *a: logged.append(msg))
    linear_hook._fused_linear(_layer(weight=torch.ones(16, 4)), torch.ones(3, 4), (), {})
    linear_hook._fused_linear(layer, torch.ones(9, 4), (), {})  # a shape it has: rows unfused
    assert logged == ["artune: the profile's linear section has no float32 K=4 N=16 layer (it "
                      "was tuned for another model or TP size); those layers stay unfused. "
                      "`artune tune --linear-shapes 4x16` measures them"]
    # a profile whose section was dropped (NVRAR excluded at set-up, which said so): no note
    from artune.profile import Profile, validate

    plugin._ROUTES["tp:0"].profile = Profile(validate(dict(_LINEAR_PROFILE, linear=[])))
    assert linear_hook._fused_linear(_layer(weight=torch.ones(16, 4)), torch.ones(3, 4), (),
                                     {}) is None
    assert len(logged) == 1
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR", "0")
    assert linear_hook._fused_linear(layer, torch.ones(8, 4), (), {}) is None
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR", "sometimes")
    with pytest.raises(ValueError, match="expected auto, 1 or 0"):
        envs.get("ARTUNE_FUSED_LINEAR")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_LINEAR_PROFILE))
    assert linear_hook.profile_fuses_linear(str(path))
    unfused = json.loads(json.dumps(_LINEAR_PROFILE))
    unfused["linear"][0]["ranges"][0]["fused"] = False
    path.write_text(json.dumps(unfused))
    assert not linear_hook.profile_fuses_linear(str(path))
    assert not linear_hook.profile_fuses_linear(str(tmp_path / "missing.json"))


def _row_module(**over: Any) -> Any:
    """A torch module with RowParallelLinear's attributes whose forward goes through the hook
    (SGLang's own forward stand-in: ``x @ W.T + 100``, so the two paths differ)."""
    import torch

    class Row(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8, 4, dtype=torch.bfloat16),
                                             requires_grad=False)
            attrs = dict(bias=None, reduce_results=True, tp_size=2, input_is_parallel=True,
                         skip_bias_add=False, use_dp_attention_reduce=False,
                         use_decode_attn_tp=False, quant_method=UnquantizedLinearMethod())
            attrs.update(over)
            for name, value in attrs.items():
                setattr(self, name, value)

        def sglang_forward(self, x: Any, skip_all_reduce: bool = False,
                           forward_batch: Any = None, output_tensor: Any = None) -> Any:
            return x.to(self.weight.dtype) @ self.weight.t() + 100, None  # apply casts

        def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            return linear_hook._around_row_linear(Row.sglang_forward, self, x, *args, **kwargs)

    return Row()


def _compiled(fn: Any) -> tuple[Any, list[Any]]:
    """``fn`` under torch.compile(fullgraph=True, dynamic=False), as SGLang compiles (aot_eager:
    the fake implementations run, no C++ compiler needed); the traced graphs land in the list."""
    import torch

    graphs: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        from torch._dynamo.backends.common import aot_autograd

        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), graphs


def _has_fused_op(graphs: list[Any]) -> bool:
    import torch

    op = torch.ops.artune.sglang_row_linear
    return any(node.target in (op, op.default) for gm in graphs for node in gm.graph.nodes)


def _bf16(*shape: int) -> Any:
    import torch

    return torch.ones(*shape, dtype=torch.bfloat16)


def _bf16_full(shape: tuple[int, ...], value: float) -> Any:
    import torch

    return torch.full(shape, value, dtype=torch.bfloat16)


def _linear_module(monkeypatch: pytest.MonkeyPatch, quant_comms: bool | None = None) -> list[Any]:
    """Stands in for SGLang's linear module (what the hook looks up there): its TP all-reduce
    (doubles, recording each call's shape), its MLP-skip flag, and ``get_exec`` when
    ``quant_comms`` is given. Returns the list of all-reduced shapes."""
    reduced: list[Any] = []
    module = types.SimpleNamespace(
        tensor_model_parallel_all_reduce=lambda y: reduced.append(tuple(y.shape)) or 2 * y,
        should_skip_mlp_all_reduce=lambda: False)
    if quant_comms is not None:
        state = types.SimpleNamespace(
            comm=types.SimpleNamespace(enable_quant_communications=quant_comms))
        module.get_exec = lambda: state
    monkeypatch.setattr(linear_hook, "_LINEAR_MODULE", [module])
    return reduced


class _Mode:
    """A ForwardBatch's forward_mode."""

    def __init__(self, decode: bool) -> None:
        self.decode = decode

    def is_decode_or_idle(self) -> bool:
        return self.decode


def test_compiled_one_row_layers_stay_with_inductor_where_it_fuses_them(monkeypatch) -> None:
    """Where inductor's coordinate-descent tuning is on (SGLang's default compile mode turns it
    on, and SGLang sets it before compiling), inductor lowers a GEMM of statically one row to a
    multiply and a sum fused with its neighbours; a layer traced with one row then stays
    SGLang's own (no custom op in the graph, logged once), while 2 rows still trace to the op.
    ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED=1 fuses one row too, and without the tuning (a mode
    without it, the config off) one row is fused as before. (The stand-in comm's fused call
    gives 2 * x @ W.T and counts itself; SGLang's own forward stand-in x @ W.T + 100.)"""
    import torch
    import torch._inductor.config as inductor_config

    comm = _FakeComm()
    _fused_setup(monkeypatch, comm, mode="graph", switch="auto", dtype="bfloat16")
    reduced = _linear_module(monkeypatch)
    layer = _row_module()
    logged: list[str] = []
    monkeypatch.setattr(plugin, "log_once", lambda key, msg, *a: logged.append(msg))
    monkeypatch.delenv("SGLANG_TORCH_COMPILE_MODE", raising=False)  # SGLang's default mode
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR", "0")  # nothing fused: the rule is not news
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert f(_bf16(1, 4)).float()[0, 0] == 104.0 and not _has_fused_op(graphs) and not logged
    monkeypatch.delenv("ARTUNE_FUSED_LINEAR")
    for config_on in (False, True):
        monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", config_on)
        f, graphs = _compiled(lambda x: layer(x)[0])
        assert torch.equal(f(_bf16(1, 4)).float(), torch.full((1, 8), 104.0))  # SGLang's own
        assert not _has_fused_op(graphs) and comm.calls == 0 and not reduced
    assert any("row-parallel layers of one row stay SGLang's own" in m for m in logged)
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(2, 4)), _bf16_full((2, 8), 8.0)) and _has_fused_op(graphs)
    assert comm.calls == 1
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED", "1")
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(1, 4)), _bf16_full((1, 8), 8.0)) and _has_fused_op(graphs)
    assert comm.calls == 2
    monkeypatch.delenv("ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED")
    monkeypatch.setenv("SGLANG_TORCH_COMPILE_MODE", "default")  # no tuning by the mode ...
    f, graphs = _compiled(lambda x: layer(x)[0])  # ... but by the config (still on)
    assert not _has_fused_op(graphs) and f(_bf16(1, 4)).float()[0, 0] == 104.0
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(1, 4)), _bf16_full((1, 8), 8.0)) and _has_fused_op(graphs)
    assert comm.calls == 3
    torch._dynamo.reset()


def test_fused_linear_under_torch_compile_is_one_custom_op(monkeypatch) -> None:
    """Under torch.compile a layer whose shape the profile fuses at some row count becomes
    torch.ops.artune.sglang_row_linear in one graph (no graph break), decided from what every
    rank traces alike; the op chooses when it runs: the fused kernel inside a capture at the
    rows the profile fuses, else the GEMM and SGLang's TP all-reduce (SGLang's warm-up runs,
    which ranks reach seconds apart after compiling). Anything else is traced as SGLang's own
    forward."""
    import torch

    comm = _FakeComm()
    _fused_setup(monkeypatch, comm, mode="graph", switch="auto", dtype="bfloat16")
    reduced = _linear_module(monkeypatch)
    layer = _row_module()
    f, graphs = _compiled(lambda x: layer(x)[0] + 1)
    traced: list[str] = []
    monkeypatch.setattr(plugin, "_TRACE", {})
    monkeypatch.setattr(plugin, "_trace", lambda group, x, backend: traced.append(backend))
    y = f(_bf16(3, 4))  # 3 rows: fused in the profile, inside a capture
    assert torch.equal(y, _bf16_full((3, 8), 9.0)) and comm.calls == 1 and not reduced
    assert comm.params == (16, 64, 8, 2, 0) and _has_fused_op(graphs)
    assert traced == ["nvrar (fused linear)"]  # the route trace counts compiled fused calls
    monkeypatch.setattr(plugin, "_TRACE", None)
    monkeypatch.setattr(plugin, "current_mode", lambda: "eager")  # the same graph, warm-up
    assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 9.0))
    assert comm.calls == 1 and reduced == [(3, 8)] and len(graphs) == 1
    monkeypatch.setattr(plugin, "current_mode", lambda: "graph")
    y = f(_bf16(9, 4))  # 9 rows: unfused in the profile, the op's GEMM + all-reduce
    assert torch.equal(y, _bf16_full((9, 8), 9.0)) and comm.calls == 1
    assert reduced == [(3, 8), (9, 8)] and len(graphs) == 2 and _has_fused_op(graphs[1:])

    # dynamic shapes (SGLang's piecewise prefill graphs): the row count is symbolic while
    # tracing, and the op decides per call
    torch._dynamo.reset()
    g = torch.compile(lambda x: layer(x)[0], backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(g(_bf16(5, 4)), _bf16_full((5, 8), 8.0)) and comm.calls == 2
    assert torch.equal(g(_bf16(70, 4)), _bf16_full((70, 8), 8.0)) and comm.calls == 2
    assert reduced[-1] == (70, 8)

    refused: list[tuple[str, Any, Any]] = [
        ("a layer with bias", _row_module(bias=torch.zeros(8)), {}),
        ("a quantized layer", _row_module(quant_method=object()), {}),
        ("no all-reduce", _row_module(reduce_results=False), {}),
        ("skip_all_reduce", _row_module(), {"skip_all_reduce": True}),
        ("another weight dtype", _row_module(weight=torch.nn.Parameter(
            torch.ones(8, 4, dtype=torch.float64), requires_grad=False)), {}),
        ("an extend batch, quantized all-reduce unknown", _row_module(),
         {"forward_batch": types.SimpleNamespace(forward_mode=_Mode(decode=False))}),
    ]
    for why, lay, kwargs in refused:
        f, graphs = _compiled(lambda x, lay=lay, kwargs=kwargs: lay(x, **kwargs)[0])
        assert torch.equal(f(_bf16(3, 4)).float(), torch.full((3, 8), 104.0)), why
        assert not _has_fused_op(graphs), why
    for decode, quant in ((True, True), (False, False)):  # SGLang's all-reduce not quantized
        _linear_module(monkeypatch, quant_comms=quant)
        batch = types.SimpleNamespace(forward_mode=_Mode(decode))
        f, graphs = _compiled(lambda x, batch=batch: layer(x, forward_batch=batch)[0])
        assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 8.0)) and _has_fused_op(graphs)
    _linear_module(monkeypatch, quant_comms=True)  # an extend batch all-reduced quantized
    batch = types.SimpleNamespace(forward_mode=_Mode(decode=False))
    f, graphs = _compiled(lambda x: layer(x, forward_batch=batch)[0])
    assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 104.0))
    assert not _has_fused_op(graphs)
    calls = comm.calls
    reduced = _linear_module(monkeypatch)
    linear_hook._LINEAR_MODULE[0].should_skip_mlp_all_reduce = lambda: True  # SGLang's flag
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 104.0))
    assert not _has_fused_op(graphs)
    reduced = _linear_module(monkeypatch)
    for mode in ("reduce-overhead", "max-autotune"):  # inductor's own CUDA graphs
        monkeypatch.setenv("SGLANG_TORCH_COMPILE_MODE", mode)
        f, graphs = _compiled(lambda x: layer(x)[0])
        assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 104.0))
        assert not _has_fused_op(graphs), mode
    monkeypatch.delenv("SGLANG_TORCH_COMPILE_MODE")
    monkeypatch.setenv("ARTUNE_FUSED_LINEAR", "0")
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 104.0))
    assert not _has_fused_op(graphs)
    # NVRAR not built
    _fused_setup(monkeypatch, None, mode="graph", switch="auto", dtype="bfloat16")
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 104.0))
    assert comm.calls == calls and not _has_fused_op(graphs)
    monkeypatch.setattr(linear_hook, "_LINEAR_MODULE", [])  # the hook was not registered
    _fused_setup(monkeypatch, comm, mode="graph", switch="auto", dtype="bfloat16")
    f, graphs = _compiled(lambda x: layer(x)[0])
    assert torch.equal(f(_bf16(3, 4)), _bf16_full((3, 8), 104.0))
    assert not _has_fused_op(graphs)

    # ARTUNE_FUSED_LINEAR=1: any shape, fused at the defaults up to ARTUNE_FUSED_LINEAR_ROWS;
    # two layers of different shapes in one graph
    from artune.kernels.nvrar import LINEAR_DEFAULTS

    reduced = _linear_module(monkeypatch)
    _fused_setup(monkeypatch, comm, mode="graph", switch="1", dtype="bfloat16")
    down = _row_module(weight=torch.nn.Parameter(_bf16(4, 8), requires_grad=False))
    f, graphs = _compiled(lambda x: down(layer(x)[0])[0])
    assert torch.equal(f(_bf16(16, 4)), _bf16_full((16, 4), 128.0))
    assert comm.calls == calls + 2 and comm.params == (*(LINEAR_DEFAULTS[p] for p in (
        "block_n", "block_k", "warps", "stages")), 0)
    assert sum(n.target is torch.ops.artune.sglang_row_linear.default
               or n.target is torch.ops.artune.sglang_row_linear
               for gm in graphs for n in gm.graph.nodes) == 2
    assert torch.equal(f(_bf16(17, 4)), _bf16_full((17, 4), 128.0))  # 17 rows: unfused
    assert comm.calls == calls + 2 and reduced == [(17, 8), (17, 4)]

    # the compiled graph outlives NVRAR (closed): logged, the GEMM and the TP all-reduce
    logged: list[str] = []
    monkeypatch.setattr(plugin, "log_once", lambda key, msg, *a: logged.append(msg))
    f, graphs = _compiled(lambda x: layer(x)[0])
    f(_bf16(2, 4))
    plugin._ROUTES["tp:0"].router.backends["nvrar"].closed = True
    assert torch.equal(f(_bf16(2, 4)), _bf16_full((2, 8), 8.0))
    assert comm.calls == calls + 3 and reduced[-1] == (2, 8)
    assert any("NVRAR is not built" in m for m in logged)
    torch._dynamo.reset()


def test_fused_linear_custom_op_schema_and_fake() -> None:
    """torch.library's own checks of the op (schema, fake implementation, autograd
    registration), with a stand-in comm: inside a capture (the fused kernel) and outside one
    (the GEMM and the TP all-reduce)."""
    import torch

    comm = _FakeComm()
    mp = pytest.MonkeyPatch()
    try:
        _fused_setup(mp, comm, mode="graph", switch="auto", dtype="bfloat16")
        reduced = _linear_module(mp)
        args = (torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16))
        torch.library.opcheck(torch.ops.artune.sglang_row_linear.default, args)
        assert comm.calls >= 1 and not reduced
        mp.setattr(plugin, "current_mode", lambda: "eager")
        torch.library.opcheck(torch.ops.artune.sglang_row_linear.default, args)
        assert reduced
    finally:
        mp.undo()


def test_fused_linear_hook_is_registered_where_the_layer_exists(monkeypatch) -> None:
    """ARTUNE_FUSED_LINEAR=1 hooks RowParallelLinear.forward (around), or warns and leaves
    the layers alone on an SGLang without it."""
    registered: list[tuple[str, Any]] = []
    registry = types.SimpleNamespace(register=lambda t, h, k: registered.append((t, h)))
    fake = types.SimpleNamespace(HookRegistry=registry,
                                 HookType=types.SimpleNamespace(AROUND="around"))
    for name in ("sglang", "sglang.srt", "sglang.srt.plugins", "sglang.srt.layers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", fake)
    linear = types.ModuleType("sglang.srt.layers.linear")
    monkeypatch.setitem(sys.modules, "sglang.srt.layers.linear", linear)
    linear_hook.register_fused_linear()  # no RowParallelLinear: nothing registered
    assert registered == []

    class RowParallelLinear:
        def forward(self, x: Any) -> Any:
            return x

    linear.RowParallelLinear = RowParallelLinear  # type: ignore[attr-defined]
    linear_hook.register_fused_linear()
    assert registered == [(linear_hook.ROW_LINEAR, linear_hook._around_row_linear)]


# ---------------------------------------------------------------------------------------------
# The plugin's exchanges are bounded (plain gloo ranks: no sglang needed)


def _gather_with_a_dead_peer(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from artune.agree import gather
    from artune.integration.sglang import PluginError

    os.environ["ARTUNE_COLLECTIVE_TIMEOUT_S"] = "5"
    group = dist.new_group(backend="gloo")
    both = gather(group, rank * 10, "TP: warm-up", PluginError)
    if rank == 1:
        os._exit(9)  # dies before the next exchange, like a crash during set-up
    t0 = time.monotonic()
    try:
        gather(group, "mine", "TP: profile exchange", PluginError)
    except PluginError as exc:
        return {"both": both, "error": str(exc), "seconds": time.monotonic() - t0}
    return {"both": both, "error": None}


def _agree_fused(rank: int, world: int) -> dict[str, Any]:
    """Ranks agree on the fused linear layers: alike first, then rank 1 without the hook."""
    import torch.distributed as dist

    from artune.integration import sglang_linear as lin
    from artune.integration.sglang import PluginError

    os.environ["ARTUNE_COLLECTIVE_TIMEOUT_S"] = "20"
    tp = types.SimpleNamespace(cpu_group=dist.new_group(backend="gloo"))
    lin._FUSED_HOOKED[:] = [True]
    lin.agree_fused_linear(tp)  # alike: no error
    if rank == 1:
        lin._FUSED_HOOKED.clear()
    try:
        lin.agree_fused_linear(tp)
    except PluginError as exc:
        return {"error": str(exc)}
    return {"error": None}


def test_ranks_that_differ_in_the_fused_linear_layers_fail_alike() -> None:
    from conftest import run_gloo

    for r in run_gloo(_agree_fused, 2, timeout_s=90):
        assert r["error"] == (
            "artune TP: ranks differ in the fused linear layers (rank 0: "
            "ARTUNE_FUSED_LINEAR=auto, hook on; rank 1: ARTUNE_FUSED_LINEAR=auto, hook off); "
            "give every rank the same ARTUNE_FUSED_LINEAR and profile"), r


def test_a_rank_that_dies_during_setup_fails_the_others_within_the_bound() -> None:
    from conftest import run_gloo

    r0, _ = run_gloo(_gather_with_a_dead_peer, 2, may_die=frozenset({1}), timeout_s=90)
    assert r0["both"] == [0, 10]
    assert r0["error"] is not None and r0["seconds"] < 30
    assert r0["error"].startswith("artune: rank 0: TP: profile exchange: not every rank")
    assert "ARTUNE_COLLECTIVE_TIMEOUT_S" in r0["error"], r0["error"]
    assert "rank(s) 1 did not arrive" in r0["error"], r0["error"]


def _gather_with_a_late_peer(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 reaches the second exchange after the others gave up on it: it must fail too
    (at once, naming the rank that gave up), not return or wait; the next exchange of all
    three still works."""
    import torch.distributed as dist

    from artune.agree import gather
    from artune.integration.sglang import PluginError

    os.environ["ARTUNE_COLLECTIVE_TIMEOUT_S"] = "2"
    group = dist.new_group(backend="gloo")
    first = gather(group, rank, "first", PluginError)
    if rank == 2:
        time.sleep(4)  # past the others' bound
    t0 = time.monotonic()
    try:
        gather(group, rank, "second", PluginError)
        second: str | None = None
    except PluginError as exc:
        second = str(exc)
    took = time.monotonic() - t0
    dist.barrier(group=group)
    third = gather(group, rank * 2, "third", PluginError)
    return {"first": first, "second": second, "took": took, "third": third}


def test_a_rank_arriving_after_its_peers_gave_up_fails_too_and_at_once() -> None:
    from conftest import run_gloo

    res = run_gloo(_gather_with_a_late_peer, 3, timeout_s=90)
    for rank, r in enumerate(res):
        assert r["first"] == [0, 1, 2] and r["third"] == [0, 2, 4]
        assert r["second"] is not None, f"rank {rank} returned from an exchange that failed"
        assert r["second"].startswith(f"artune: rank {rank}: second: ")
    for r in res[:2]:
        assert 1.5 < r["took"] < 10 and "rank(s) 2 did not arrive" in r["second"], r
    assert res[2]["took"] < 1.0, res[2]  # sees the abort, does not wait its own bound
    assert "gave up: rank(s) 2 did not arrive" in res[2]["second"], res[2]


def test_attention_tp_group_gets_its_own_route_when_it_differs_from_tp(version: str,
                                                                      tmp_path: Path) -> None:
    """TP = 4 with attention data parallelism 2: the attention-TP groups (2 ranks each) are set
    up too. A profile made for 4 ranks routes TP, and the 2-rank groups keep SGLang's own
    all-reduce (logged); one made for 2 ranks routes the attention-TP groups, while TP, with
    ARTUNE_STRICT=0, keeps SGLang's own."""
    four = _write_profile(tmp_path / "four.json", world=4)
    res = _run(version, tmp_path, scenario="attn_dp", world=4, timeout_s=180,
               env={"ARTUNE_PROFILE": str(four), "ARTUNE_LOG_LEVEL": "INFO"})
    for r in res:
        assert "error" not in r, r["error"] + r.get("traceback", "") + r["stderr"][-3000:]
        assert r["attn_tp_size"] == 2
        assert [n.split(":")[0] for n in r["routes"]] == ["tp"], r["routes"]
        assert "attention-TP" in r["stderr"] and "keeps SGLang's own all-reduce" in r["stderr"]
    two = _write_profile(tmp_path / "two.json", world=2)
    res = _run(version, tmp_path, scenario="attn_dp", world=4, timeout_s=180,
               env={"ARTUNE_PROFILE": str(two), "ARTUNE_STRICT": "0"})
    for r in res:
        assert "error" not in r, r["error"] + r.get("traceback", "") + r["stderr"][-3000:]
        assert [n.split(":")[0] for n in r["routes"]] == ["attention_tp"], r["routes"]


@pytest.mark.parametrize("live", [True, False])
def test_setup_warns_when_the_profile_never_measured_sglangs_own(
        live: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group's rank 0 warns, after its routing line, when the profile has no measurement of
    SGLang's own all-reduce while that all-reduce is live in this server (its sizes may then
    run slower than SGLang's default); with SGLang's custom all-reduce off, nothing to say."""
    import logging

    from _profiles import profile_doc

    from artune import log as artune_log
    from artune.integration import sglang_setup

    monkeypatch.setattr(artune_log, "_seen", set())  # once per process: start afresh
    doc = profile_doc()
    doc["skipped"] = [{"backend": "sglang", "params": {}, "dtype": None, "mode": None,
                       "nbytes": None, "reason": "rank 0: create() failed: ImportError: x"}]
    prof = profile_mod.Profile(doc)

    class _Router:
        def close(self) -> None:
            pass

    monkeypatch.setenv("ARTUNE_PROFILE", "/p/profile.json")
    monkeypatch.setattr(sglang_setup, "build_router", lambda *a, **k: (prof, _Router()))
    monkeypatch.setattr(sglang_setup, "_start_trace", lambda: None)
    gc = types.SimpleNamespace(unique_name="tp:test", world_size=4, rank_in_group=0,
                               device_group=None, cpu_group=None, device="cpu",
                               ca_comm=types.SimpleNamespace(disabled=not live))
    seen: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = _Keep()
    logging.getLogger("artune").addHandler(handler)
    try:
        assert sglang_setup.setup_group(gc) is not None
    finally:
        logging.getLogger("artune").removeHandler(handler)
        plugin._ROUTES.pop("tp:test", None)
    warned = [r.getMessage() for r in seen if r.levelno == logging.WARNING]
    if live:
        assert len(warned) == 1, warned
        assert ("/p/profile.json has no measurement of SGLang's own all-reduce (the tune "
                "skipped it: rank 0: create() failed: ImportError: x)") in warned[0]
        assert "artune tune --include-sglang" in warned[0]
    else:
        assert warned == []
