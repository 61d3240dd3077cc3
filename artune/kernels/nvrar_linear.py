"""A row-parallel linear layer and its all-reduce in one kernel: ``y = sum over the ranks of
x @ weight.T`` (NVRAR's lamport one-shot in the epilogue of a skinny GEMM).

In a tensor-parallel transformer every all-reduce follows a row-parallel GEMM (the attention
output and the MLP down projections), and at decode sizes each of the two is a few microseconds
of latency: cuBLAS's split-K GEMM (plus its reduce kernel), then the all-reduce kernel, each
with its own launch and its own tail. Here each CTA computes one tile of output columns for
every row (``BN`` columns of all ``M`` rows, over the whole of K: no split-K), rounds it to the
output dtype as the unfused GEMM would, and pushes it as lamport words (``nvrar_lamport``:
the data is its own flag) into every peer's receive slot ``[parity][this rank]``, at the tile's
own place; then it waits for the same tile of every peer, sums the W tiles in rank order in fp32
(identical bits on every rank) and writes them out. The CTAs never wait for each other, so the
first tiles travel while the last are still being computed.

Slots, epochs, parities, the clear after the read, the bounded waits and their records are
those of ``oneshot_lamport_kernel`` (same counters, same region): the calls interleave with
NVRAR's other calls in any order. Words are four consecutive output columns; a tile's words
sit at ``(tile * M + row) * BN / 4`` in a slot, so a call needs the lamport one-shot capacity
of an ``M x N`` message. Rows beyond M in the BM-row tile (``tl.dot`` needs 16 at least) are
computed from zeros, never sent: their polls read row 0's words, and only the real rows are
stored and cleared, after a barrier (so no thread empties a word another has not read yet).
Launched by ``NvrarComm.linear_all_reduce``.

With ``PREFETCH``, each CTA first asks L2 for its slab of the weight (its ``BN`` rows, all of K:
one contiguous range), before ``pdl_begin``'s wait for the kernel before it: ``PREFETCH=2`` with
``cp.async.bulk.prefetch.L2`` of each row in quarters (the host picks it where the weight is
16-byte aligned and K a multiple of 32, so every quarter starts and ends on 16 bytes),
``PREFETCH=1`` with ``prefetch.global.L2`` of every 128-byte line (any K). The weight is not the
kernel before's output, and under programmatic dependent launch the CTAs can be resident while
it finishes, so the weight can stream during its tail. A prefetch is a hint (no register, no
result; L2 is where the GPU's writes meet, so it never reads stale data), and the loop below
loads the same addresses as without it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_lamport import (
    _ahead,
    _gather_sum,
    _next_epoch,
    _pack,
    _parity,
    _record_bad,
)
from artune.kernels.nvrar_prims import (
    LANES_SENTINEL,
    call_state,
    end_call,
    now_ns,
    pdl_begin,
    pick,
    ptr_as,
)

__all__ = ["linear_lamport_kernel"]


@triton.jit
def _prefetch_slab(w_ptr, row0, K, BN: tl.constexpr):
    """``prefetch.global.L2`` every 128-byte line of rows ``row0 .. row0 + BN - 1`` of the
    [N, K] weight: a [BN, 4] block of line addresses per step of 256 elements (one or a few
    per thread), the lines past a row's end folded onto its first."""
    rows = row0 + tl.arange(0, BN)
    lines = tl.arange(0, 4) * 64
    for k0 in range(0, K, 256):  # 4 lines of 128 bytes of the 16-bit dtype
        at = k0 + lines[None, :]
        addr = w_ptr + rows[:, None] * K + tl.where(at < K, at, 0)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_slab_bulk(w_ptr, row0, K, BN: tl.constexpr):
    """``cp.async.bulk.prefetch.L2`` of rows ``row0 .. row0 + BN - 1`` of the [N, K] weight,
    each in four quarters of K / 4 elements: a [BN, 4] block of (address, bytes), one or a few
    per thread. K must be a multiple of 32 and the weight 16-byte aligned (the host checks)."""
    rows = row0 + tl.arange(0, BN)
    quarter = K // 4
    addr = w_ptr + rows[:, None] * K + tl.arange(0, 4)[None, :] * quarter
    nbytes = tl.zeros([BN, 4], tl.int32) + quarter * 2
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
                              "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["M", "limit_ns", "rank"])
def linear_lamport_kernel(
    x_ptr,  # *DT [M, K] this rank's activations (contiguous)
    w_ptr,  # *DT [N, K] this rank's weight shard (contiguous, nn.Linear's layout)
    y_ptr,  # *DT [M, N] the all-reduced output (contiguous, 8-byte aligned)
    M,  # rows (1..BM)
    K,
    N: tl.constexpr,  # output columns: a multiple of BN, grid = N / BN
    b0, b1, b2, b3, b4, b5, b6, b7,  # symmetric buffer base of rank i, as this GPU addresses it
    region,  # byte offset of the lamport region
    slot_bytes,  # bytes of one [parity][src] slot
    pend_ptr,  # *int32 [3][4] AHEAD: the words each lamport parity's call left to clear
    ctr_ptr,  # *int32 [MAX_CTAS] epoch counters (all equal between calls)
    err_dev,  # *int64 device error word (non-zero: poisoned, waits are skipped)
    err_host,  # int64 address of the host-mapped error word
    limit_ns,  # bound on each wait
    rank,
    W: tl.constexpr,
    BM: tl.constexpr,  # rows of the tile: M rounded up to a power of two, 16 at least
    BN: tl.constexpr,  # output columns per CTA (a multiple of 4)
    BK: tl.constexpr,  # K per loop step
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,  # the weight slab into L2 before the PDL wait: 1 lines, 2 bulk
    STAGES: tl.constexpr = 5,  # the K loop's pipelining depth (tiles loaded ahead + 1)
    AHEAD: tl.constexpr = False,  # three parities; clear the previous call's slots (_ahead)
):
    if not INTERPRET:  # (the interpreter has no PTX)
        if PREFETCH == 1:
            _prefetch_slab(w_ptr, tl.program_id(0) * BN, K, BN)
        elif PREFETCH == 2:
            _prefetch_slab_bulk(w_ptr, tl.program_id(0) * BN, K, BN)
    pdl_begin(PDL, INTERPRET)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    Q4: tl.constexpr = BN // 4
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, _ = call_state(ctr_ptr, err_dev, limit_ns, pid)
    par = _parity(epoch, par, AHEAD)

    # this rank's tile: acc[m, c] = sum_k x[m, k] * w[pid * BN + c, k], in fp32
    rows = tl.arange(0, BM)
    cols = pid * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        kk = k0 + ks
        xt = tl.load(x_ptr + rows[:, None] * K + kk[None, :],
                     mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
        if INTERPRET:  # its tl.dot multiplies the raw bits of 16-bit floats: in fp32 there
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)

    # as lamport words of four consecutive columns: element 4j + 2p + q is (j, p, q)
    lo, hi = tl.split(tl.reshape(acc, [BM, Q4, 2, 2]))  # q = 0 / 1: columns 4j + 2p (+ 1)
    a0, a2 = tl.split(lo)
    a1, a3 = tl.split(hi)
    own = _pack(a0, a1, a2, a3, DT)  # rounded to DT as the unfused GEMM stores it, -0.0 as +0.0

    j = tl.arange(0, Q4)[None, :]
    real = (rows[:, None] < M) & (j >= 0)  # [BM, Q4]: the words of rows below M
    at = (pid * M + rows[:, None]) * Q4 + j  # this tile's words in a slot
    # pushed once the tile is done (not after a timeout on this rank: as oneshot_lamport_kernel)
    go = real & (limit > 0)
    for i in tl.static_range(1, W):
        dst = (rank + i) % W
        slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region + (par * W + rank) * slot_bytes
        tl.store(ptr_as(slot, tl.uint64) + at, own, mask=go)

    tail = True
    if AHEAD:  # while the tiles travel: empty what the previous lamport call read (the words
        # of this call: [0, M * N / 4) of every source slot, all tiles together)
        tail = _ahead(pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region, slot_bytes, pend_ptr,
                      epoch, par, M * (N // 4), 0, 0, rank, pid, G, W, 256)
    mine = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region + par * W * slot_bytes
    STRIDE = slot_bytes // 8
    base = ptr_as(mine, tl.uint64) + tl.where(real, at, pid * M * Q4 + j)  # padding: row 0's
    deadline = now_ns(INTERPRET) + limit
    me = tl.zeros([BM, Q4], tl.int32) + rank
    s0, s1, s2, s3, bad = _gather_sum(base, STRIDE, own, me, W, rank, limit, deadline,
                                      INTERPRET, DT)
    out = _pack(s0, s1, s2, s3, DT)
    yw = tl.multiple_of(y_ptr.to(tl.pointer_type(tl.uint64), bitcast=True), 2)  # words of y
    tl.store(yw + rows[:, None] * (N // 4) + pid * Q4 + j, out, mask=real)
    failed = tl.zeros([BM, Q4], tl.int32) + (limit == 0).to(tl.int32)
    _record_bad(err_dev, err_host, tl.where(real, bad, 0), 0, pid, failed)  # STEP_ONESHOT
    tl.debug_barrier()  # every thread has read its words before any is emptied
    empty = tl.full([BM, Q4], LANES_SENTINEL, tl.int64).to(tl.uint64, bitcast=True)
    for i in tl.static_range(W):  # (AHEAD: the next lamport call empties them, unless _ahead
        # found too many)
        tl.store(base + i * STRIDE, empty, mask=real & (me != i) & tail)
    end_call(ctr_ptr, _next_epoch(epoch, AHEAD), pid, G, MAXC)
