"""NVRAR one-shot LL kernel: every rank pushes its input to every peer, each sums all W.

One hop over NVLink, no separate signal: each 8-byte LL word carries 4 payload bytes (two
16-bit elements i and i + BLOCK/2 of a chunk, or one fp32) and the call's 32-bit epoch, stored
straight into the peer's receive slot ``[parity][my rank]`` through its ``nvshmem_ptr``
address. Each rank waits for all W-1 slots of a chunk in one poll loop, then sums the W inputs
in fp32 (its own from ``x``) with the same reduction tree on every rank (same compiled kernel;
the rank is a runtime value), so every rank produces identical bits. For small messages on
one node.

Grid: ``min(ctas, cdiv(n, BLOCK))`` CTAs; CTA ``p`` handles chunks ``p, p + G, ...`` of BLOCK
elements. Launched by ``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_prims import (
    call_state,
    decode_ll,
    end_call,
    load_pair,
    pdl_begin,
    pick,
    ptr_as,
    put_ll,
    record_error,
    store_pair,
    wait_ll,
)

__all__ = ["oneshot_ll_kernel"]


@triton.jit
def _report(wa, wb, live, epoch, err_dev, err_host, pid):
    """Record the first rank whose words are still stale."""
    e = epoch.to(tl.uint32)
    stale = live & (((wa >> 32).to(tl.uint32) != e) | ((wb >> 32).to(tl.uint32) != e))
    rows = tl.arange(0, wa.shape[0])[:, None] + tl.zeros(wa.shape, tl.int32)
    peer = tl.min(tl.where(stale, rows, wa.shape[0]), axis=None)
    record_error(err_dev, err_host, 0, peer, pid)


@triton.jit(do_not_specialize=["n", "limit_ns", "rank"])
def oneshot_ll_kernel(
    x_ptr,  # *DT [n] input (any contiguous tensor)
    y_ptr,  # *DT [n] output
    n,  # elements
    b0, b1, b2, b3, b4, b5, b6, b7,  # symmetric buffer base of rank i, as this GPU addresses it
    region,  # byte offset of the one-shot region
    slot_bytes,  # bytes of one [parity][src] slot
    ctr_ptr,  # *int32 [MAX_CTAS] epoch counters (all equal between calls)
    err_dev,  # *int64 device error word (non-zero: poisoned, waits are skipped)
    err_host,  # int64 address of the host-mapped error word
    limit_ns,  # bound on each wait
    rank,
    W: tl.constexpr,
    PACK: tl.constexpr,  # elements per 4-byte word (2 for 16-bit dtypes, 1 for fp32)
    BLOCK: tl.constexpr,  # elements per chunk
    WP: tl.constexpr,  # W rounded up to a power of two
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    SPIN: tl.constexpr,  # per-thread PTX polling (nvrar_prims.spin_ll) instead of block rounds
    DIAG: tl.constexpr = 0,  # latency breakdown only (benchmarks/nvrar_dev.py --diag), WRONG
    # sums: 1 reads the slots once without waiting, 2 also skips the pushes (local work only)
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl_begin)
):
    pdl_begin(PDL, INTERPRET)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    H: tl.constexpr = BLOCK // 2  # a chunk travels as two halves (nvrar_prims.load_pair)
    BW: tl.constexpr = BLOCK // PACK  # LL words per chunk
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, flag = call_state(ctr_ptr, err_dev, limit_ns, pid)
    nchunks = tl.cdiv(n, BLOCK)

    # push this rank's chunks into every peer's slot [par][rank]
    if DIAG < 2:
        for c in range(pid, nchunks, G):
            a, b = load_pair(x_ptr, c * BLOCK, n, H)
            for i in tl.static_range(1, W):
                dst = (rank + i) % W
                slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region
                slot += (par * W + rank) * slot_bytes
                put_ll(a, b, ptr_as(slot, tl.uint64) + c * BW, flag, PACK, H)

    # wait for all W-1 peers' chunks at once ([WP, H] words per half), then sum the W inputs
    rows = tl.arange(0, WP)[:, None]
    live = (rows < W) & (rows != rank)
    mine = ptr_as(pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region + par * W * slot_bytes,
                  tl.uint64)
    for c in range(pid, nchunks, G):
        pa = mine + rows * (slot_bytes // 8) + c * BW + tl.arange(0, H)[None, :]
        if DIAG == 0:
            wa, wb, pending = wait_ll(pa, pa + H, live, epoch.to(tl.uint32), limit, PACK == 1,
                                      INTERPRET, SPIN)
            if pending > 0:
                _report(wa, wb, live, epoch, err_dev, err_host, pid)
                limit = limit * 0
        else:
            wa = tl.load(pa, mask=live, other=0, volatile=True)
            if PACK == 1:
                wb = tl.load(pa + H, mask=live, other=0, volatile=True)
            else:
                wb = wa
        ta, tb = decode_ll(wa, wb, DT, PACK)
        a, b = load_pair(x_ptr, c * BLOCK, n, H)
        va = tl.where(rows == rank, a.to(tl.float32)[None, :], ta.to(tl.float32))
        vb = tl.where(rows == rank, b.to(tl.float32)[None, :], tb.to(tl.float32))
        sa = tl.sum(tl.where(rows < W, va, 0.0), axis=0)
        sb = tl.sum(tl.where(rows < W, vb, 0.0), axis=0)
        store_pair(y_ptr, c * BLOCK, n, sa.to(DT), sb.to(DT), H)

    end_call(ctr_ptr, epoch, pid, G, MAXC)
