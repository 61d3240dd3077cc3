"""A model's row-parallel layer shapes, for the tune's fused-linear phase and for ``artune
launch``'s note on layers a profile lacks. Pure Python with no dependency beyond the standard
library: ``artune launch`` reads it on serving machines, where the tuner's dependencies (Optuna,
the kernels) need not be importable."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["parse_shapes", "model_dims", "layer_shapes"]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1024x4096,3584x4096' -> [(1024, 4096), (3584, 4096)]: K (a rank's inputs) x N (the
    layer's outputs) of each row-parallel layer."""
    shapes: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        k, sep, n = part.lower().partition("x")
        if not sep or not k.isdigit() or not n.isdigit() or int(k) < 1 or int(n) < 1:
            raise ValueError(f"--linear-shapes: bad shape {part!r}; expected KxN (a rank's "
                             "inputs x the layer's outputs), e.g. 1024x4096")
        if (int(k), int(n)) not in shapes:
            shapes.append((int(k), int(n)))
    return shapes


def model_dims(path: str | Path) -> dict[str, int]:
    """From a Hugging Face model folder or its config.json: hidden_size, the attention output's
    width (num_attention_heads x head_dim) and intermediate_size."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--linear-model: {cfg_path} not found (give a model folder holding "
                         "config.json, or the file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--linear-model: {cfg_path} is not a readable JSON config: "
                         f"{exc}") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size")
               if not isinstance(cfg, dict) or not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"--linear-model: {cfg_path} has no {', '.join(missing)} (whole "
                         "numbers); give the layer shapes with --linear-shapes KxN instead")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads > 0 else 0)
    if heads <= 0 or not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise ValueError(f"--linear-model: {cfg_path} gives num_attention_heads {heads!r} and "
                         f"head_dim {cfg.get('head_dim')!r}: not positive whole numbers")
    return {"hidden": cfg["hidden_size"], "attn": heads * head_dim,
            "intermediate": cfg["intermediate_size"]}


def layer_shapes(dims: dict[str, int], tp: int) -> list[tuple[int, int]]:
    """The (K, N) of the row-parallel layers at tensor-parallel size ``tp``: the attention output
    projection and the MLP down projection."""
    out: list[tuple[int, int]] = []
    for name, width in (("attention output", dims["attn"]),
                        ("MLP intermediate", dims["intermediate"])):
        if width % tp:
            raise ValueError(f"--linear-model: the {name} width {width} does not split over "
                             f"{tp} ranks")
        if (width // tp, dims["hidden"]) not in out:
            out.append((width // tp, dims["hidden"]))
    return out
