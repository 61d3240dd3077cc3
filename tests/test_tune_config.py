"""Sizes, the tune configuration and the CLI's argument checks (pure CPU, no processes)."""

from __future__ import annotations

import math

import pytest

from artune.autotune.config import TuneConfig, parse_extra_backend, parse_size, parse_sizes
from artune.autotune.crew import actual_nbytes
from artune.autotune.timing import MAX_CALLS, Timer, calls_for, summarize
from artune.cli import build_parser, tune_config


def test_parse_size_units() -> None:
    assert [parse_size(s) for s in ("1", "4K", "4kb", "1.5M", "2MiB", "1G")] == [
        1, 4096, 4096, 3 << 19, 2 << 20, 1 << 30]
    for bad in ("", "K", "-1K", "4X", "0"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)


def test_full_range_is_powers_of_two_with_midpoints() -> None:
    sizes = parse_sizes("1K:256M")
    assert sizes[:4] == [1024, 1536, 2048, 3072]
    assert sizes[-1] == 256 << 20 and (3 << 26) in sizes
    assert len(sizes) == 19 + 18  # 2^10..2^28 and the 18 midpoints between them
    assert sizes == sorted(set(sizes))


def test_quick_range_and_lists() -> None:
    assert parse_sizes("1K:256M:4") == [1 << k for k in range(10, 29, 2)]
    assert parse_sizes("64K, 4K,1M,4k") == [4096, 65536, 1 << 20]
    with pytest.raises(ValueError, match="factor"):
        parse_sizes("1K:4K:1")
    with pytest.raises(ValueError):
        parse_sizes("4K:1K")


def test_config_defaults_depend_on_device_and_quick() -> None:
    gpu, quick = TuneConfig(), TuneConfig(quick=True)
    assert gpu.sizes == parse_sizes("1K:256M") and quick.sizes == parse_sizes("1K:256M:4")
    assert quick.n_reps < gpu.n_reps and quick.n_trials < gpu.n_trials
    cpu = TuneConfig(device="cpu")
    assert cpu.dry_run and max(cpu.sizes) <= 1 << 20
    assert 1 <= gpu.prune_after < gpu.n_reps


def test_actual_nbytes_whole_elements() -> None:
    assert actual_nbytes(4096, "bfloat16") == 4096
    assert actual_nbytes(1001, "float32") == 1000
    assert actual_nbytes(1, "bfloat16") == 2


def test_extra_backend_syntax() -> None:
    assert parse_extra_backend("x=pkg.mod:Cls") == ("x", "pkg.mod:Cls")
    with pytest.raises(ValueError, match="NAME=MODULE:CLASS"):
        parse_extra_backend("x=pkg.mod")


def _cfg(*argv: str) -> TuneConfig:
    args = build_parser().parse_args(["tune", *argv])
    return tune_config(args, "artune tune")


def test_cli_config_parsing() -> None:
    cfg = _cfg("--device", "cpu", "--sizes", "4K,64K", "--dtypes", "bf16,fp32",
               "--modes", "eager", "--backends", "gloo", "--trials", "2", "--quick")
    assert cfg.sizes == [4096, 65536] and cfg.dtypes == ["bfloat16", "float32"]
    assert cfg.modes == ["eager"] and cfg.backends == ["gloo"] and cfg.n_trials == 2


def test_modes_are_tuned_graph_first_in_any_order_given() -> None:
    """An eager study takes its parameter sets from the graph study of its size, which must
    have run: `--modes eager,graph` tunes what `graph,eager` does (and a repeat counts once)."""
    assert _cfg("--modes", "eager,graph").modes == ["graph", "eager"]
    assert _cfg("--modes", "eager,eager").modes == ["eager"]
    assert _cfg().modes == ["graph", "eager"]


def test_include_sglang() -> None:
    """SGLang's own all-reduce is a candidate by default on GPUs; --include-sglang adds it to a
    --backends list, --no-include-sglang drops it."""
    from artune.autotune.runner import candidates

    assert "sglang" in candidates(_cfg())
    assert candidates(_cfg("--backends", "nccl,nvrar")) == ["nccl", "nvrar"]
    assert candidates(_cfg("--backends", "nccl,nvrar", "--include-sglang")) == [
        "nccl", "nvrar", "sglang"]
    assert candidates(_cfg("--backends", "sglang,nccl", "--include-sglang")) == ["sglang", "nccl"]
    no = candidates(_cfg("--no-include-sglang"))
    assert "sglang" not in no and "nccl" in no and "nvrar" in no
    assert candidates(_cfg("--device", "cpu")) == ["gloo"]
    assert candidates(_cfg("--device", "cpu", "--include-sglang")) == ["gloo", "sglang"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (("--backends", "nccl,warp"), "unknown warp"),
        (("--dtypes", "int8"), "--dtypes"),
        (("--modes", "graph,lazy"), "--modes"),
        (("--reps", "0"), "--reps must be at least 1"),
        (("--sizes", "4Q"), "bad size"),
    ],
)
def test_cli_config_rejects(argv: tuple[str, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(*argv)


def test_summarize_median_and_spread() -> None:
    med, spread = summarize([10.0, 11.0, 12.0, 13.0, 100.0])
    assert med == 12.0 and spread == pytest.approx(2.0)
    assert summarize([5.0, 7.0]) == (6.0, 2.0)
    assert all(math.isnan(v) for v in summarize([]))


def test_calls_per_repetition() -> None:
    assert calls_for(5.0, 4096, "graph") == 40  # 200 µs per replay
    assert calls_for(0.001, 4096, "eager") == MAX_CALLS
    assert calls_for(1000.0, 256 << 20, "graph") == 1
    assert calls_for(1.0, 64 << 20, "graph") == 8  # graph outputs kept below 512 MB
    # eager: 64 calls up to 16 MiB, then at most 1 GiB per repetition, at least one call
    assert calls_for(0.001, 16 << 20, "eager") == MAX_CALLS
    assert calls_for(0.001, 64 << 20, "eager") == 16
    assert calls_for(0.001, 256 << 20, "eager") == 4
    assert calls_for(0.001, 2 << 30, "eager") == 1


def test_timer_on_cpu_counts_calls() -> None:
    import torch

    n = {"calls": 0}

    def fn() -> None:
        n["calls"] += 1

    with Timer(fn, mode="graph", device=torch.device("cpu"), calls=4) as t:
        t.prepare(warmup=2)
        samples = t.sample(3)
    assert len(samples) == 3 and all(s >= 0 for s in samples)
    assert n["calls"] == 4 * (2 + 3)
    with pytest.raises(ValueError, match="mode"):
        Timer(fn, mode="lazy", device=torch.device("cpu"), calls=1)


def test_incumbent_margin_from_the_command_line() -> None:
    assert _cfg("--device", "cpu").incumbent_margin == pytest.approx(0.10)
    assert _cfg("--device", "cpu", "--incumbent-margin", "0").incumbent_margin == 0.0
    for bad in ("1.5", "-0.1", "ten"):
        with pytest.raises(SystemExit):
            _cfg("--device", "cpu", "--incumbent-margin", bad)
