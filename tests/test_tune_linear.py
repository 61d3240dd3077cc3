"""The tune's fused-linear phase without GPUs: what it measures (shapes from a model's config,
rows), the profile's linear section it builds, and select_linear reading it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from artune.autotune.linear import (
    FUSED,
    UNFUSED,
    build_linear_table,
    layer_shapes,
    linear_space,
    model_dims,
    parse_shapes,
)
from artune.profile import Profile, ProfileError, select_linear, validate

LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "architectures": ["LlamaForCausalLM"]}


def test_layer_shapes_from_a_model_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    dims = model_dims(tmp_path)
    assert dims == model_dims(tmp_path / "config.json")
    assert layer_shapes(dims, 4) == [(1024, 4096), (3584, 4096)]
    assert layer_shapes(dims, 1) == [(4096, 4096), (14336, 4096)]
    with pytest.raises(ValueError, match="attention output width 4096 does not split over 3"):
        layer_shapes(dims, 3)
    gemma = dict(LLAMA_8B, head_dim=256, num_attention_heads=8)  # head_dim given explicitly
    (tmp_path / "g.json").write_text(json.dumps({"text_config": gemma}))
    assert model_dims(tmp_path / "g.json")["attn"] == 2048
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="no num_attention_heads, intermediate_size"):
        model_dims(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        model_dims(tmp_path / "nowhere")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON config"):
        model_dims(tmp_path / "broken.json")


def test_parse_shapes_and_space() -> None:
    assert parse_shapes("1024x4096, 3584X4096,1024x4096") == [(1024, 4096), (3584, 4096)]
    for bad in ("1024", "1024x", "0x4096", "ax4096", "1024x4096x2"):
        with pytest.raises(ValueError, match="expected KxN"):
            parse_shapes(bad)
    space = linear_space(4096, 132)  # an H100's SMs: 16-column tiles would be 256 CTAs
    assert space["block_n"] == [32, 64, 128]
    assert linear_space(48, 132)["block_n"] == [16]


def _rec(impl: str, rows: int, us: float, **params: int) -> dict[str, Any]:
    return {"backend": impl, "params": params, "dtype": "bfloat16", "mode": "graph",
            "nbytes": rows * 8192, "k": 1024, "n": 4096, "rows": rows, "latency_us": us}


P32 = {"block_n": 32, "block_k": 256, "warps": 4, "stages": 3}
P64 = {"block_n": 64, "block_k": 128, "warps": 8, "stages": 3}


def test_table_fuses_where_measured_faster_and_between_two_such_rows() -> None:
    recs = [
        _rec(UNFUSED, 1, 10.0), _rec(FUSED, 1, 8.0, **P32), _rec(FUSED, 1, 9.0, **P64),
        _rec(UNFUSED, 4, 10.0), _rec(FUSED, 4, 8.5, **P64), _rec(FUSED, 4, 8.9, **P32),
        _rec(UNFUSED, 16, 11.0), _rec(FUSED, 16, 10.9, **P32),  # within 3 %: unfused
        _rec(UNFUSED, 64, 14.0), _rec(FUSED, 64, 12.0, **P32),  # faster, but 16 is not
        {"backend": "nccl", "params": {}, "dtype": "bfloat16", "mode": "graph",
         "nbytes": 4096, "latency_us": 1.0},  # not this phase's
    ]
    (entry,) = build_linear_table(recs, rel_tol=0.03)
    assert (entry["dtype"], entry["k"], entry["n"]) == ("bfloat16", 1024, 4096)
    assert [(p["rows"], p["fused"], p["params"]) for p in entry["points"]] == [
        (1, True, P32), (4, True, P64), (16, False, P32), (64, True, P32)]
    assert entry["points"][2]["unfused_us"] == 11.0 and entry["points"][2]["fused_us"] == 10.9
    assert entry["ranges"] == [
        {"min_rows": 1, "max_rows": 1, "fused": True, "params": P32},
        {"min_rows": 2, "max_rows": 4, "fused": True, "params": P64},
        {"min_rows": 5, "max_rows": 63, "fused": False, "params": {}},
        {"min_rows": 64, "max_rows": 64, "fused": True, "params": P32},
    ]
    doc = {"schema_version": 1, "fingerprint": {}, "tables": {}, "linear": [entry]}
    prof = Profile(validate(doc))
    assert prof.fuses_linear()
    assert select_linear(prof, "bfloat16", 1024, 4096, 1) == P32
    assert select_linear(prof, "torch.bfloat16", 1024, 4096, 3) == P64
    assert select_linear(prof, "bfloat16", 1024, 4096, 20) is None
    assert select_linear(prof, "bfloat16", 1024, 4096, 64) == P32
    assert select_linear(prof, "bfloat16", 1024, 4096, 65) is None  # beyond what was measured
    assert select_linear(prof, "float16", 1024, 4096, 1) is None
    assert select_linear(prof, "bfloat16", 3584, 4096, 1) is None


def test_a_side_that_failed_is_never_fused() -> None:
    skips = [dict(_rec(FUSED, 4, 0.0, **P32), reason="unsupported: too big"),
             dict(_rec(UNFUSED, 1, 0.0), reason="timing raised X"),
             dict(_rec(FUSED, 8, 0.0, **P32), reason="max abs error 1 > tol 0.1")]
    (entry,) = build_linear_table([_rec(FUSED, 1, 1.0, **P32), _rec(UNFUSED, 4, 9.0)], 0.03,
                                  skips)
    assert [p["fused"] for p in entry["points"]] == [False, False, False]
    assert entry["points"][0]["unfused_why"] == "timing raised X"
    assert entry["points"][1]["fused_why"] == "unsupported: too big"
    assert entry["points"][2]["fused_why"].startswith("max abs error")
    assert entry["points"][2]["unfused_us"] is None and "unfused_why" not in entry["points"][2]
    assert not any(g["fused"] for g in entry["ranges"])
    assert not Profile(validate({"schema_version": 1, "fingerprint": {}, "tables": {},
                                 "linear": [entry]})).fuses_linear()


@pytest.mark.parametrize(("linear", "match"), [
    ({}, "linear must be a list"),
    ([{"dtype": "int8", "k": 1, "n": 1, "ranges": []}], "dtype 'int8'"),
    ([{"dtype": "bfloat16", "k": 0, "n": 1, "ranges": []}], "k and n must be positive"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 2, "max_rows": 1, "fused": False}]}], "ascending"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 1, "max_rows": 4, "fused": False},
        {"min_rows": 3, "max_rows": 8, "fused": False}]}], "ascending, after 4"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": [
        {"min_rows": 1, "max_rows": 4, "fused": True, "params": {"block_n": 32}}]}],
     "a fused range needs params"),
    ([{"dtype": "bfloat16", "k": 1, "n": 1, "ranges": []}] * 2, "listed twice"),
])
def test_bad_linear_sections_are_refused(linear: Any, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        validate({"schema_version": 1, "fingerprint": {}, "tables": {}, "linear": linear})


def test_cli_linear_arguments(tmp_path: Path) -> None:
    from artune.cli import build_parser, tune_config

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))

    def cfg(*argv: str) -> Any:
        return tune_config(build_parser().parse_args(["tune", *argv]), "artune tune")

    c = cfg("--linear-model", str(tmp_path), "--linear-shapes", "512x4096",
            "--linear-rows", "16,1,4")
    assert c.linear_model == {"hidden": 4096, "attn": 4096, "intermediate": 14336}
    assert c.linear_shapes == [(512, 4096)] and c.linear_rows == [1, 4, 16]
    assert cfg().linear_model is None and cfg().linear_shapes == [] and cfg().linear_rows == []
    for argv, match in ((("--linear-shapes", "1x1", "--linear-rows", "0,1"), "1 to 64"),
                        (("--linear-shapes", "1x1", "--linear-rows", "65"), "1 to 64"),
                        (("--linear-shapes", "1x1", "--linear-rows", "a"), "1 to 64"),
                        (("--linear-rows", "1"), "needs --linear-model"),
                        (("--linear-model", str(tmp_path / "no")), "not found")):
        with pytest.raises(ValueError, match=match):
            cfg(*argv)
