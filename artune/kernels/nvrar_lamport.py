"""NVRAR one-shot with the data as its own flag (``proto="lamport"``), for 16-bit dtypes.

Like the LL one-shot (``nvrar_oneshot``), every rank pushes its input to every peer's receive
slot ``[parity][my rank]`` in one NVLink hop and sums all W inputs in fp32 in rank order. But
the slot words carry payload only: a receive slot holds the sentinel 0x8000 (-0.0 in bf16 and
fp16) in every element until its writer stores there, and the writer sends -0.0 as +0.0 (so is
every rank's own contribution: all ranks sum the same values with the same reduction tree and
get identical bits). A reader polls its slot until no element is the sentinel, sums, then writes
the sentinel back over what it read. Half the bytes of LL over NVLink (2 per element instead
of 4), no packing.

Why clearing after the read is safe with two parities: a peer writes slot ``[p][q]`` of this
rank in calls k and k + 2 only, and starts call k + 2 only after it has this rank's data of
call k + 1, which this rank pushes after its call k (clearing included) has finished.

Arrival is checked per 8-byte word (4 elements) by the LL waits of ``nvrar_prims``
(``wait_ll(..., LAMPORT=True)``): no 16-bit lane may equal 0x8000; the writer stores whole
chunks (zeros past ``n``), so every polled word is written. Grid and chunks as in
``nvrar_oneshot``; launched by ``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_prims import (
    LANES_SENTINEL,
    call_state,
    empty_lanes,
    end_call,
    load_chunk,
    pdl_begin,
    pick,
    ptr_as,
    record_error,
    store_chunk,
    wait_ll,
)

__all__ = ["oneshot_lamport_kernel", "SENTINEL16"]

#: What an empty receive slot holds in every 16-bit element (the bits of -0.0).
SENTINEL16 = 0x8000


@triton.jit
def _sentinel_words(like):
    """Words of four sentinel lanes, shaped like ``like`` (uint64)."""
    return tl.full(like.shape, LANES_SENTINEL, tl.int64).to(tl.uint64, bitcast=True)


@triton.jit
def _bits(x_ptr, start, n, Q: tl.constexpr):
    """Elements [start, start + Q) of ``x`` as uint64 bits (zeros past ``n``, -0.0 as +0.0)."""
    v = load_chunk(x_ptr, start, n, Q).to(tl.uint16, bitcast=True)
    return tl.where(v == 0x8000, 0, v).to(tl.uint64)


@triton.jit
def _lane(w, k: tl.constexpr, DT: tl.constexpr):
    """Quarter ``k`` of the packed words ``w`` as dtype ``DT``."""
    return ((w >> (16 * k)) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)


@triton.jit(do_not_specialize=["n", "limit_ns", "rank"])
def oneshot_lamport_kernel(
    x_ptr,  # *DT [n] input (16-bit dtype, any contiguous tensor)
    y_ptr,  # *DT [n] output
    n,  # elements
    b0, b1, b2, b3, b4, b5, b6, b7,  # symmetric buffer base of rank i, as this GPU addresses it
    region,  # byte offset of the lamport region
    slot_bytes,  # bytes of one [parity][src] slot
    ctr_ptr,  # *int32 [MAX_CTAS] epoch counters (all equal between calls)
    err_dev,  # *int64 device error word (non-zero: poisoned, waits are skipped)
    err_host,  # int64 address of the host-mapped error word
    limit_ns,  # bound on each wait
    rank,
    W: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per chunk (a multiple of 4)
    WP: tl.constexpr,  # W rounded up to a power of two
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    SPIN: tl.constexpr,  # per-thread PTX polling instead of block rounds
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl_begin)
):
    pdl_begin(PDL, INTERPRET)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    # A chunk travels as 8-byte words of four elements i, Q + i, 2Q + i, 3Q + i (its quarters),
    # which the same thread holds: packing needs no layout conversion (as LL's halves).
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, _ = call_state(ctr_ptr, err_dev, limit_ns, pid)
    nchunks = tl.cdiv(n, BLOCK)

    # push this rank's chunks (whole chunks: zeros past n) into every peer's slot [par][rank];
    # not after a timeout on this rank (limit 0): its waits no longer hold it back, so its
    # pushes could overwrite data a slower peer has not read yet, which no flag would reveal.
    # The peers time out instead, and every rank reports the failure.
    for c in range(pid, tl.where(limit > 0, nchunks, 0), G):
        w = _bits(x_ptr, c * BLOCK, n, Q)
        w |= _bits(x_ptr, c * BLOCK + Q, n, Q) << 16
        w |= _bits(x_ptr, c * BLOCK + 2 * Q, n, Q) << 32
        w |= _bits(x_ptr, c * BLOCK + 3 * Q, n, Q) << 48
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region
            slot += (par * W + rank) * slot_bytes
            tl.store(ptr_as(slot, tl.uint64) + c * Q + tl.arange(0, Q), w)

    # wait for all W-1 peers' chunks at once ([WP, Q] words), sum the W inputs (one reduction
    # tree, the same on every rank), then put the sentinel back into the words read
    rows = tl.arange(0, WP)[:, None]
    live = (rows < W) & (rows != rank) & (tl.arange(0, Q)[None, :] >= 0)
    mine = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region + par * W * slot_bytes
    for c in range(pid, nchunks, G):
        pw = ptr_as(mine, tl.uint64) + rows * (slot_bytes // 8) + c * Q + tl.arange(0, Q)[None, :]
        w, _same, pending = wait_ll(pw, pw, live, epoch.to(tl.uint32), limit, False, INTERPRET,
                                    SPIN, True)
        if pending > 0:
            stale = live & empty_lanes(w)
            peer = tl.min(tl.where(stale, rows + tl.zeros(w.shape, tl.int32), WP), axis=None)
            record_error(err_dev, err_host, 0, peer, pid)
            limit = limit * 0
        for k in tl.static_range(4):
            own = _lane(_bits(x_ptr, c * BLOCK + k * Q, n, Q), 0, DT)
            v = tl.where(rows == rank, own.to(tl.float32)[None, :], _lane(w, k, DT).to(tl.float32))
            s = tl.sum(tl.where(rows < W, v, 0.0), axis=0)
            store_chunk(y_ptr, c * BLOCK + k * Q, n, s.to(DT), Q)
        tl.store(pw, _sentinel_words(w), mask=live)

    end_call(ctr_ptr, epoch, pid, G, MAXC)
