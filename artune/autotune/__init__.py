"""The autotuner behind ``artune tune``: timing, correctness gate, Optuna search, table, launcher.

Modules (each imported where used; nothing here needs CUDA):

- ``config``   what a tune measures (``TuneConfig``, ``parse_sizes``); ``shapes`` a model's
  row-parallel layer shapes (no dependency: `artune launch` reads it);
- ``launcher`` starts one rank per GPU from a shell and stops them all when one dies;
- ``runner``   one rank: joins the group, then drives (rank 0, ``driver``) or follows (``crew``);
- ``crew``     what every rank executes: setup, trial (gate + timing), validation;
- ``gate``     the correctness gate; ``timing`` CUDA-graph and eager timing;
- ``search``   Optuna studies, sampling, pruning, resume; ``comm`` host collectives;
- ``table``    measurements -> dispatch table -> profile document; ``ui`` what rank 0 prints.
"""

from __future__ import annotations

from artune.autotune.config import TuneConfig, parse_size, parse_sizes

__all__ = ["TuneConfig", "parse_size", "parse_sizes"]
