"""NVRAR one-shot LL kernel: every rank pushes its input to every peer, each sums all W.

One hop over NVLink, no separate signal: each 8-byte LL word carries 4 payload bytes and the
call's 32-bit epoch, stored straight into the peer's receive slot ``[parity][my rank]`` through
its ``nvshmem_ptr`` address. Each rank then sums the W inputs in rank order in fp32 (its own from
``x``), so every rank produces identical bits. For small messages on one node.

Grid: ``min(ctas, cdiv(n, BLOCK))`` CTAs; CTA ``p`` handles chunks ``p, p + G, ...`` of BLOCK
elements. Launched by ``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_prims import (
    from_words,
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

    # sum the W inputs in rank order
    mine = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region
    for c in range(pid, nchunks, G):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for src in tl.static_range(W):
            if src == rank:
                v = load_chunk(x_ptr, c * BLOCK, n, BLOCK)
            else:
                slot = mine + (par * W + src) * slot_bytes
                words, pending = wait_ll(
                    ptr_as(slot, tl.uint64) + c * BW + wo,
                    epoch.to(tl.uint32),
                    limit,
                    INTERPRET,
                )
                if pending > 0:
                    record_error(err_dev, err_host, 0, src, pid)
                    limit = limit * 0
                v = from_words((words & 0xFFFFFFFF).to(tl.uint32), DT, PACK, BLOCK)
            acc += v.to(tl.float32)
        store_chunk(y_ptr, c * BLOCK, n, acc.to(DT), BLOCK)

    # advance this CTA's share of the counters (after every thread read the old value)
    tl.debug_barrier()
    idx = pid + G * tl.arange(0, MAXC)
    tl.store(ctr_ptr + idx, tl.zeros([MAXC], tl.int32) + epoch, mask=idx < MAXC)
