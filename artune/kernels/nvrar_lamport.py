"""NVRAR with the data as its own flag (``proto="lamport"``), for 16-bit dtypes: a one-shot
and, on one node, a two-shot (``twoshot_lamport_kernel``, described there).

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

Arrival is checked per 8-byte word (4 elements): no 16-bit lane may equal 0x8000; the writer
stores whole chunks (zeros past ``n``), so every polled word is written. Each thread polls,
sums and clears only its own words (``_gather_sum``: one PTX loop over up to four sources,
``nvrar_prims.spin_lamport4``; block rounds of ``wait_ll`` under the interpreter), so the
kernels run one thread per word (``nvrar._lamport_warps``). Grid and chunks as in
``nvrar_oneshot``; launched by ``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_layout import STEP_NORM
from artune.kernels.nvrar_prims import (
    ERR_MARK,
    LANES_SENTINEL,
    call_state,
    empty_lanes,
    end_call,
    load_chunk,
    now_ns,
    pdl_begin,
    pick,
    ptr_as,
    record_error,
    spin_lamport4,
    store_chunk,
    wait_ll,
)

__all__ = ["oneshot_lamport_kernel", "twoshot_lamport_kernel", "SENTINEL16"]

#: What an empty receive slot holds in every 16-bit element (the bits of -0.0).
SENTINEL16 = 0x8000
#: The error step of a fused call's exchange of partial sums between the CTAs of a row.
_STEP_NORM = tl.constexpr(STEP_NORM)


@triton.jit
def _bits(x_ptr, start, n, Q: tl.constexpr):
    """Elements [start, start + Q) of ``x`` as uint64 bits (zeros past ``n``, -0.0 as +0.0)."""
    v = load_chunk(x_ptr, start, n, Q).to(tl.uint16, bitcast=True)
    return tl.where(v == 0x8000, 0, v).to(tl.uint64)


@triton.jit
def _words(x_ptr, start, n, Q: tl.constexpr):
    """Elements [start, start + 4Q) of ``x`` as Q lamport words (quarter k in lane k)."""
    w = _bits(x_ptr, start, n, Q)
    w |= _bits(x_ptr, start + Q, n, Q) << 16
    w |= _bits(x_ptr, start + 2 * Q, n, Q) << 32
    w |= _bits(x_ptr, start + 3 * Q, n, Q) << 48
    return w


#: The low 15 bits of every 16-bit lane.
_LOW15 = tl.constexpr(0x7FFF7FFF7FFF7FFF)


@triton.jit
def _raw_words(x_ptr, c, n, Q: tl.constexpr):
    """Words c*Q .. c*Q + Q - 1 of ``x`` read as 8-byte words of four consecutive elements
    (``x`` 8-byte aligned, n a multiple of 4; zeros past n), as they are."""
    idx = c * Q + tl.arange(0, Q)
    p = tl.multiple_of(x_ptr.to(tl.pointer_type(tl.uint64), bitcast=True), 2)
    return tl.load(p + idx, mask=idx < n // 4, other=0)


@triton.jit
def _vec_words(x_ptr, c, n, Q: tl.constexpr):
    """``_raw_words`` with every -0.0 lane made +0.0. Exact per lane, no carry between lanes:
    with t = w ^ sentinels, ((t & LOW15) + LOW15) | t has bit 15 of a lane set iff that lane of
    t is non-zero, i.e. iff the lane of w is not 0x8000; flipping bit 15 of the other lanes
    turns 0x8000 into 0."""
    return _plus_zero(_raw_words(x_ptr, c, n, Q))


@triton.jit
def _plus_zero(w):
    """The uint64 words ``w`` with every 16-bit lane 0x8000 (-0.0) made 0 (see _vec_words)."""
    s = tl.full(w.shape, LANES_SENTINEL, tl.int64).to(tl.uint64, bitcast=True)
    low = tl.full(w.shape, _LOW15, tl.uint64)
    t = w ^ s
    nonzero = (((t & low) + low) | t) & s
    return w ^ (nonzero ^ s)


@triton.jit
def _load_words(x_ptr, g, n, Q: tl.constexpr, VEC: tl.constexpr):
    """Chunk ``g`` (elements g*4Q ..) of ``x`` as Q lamport words, -0.0 sent as +0.0."""
    if VEC:
        w = _vec_words(x_ptr, g, n, Q)
    else:
        w = _words(x_ptr, g * 4 * Q, n, Q)
    return w


@triton.jit
def _pack_raw(a0, a1, a2, a3, DT: tl.constexpr):
    """Four lane values (any float dtype) rounded to DT and packed into words."""
    w = a0.to(DT).to(tl.uint16, bitcast=True).to(tl.uint64)
    w |= a1.to(DT).to(tl.uint16, bitcast=True).to(tl.uint64) << 16
    w |= a2.to(DT).to(tl.uint16, bitcast=True).to(tl.uint64) << 32
    w |= a3.to(DT).to(tl.uint16, bitcast=True).to(tl.uint64) << 48
    return w


@triton.jit
def _pack(a0, a1, a2, a3, DT: tl.constexpr):
    """``_pack_raw`` with -0.0 as +0.0 (what every rank stores for these elements, the owner
    included: identical bits)."""
    return _plus_zero(_pack_raw(a0, a1, a2, a3, DT))


@triton.jit
def _store_words(y_ptr, g, n, w, Q: tl.constexpr, VEC: tl.constexpr):
    """Lamport words ``w`` into chunk ``g`` of ``y`` (elements below n only)."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    if VEC:
        idx = g * Q + tl.arange(0, Q)
        p = tl.multiple_of(y_ptr.to(tl.pointer_type(tl.uint64), bitcast=True), 2)
        tl.store(p + idx, w, mask=idx < n // 4)
    else:
        start = g * 4 * Q
        store_chunk(y_ptr, start, n, _lane(w, 0, DT), Q)
        store_chunk(y_ptr, start + Q, n, _lane(w, 1, DT), Q)
        store_chunk(y_ptr, start + 2 * Q, n, _lane(w, 2, DT), Q)
        store_chunk(y_ptr, start + 3 * Q, n, _lane(w, 3, DT), Q)


@triton.jit
def _record_bad(err_dev, err_host, bad, STEP: tl.constexpr, pid, quiet):
    """The timeout record (STEP, the first stale source ``bad`` - 1, this CTA), written by the
    threads that saw one and are not ``quiet`` (predicated stores: no block-wide step); it
    poisons this rank's later calls. ``quiet``: threads that recorded already in this call,
    or all of them when the instance was poisoned before it; another thread or CTA may still
    write a later record over an earlier one (which record the host reads is not ordered)."""
    code = ERR_MARK | (STEP << 32) | ((bad - 1).to(tl.int64) << 16) | pid.to(tl.int64)
    z = tl.zeros(bad.shape, tl.int64)
    write = (bad > 0) & (quiet == 0)
    tl.store(err_dev + z, code, mask=write)
    tl.store(err_host.to(tl.pointer_type(tl.int64)) + z, code, mask=write)


@triton.jit
def _lane(w, k: tl.constexpr, DT: tl.constexpr):
    """Quarter ``k`` of the packed words ``w`` as dtype ``DT``."""
    return ((w >> (16 * k)) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)


@triton.jit(do_not_specialize=["n", "limit_ns", "rank"])
def oneshot_lamport_kernel(
    x_ptr,  # *DT [n] input (16-bit dtype, any contiguous tensor)
    y_ptr,  # *DT [n] output (NORM: may be x_ptr)
    n,  # elements
    res_ptr,  # NORM: *DT [n] residual rows, updated in place (else unused)
    w_ptr,  # NORM: *DT [BLOCK * SPLIT] the RMSNorm weight, one row's (else unused)
    eps,  # NORM: the RMSNorm epsilon (else unused)
    part_ptr,  # NORM, SPLIT > 1: *int64 [MAXC] each CTA's tagged partial sum of squares
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
    BLOCK: tl.constexpr,  # elements per chunk (a multiple of 4)
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl_begin)
    VEC: tl.constexpr = False,  # words of 4 consecutive elements (n % 4 == 0, x, y 8-aligned)
    AHEAD: tl.constexpr = False,  # three parities; clear the previous call's slots (_ahead)
    NORM: tl.constexpr = False,  # chunks are row slices: residual add + RMSNorm (_norm_row)
    SPLIT: tl.constexpr = 1,  # NORM: slices (chunks, CTAs) per row; > 1: one chunk per CTA
    SLOTS: tl.constexpr = 1,  # SPLIT rounded up to a power of two
):
    pdl_begin(PDL, INTERPRET)
    # A chunk travels as 8-byte words of four elements i, Q + i, 2Q + i, 3Q + i (its quarters),
    # which the same thread holds: packing needs no layout conversion (as LL's halves). With
    # VEC, of four consecutive elements: x and y are then read and written as 8-byte words.
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, _ = call_state(ctr_ptr, err_dev, limit_ns, pid)
    par = _parity(epoch, par, AHEAD)
    nchunks = tl.cdiv(n, BLOCK)

    # push this rank's chunks (whole chunks: zeros past n) into every peer's slot [par][rank];
    # not after a timeout on this rank (limit 0): its waits no longer hold it back, so its
    # pushes could overwrite data a slower peer has not read yet, which no flag would reveal.
    # The peers time out instead, and every rank reports the failure.
    # (The loop bound does not depend on the error word: the input loads need not wait for it,
    # only the stores do, through their mask.)
    go = (tl.arange(0, Q) >= 0) & (limit > 0)
    for c in range(pid, nchunks, G):
        w = _load_words(x_ptr, c, n, Q, VEC)
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region
            slot += (par * W + rank) * slot_bytes
            tl.store(ptr_as(slot, tl.uint64) + c * Q + tl.arange(0, Q), w, mask=go)

    base = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region
    tail = True
    if AHEAD:  # while the peers' words travel: empty what the previous lamport call read
        tail = _ahead(base, slot_bytes, pend_ptr, epoch, par, nchunks * Q, 0, 0, rank, pid, G,
                      W, Q)
    _gather_flat(x_ptr, y_ptr, n, base + par * W * slot_bytes, slot_bytes, err_dev, err_host,
                 limit, rank, pid, G, nchunks, W, BLOCK, INTERPRET, VEC, AHEAD, tail,
                 res_ptr, w_ptr, eps, NORM, part_ptr, epoch, SPLIT, SLOTS)
    end_call(ctr_ptr, _next_epoch(epoch, AHEAD), pid, G, MAXC)


#: AHEAD: the lamport epoch counters wrap at this multiple of 3, so that consecutive calls
#: always take consecutive parities (2**32 is not a multiple of 3).
LAMPORT_WRAP = tl.constexpr(3 << 28)
#: AHEAD: a call that read more words than this per source slot (a one-shot message above
#: 128 KiB; one of exactly 128 KiB still defers) empties them at its own end, as without AHEAD:
#: the next call, maybe a small one on a small grid, would otherwise pay for clearing them.
AHEAD_MAX_WORDS = tl.constexpr(16384)


@triton.jit
def _parity(epoch, par, AHEAD: tl.constexpr):
    """The lamport slot parity of this call: ``par`` (epoch & 1) with two parities, epoch % 3
    with three (AHEAD; the epoch is then in 1..LAMPORT_WRAP)."""
    if AHEAD:
        par = (epoch % 3).to(tl.int64)
    return par


@triton.jit
def _next_epoch(epoch, AHEAD: tl.constexpr):
    """What end_call stores: the epoch, wrapped at LAMPORT_WRAP with three parities."""
    if AHEAD:
        epoch = epoch % LAMPORT_WRAP
    return epoch


@triton.jit
def _ahead(base, slot_bytes, pend_ptr, epoch, par, a, boff, b, rank, pid, G,
           W: tl.constexpr, Q: tl.constexpr):
    """Three parities (``AHEAD``): the sentinel back over the words the previous lamport call
    read, instead of at the end of that call, and this call's own words recorded for the next.
    Returns whether this call must empty its own words at its end after all (True above
    AHEAD_MAX_WORDS per source; then it records nothing to clear).

    ``pend[p]`` = (a, boff, b): a call of parity p read words [0, a) and [boff, boff + b) of
    every peer's slot [p][src]. Call k empties those of call k - 1 (parity (k - 1) % 3), spread
    over its CTAs. Safe: a peer next writes them in call k + 2, which it starts only after its
    call k + 1 has this rank's data of call k + 1, sent after this call ended. (Call k + 1's
    slots, which a fast peer may be filling now, have the third parity.) The lamport epochs
    count lamport calls only (their own counters), so other plans between them change
    nothing. Empty ``pend`` before the first call: nothing to clear."""
    prev = (epoch + 2) % 3  # (epoch - 1) mod 3, epoch >= 1
    pa = tl.load(pend_ptr + prev * 4)
    pboff = tl.load(pend_ptr + prev * 4 + 1)
    pb = tl.load(pend_ptr + prev * 4 + 2)
    tail = a + b > AHEAD_MAX_WORDS
    if pid == 0:  # read only by the next lamport call, after this one ended
        k = tl.arange(0, 4)
        rec = tl.where(k == 0, a, tl.where(k == 1, boff, tl.where(k == 2, b, 0)))
        tl.store(pend_ptr + par * 4 + k, tl.where(tail, 0, rec).to(tl.int32))
    offs = tl.arange(0, Q)
    empty = tl.full([Q], LANES_SENTINEL, tl.int64).to(tl.uint64, bitcast=True)
    slots = ptr_as(base + prev.to(tl.int64) * W * slot_bytes, tl.uint64)
    STRIDE = slot_bytes // 8
    for w in range(pid * Q, pa, G * Q):
        for i in tl.static_range(W):
            tl.store(slots + i * STRIDE + w + offs, empty, mask=(w + offs < pa) & (rank != i))
    for w in range(pid * Q, pb, G * Q):
        for i in tl.static_range(W):
            tl.store(slots + i * STRIDE + pboff + w + offs, empty,
                     mask=(w + offs < pb) & (rank != i))
    return tail


@triton.jit
def _gather_flat(x_ptr, y_ptr, n, mine, slot_bytes, err_dev, err_host, limit, rank, pid, G,
                 nchunks, W: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
                 VEC: tl.constexpr, AHEAD: tl.constexpr, tail, res_ptr, w_ptr, eps,
                 NORM: tl.constexpr, part_ptr, epoch, SPLIT: tl.constexpr,
                 SLOTS: tl.constexpr):
    """Wait, sum and clear with every source's words as a 1-D [Q] vector of the same layout:
    each thread polls, sums and clears only its own words (no reduction across threads, no
    layout conversion). On the GPU a thread polls up to four sources' words in one loop
    (``spin_lamport4``) against one deadline for the whole call, so a timed-out wait makes the
    later ones return at once; the timeout record is written by the threads that saw a stale
    word (predicated stores), with no block-wide count."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    Q: tl.constexpr = BLOCK // 4
    STRIDE = slot_bytes // 8
    offs = tl.arange(0, Q)
    deadline = now_ns(INTERPRET) + limit
    me = tl.zeros([Q], tl.int32) + rank
    # quiet: a poisoned instance keeps its first record; so does a thread that recorded one
    failed = tl.zeros([Q], tl.int32) + (limit == 0).to(tl.int32)
    for c in range(pid, nchunks, G):
        own = _load_words(x_ptr, c, n, Q, VEC)
        base = ptr_as(mine, tl.uint64) + c * Q + offs
        if NORM:  # loaded before the wait, so that they arrive while it polls
            r = _raw_words(res_ptr, c, n, Q)
            wt = _raw_words(w_ptr, c % SPLIT, 4 * Q * SPLIT, Q)
        else:
            r = own
            wt = own
        # the sum in rank order, the same on every rank (this rank's own words in its place)
        a0, a1, a2, a3, bad = _gather_sum(base, STRIDE, own, me, W, rank, limit, deadline,
                                          INTERPRET, DT)
        if NORM:
            lost = _norm_row(y_ptr, res_ptr, r, wt, eps, c, n, a0, a1, a2, a3, part_ptr, epoch,
                             pid, limit, deadline, Q, DT, SPLIT, SLOTS, INTERPRET)
            # a partner CTA's partial never came, a bound after the peers' words were due: its
            # own record (a peer's timeout) stands where there is one
            if lost & (limit > 0) & (tl.load(err_dev, volatile=True) == 0):
                record_error(err_dev, err_host, _STEP_NORM, rank, pid)
        else:
            _store_words(y_ptr, c, n, _pack(a0, a1, a2, a3, DT), Q, VEC)
        _record_bad(err_dev, err_host, bad, 0, pid, failed)  # STEP_ONESHOT
        failed = failed | (bad > 0).to(tl.int32)
        if INTERPRET:  # block rounds wait per source: later waits must not wait again
            limit = tl.where(tl.max(bad, axis=0) > 0, 0, limit)
        # back to empty: every source's words but this rank's (AHEAD: the next lamport call
        # empties them, unless there are too many)
        _clear(base, STRIDE, me, W, AHEAD, tail)


@triton.jit
def _norm_row(y_ptr, res_ptr, r, wt, eps, c, n, a0, a1, a2, a3, part_ptr, epoch, pid, limit,
              deadline, Q: tl.constexpr, DT: tl.constexpr, SPLIT: tl.constexpr, SLOTS: tl.constexpr,
              INTERPRET: tl.constexpr):
    """NORM: chunk ``c`` is slice c % SPLIT of row c // SPLIT, 4Q elements in words of four
    consecutive elements (VEC). The sum is rounded to DT as the plain all-reduce stores it,
    then, as SGLang's fused add + RMSNorm does: h = sum + residual in fp32, the residual
    becomes h (rounded), and y = h * rsqrt(mean(h * h) + eps) * weight, the mean over the whole
    row (``_row_total``); ``r`` and ``wt`` are the residual's and the weight's words of the
    slice, loaded before the wait. Each thread reads and writes only its own words (x, y and
    the residual may be the same memory). Every rank holds the same sums and the same residual
    and reduces in the same order: identical bits everywhere. Returns whether a partner
    CTA's partial never came."""
    h0 = a0.to(DT).to(tl.float32) + _lane(r, 0, DT).to(tl.float32)
    h1 = a1.to(DT).to(tl.float32) + _lane(r, 1, DT).to(tl.float32)
    h2 = a2.to(DT).to(tl.float32) + _lane(r, 2, DT).to(tl.float32)
    h3 = a3.to(DT).to(tl.float32) + _lane(r, 3, DT).to(tl.float32)
    _store_words(res_ptr, c, n, _pack_raw(h0, h1, h2, h3, DT), Q, True)
    ss = tl.sum(h0 * h0 + h1 * h1 + h2 * h2 + h3 * h3, axis=0)
    lost = limit < 0  # False (a scalar tensor, as _row_total returns)
    if SPLIT > 1:
        ss, lost = _row_total(part_ptr, ss, epoch, pid, limit, deadline, SPLIT, SLOTS,
                              INTERPRET)
    rstd = 1.0 / tl.sqrt(ss / (4 * Q * SPLIT) + eps)
    o0 = h0 * rstd * _lane(wt, 0, DT).to(tl.float32)
    o1 = h1 * rstd * _lane(wt, 1, DT).to(tl.float32)
    o2 = h2 * rstd * _lane(wt, 2, DT).to(tl.float32)
    o3 = h3 * rstd * _lane(wt, 3, DT).to(tl.float32)
    _store_words(y_ptr, c, n, _pack_raw(o0, o1, o2, o3, DT), Q, True)
    return lost


@triton.jit
def _row_total(part_ptr, ss, epoch, pid, limit, deadline, SPLIT: tl.constexpr,
               SLOTS: tl.constexpr, INTERPRET: tl.constexpr):
    """NORM with SPLIT > 1: the row's sum of squares from the partials ``ss`` of its SPLIT
    CTAs (pid - pid % SPLIT onwards: one chunk per CTA, so chunk c is CTA c). Each CTA posts its
    partial as one LL word in its slot of ``part_ptr`` (the fp32 bits, tagged with the call's
    epoch: no flag travels apart from the data and no slot needs emptying; the epoch differs
    between consecutive calls) and polls its partners' slots, summed by one fixed reduction:
    the same on every rank. The wait ends a bound (``limit``) after the peers' words were due
    (``deadline``): a partner that timed out waiting for a peer posts its partial before that.
    Returns (total, whether a partial never came). Needs the row's CTAs resident together, as
    a grid within fused_plan's bound is when nothing else holds the SMs; not under the
    interpreter (CTAs one after another)."""
    tl.static_assert(not INTERPRET, "the interpreter runs CTAs one after another")
    tag = epoch.to(tl.uint32)
    p = part_ptr.to(tl.pointer_type(tl.uint64), bitcast=True)
    word = (tag.to(tl.uint64) << 32) | ss.to(tl.uint32, bitcast=True).to(tl.uint64)
    tl.store(p + pid, word)
    lanes = tl.arange(0, SLOTS)
    live = (lanes < SPLIT).to(tl.int32)
    bound = tl.where(limit > 0, deadline + limit - now_ns(INTERPRET), 0)
    words, _, stale = wait_ll(p + (pid - pid % SPLIT) + lanes, p, live, tag, bound, False,
                              INTERPRET, SPIN=True)
    parts = (words & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    return tl.sum(tl.where(lanes < SPLIT, parts, 0.0), axis=0), stale > 0


@triton.jit
def _gather_sum(base, STRIDE, own, me, W: tl.constexpr, rank, limit, deadline,
                INTERPRET: tl.constexpr, DT: tl.constexpr):
    """Wait for the W - 1 peers' words at ``base`` (source i at ``base + i * STRIDE``) and sum
    all W sources in rank order, this rank's ``own`` words in its place, lane by lane in fp32.
    Returns the four lane sums and ``bad`` (the first source whose word never arrived, + 1)."""
    w0, w1, w2, w3 = _poll4(base, STRIDE, 0, W, rank, limit, deadline, INTERPRET)
    if W > 4:
        w4, w5, w6, w7 = _poll4(base, STRIDE, 4, W, rank, limit, deadline, INTERPRET)
    else:
        w4, w5, w6, w7 = w0, w0, w0, w0
    return _sum_sources(w0, w1, w2, w3, w4, w5, w6, w7, own, me, W, DT)


@triton.jit
def _sum_sources(w0, w1, w2, w3, w4, w5, w6, w7, own, me, W: tl.constexpr, DT: tl.constexpr):
    """The polled words ``w0``-``w7`` of sources 0..W-1 (those beyond W unused) summed in rank
    order, this rank's ``own`` words in its place, lane by lane in fp32. Returns the four lane
    sums and ``bad`` (the first source whose word never arrived, + 1; 0 where all did)."""
    bad = tl.zeros(own.shape, tl.int32)
    a0 = tl.zeros(own.shape, tl.float32)
    a1 = tl.zeros(own.shape, tl.float32)
    a2 = tl.zeros(own.shape, tl.float32)
    a3 = tl.zeros(own.shape, tl.float32)
    a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w0, own, me, 0, DT)
    if W > 1:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w1, own, me, 1, DT)
    if W > 2:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w2, own, me, 2, DT)
    if W > 3:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w3, own, me, 3, DT)
    if W > 4:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w4, own, me, 4, DT)
    if W > 5:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w5, own, me, 5, DT)
    if W > 6:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w6, own, me, 6, DT)
    if W > 7:
        a0, a1, a2, a3, bad = _add(a0, a1, a2, a3, bad, w7, own, me, 7, DT)
    return a0, a1, a2, a3, bad


@triton.jit
def _clear(base, STRIDE, me, W: tl.constexpr, AHEAD: tl.constexpr, tail):
    """The sentinel back over every source's words at ``base`` but this rank's (``me``); with
    ``AHEAD``, only where ``tail`` (``_ahead``'s answer) says this call clears its own."""
    empty = tl.full(me.shape, LANES_SENTINEL, tl.int64).to(tl.uint64, bitcast=True)
    for i in tl.static_range(W):
        if AHEAD:
            tl.store(base + i * STRIDE, empty, mask=(me != i) & tail)
        else:
            tl.store(base + i * STRIDE, empty, mask=me != i)


@triton.jit
def _poll4(base, STRIDE, FIRST: tl.constexpr, W: tl.constexpr, rank, limit, deadline,
           INTERPRET: tl.constexpr):
    """The words of sources FIRST..FIRST+3 (0 for sources beyond W and for this rank), each
    once it arrived or the wait ran out (then as last read)."""
    p0, p1, p2, p3, bits = _sources4(base, STRIDE, FIRST, W, rank)
    if INTERPRET:
        w0 = _poll1(p0, FIRST, W, rank, limit, INTERPRET)
        w1 = _poll1(p1, FIRST + 1, W, rank, limit, INTERPRET)
        w2 = _poll1(p2, FIRST + 2, W, rank, limit, INTERPRET)
        w3 = _poll1(p3, FIRST + 3, W, rank, limit, INTERPRET)
    else:
        w0, w1, w2, w3 = spin_lamport4(p0, p1, p2, p3, bits, deadline)
    return w0, w1, w2, w3


@triton.jit
def _sources4(base, STRIDE, FIRST: tl.constexpr, W: tl.constexpr, rank):
    """What a four-source poll takes: the pointers to sources FIRST..FIRST+3 at ``base`` (source
    i at ``base + i * STRIDE``; a source beyond W gets this rank's own slot, never loaded) and
    their live bits for ``spin_lamport4`` / ``spin_lamport4_wide`` (bit i: source FIRST + i is
    below W and not this rank)."""
    p0 = base + FIRST * STRIDE
    p1 = base + (FIRST + 1) * STRIDE
    p2 = base + (FIRST + 2) * STRIDE
    p3 = base + (FIRST + 3) * STRIDE
    bits = 0
    for i in tl.static_range(4):
        if FIRST + i < W:
            bits = bits | tl.where(FIRST + i == rank, 0, 1 << i)
    if FIRST + 1 >= W:
        p1 = base
    if FIRST + 2 >= W:
        p2 = base
    if FIRST + 3 >= W:
        p3 = base
    return p0, p1, p2, p3, bits


@triton.jit
def _poll1(p, SRC: tl.constexpr, W: tl.constexpr, rank, limit, INTERPRET: tl.constexpr):
    """Under the interpreter: source SRC's words by block rounds (``wait_ll``), 0 when not live."""
    if SRC < W:
        live = (tl.zeros(p.shape, tl.int32) + rank) != SRC
        w, _same, _pending = wait_ll(p, p, live, 0, limit, False, INTERPRET, False, True)
    else:
        w = tl.zeros(p.shape, tl.uint64)
    return w


@triton.jit
def _add(a0, a1, a2, a3, bad, w, own, me, SRC: tl.constexpr, DT: tl.constexpr):
    """Add source SRC's four lanes (this rank's own words where SRC is this rank) to the sums;
    ``bad`` becomes SRC + 1 where the word never arrived (the first such source)."""
    v = tl.where(me == SRC, own, w)
    stale = (me != SRC) & empty_lanes(v)
    bad = tl.where(stale & (bad == 0), SRC + 1, bad)
    a0 += _lane(v, 0, DT).to(tl.float32)
    a1 += _lane(v, 1, DT).to(tl.float32)
    a2 += _lane(v, 2, DT).to(tl.float32)
    a3 += _lane(v, 3, DT).to(tl.float32)
    return a0, a1, a2, a3, bad


@triton.jit(do_not_specialize=["n", "shard", "limit_ns", "rank"])
def twoshot_lamport_kernel(
    x_ptr,  # *DT [n] input (16-bit dtype, any contiguous tensor)
    y_ptr,  # *DT [n] output
    n,  # elements
    shard,  # elements per shard: cdiv(n, W) rounded up to BLOCK
    b0, b1, b2, b3, b4, b5, b6, b7,  # symmetric buffer base of rank i, as this GPU addresses it
    region,  # byte offset of the lamport region
    slot_bytes,  # bytes of one [parity][src] slot
    ag_bytes,  # byte offset of the all-gather half inside a slot
    pend_ptr,  # *int32 [3][4] AHEAD: the words each lamport parity's call left to clear
    ctr_ptr,  # *int32 [MAX_CTAS] epoch counters (all equal between calls)
    err_dev,  # *int64 device error word (non-zero: poisoned, waits are skipped)
    err_host,  # int64 address of the host-mapped error word
    limit_ns,  # bound on each wait
    rank,
    W: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per chunk (a multiple of 4)
    MAXC: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,
    VEC: tl.constexpr = False,  # words of 4 consecutive elements (n % 4 == 0, x, y 8-aligned)
    AHEAD: tl.constexpr = False,  # three parities; clear the previous call's slots (_ahead)
    PDL_NEXT: tl.constexpr = True,  # under PDL, let the next grid launch at the start (pdl_begin)
):
    """Two-shot all-reduce on one node with the lamport protocol (the data its own flag):

    1. reduce-scatter: chunk c of shard j goes, as lamport words, to rank j's slot
       [parity][this rank] (first half); rank j waits for its W - 1 peers' words of chunk c,
       sums the W contributions in rank order (fp32), rounds to the dtype (-0.0 as +0.0), and
       clears what it read;
    2. all-gather: that result chunk goes to every peer's slot [parity][rank j] (second half,
       from ``ag_bytes``) and to y; every rank waits for the other shards' chunks, writes them to
       y and clears them.

    Every CTA owns chunks c = pid, pid + G, ... of every shard on every rank, so it only waits
    for the same CTA index elsewhere; each thread polls, sums and clears only its own words (as
    the one-shot's per-thread gather). Slot reuse: a peer writes slot half [p][q] of this rank in
    calls k and k + 2 only, and it starts call k + 2 only after it has this rank's all-gather
    data of call k + 1, which this rank sends after its call k (clearing included) finished.
    """
    pdl_begin(PDL, INTERPRET, PDL_NEXT)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, _ = call_state(ctr_ptr, err_dev, limit_ns, pid)
    par = _parity(epoch, par, AHEAD)
    cps = shard // BLOCK  # chunks per shard
    STRIDE = slot_bytes // 8
    offs = tl.arange(0, Q)
    go = (offs >= 0) & (limit > 0)  # no pushes after a timeout on this rank (see one-shot)
    me = tl.zeros([Q], tl.int32) + rank
    deadline = now_ns(INTERPRET) + limit
    base_all = pick(rank, b0, b1, b2, b3, b4, b5, b6, b7) + region
    mine = base_all + par * W * slot_bytes

    # 1a. reduce-scatter pushes: every other rank's shard, chunk by chunk
    for c in range(pid, cps, G):
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            w = _load_words(x_ptr, dst * cps + c, n, Q, VEC)
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region
            slot += (par * W + rank) * slot_bytes
            tl.store(ptr_as(slot, tl.uint64) + c * Q + offs, w, mask=go)
    tail = True
    if AHEAD:  # while the chunks travel: empty what the previous lamport call read
        tail = _ahead(base_all, slot_bytes, pend_ptr, epoch, par, cps * Q, ag_bytes // 8,
                      cps * Q, rank, pid, G, W, Q)

    # 1b. this rank's shard: wait, sum, clear; 2a. push the result everywhere, and to y
    # quiet: a poisoned instance keeps its first record; so does a thread that recorded one
    failed = tl.zeros([Q], tl.int32) + (limit == 0).to(tl.int32)
    for c in range(pid, cps, G):
        own = _load_words(x_ptr, rank * cps + c, n, Q, VEC)
        base = ptr_as(mine, tl.uint64) + c * Q + offs
        a0, a1, a2, a3, bad = _gather_sum(base, STRIDE, own, me, W, rank, limit, deadline,
                                          INTERPRET, DT)
        _record_bad(err_dev, err_host, bad, 1, pid, failed)  # STEP_RS
        failed = failed | (bad > 0).to(tl.int32)
        # a thread whose wait ran out forwards nothing: its sums lack a peer's part, and the
        # peers must time out on them (naming this rank) rather than take them
        if INTERPRET:  # block rounds wait per source: later waits must not wait again
            limit = tl.where(tl.max(bad, axis=0) > 0, 0, limit)
        _clear(base, STRIDE, me, W, AHEAD, tail)
        r = _pack(a0, a1, a2, a3, DT)
        forward = go & (failed == 0)
        for i in tl.static_range(1, W):
            dst = (rank + i) % W
            slot = pick(dst, b0, b1, b2, b3, b4, b5, b6, b7) + region + ag_bytes
            slot += (par * W + rank) * slot_bytes
            tl.store(ptr_as(slot, tl.uint64) + c * Q + offs, r, mask=forward)
        _store_words(y_ptr, rank * cps + c, n, r, Q, VEC)

    # 2b. the other shards: wait, write to y, clear
    for c in range(pid, cps, G):
        base = ptr_as(mine + ag_bytes, tl.uint64) + c * Q + offs
        v0, v1, v2, v3 = _poll4(base, STRIDE, 0, W, rank, limit, deadline, INTERPRET)
        bad = tl.zeros([Q], tl.int32)
        bad = _put_shard(y_ptr, n, v0, me, bad, 0, W, cps, c, Q, VEC)
        bad = _put_shard(y_ptr, n, v1, me, bad, 1, W, cps, c, Q, VEC)
        bad = _put_shard(y_ptr, n, v2, me, bad, 2, W, cps, c, Q, VEC)
        bad = _put_shard(y_ptr, n, v3, me, bad, 3, W, cps, c, Q, VEC)
        if W > 4:
            v4, v5, v6, v7 = _poll4(base, STRIDE, 4, W, rank, limit, deadline, INTERPRET)
            bad = _put_shard(y_ptr, n, v4, me, bad, 4, W, cps, c, Q, VEC)
            bad = _put_shard(y_ptr, n, v5, me, bad, 5, W, cps, c, Q, VEC)
            bad = _put_shard(y_ptr, n, v6, me, bad, 6, W, cps, c, Q, VEC)
            bad = _put_shard(y_ptr, n, v7, me, bad, 7, W, cps, c, Q, VEC)
        _record_bad(err_dev, err_host, bad, 2, pid, failed)  # STEP_AG
        failed = failed | (bad > 0).to(tl.int32)
        if INTERPRET:
            limit = tl.where(tl.max(bad, axis=0) > 0, 0, limit)
        _clear(base, STRIDE, me, W, AHEAD, tail)

    end_call(ctr_ptr, _next_epoch(epoch, AHEAD), pid, G, MAXC)


@triton.jit
def _put_shard(y_ptr, n, v, me, bad, SRC: tl.constexpr, W: tl.constexpr, cps, c,
               Q: tl.constexpr, VEC: tl.constexpr):
    """Shard SRC's chunk c (words ``v``, from rank SRC) into y, unless SRC is beyond W or this
    rank; ``bad`` becomes SRC + 1 where a word never arrived (the first such source)."""
    if SRC < W:
        live = me != SRC
        stale = live & empty_lanes(v)
        bad = tl.where(stale & (bad == 0), SRC + 1, bad)
        g = SRC * cps + c
        if VEC:
            idx = g * Q + tl.arange(0, Q)
            p = tl.multiple_of(y_ptr.to(tl.pointer_type(tl.uint64), bitcast=True), 2)
            tl.store(p + idx, v, mask=live & (idx < n // 4))
        else:
            DT: tl.constexpr = y_ptr.dtype.element_ty
            start = g * 4 * Q
            for k in tl.static_range(4):
                e = start + k * Q + tl.arange(0, Q)
                tl.store(y_ptr + e, _lane(v, k, DT), mask=live & (e < n))
    return bad
