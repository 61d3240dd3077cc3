"""The SGLang plugin's fused linear layers: a row-parallel linear layer and its all-reduce as
one NVRAR kernel (``NvrarComm.linear_all_reduce``), where the profile's ``linear`` section says
(or everywhere it can with ``ARTUNE_FUSED_LINEAR=1``; docs/sglang.md).

``artune.integration.sglang``'s ``register`` calls ``register_fused_linear`` when the switch and
the profile ask for it, and its set-up after ``initialize_model_parallel`` calls
``agree_fused_linear`` on the TP group; the hook (``_around_row_linear``) then decides per call
from what every rank sees alike (``_fused_linear``).

Under torch.compile (``_traced_row_linear``) the hook decides, while the graph is traced, whether
a layer's shape may run fused (the switch, the profile's linear section, NVRAR built), and such
a layer becomes one call of the custom op ``torch.ops.artune.sglang_row_linear``. The op makes
the rest of the choice when it runs, from the row count and the capture state: inside a
CUDA-graph capture the fused kernel where the profile fuses those rows, otherwise the GEMM and
SGLang's TP all-reduce (as the uncompiled hook; SGLang's warm-up runs of a compiled graph are
not captured, and ranks that compiled at different speeds reach them seconds apart, longer than
NVRAR's bounded waits). Row counts may be symbolic (dynamic shapes) while tracing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from artune import envs
from artune.integration import sglang as plugin
from artune.log import logger

__all__ = ["ROW_LINEAR", "profile_fuses_linear", "register_fused_linear", "agree_fused_linear"]

#: The row-parallel linear layer whose GEMM and all-reduce ARTUNE_FUSED_LINEAR runs as one kernel.
ROW_LINEAR = "sglang.srt.layers.linear.RowParallelLinear.forward"
#: [True] once RowParallelLinear.forward is hooked in this process (``register_fused_linear``)
_FUSED_HOOKED: list[bool] = []
#: [SGLang's linear module] once the hook is registered: the traced path and the compiled op
#: call its ``should_skip_mlp_all_reduce``, ``get_exec`` and ``tensor_model_parallel_all_reduce``
#: as SGLang's own forward does, looked up at each use (another plugin may rebind them)
_LINEAR_MODULE: list[Any] = []


def profile_fuses_linear(path: str) -> bool:
    """Whether the profile at ``path`` runs some row-parallel linear layer fused (an unreadable
    profile: False here; the hook after initialize_model_parallel names the problem)."""
    from artune.profile import ProfileError, load

    try:
        return load(path).fuses_linear()
    except ProfileError:
        return False


def register_fused_linear() -> None:
    """Hook RowParallelLinear.forward (``_around_row_linear``) for ARTUNE_FUSED_LINEAR (1, or
    auto with a profile whose linear section fuses some layer), or say why not (this SGLang has
    no such method)."""
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    owner, _, attr = ROW_LINEAR.rpartition(".")
    try:
        ok = callable(getattr(pkgutil.resolve_name(owner), attr, None))
    except (ImportError, AttributeError, ValueError):
        ok = False
    if not ok:
        logger.warning("artune: fused linear layers (ARTUNE_FUSED_LINEAR) but this SGLang has "
                       "no %s; the linear layers keep their GEMM and the routed all-reduce",
                       ROW_LINEAR)
        return
    HookRegistry.register(ROW_LINEAR, _around_row_linear, HookType.AROUND)
    _FUSED_HOOKED[:] = [True]
    _LINEAR_MODULE[:] = [pkgutil.resolve_name(owner.rpartition(".")[0])]
    if envs.get("ARTUNE_FUSED_LINEAR") == "on":
        logger.info("artune: ARTUNE_FUSED_LINEAR=1: row-parallel linear layers of at most %d "
                    "rows run as one NVRAR kernel inside CUDA graphs",
                    envs.get("ARTUNE_FUSED_LINEAR_ROWS"))
    else:
        logger.info("artune: row-parallel linear layers run as one NVRAR kernel inside CUDA "
                    "graphs where the profile's linear section says so (ARTUNE_FUSED_LINEAR=0 "
                    "turns it off)")


def agree_fused_linear(group: Any) -> None:
    """Every rank of the TP group hooks the linear layers alike: the switch and the hook are
    each rank's own (the environment, the profile read at registration), and a rank fusing
    where its peers do not would issue other collectives. A difference is an error on every
    rank."""
    from artune import agree

    mine = {"switch": envs.get("ARTUNE_FUSED_LINEAR"), "hooked": bool(_FUSED_HOOKED)}
    views = agree.gather(group.cpu_group, mine, "TP: fused linear layers", plugin.PluginError)
    if any(v != views[0] for v in views):
        raise plugin.PluginError(
            "artune TP: ranks differ in the fused linear layers ("
            + "; ".join(f"rank {r}: ARTUNE_FUSED_LINEAR={v['switch']}, hook "
                        f"{'on' if v['hooked'] else 'off'}" for r, v in enumerate(views))
            + "); give every rank the same ARTUNE_FUSED_LINEAR and profile")


def _around_row_linear(original: Callable[..., Any], self: Any, *args: Any,
                       **kwargs: Any) -> Any:
    x = args[0] if args else kwargs.get("input_")
    if torch.compiler.is_compiling():
        return _traced_row_linear(original, self, x, args, kwargs)
    fused = _fused_linear(self, x, args[1:], kwargs)
    if fused is None:
        return original(self, *args, **kwargs)
    return _run_fused(*fused, x, self.weight), (self.bias if self.skip_bias_add else None)


def _run_fused(comm: Any, params: Mapping[str, int], x: Any, weight: Any) -> Any:
    """The fused kernel on the TP group (``_linear_choice``'s comm and parameters), noted in the
    route trace when one is kept."""
    if plugin._TRACE is not None:
        plugin._trace(plugin._TP_GROUP[0], x, "nvrar (fused linear)")
    return comm.linear_all_reduce(x, weight, None, params["block_n"], params["block_k"],
                                  params["warps"], params["stages"], params.get("prefetch", 0))


#: RowParallelLinear.forward's arguments after the input, in order (SGLang 0.5.17 and 0.5.23).
_ROW_LINEAR_ARGS = ("skip_all_reduce", "forward_batch", "output_tensor")


def _plain_call(layer: Any, x: Any, rest: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether this RowParallelLinear call is one the fused kernel can stand in for: a 2-D
    contiguous input, no argument that changes the call (skip_all_reduce, output_tensor, one
    this hook does not know), an unquantized layer without bias that all-reduces over the
    plugin's TP group (``_tp_layer``), not a batch SGLang all-reduces quantized or
    reduce-scatters (sequence parallelism). Attribute reads only, so torch.compile traces it as
    SGLang's own forward."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_contiguous():
        return False
    if len(rest) > len(_ROW_LINEAR_ARGS):
        return False
    extra = dict(zip(_ROW_LINEAR_ARGS, rest, strict=False))
    extra.update((k, v) for k, v in kwargs.items() if k != "input_")
    if (extra.get("skip_all_reduce") or extra.get("output_tensor") is not None
            or not set(extra) <= set(_ROW_LINEAR_ARGS)):
        return False
    if not (getattr(layer, "reduce_results", False) and _tp_layer(layer)
            and getattr(layer, "input_is_parallel", False) and layer.bias is None
            and not getattr(layer, "use_dp_attention_reduce", False)
            and not getattr(layer, "use_decode_attn_tp", False)
            and type(layer.quant_method).__name__ == "UnquantizedLinearMethod"):
        return False
    return not (_quantized_all_reduce(extra.get("forward_batch")) or _sequence_parallel())


def _tp_layer(layer: Any) -> bool:
    """Whether the layer is split over more than one rank of the plugin's TP group: its
    ``tp_size`` (SGLang 0.5.17), or its ``tp_group`` and ``parallel_group`` (0.5.23, whose
    layers may also belong to the attention-TP group or be replicated)."""
    size = getattr(layer, "tp_size", None)
    if size is not None:
        return bool(size > 1)
    group = getattr(layer, "tp_group", None)
    if getattr(layer, "parallel_group", None) not in (None, "tp") or group is None:
        return False
    return bool(plugin._TP_GROUP and getattr(group, "unique_name", None) == plugin._TP_GROUP[0]
                and getattr(group, "world_size", 1) > 1)


def _sequence_parallel() -> bool:
    """Whether SGLang reduce-scatters row-parallel outputs instead (its sequence parallelism,
    ``get_forward().sp_active``, 0.5.23; False where its linear module has no such state)."""
    get_forward = getattr(_LINEAR_MODULE[0], "get_forward", None) if _LINEAR_MODULE else None
    return bool(get_forward().sp_active) if get_forward is not None else False


def _quantized_all_reduce(forward_batch: Any) -> bool:
    """Whether SGLang's forward would all-reduce this call quantized: a batch that is not
    decode (or idle) while its quantized communications are on (unknown, without SGLang's
    linear module: assumed so)."""
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is None or mode.is_decode_or_idle():
        return False
    get_exec = getattr(_LINEAR_MODULE[0], "get_exec", None) if _LINEAR_MODULE else None
    return get_exec is None or bool(get_exec().comm.enable_quant_communications)


def _skips_all_reduce() -> bool:
    """SGLang's ``should_skip_mlp_all_reduce()`` (the decoder's flag), False where its linear
    module has none."""
    skip = getattr(_LINEAR_MODULE[0], "should_skip_mlp_all_reduce", None) if _LINEAR_MODULE \
        else None
    return bool(skip()) if callable(skip) else False


def _fused_linear(layer: Any, x: Any, rest: tuple[Any, ...],
                  kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, int]] | None:
    """(the NVRAR comm, the fused kernel's parameters) that run this RowParallelLinear call
    (input ``x``, then ``rest`` and ``kwargs``) as one kernel, or None for SGLang's own
    forward. Only what every rank sees alike decides (shapes, dtypes, the layer's settings,
    capture state, the profile every rank proved it holds), so every rank makes the same
    choice: a call inside a CUDA-graph capture (not under torch.compile: see
    ``_traced_row_linear``) that ``_plain_call`` takes, where NVRAR is built, and whose shape
    and row count the profile's linear section runs fused (ARTUNE_FUSED_LINEAR=1: any of at
    most ARTUNE_FUSED_LINEAR_ROWS rows, at the defaults). The cheap tests come first: eager
    prefill calls pass here too."""
    if envs.get("ARTUNE_FUSED_LINEAR") == "off" or not isinstance(x, torch.Tensor) or (
            x.dim() != 2 or not 1 <= x.shape[0] <= _max_rows()):
        return None
    if not _plain_call(layer, x, rest, kwargs):
        return None
    if not plugin._TP_GROUP or torch.compiler.is_compiling() or plugin.current_mode() != "graph":
        return None
    if _skips_all_reduce():
        return None
    n, k = layer.weight.shape
    return _linear_choice(x, layer.weight, k, n)


def _max_rows() -> int:
    """The most rows a fused call takes: ARTUNE_FUSED_LINEAR_ROWS with the switch on, else the
    kernel's bound (the profile says which of those run fused)."""
    from artune.kernels.nvrar import LINEAR_MAX_ROWS

    if envs.get("ARTUNE_FUSED_LINEAR") == "on":
        return int(envs.get("ARTUNE_FUSED_LINEAR_ROWS"))
    return LINEAR_MAX_ROWS


def _linear_choice(x: Any, weight: Any, k: int, n: int) -> tuple[Any, dict[str, int]] | None:
    """The NVRAR comm and the fused kernel's parameters for ``x`` [rows, K] times ``weight``
    [N, K] on the TP group (the switch, the profile's linear section, NVRAR built there and
    taking the shapes), or None; logs once why a layer stays unfused where that is news."""
    from artune.kernels.nvrar import linear_defaults
    from artune.profile import select_linear

    route = _tp_route()
    if route is None:
        return None
    params = (linear_defaults(x.shape[0], x.element_size())
              if envs.get("ARTUNE_FUSED_LINEAR") == "on"
              else select_linear(route.profile, x.dtype, k, n, x.shape[0]))
    if params is None:
        dtype = str(x.dtype).removeprefix("torch.")
        shapes = route.profile.linear_shapes()  # (none left where NVRAR could not be built)
        if shapes and (dtype, k, n) not in shapes:
            plugin.log_once(
                f"sglang:fused-linear:shape:{dtype}:{k}x{n}",
                f"artune: the profile's linear section has no {dtype} K={k} N={n} layer (it was "
                f"tuned for another model or TP size); those layers stay unfused. "
                f"`artune tune --linear-shapes {k}x{n}` measures them")
        return None
    comm = _tp_comm()
    if comm is None:
        plugin.log_once(
            "sglang:fused-linear:unbuilt", "artune: fused linear layers, but NVRAR is not built "
            "on the TP group (it cannot run here: see the set-up's warning); the linear layers "
            "keep their GEMM and the routed all-reduce", logging.WARNING)
        return None
    why = comm.linear_problem(x, weight, None, params["block_n"], params["block_k"],
                              params["stages"])
    if why:
        plugin.log_once(
            f"sglang:fused-linear:{tuple(x.shape)}:{tuple(weight.shape)}",
            f"artune: fused linear not used for {tuple(x.shape)} x {tuple(weight.shape)}: "
            f"{why}")
        return None
    return comm, params


def _tp_route() -> Any:
    """The plugin's route of the TP group (its profile and router), or None before set-up."""
    return plugin._ROUTES.get(plugin._TP_GROUP[0]) if plugin._TP_GROUP else None


def _tp_comm() -> Any:
    """NVRAR's comm on the TP group, or None where it is not built (or closed)."""
    route = _tp_route()
    be = route.router.backends.get("nvrar") if route is not None else None
    return getattr(be, "comm", None) if be is not None and not be.closed else None


# ---------------------------------------------------------------------------------------------
# torch.compile: decided while tracing, run by a custom op


def _traced_row_linear(original: Callable[..., Any], layer: Any, x: Any, args: tuple[Any, ...],
                       kwargs: Mapping[str, Any]) -> Any:
    """The hook while torch.compile traces RowParallelLinear.forward: a call ``_plain_call``
    takes, of a layer shape the profile fuses at some row count (``_traced_shape_fuses``), becomes
    ``torch.ops.artune.sglang_row_linear``, which chooses by row count and capture state when it
    runs, except a layer of statically one row that inductor lowers better
    (``_inductor_takes_one_row``); anything else is traced as SGLang's own forward. The choice
    depends only on what every rank traces alike."""
    if _LINEAR_MODULE and _plain_call(layer, x, args[1:], kwargs) and not _skips_all_reduce():
        n, k = layer.weight.shape
        if (_traced_shape_fuses(str(x.dtype).removeprefix("torch."),
                                str(layer.weight.dtype).removeprefix("torch."), k, n,
                                layer.weight.is_contiguous())
                and not (isinstance(x.shape[0], int) and x.shape[0] == 1
                         and _inductor_takes_one_row())):
            y = torch.ops.artune.sglang_row_linear(x, layer.weight)
            return y, (layer.bias if layer.skip_bias_add else None)
    return original(layer, *args, **kwargs)


@torch.compiler.assume_constant_result
def _inductor_takes_one_row() -> bool:
    """Whether a layer traced with statically one row (a decode graph of batch size 1: SGLang
    compiles its CUDA graphs with static shapes) stays SGLang's own: where inductor's
    coordinate-descent tuning is on (SGLang's ``set_torch_compile_config`` turns it on, and so
    does its default compile mode, ``max-autotune-no-cudagraphs``), torch's
    ``mm`` decomposition makes a one-row GEMM a multiply and a sum, which inductor fuses with
    the kernels around it (the down projection with the activation before it: one kernel where
    the opaque op leaves two; docs/sglang.md, "What the compiled kernel tables show at bs 1").
    ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED=1 fuses such layers anyway. A constant of the traced
    graph, the same on every rank (so is the configuration)."""
    import torch._inductor as inductor
    import torch._inductor.config as inductor_config

    if envs.get("ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED"):
        return False
    mode = os.environ.get("SGLANG_TORCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
    try:  # SGLang's compile mode (its default, max-autotune-no-cudagraphs, turns it on too)
        by_mode = bool(inductor.list_mode_options(mode).get("coordinate_descent_tuning"))
    except (RuntimeError, KeyError, AttributeError):
        by_mode = False
    if not (by_mode or getattr(inductor_config, "coordinate_descent_tuning", False)):
        return False
    plugin.log_once(
        "sglang:fused-linear:one-row-compiled",
        "artune: under torch.compile, row-parallel layers of one row stay SGLang's own: "
        "inductor fuses their GEMM with the kernels around it (coordinate-descent tuning); "
        "ARTUNE_FUSED_LINEAR_ONE_ROW_COMPILED=1 fuses them with their all-reduce instead")
    return True


#: torch.compile modes in which inductor records CUDA graphs of its own
_INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@torch.compiler.assume_constant_result
def _traced_shape_fuses(dtype: str, weight_dtype: str, k: int, n: int,
                        weight_contiguous: bool) -> bool:
    """Whether a [rows, K] ``dtype`` input times a [N, K] ``weight_dtype`` weight runs fused at
    some row count: the switch (1: any shape), the profile's linear section, NVRAR built on the
    TP group. Called with constants only (the weight's shape, never the row count, which may be
    symbolic), while tracing; its result is a constant of the graph: the profile, the switch and
    NVRAR are fixed once the TP group is set up."""
    from artune.profile import select_linear

    switch = envs.get("ARTUNE_FUSED_LINEAR")
    route = _tp_route()
    if (switch == "off" or route is None or dtype != weight_dtype or not weight_contiguous
            or dtype not in ("bfloat16", "float16") or _tp_comm() is None):
        return False
    mode = os.environ.get("SGLANG_TORCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
    if mode in _INDUCTOR_GRAPH_MODES:
        plugin.log_once(
            "sglang:fused-linear:inductor-graphs",
            f"artune: SGLANG_TORCH_COMPILE_MODE={mode} makes inductor record its own CUDA graphs, "
            f"which would replay the fused kernel in SGLang's uncaptured warm-up runs (ranks "
            f"arrive there seconds apart); the compiled linear layers stay unfused",
            logging.WARNING)
        return False
    return switch == "on" or any(select_linear(route.profile, dtype, k, n, rows) is not None
                                 for rows in range(1, _max_rows() + 1))


@torch.library.custom_op("artune::sglang_row_linear", mutates_args=())
def sglang_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A row-parallel linear layer of the plugin's TP group and its all-reduce: the sum over the
    group of ``x @ weight.T``. Inside a CUDA-graph capture, where the profile's linear section
    fuses this shape and row count (``_linear_choice``, as the uncompiled hook), one NVRAR
    kernel (``NvrarComm.linear_all_reduce``); otherwise the GEMM and SGLang's TP all-reduce.
    The capture state, the shapes and the profile are alike on every rank, so is the choice.
    Inference only (no autograd formula: SGLang runs its forward under no_grad)."""
    if plugin.current_mode() == "graph" and 1 <= x.shape[0] <= _max_rows():
        chosen = _linear_choice(x, weight, weight.shape[1], weight.shape[0])
        if chosen is not None:
            return _run_fused(*chosen, x, weight)
    return _LINEAR_MODULE[0].tensor_model_parallel_all_reduce(
        torch.nn.functional.linear(x, weight))


@sglang_row_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
