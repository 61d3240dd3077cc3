"""NVRAR one-shot LL kernel: every rank pushes its input to every peer, each sums all W.

One hop over NVLink, no separate signal: each 8-byte LL word carries 4 payload bytes and the
call's 32-bit epoch, stored straight into the peer's receive slot ``[parity][my rank]`` through
its ``nvshmem_ptr`` address. Each rank waits for all W-1 slots of a chunk in one poll loop,
then sums the W inputs in fp32 (its own from ``x``) with the same reduction tree on every rank
(same compiled kernel; the rank is a runtime value), so every rank produces identical bits.
For small messages on one node.

Grid: ``min(ctas, cdiv(n, BLOCK))`` CTAs; CTA ``p`` handles chunks ``p, p + G, ...`` of BLOCK
elements. Launched by ``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_prims import (
    load_chunk,
    pick,
    ptr_as,
    record_error,
    store_chunk,
    to_words,
    wait_ll,
)

__all__ = ["oneshot_ll_kernel"]


@triton.jit
def _decode_rows(words, DT: tl.constexpr, PACK: tl.constexpr, WP: tl.constexpr,
                 BLOCK: tl.constexpr):
    """[WP, BLOCK // PACK] uint64 LL words -> [WP, BLOCK] elements of dtype DT."""
    w = (words & 0xFFFFFFFF).to(tl.uint32)
    if PACK == 1:
        return w.to(DT, bitcast=True)
    else:
        lo = (w & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        hi = (w >> 16).to(tl.uint16).to(DT, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (WP, BLOCK))


@triton.jit
def _report(words, live, epoch, err_dev, err_host, pid):
    """Record the first rank whose words are still stale."""
    stale = live & ((words >> 32).to(tl.uint32) != epoch.to(tl.uint32))
    rows = tl.arange(0, words.shape[0])[:, None] + tl.zeros(words.shape, tl.int32)
    peer = tl.min(tl.where(stale, rows, words.shape[0]), axis=None)
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
):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BW: tl.constexpr = BLOCK // PACK
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch = tl.load(ctr_ptr + pid) + 1
    limit = tl.where(tl.load(err_dev) != 0, 0, limit_ns).to(tl.int64)
    par = (epoch & 1).to(tl.int64)
    flag = epoch.to(tl.uint32).to(tl.uint64) << 32
    nchunks = tl.cdiv(n, BLOCK)
    wo = tl.arange(0, BW)

    # push this rank's chunks into every peer's slot [par][rank]
    for c in range(pid, nchunks, G):
        ll = to_words(load_chunk(x_ptr, c * BLOCK, n, BLOCK), PACK, BLOCK).to(tl.uint64) | flag
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region
            slot += (par * W + rank) * slot_bytes
            tl.store(ptr_as(slot, tl.uint64) + c * BW + wo, ll)

    # wait for all W-1 peers' chunks at once ([WP, BW] words), then sum the W inputs
    rows = tl.arange(0, WP)[:, None]
    live = (rows < W) & (rows != rank)
    mine = ptr_as(pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region + par * W * slot_bytes,
                  tl.uint64)
    for c in range(pid, nchunks, G):
        words, pending = wait_ll(
            mine + rows * (slot_bytes // 8) + c * BW + wo[None, :], live, epoch.to(tl.uint32),
            limit, INTERPRET,
        )
        if pending > 0:
            _report(words, live, epoch, err_dev, err_host, pid)
            limit = limit * 0
        theirs = _decode_rows(words, DT, PACK, WP, BLOCK).to(tl.float32)
        own = load_chunk(x_ptr, c * BLOCK, n, BLOCK).to(tl.float32)
        v = tl.where(rows == rank, own[None, :], theirs)
        v = tl.where(rows < W, v, 0.0)
        store_chunk(y_ptr, c * BLOCK, n, tl.sum(v, axis=0).to(DT), BLOCK)

    # advance this CTA's share of the counters (after every thread read the old value)
    tl.debug_barrier()
    idx = pid + G * tl.arange(0, MAXC)
    tl.store(ctr_ptr + idx, tl.zeros([MAXC], tl.int32) + epoch, mask=idx < MAXC)
