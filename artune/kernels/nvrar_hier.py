"""NVRAR's node-aware kernel: reduce-scatter in the node, recursive doubling between nodes,
all-gather in the node. With one node it is a two-shot all-reduce.

Ranks form ``N`` (possibly virtual) nodes of ``L``: rank = g * L + lr. The message is cut into L
shards of ``shard`` elements; local rank ``lr`` owns shard ``lr``. Per chunk of BLOCK elements:

1. reduce-scatter (L > 1): push chunk c of shard j of ``x`` into node peer j's slot
   ``rs[lr]``; sum the L contributions to shard lr in local-rank order (fp32), round to the dtype;
2. inter-node (N > 1): recursive doubling among the N ranks with the same ``lr``; nodes beyond
   the largest power of two fold in first and get the result last (MPICH's scheme). Each
   exchange adds the same two rounded values on both sides, so all agree bit for bit;
3. all-gather (L > 1): write the result to ``y`` and push it into every node peer's slot
   ``ag[lr]``; copy the peers' shards from the own slots into ``y``.

Protocol ``LL``: each 8-byte word carries 4 payload bytes and the epoch (no signal, no fence).
Otherwise data, then fence + a 64-bit signal per (phase, source, chunk). Intra-node traffic uses
peer addresses (NVLink). Inter-node traffic uses NVSHMEM puts (``NVSHMEM``: putmem_signal for
signals, putmem of staged LL words) or, where every rank is load/store reachable, peer
addresses taken from ``rd_tab``. CTAs only wait for the same CTA index on other ranks, so no
grid-wide barrier is needed. Launched by ``artune.kernels.nvrar.NvrarComm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from artune.kernels.nvrar_prims import (
    call_state,
    decode_ll,
    end_call,
    fence_sys,
    load_pair,
    pdl_begin,
    pick,
    ptr_as,
    put_ll,
    record_error,
    wait_ll,
    wait_signal,
)
from artune.kernels.nvrar_shmem import putmem_block, putmem_signal_block

__all__ = ["hier_kernel", "hier_kernel_nvshmem"]


@triton.jit
def _put(va, vb, base, c, flag, LL: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr):
    """Store chunk ``c`` (its halves ``va``, ``vb``) into the slot at address ``base``."""
    H: tl.constexpr = BLOCK // 2
    if LL:
        put_ll(va, vb, ptr_as(base, tl.uint64) + c * (BLOCK // PACK), flag, PACK, H)
    else:
        dst = ptr_as(base, va.dtype) + c * BLOCK
        tl.store(dst + tl.arange(0, H), va)
        tl.store(dst + H + tl.arange(0, H), vb)


@triton.jit
def _get(base, sig, c, epoch, limit, DT: tl.constexpr, LL: tl.constexpr, PACK: tl.constexpr,
         BLOCK: tl.constexpr, INTERPRET: tl.constexpr, SPIN: tl.constexpr):
    """Chunk ``c`` of the own slot at ``base`` once it arrived (LL flags, or the signal at
    ``sig``). Returns (half a, half b, arrived)."""
    H: tl.constexpr = BLOCK // 2
    if LL:
        pa = ptr_as(base, tl.uint64) + c * (BLOCK // PACK) + tl.arange(0, H)
        wa, wb, pending = wait_ll(pa, pa + H, tl.full([H], 1, tl.int1), epoch.to(tl.uint32),
                                  limit, PACK == 1, INTERPRET, SPIN)
        va, vb = decode_ll(wa, wb, DT, PACK)
        ok = pending == 0
    else:
        ok = wait_signal(sig, epoch.to(tl.int64), limit, INTERPRET)
        src = ptr_as(base, DT) + c * BLOCK
        va = tl.load(src + tl.arange(0, H), cache_modifier=".cg")
        vb = tl.load(src + H + tl.arange(0, H), cache_modifier=".cg")
    return va, vb, ok


@triton.jit
def _signal(base, sig_off, idx, epoch, INTERPRET: tl.constexpr):
    """Set the int64 signal ``idx`` of the peer whose buffer is at ``base`` to ``epoch``.
    The caller has run ``tl.debug_barrier()`` and ``fence_sys`` (its value is folded in)."""
    tl.store((base + sig_off + idx * 8).to(tl.pointer_type(tl.int64)), epoch)


@triton.jit
def _send_inter(va, vb, me, dst_pe, rd_tab, rd_off, stage_off, sig_off, slot, sidx, step, par, c,
                epoch, flag, STEPS: tl.constexpr, LL: tl.constexpr, NVSHMEM: tl.constexpr,
                SIGSET: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Send chunk ``c`` to ``dst_pe``'s inter-node slot of ``step`` (signal index ``sidx``)."""
    region = rd_off + (par * STEPS + step) * slot
    if NVSHMEM:
        # stage in the own symmetric buffer, then one block-wide put (with signal)
        staged = stage_off + (par * STEPS + step) * slot
        _put(va, vb, me + staged, c, flag, LL, PACK, BLOCK)
        tl.debug_barrier()
        if LL:
            nbytes = (BLOCK // PACK) * 8
            at = c * nbytes
            putmem_block(me + region + at, me + staged + at, tl.full([], nbytes, tl.int64),
                         dst_pe.to(tl.int32))
        else:
            nbytes = BLOCK * va.dtype.primitive_bitwidth // 8
            at = c * nbytes
            putmem_signal_block(me + region + at, me + staged + at, tl.full([], nbytes, tl.int64),
                                me + sig_off + sidx * 8, epoch.to(tl.uint64),
                                tl.full([], SIGSET, tl.int32), dst_pe.to(tl.int32))
    else:
        peer = tl.multiple_of(tl.load(rd_tab + dst_pe), 16)
        _put(va, vb, peer + region, c, flag, LL, PACK, BLOCK)
        if not LL:
            tl.debug_barrier()
            z = fence_sys(INTERPRET)
            _signal(peer, sig_off, sidx, epoch.to(tl.int64) + z, INTERPRET)


@triton.jit
def _hier_body(
    x_ptr, y_ptr, n, shard,
    b0, b1, b2, b3, b4, b5, b6, b7,
    rd_tab, rs_off, ag_off, rd_off, stage_off, sig_off, slot, maxch,
    ctr_ptr, err_dev, err_host, limit_ns, rank,
    N: tl.constexpr, L: tl.constexpr, LOG2P: tl.constexpr, EXTRA: tl.constexpr,
    STEPS: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, LL: tl.constexpr,
    NVSHMEM: tl.constexpr, SIGSET: tl.constexpr, MAXC: tl.constexpr, INTERPRET: tl.constexpr,
    SPIN: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL, INTERPRET)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    H: tl.constexpr = BLOCK // 2  # a chunk travels as two halves (nvrar_prims.load_pair)
    PHASES: tl.constexpr = 2 + STEPS
    P: tl.constexpr = N - EXTRA
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    epoch, limit, par, flag = call_state(ctr_ptr, err_dev, limit_ns, pid)
    shard = (shard // 16) * 16  # a no-op (SHARD_ALIGN) that tells Triton: x/y accesses vectorize
    g = rank // L
    lr = rank % L
    cps = tl.cdiv(shard, BLOCK)
    me = pick(lr, b0, b1, b2, b3, b4, b5, b6, b7)

    # 1a. reduce-scatter push: shard j of x to node peer j, slot rs[lr]
    if L > 1:
        for c in range(pid, cps, G):
            for i in tl.static_range(1, L):
                j = (lr + i) % L
                va, vb = load_pair(x_ptr, j * shard + c * BLOCK, n, H)
                _put(va, vb, pick(j, b0, b1, b2, b3, b4, b5, b6, b7) + rs_off + lr * slot, c,
                     flag, LL, PACK, BLOCK)
            if not LL:
                tl.debug_barrier()
                z = fence_sys(INTERPRET)
                for i in tl.static_range(1, L):
                    j = (lr + i) % L
                    _signal(pick(j, b0, b1, b2, b3, b4, b5, b6, b7), sig_off,
                            ((par * PHASES + 0) * L + lr) * maxch + c, epoch.to(tl.int64) + z,
                            INTERPRET)

    for c in range(pid, cps, G):
        # 1b. sum the node's contributions to shard lr, in local-rank order
        acc_a = tl.zeros([H], dtype=tl.float32)
        acc_b = tl.zeros([H], dtype=tl.float32)
        for j in tl.static_range(L):
            if j == lr:
                va, vb = load_pair(x_ptr, lr * shard + c * BLOCK, n, H)
            else:
                va, vb, ok = _get(me + rs_off + j * slot, me + sig_off
                                  + (((par * PHASES + 0) * L + j) * maxch + c) * 8,
                                  c, epoch, limit, DT, LL, PACK, BLOCK, INTERPRET, SPIN)
                if not ok:
                    record_error(err_dev, err_host, 1, g * L + j, pid)
                    limit = limit * 0
            acc_a += va.to(tl.float32)
            acc_b += vb.to(tl.float32)
        va = acc_a.to(DT)
        vb = acc_b.to(DT)

        # 2. inter-node recursive doubling on shard lr (with fold-in/out of extra nodes)
        if N > 1:
            if EXTRA > 0:
                fold = tl.where(g >= P, g - P, g + P) * L + lr
                if g >= P:
                    _send_inter(va, vb, me, fold, rd_tab, rd_off, stage_off, sig_off, slot,
                                (par * PHASES + 2 + LOG2P) * L * maxch + c, LOG2P, par, c, epoch,
                                flag, STEPS, LL, NVSHMEM, SIGSET, PACK, BLOCK, INTERPRET)
                    sidx = (par * PHASES + 3 + LOG2P) * L * maxch + c
                    va, vb, ok = _get(me + rd_off + (par * STEPS + LOG2P + 1) * slot,
                                      me + sig_off + sidx * 8, c, epoch, limit, DT, LL, PACK,
                                      BLOCK, INTERPRET, SPIN)
                    if not ok:
                        record_error(err_dev, err_host, 3 + LOG2P + 1, fold, pid)
                        limit = limit * 0
                elif g < EXTRA:
                    sidx = (par * PHASES + 2 + LOG2P) * L * maxch + c
                    ua, ub, ok = _get(me + rd_off + (par * STEPS + LOG2P) * slot,
                                      me + sig_off + sidx * 8, c, epoch, limit, DT, LL, PACK,
                                      BLOCK, INTERPRET, SPIN)
                    if not ok:
                        record_error(err_dev, err_host, 3 + LOG2P, fold, pid)
                        limit = limit * 0
                    va = (va.to(tl.float32) + ua.to(tl.float32)).to(DT)
                    vb = (vb.to(tl.float32) + ub.to(tl.float32)).to(DT)
            if g < P:
                for k in tl.static_range(LOG2P):
                    partner = (g ^ (1 << k)) * L + lr
                    sidx = (par * PHASES + 2 + k) * L * maxch + c
                    _send_inter(va, vb, me, partner, rd_tab, rd_off, stage_off, sig_off, slot,
                                sidx, k, par, c, epoch, flag, STEPS, LL, NVSHMEM, SIGSET, PACK,
                                BLOCK, INTERPRET)
                    ua, ub, ok = _get(me + rd_off + (par * STEPS + k) * slot,
                                      me + sig_off + sidx * 8, c, epoch, limit, DT, LL, PACK,
                                      BLOCK, INTERPRET, SPIN)
                    if not ok:
                        record_error(err_dev, err_host, 3 + k, partner, pid)
                        limit = limit * 0
                    va = (va.to(tl.float32) + ua.to(tl.float32)).to(DT)
                    vb = (vb.to(tl.float32) + ub.to(tl.float32)).to(DT)
                if EXTRA > 0:
                    if g < EXTRA:
                        _send_inter(va, vb, me, (g + P) * L + lr, rd_tab, rd_off, stage_off,
                                    sig_off, slot, (par * PHASES + 3 + LOG2P) * L * maxch + c,
                                    LOG2P + 1, par, c, epoch, flag, STEPS, LL, NVSHMEM, SIGSET,
                                    PACK, BLOCK, INTERPRET)

        # 3a. the result: own shard of y, and every node peer's slot ag[lr]
        _store_part(y_ptr, lr * shard, c, shard, n, va, vb, BLOCK)
        if L > 1:
            for i in tl.static_range(1, L):
                j = (lr + i) % L
                _put(va, vb, pick(j, b0, b1, b2, b3, b4, b5, b6, b7) + ag_off + lr * slot, c,
                     flag, LL, PACK, BLOCK)
            if not LL:
                tl.debug_barrier()
                z = fence_sys(INTERPRET)
                for i in tl.static_range(1, L):
                    j = (lr + i) % L
                    _signal(pick(j, b0, b1, b2, b3, b4, b5, b6, b7), sig_off,
                            ((par * PHASES + 1) * L + lr) * maxch + c, epoch.to(tl.int64) + z,
                            INTERPRET)

    # 3b. all-gather receive: the node peers' shards into y
    if L > 1:
        for c in range(pid, cps, G):
            for i in tl.static_range(1, L):
                j = (lr + i) % L
                va, vb, ok = _get(me + ag_off + j * slot,
                                  me + sig_off + (((par * PHASES + 1) * L + j) * maxch + c) * 8,
                                  c, epoch, limit, DT, LL, PACK, BLOCK, INTERPRET, SPIN)
                if not ok:
                    record_error(err_dev, err_host, 2, g * L + j, pid)
                    limit = limit * 0
                _store_part(y_ptr, j * shard, c, shard, n, va, vb, BLOCK)

    end_call(ctr_ptr, epoch, pid, G, MAXC)


@triton.jit
def _store_part(y_ptr, start, c, shard, n, va, vb, BLOCK: tl.constexpr):
    """Chunk ``c`` (halves ``va``, ``vb``) of the shard starting at element ``start``: elements
    inside the shard and below ``n`` only (one branch level: nested ifs here broke Triton 3.6's
    layout pass)."""
    H: tl.constexpr = BLOCK // 2
    t = c * BLOCK + tl.arange(0, H)
    pa = y_ptr + start + t
    if ((c + 1) * BLOCK <= shard) & (start + (c + 1) * BLOCK <= n):
        tl.store(pa, va)
        tl.store(pa + H, vb)
    else:
        tl.store(pa, va, mask=(t < shard) & (start + t < n))
        tl.store(pa + H, vb, mask=(t + H < shard) & (start + t + H < n))


# Two entry points over one body rather than one with a flag: ``with_nvshmem`` links NVSHMEM's
# device library into the function it wraps, and the peer-address variant must stay free of it.
@triton.jit(do_not_specialize=["n", "shard", "maxch", "limit_ns", "rank"])
def hier_kernel(
    x_ptr, y_ptr, n, shard,
    b0, b1, b2, b3, b4, b5, b6, b7,
    rd_tab, rs_off, ag_off, rd_off, stage_off, sig_off, slot, maxch,
    ctr_ptr, err_dev, err_host, limit_ns, rank,
    N: tl.constexpr, L: tl.constexpr, LOG2P: tl.constexpr, EXTRA: tl.constexpr,
    STEPS: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, LL: tl.constexpr,
    SIGSET: tl.constexpr, MAXC: tl.constexpr, INTERPRET: tl.constexpr, SPIN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """All traffic through peer addresses (one node, or every rank NVLink-reachable)."""
    _hier_body(x_ptr, y_ptr, n, shard, b0, b1, b2, b3, b4, b5, b6, b7, rd_tab, rs_off, ag_off,
               rd_off, stage_off, sig_off, slot, maxch, ctr_ptr, err_dev, err_host, limit_ns,
               rank, N, L, LOG2P, EXTRA, STEPS, PACK, BLOCK, LL, False, SIGSET, MAXC, INTERPRET,
               SPIN, PDL)


@triton.jit(do_not_specialize=["n", "shard", "maxch", "limit_ns", "rank"])
def hier_kernel_nvshmem(
    x_ptr, y_ptr, n, shard,
    b0, b1, b2, b3, b4, b5, b6, b7,
    rd_tab, rs_off, ag_off, rd_off, stage_off, sig_off, slot, maxch,
    ctr_ptr, err_dev, err_host, limit_ns, rank,
    N: tl.constexpr, L: tl.constexpr, LOG2P: tl.constexpr, EXTRA: tl.constexpr,
    STEPS: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, LL: tl.constexpr,
    SIGSET: tl.constexpr, MAXC: tl.constexpr, INTERPRET: tl.constexpr, SPIN: tl.constexpr,
):
    """Inter-node steps through NVSHMEM puts (must be wrapped by ``nvrar_shmem.with_nvshmem``)."""
    _hier_body(x_ptr, y_ptr, n, shard, b0, b1, b2, b3, b4, b5, b6, b7, rd_tab, rs_off, ag_off,
               rd_off, stage_off, sig_off, slot, maxch, ctr_ptr, err_dev, err_host, limit_ns,
               rank, N, L, LOG2P, EXTRA, STEPS, PACK, BLOCK, LL, True, SIGSET, MAXC, INTERPRET,
               SPIN, False)
