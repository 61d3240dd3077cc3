"""The correctness gate every (backend, params, dtype, size) passes before it is timed.

Collective: every rank calls ``check`` with its own input. The backend's result must

- match an fp32 reference all-reduce of the same inputs (``ref_group``: NCCL on GPUs, gloo on
  CPUs) within the dtype's tolerance: ``|y - ref| <= eps(dtype) * world_size * sum_r |x_r|``
  (the error bound of summing ``world_size`` values in that dtype, plus the final rounding),
- be bit-identical on every rank (tensor-parallel ranks must never disagree), checked exactly
  with an element-wise MAX and MIN of the result's bytes over ``ref_group``,
- leave the input untouched, and have the input's shape and dtype.

Every rank returns the same verdict: None (passed) or a one-line reason such as
"max abs error 0.5 > tol 0.01 at rank 2" that goes into the profile's ``skipped`` list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from artune.autotune.comm import Comm

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from artune.backends.base import Backend

__all__ = ["check", "verdict", "EPS", "random_input"]

#: Rounding unit used for the tolerance, per dtype (2x the unit roundoff, for slack).
EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-22}


def random_input(numel: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Standard-normal values (never zeros: a backend that drops data must not pass)."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    x = torch.randn(numel, generator=gen, device=device, dtype=torch.float32)
    return x.to(dtype)


def _first_error(errors: list[str | None]) -> str | None:
    for r, e in enumerate(errors):
        if e is not None:
            return f"rank {r}: {e}"
    return None


def check(
    backend: Backend,
    params: dict[str, Any],
    x: torch.Tensor,
    comm: Comm,
    ref_group: dist.ProcessGroup,
) -> str | None:
    """None if ``backend.all_reduce(x, params)`` is correct on every rank, else the reason."""
    import torch
    import torch.distributed as dist

    xf = x.float()
    ref = torch.stack([xf, xf.abs()])
    dist.all_reduce(ref, group=ref_group)
    before = x.clone()

    error: str | None = None
    y: torch.Tensor | None = None
    try:
        y = backend.all_reduce(x, params)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    except Exception as exc:  # noqa: BLE001 - any failure excludes the backend at this size
        error = f"all_reduce raised {type(exc).__name__}: {exc}".splitlines()[0]
    if error is None and y is not None:
        if not torch.equal(x, before):
            error = "all_reduce mutated its input"
        elif y.shape != x.shape or y.dtype != x.dtype:
            error = (
                f"result has shape {tuple(y.shape)} {y.dtype}, "
                f"expected {tuple(x.shape)} {x.dtype}"
            )
    first = _first_error(comm.gather_errors(error, "gate: exceptions"))
    if first is not None:
        return first
    assert y is not None
    return verdict(y, ref, comm, ref_group)


def verdict(y: torch.Tensor, ref: torch.Tensor, comm: Comm,
            ref_group: dist.ProcessGroup) -> str | None:
    """Collective: None when ``y`` (this rank's result) has the same bits on every rank and is
    within the dtype's tolerance of ``ref[0]`` (the fp32 sum over the ranks of the values
    reduced), where ``ref[1]`` is the sum of their magnitudes; else the reason (the same on
    every rank)."""
    import torch
    import torch.distributed as dist

    from artune.profile import dtype_name

    name = dtype_name(y.dtype)
    world = comm.world_size
    y, ref = y.reshape(-1), ref.reshape(2, -1)  # (element-wise, whatever the shape)
    # Bit-identical on every rank: the element-wise max and min of the bytes agree everywhere.
    yb = y.view(torch.uint8)
    hi, lo = yb.clone(), yb.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=ref_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=ref_group)
    disagree = int((hi != lo).sum().item())

    # Numerical error against the fp32 reference, per element.
    tol = EPS.get(name, 2.0**-7) * world * ref[1] + 1e-30
    err = (y.float() - ref[0]).abs()
    nonfinite = int((~torch.isfinite(y.float())).sum().item())
    excess = err - tol
    i = int(torch.argmax(excess).item()) if err.numel() else 0
    rows = comm.gather_floats(
        [
            float(nonfinite),
            float(excess[i].item()) if err.numel() else -1.0,
            float(err[i].item()) if err.numel() else 0.0,
            float(tol[i].item()) if err.numel() else 0.0,
        ],
        "gate: results",
    )
    for r, row in enumerate(rows):
        if row[0]:
            return f"{int(row[0])} non-finite values in the result at rank {r}"
    for r, (_, ex, e, t) in enumerate(rows):
        if ex > 0:
            return f"max abs error {e:.3g} > tol {t:.3g} at rank {r} ({name}, {world} ranks)"
    if disagree:
        return f"ranks disagree bitwise in {disagree} of {yb.numel()} bytes"
    return None
