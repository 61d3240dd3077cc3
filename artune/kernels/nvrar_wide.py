"""NVRAR's lamport one-shot and two-shot moving 16 bytes per thread (``ARTUNE_NVRAR_WIDE``).

The same protocol, slots, parities, epochs, chunks and wire layout as ``nvrar_lamport`` (word k
of a chunk's slot holds elements 4k .. 4k + 3, -0.0 sent as +0.0, the sentinel 0x8000 in every
empty 16-bit lane); only the work per thread differs: each thread owns a pair of words (words
2t and 2t + 1 of a chunk, eight consecutive elements) and moves it with one 16-byte load or
store: the input and output, the pushes to the peers, the polls (``spin_lamport4_wide``) and the
clears. A chunk of BLOCK elements runs on BLOCK / 8 threads (``nvrar._lamport_warps``): half
the threads and memory instructions of the 8-byte kernels, as SGLang's custom all-reduce moves
16 bytes per thread.

Every 16-byte access is inline PTX on tensors of one element per thread (``load_pair16``,
``store_pair16``): Triton 3.6 vectorizes its own loads and stores by giving a thread two
elements, in a layout of its choosing, and a per-thread gather needs every tensor of a call in
one layout (a thread must clear only the words it polled; docs/nvrar.md, "16-byte words").

Because the wire layout is the 8-byte kernels', a rank may run these while its peers run those
(the choice is local: x and y 16-byte aligned, n a multiple of 8, no fused norm, two parities).
The sum is the same fp32 sum in rank order: identical bits on every rank. Launched by
``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_lamport import (
    _pack,
    _plus_zero,
    _record_bad,
    _sources4,
    _sum_sources,
)
from artune.kernels.nvrar_prims import (
    LANES_SENTINEL,
    call_state,
    empty_lanes,
    end_call,
    load_pair16,
    now_ns,
    pdl_begin,
    pick,
    ptr_as,
    spin_lamport4_wide,
    store_pair16,
    wait_ll,
)

__all__ = ["oneshot_wide_kernel", "twoshot_wide_kernel"]


@triton.jit
def _words_of(x_ptr):
    """A 16-byte aligned 16-bit tensor as a pointer to its 8-byte words."""
    return tl.multiple_of(x_ptr.to(tl.pointer_type(tl.uint64), bitcast=True), 2)


@triton.jit
def _input_pairs(x_ptr, g, npairs, P: tl.constexpr, INTERPRET: tl.constexpr):
    """Chunk ``g`` of ``x`` as its P pairs of lamport words (lo, hi), zeros past the end
    (``npairs`` = n // 8), -0.0 sent as +0.0."""
    idx = g * P + tl.arange(0, P)
    lo, hi = load_pair16(_words_of(x_ptr) + 2 * idx, idx < npairs, INTERPRET)
    return _plus_zero(lo), _plus_zero(hi)


@triton.jit
def _put_pairs(slot, c, lo, hi, mask, P: tl.constexpr, INTERPRET: tl.constexpr):
    """Pairs (lo, hi) into chunk ``c`` of the slot at int64 address ``slot`` where ``mask``."""
    p = ptr_as(slot, tl.uint64) + 2 * (c * P + tl.arange(0, P))
    store_pair16(p, lo, hi, mask, INTERPRET)


@triton.jit
def _output_pairs(y_ptr, g, npairs, lo, hi, mask, P: tl.constexpr, INTERPRET: tl.constexpr):
    """Pairs (lo, hi) into chunk ``g`` of ``y`` (pairs below ``npairs`` only) where ``mask``."""
    idx = g * P + tl.arange(0, P)
    store_pair16(_words_of(y_ptr) + 2 * idx, lo, hi, mask & (idx < npairs), INTERPRET)


@triton.jit
def _poll_pairs(base, STRIDE, FIRST: tl.constexpr, W: tl.constexpr, rank, limit, deadline,
                INTERPRET: tl.constexpr):
    """The pairs of sources FIRST..FIRST+3 at ``base`` (uint64 pointers to each thread's pair of
    source FIRST; source i at ``base + i * STRIDE``): (lo0, hi0, ..., lo3, hi3), zeros for
    sources beyond W and for this rank, each pair once it arrived or the wait ran out."""
    p0, p1, p2, p3, bits = _sources4(base, STRIDE, FIRST, W, rank)
    if INTERPRET:
        l0, h0 = _poll_pair1(p0, FIRST, W, rank, limit, INTERPRET)
        l1, h1 = _poll_pair1(p1, FIRST + 1, W, rank, limit, INTERPRET)
        l2, h2 = _poll_pair1(p2, FIRST + 2, W, rank, limit, INTERPRET)
        l3, h3 = _poll_pair1(p3, FIRST + 3, W, rank, limit, INTERPRET)
    else:
        l0, h0, l1, h1, l2, h2, l3, h3 = spin_lamport4_wide(p0, p1, p2, p3, bits, deadline)
    return l0, h0, l1, h1, l2, h2, l3, h3


@triton.jit
def _poll_pair1(p, SRC: tl.constexpr, W: tl.constexpr, rank, limit, INTERPRET: tl.constexpr):
    """Under the interpreter: source SRC's pairs by block rounds (``wait_ll``), 0 when not live."""
    if SRC < W:
        live = (tl.zeros(p.shape, tl.int32) + rank) != SRC
        lo, hi, _pending = wait_ll(p, p + 1, live, 0, limit, True, INTERPRET, False, True)
    else:
        lo = tl.zeros(p.shape, tl.uint64)
        hi = lo
    return lo, hi


@triton.jit
def _gather_pairs(base, STRIDE, own_lo, own_hi, me, W: tl.constexpr, rank, limit, deadline,
                  INTERPRET: tl.constexpr, DT: tl.constexpr):
    """Wait for the W - 1 peers' pairs at ``base`` and sum all W sources in rank order (this
    rank's own pair in its place), lane by lane in fp32. Returns the summed pair as lamport
    words (rounded to DT, -0.0 as +0.0) and ``bad`` (the first source whose pair never
    arrived, + 1)."""
    l0, h0, l1, h1, l2, h2, l3, h3 = _poll_pairs(base, STRIDE, 0, W, rank, limit, deadline,
                                                 INTERPRET)
    if W > 4:
        l4, h4, l5, h5, l6, h6, l7, h7 = _poll_pairs(base, STRIDE, 4, W, rank, limit, deadline,
                                                     INTERPRET)
    else:
        l4, h4, l5, h5, l6, h6, l7, h7 = l0, h0, l0, h0, l0, h0, l0, h0
    a0, a1, a2, a3, bad_lo = _sum_sources(l0, l1, l2, l3, l4, l5, l6, l7, own_lo, me, W, DT)
    b0, b1, b2, b3, bad_hi = _sum_sources(h0, h1, h2, h3, h4, h5, h6, h7, own_hi, me, W, DT)
    first = tl.minimum(tl.where(bad_lo == 0, W + 1, bad_lo), tl.where(bad_hi == 0, W + 1, bad_hi))
    bad = tl.where(first > W, 0, first)
    return _pack(a0, a1, a2, a3, DT), _pack(b0, b1, b2, b3, DT), bad


@triton.jit
def _clear_pairs(base, STRIDE, me, W: tl.constexpr, INTERPRET: tl.constexpr):
    """The sentinel back over every source's pairs at ``base`` but this rank's (``me``)."""
    empty = tl.full(me.shape, LANES_SENTINEL, tl.int64).to(tl.uint64, bitcast=True)
    for i in tl.static_range(W):
        store_pair16(base + i * STRIDE, empty, empty, me != i, INTERPRET)


@triton.jit(do_not_specialize=["n", "limit_ns", "rank"])
def oneshot_wide_kernel(
    x_ptr,  # *DT [n] input (16-bit dtype, n % 8 == 0, 16-byte aligned)
    y_ptr,  # *DT [n] output (16-byte aligned)
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
    BLOCK: tl.constexpr,  # elements per chunk (a multiple of 256)
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl_begin)
):
    """``oneshot_lamport_kernel`` with 16 bytes per thread: push this rank's chunks to every
    peer's slot [parity][rank], then wait for every peer's, sum in rank order, write y and
    clear what was read. No pushes after a timeout on this rank (its peers time out instead)."""
    pdl_begin(PDL, INTERPRET)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    P: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, _ = call_state(ctr_ptr, err_dev, limit_ns, pid)
    nchunks = tl.cdiv(n, BLOCK)
    npairs = n // 8
    offs = tl.arange(0, P)
    go = (offs >= 0) & (limit > 0)
    for c in range(pid, nchunks, G):
        lo, hi = _input_pairs(x_ptr, c, npairs, P, INTERPRET)
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region
            _put_pairs(slot + (par * W + rank) * slot_bytes, c, lo, hi, go, P, INTERPRET)

    mine = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region + par * W * slot_bytes
    STRIDE = slot_bytes // 8
    deadline = now_ns(INTERPRET) + limit
    me = tl.zeros([P], tl.int32) + rank
    # quiet: a poisoned instance keeps its first record; so does a thread that recorded one
    failed = tl.zeros([P], tl.int32) + (limit == 0).to(tl.int32)
    for c in range(pid, nchunks, G):
        own_lo, own_hi = _input_pairs(x_ptr, c, npairs, P, INTERPRET)
        base = ptr_as(mine, tl.uint64) + 2 * (c * P + offs)
        r_lo, r_hi, bad = _gather_pairs(base, STRIDE, own_lo, own_hi, me, W, rank, limit,
                                        deadline, INTERPRET, DT)
        _output_pairs(y_ptr, c, npairs, r_lo, r_hi, offs >= 0, P, INTERPRET)
        _record_bad(err_dev, err_host, bad, 0, pid, failed)  # STEP_ONESHOT
        failed = failed | (bad > 0).to(tl.int32)
        if INTERPRET:  # block rounds wait per source: later waits must not wait again
            limit = tl.where(tl.max(bad, axis=0) > 0, 0, limit)
        _clear_pairs(base, STRIDE, me, W, INTERPRET)
    end_call(ctr_ptr, epoch, pid, G, MAXC)


@triton.jit(do_not_specialize=["n", "shard", "limit_ns", "rank"])
def twoshot_wide_kernel(
    x_ptr,  # *DT [n] input (16-bit dtype, n % 8 == 0, 16-byte aligned)
    y_ptr,  # *DT [n] output (16-byte aligned)
    n,  # elements
    shard,  # elements per shard: cdiv(n, W) rounded up to BLOCK
    b0, b1, b2, b3, b4, b5, b6, b7,  # symmetric buffer base of rank i, as this GPU addresses it
    region,  # byte offset of the lamport region
    slot_bytes,  # bytes of one [parity][src] slot
    ag_bytes,  # byte offset of the all-gather half inside a slot
    ctr_ptr,  # *int32 [MAX_CTAS] epoch counters (all equal between calls)
    err_dev,  # *int64 device error word (non-zero: poisoned, waits are skipped)
    err_host,  # int64 address of the host-mapped error word
    limit_ns,  # bound on each wait
    rank,
    W: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per chunk (a multiple of 256)
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,
    PDL_NEXT: tl.constexpr = True,  # under PDL, let the next grid launch at the start (pdl_begin)
):
    """``twoshot_lamport_kernel`` with 16 bytes per thread: reduce-scatter (chunk c of shard j to
    rank j's slot [parity][rank], first half; rank j sums its shard's W contributions in rank
    order and clears them), then all-gather (the result to every peer's slot [parity][j],
    second half, and to y; every rank waits for the other shards, writes them to y, clears)."""
    pdl_begin(PDL, INTERPRET, PDL_NEXT)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    P: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, _ = call_state(ctr_ptr, err_dev, limit_ns, pid)
    cps = shard // BLOCK  # chunks per shard
    npairs = n // 8
    STRIDE = slot_bytes // 8
    offs = tl.arange(0, P)
    go = (offs >= 0) & (limit > 0)  # no pushes after a timeout on this rank
    me = tl.zeros([P], tl.int32) + rank
    deadline = now_ns(INTERPRET) + limit
    mine = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region + par * W * slot_bytes
    into = (par * W + rank) * slot_bytes  # this rank's slot in a peer's region

    # 1a. reduce-scatter pushes: every other rank's shard, chunk by chunk
    for c in range(pid, cps, G):
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            lo, hi = _input_pairs(x_ptr, dst * cps + c, npairs, P, INTERPRET)
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region + into
            _put_pairs(slot, c, lo, hi, go, P, INTERPRET)

    # 1b. this rank's shard: wait, sum, clear; 2a. push the result everywhere, and to y
    failed = tl.zeros([P], tl.int32) + (limit == 0).to(tl.int32)
    for c in range(pid, cps, G):
        own_lo, own_hi = _input_pairs(x_ptr, rank * cps + c, npairs, P, INTERPRET)
        base = ptr_as(mine, tl.uint64) + 2 * (c * P + offs)
        r_lo, r_hi, bad = _gather_pairs(base, STRIDE, own_lo, own_hi, me, W, rank, limit,
                                        deadline, INTERPRET, DT)
        _record_bad(err_dev, err_host, bad, 1, pid, failed)  # STEP_RS
        failed = failed | (bad > 0).to(tl.int32)
        if INTERPRET:
            limit = tl.where(tl.max(bad, axis=0) > 0, 0, limit)
        _clear_pairs(base, STRIDE, me, W, INTERPRET)
        # a thread whose wait ran out forwards nothing: its peers time out on it instead
        forward = go & (failed == 0)
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region + ag_bytes + into
            _put_pairs(slot, c, r_lo, r_hi, forward, P, INTERPRET)
        _output_pairs(y_ptr, rank * cps + c, npairs, r_lo, r_hi, offs >= 0, P, INTERPRET)

    # 2b. the other shards: wait, write to y, clear
    for c in range(pid, cps, G):
        base = ptr_as(mine + ag_bytes, tl.uint64) + 2 * (c * P + offs)
        l0, h0, l1, h1, l2, h2, l3, h3 = _poll_pairs(base, STRIDE, 0, W, rank, limit, deadline,
                                                     INTERPRET)
        bad = tl.zeros([P], tl.int32)
        bad = _put_shard(y_ptr, npairs, l0, h0, me, bad, 0, W, cps, c, P, INTERPRET)
        bad = _put_shard(y_ptr, npairs, l1, h1, me, bad, 1, W, cps, c, P, INTERPRET)
        bad = _put_shard(y_ptr, npairs, l2, h2, me, bad, 2, W, cps, c, P, INTERPRET)
        bad = _put_shard(y_ptr, npairs, l3, h3, me, bad, 3, W, cps, c, P, INTERPRET)
        if W > 4:
            l4, h4, l5, h5, l6, h6, l7, h7 = _poll_pairs(base, STRIDE, 4, W, rank, limit,
                                                         deadline, INTERPRET)
            bad = _put_shard(y_ptr, npairs, l4, h4, me, bad, 4, W, cps, c, P, INTERPRET)
            bad = _put_shard(y_ptr, npairs, l5, h5, me, bad, 5, W, cps, c, P, INTERPRET)
            bad = _put_shard(y_ptr, npairs, l6, h6, me, bad, 6, W, cps, c, P, INTERPRET)
            bad = _put_shard(y_ptr, npairs, l7, h7, me, bad, 7, W, cps, c, P, INTERPRET)
        _record_bad(err_dev, err_host, bad, 2, pid, failed)  # STEP_AG
        failed = failed | (bad > 0).to(tl.int32)
        if INTERPRET:
            limit = tl.where(tl.max(bad, axis=0) > 0, 0, limit)
        _clear_pairs(base, STRIDE, me, W, INTERPRET)

    end_call(ctr_ptr, epoch, pid, G, MAXC)


@triton.jit
def _put_shard(y_ptr, npairs, lo, hi, me, bad, SRC: tl.constexpr, W: tl.constexpr, cps, c,
               P: tl.constexpr, INTERPRET: tl.constexpr):
    """Shard SRC's chunk c (pairs (lo, hi), from rank SRC) into y, unless SRC is beyond W or
    this rank; ``bad`` becomes SRC + 1 where a pair never arrived (the first such source)."""
    if SRC < W:
        live = me != SRC
        stale = live & (empty_lanes(lo) | empty_lanes(hi))
        bad = tl.where(stale & (bad == 0), SRC + 1, bad)
        _output_pairs(y_ptr, SRC * cps + c, npairs, lo, hi, live, P, INTERPRET)
    return bad
