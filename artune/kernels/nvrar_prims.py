"""Device helpers shared by the NVRAR kernels (Triton).

Memory-model notes (PTX ISA, "Memory Consistency Model"):

- LL words are 8 bytes, 4 bytes of payload and 4 bytes of epoch flag, written with one aligned
  store each. An aligned 8-byte store is never torn, so a reader that sees the flag sees the
  payload; no fence and no separate signal is needed (the flag travels with the data).
- Signal protocol: data stores, ``bar.sync`` (``tl.debug_barrier``), ``fence.acq_rel.sys``, then
  the signal store; the reader polls with ``ld.acquire.sys`` and reads the data afterwards
  bypassing L1 (``.cg``).
- Every wait is bounded by ``limit_ns`` of ``%globaltimer``; a wait that runs out reports
  failure and the caller records (step, peer, CTA) in the error words and stops waiting.

Under ``TRITON_INTERPRET=1`` (CPU emulation of several ranks, tests/test_nvrar_cpu.py) inline PTX
is unavailable: ``INTERPRET`` swaps the clock for a spin count and the PTX loads/fences for plain
volatile loads.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = [
    "now_ns",
    "fence_sys",
    "ld_acquire",
    "wait_ll",
    "spin_ll",
    "spin_lamport4",
    "spin_lamport4_wide",
    "load_pair16",
    "store_pair16",
    "empty_lanes",
    "LANES_SENTINEL",
    "wait_signal",
    "call_state",
    "pdl_begin",
    "end_call",
    "record_error",
    "load_chunk",
    "store_chunk",
    "load_pair",
    "store_pair",
    "put_ll",
    "decode_ll",
    "ptr_as",
    "pick",
    "ERR_MARK",
]

#: Bit set in an error word that holds a timeout record (never 0 then).
ERR_MARK = tl.constexpr(1 << 62)
#: Emulated nanoseconds per spin of a wait loop under the interpreter.
_INTERP_SPIN_NS = tl.constexpr(1_000_000)


@triton.jit
def now_ns(INTERPRET: tl.constexpr):
    """%globaltimer in ns (int64 scalar); 0 under the interpreter."""
    if INTERPRET:
        return tl.full([], 0, tl.int64)
    else:
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )


@triton.jit
def fence_sys(INTERPRET: tl.constexpr):
    """``fence.acq_rel.sys``; returns an int64 zero to make later stores depend on it."""
    if INTERPRET:
        return tl.full([], 0, tl.int64)
    else:
        return tl.inline_asm_elementwise(
            "fence.acq_rel.sys;\n\tmov.u64 $0, 0;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )


@triton.jit
def ld_acquire(addr, INTERPRET: tl.constexpr):
    """``ld.acquire.sys`` of the int64 at address ``addr`` (an int64 scalar or tensor)."""
    if INTERPRET:
        return tl.load(addr.to(tl.pointer_type(tl.int64)), volatile=True)
    else:
        return tl.inline_asm_elementwise(
            "ld.acquire.sys.global.b64 $0, [$1];",
            "=l,l",
            [addr],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )


def _spin_ptx(tag: str, regs: str, arrived: str, pred: str, timer: str) -> str:
    """One thread's poll of one word, as inline PTX: $0 = the word at address $1 once
    ``arrived`` (PTX setting predicate ``pred``1 from $0) holds, or when %globaltimer (read into
    ``timer``) reaches the deadline $3 (then the stale word), or 0 at once where $4 == 0 (not a
    live word). Labels and registers are local to the braces."""
    return (
        "{\n" + regs
        + f"mov.u64 $0, 0;\nsetp.eq.s32 {pred}0, $4, 0;\n@{pred}0 bra {tag}_DONE;\n"
        + f"{tag}_POLL:\nld.volatile.global.u64 $0, [$1];\n" + arrived
        + f"@{pred}1 bra {tag}_DONE;\nmov.u64 {timer}, %globaltimer;\n"
        + f"setp.lt.s64 {pred}2, {timer}, $3;\n@{pred}2 bra {tag}_POLL;\n{tag}_DONE:\n}}"
    )


# LL words: arrived once the flag (high 32 bits) equals the epoch $2.
_SPIN_LL_PTX = tl.constexpr(_spin_ptx(
    "ARTUNE_LL",
    ".reg .pred %artp<3>;\n.reg .b64 %artt;\n.reg .b32 %artw<2>;\n",
    "mov.b64 {%artw0, %artw1}, $0;\nsetp.eq.u32 %artp1, %artw1, $2;\n",
    "%artp", "%artt"))

# 64-bit lane patterns as int64 values (Triton constants are signed), bitcast where used.
LANES_SENTINEL = tl.constexpr(0x8000800080008000 - (1 << 64))
_LANES_ONE = tl.constexpr(0x0001000100010001)


@triton.jit
def empty_lanes(w):
    """True where the uint64 lamport word ``w`` still has a sentinel lane (not fully written).
    Computed in int64 (wrapping), which the interpreter takes too."""
    s = tl.full(w.shape, LANES_SENTINEL, tl.int64)
    t = w.to(tl.int64, bitcast=True) ^ s
    return ((t - _LANES_ONE) & ~t & s) != 0


@triton.jit
def spin_ll(p, live, epoch, deadline):
    """Each thread polls its own LL words at ``p`` (uint64 pointers) where ``live`` until their
    flags equal ``epoch`` (uint32) or %globaltimer reaches ``deadline`` (int64 ns): no
    block-wide reduction per poll. Returns the words (0 where not live). GPU only (inline PTX;
    lamport words are polled by ``spin_lamport4``)."""
    zi = tl.zeros(p.shape, tl.int32)
    return tl.inline_asm_elementwise(
        _SPIN_LL_PTX,
        "=l,l,r,l,r",
        [p.to(tl.int64, bitcast=True), zi + epoch.to(tl.int32, bitcast=True),
         zi.to(tl.int64) + deadline, zi + live.to(tl.int32)],
        dtype=tl.uint64,
        is_pure=False,
        pack=1,
    )


def _spin4_ptx(wide: bool = False) -> str:
    """One thread's poll of four lamport words at once, as inline PTX: $0-$3 = the words at
    addresses $4-$7. Bit i of $8 marks word i live (a word not live is 0 and never loaded). Each
    round loads every live word that has not arrived (the loads are issued back to back, so one
    round costs one memory latency, not four), then drops the ones that arrived (no 16-bit lane
    is the sentinel 0x8000); done when none is left, or when %globaltimer reaches the deadline $9
    (the stale words are returned as last read). Labels and registers are local to the braces.

    ``wide``: four pairs of words, each pair one 16-byte load: $0-$7 = words (2i, 2i + 1) of
    pair i at the 16-byte aligned addresses $8-$11, live bits $12, deadline $13; a pair has
    arrived when neither word holds a sentinel lane."""
    out = 8 if wide else 4
    live, deadline = (f"${out + 4}", f"${out + 5}")
    tag = "ARTUNE_W4" if wide else "ARTUNE_L4"
    lines = ["{", ".reg .pred %arw<4>;", ".reg .pred %arq;", ".reg .b64 %arv<4>;",
             ".reg .b32 %arb;"]
    for i in range(out):
        lines.append(f"mov.u64 ${i}, 0;")
    for i in range(4):
        lines += [f"and.b32 %arb, {live}, {1 << i};", f"setp.ne.u32 %arw{i}, %arb, 0;"]
    lines.append(f"{tag}_POLL:")
    for i in range(4):
        if wide:
            lines.append(f"@%arw{i} ld.volatile.global.v2.u64 {{${2 * i}, ${2 * i + 1}}}, "
                         f"[${out + i}];")
        else:
            lines.append(f"@%arw{i} ld.volatile.global.u64 ${i}, [${out + i}];")
    for i in range(4):
        words = [2 * i, 2 * i + 1] if wide else [i]
        for k, w in enumerate(words):  # %arv1 (| %arv3): the sentinel lanes of the words
            acc = "%arv1" if k == 0 else "%arv3"
            lines += [f"xor.b64 %arv0, ${w}, 0x8000800080008000;",
                      f"sub.u64 {acc}, %arv0, 0x0001000100010001;",
                      "not.b64 %arv0, %arv0;", f"and.b64 {acc}, {acc}, %arv0;",
                      f"and.b64 {acc}, {acc}, 0x8000800080008000;"]
        if wide:
            lines.append("or.b64 %arv1, %arv1, %arv3;")
        lines += ["setp.eq.u64 %arq, %arv1, 0;", f"@%arq setp.ne.u32 %arw{i}, 0, 0;"]
    lines += ["or.pred %arq, %arw0, %arw1;", "or.pred %arq, %arq, %arw2;",
              "or.pred %arq, %arq, %arw3;", f"@!%arq bra {tag}_DONE;",
              "mov.u64 %arv2, %globaltimer;", f"setp.lt.s64 %arq, %arv2, {deadline};",
              f"@%arq bra {tag}_POLL;", f"{tag}_DONE:", "}"]
    return "\n".join(lines)


_SPIN_LAMPORT4_PTX = tl.constexpr(_spin4_ptx())
_SPIN_LAMPORT4_WIDE_PTX = tl.constexpr(_spin4_ptx(wide=True))


@triton.jit
def spin_lamport4(p0, p1, p2, p3, live_bits, deadline):
    """Each thread polls its four lamport words at ``p0``-``p3`` (uint64 pointers of one shape)
    together (``_spin4_ptx``): bit i of ``live_bits`` (int32) marks ``pi`` live. Returns the four
    words (0 where not live; a stale word as last read when ``deadline`` (int64 %globaltimer ns)
    passed first). GPU only (inline PTX)."""
    zi = tl.zeros(p0.shape, tl.int32)
    return tl.inline_asm_elementwise(
        _SPIN_LAMPORT4_PTX,
        "=l,=l,=l,=l,l,l,l,l,r,l",
        [p0.to(tl.int64, bitcast=True), p1.to(tl.int64, bitcast=True),
         p2.to(tl.int64, bitcast=True), p3.to(tl.int64, bitcast=True), zi + live_bits,
         zi.to(tl.int64) + deadline],
        dtype=(tl.uint64, tl.uint64, tl.uint64, tl.uint64),
        is_pure=False,
        pack=1,
    )


@triton.jit
def spin_lamport4_wide(p0, p1, p2, p3, live_bits, deadline):
    """``spin_lamport4`` over pairs of words: each thread polls the 16-byte pairs at ``p0``-``p3``
    (uint64 pointers to the first word of a pair, 16-byte aligned) with one 16-byte load each
    per round. Returns (lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3). GPU only (inline PTX)."""
    zi = tl.zeros(p0.shape, tl.int32)
    return tl.inline_asm_elementwise(
        _SPIN_LAMPORT4_WIDE_PTX,
        "=l,=l,=l,=l,=l,=l,=l,=l,l,l,l,l,r,l",
        [p0.to(tl.int64, bitcast=True), p1.to(tl.int64, bitcast=True),
         p2.to(tl.int64, bitcast=True), p3.to(tl.int64, bitcast=True), zi + live_bits,
         zi.to(tl.int64) + deadline],
        dtype=(tl.uint64,) * 8,
        is_pure=False,
        pack=1,
    )


@triton.jit
def load_pair16(p, mask, INTERPRET: tl.constexpr):
    """The two 8-byte words at ``p`` and ``p + 1`` (a uint64 pointer tensor, 16-byte aligned)
    as (lo, hi), one 16-byte load per element; 0 where ``mask`` is false. Each element is its
    own thread's on the GPU (inline PTX: Triton keeps a tensor of one word per thread in one
    layout, where its own vectorized loads would give a thread two elements)."""
    if INTERPRET:
        lo = tl.load(p, mask=mask, other=0)
        hi = tl.load(p + 1, mask=mask, other=0)
    else:
        zi = tl.zeros(p.shape, tl.int32)
        lo, hi = tl.inline_asm_elementwise(
            "{\n.reg .pred %arm;\nmov.u64 $0, 0;\nmov.u64 $1, 0;\nsetp.ne.u32 %arm, $3, 0;\n"
            "@%arm ld.global.v2.u64 {$0, $1}, [$2];\n}",
            "=l,=l,l,r",
            [p.to(tl.int64, bitcast=True), zi + mask.to(tl.int32)],
            dtype=(tl.uint64, tl.uint64),
            is_pure=False,
            pack=1,
        )
    return lo, hi


@triton.jit
def store_pair16(p, lo, hi, mask, INTERPRET: tl.constexpr):
    """``lo`` and ``hi`` (uint64) to ``p`` and ``p + 1`` (16-byte aligned) where ``mask``: one
    16-byte store per element (inline PTX on the GPU, as ``load_pair16``; ``p`` may be a
    peer's memory). Returns an int32 zero per element (the asm's only output)."""
    if INTERPRET:
        tl.store(p, lo, mask=mask)
        tl.store(p + 1, hi, mask=mask)
        done = tl.zeros(p.shape, tl.int32)
    else:
        zi = tl.zeros(p.shape, tl.int32)
        done = tl.inline_asm_elementwise(
            "{\n.reg .pred %arm;\nsetp.ne.u32 %arm, $4, 0;\n"
            "@%arm st.global.v2.u64 [$1], {$2, $3};\nmov.u32 $0, 0;\n}",
            "=r,l,l,l,r",
            [p.to(tl.int64, bitcast=True), lo, hi, zi + mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    return done


@triton.jit
def wait_ll(pa, pb, live, epoch, limit_ns, TWO: tl.constexpr, INTERPRET: tl.constexpr,
            SPIN: tl.constexpr = False, LAMPORT: tl.constexpr = False):
    """Poll the LL words at ``pa`` (and ``pb`` when TWO; uint64 pointers of one shape) where
    ``live`` until every flag equals ``epoch`` (uint32) or ``limit_ns`` passes.
    Returns (words at pa, words at pb or pa, number of words still stale).

    ``SPIN`` (GPU only): every thread polls its own words in a PTX loop (``spin_ll``) and the
    block counts stale words once at the end, instead of a block-wide reduction per poll.
    ``LAMPORT``: the words are lamport words (``empty_lanes``); ``epoch`` is unused (block
    rounds only: the lamport kernels poll per thread with ``spin_lamport4``)."""
    tl.static_assert(not (SPIN and LAMPORT), "lamport words poll per thread in spin_lamport4")
    if SPIN and not INTERPRET:
        va, vb, pending = _spin_wait(pa, pb, live, epoch, limit_ns, TWO)
    else:
        va, vb, pending = _poll_wait(pa, pb, live, epoch, limit_ns, TWO, INTERPRET, LAMPORT)
    return va, vb, pending


@triton.jit
def _stale(v, live, epoch, LAMPORT: tl.constexpr):
    if LAMPORT:
        ok = (empty_lanes(v) == 0) | (live == 0)
    else:
        ok = ((v >> 32).to(tl.uint32) == epoch) | (live == 0)
    return ok, tl.sum((ok == 0).to(tl.int32), axis=None)


@triton.jit
def _spin_wait(pa, pb, live, epoch, limit_ns, TWO: tl.constexpr):
    deadline = now_ns(False) + limit_ns
    va = spin_ll(pa, live, epoch, deadline)
    _, pending = _stale(va, live, epoch, False)
    if TWO:
        vb = spin_ll(pb, live, epoch, deadline)
        _, more = _stale(vb, live, epoch, False)
        pending += more
    else:
        vb = va
    return va, vb, pending


@triton.jit
def _poll_wait(pa, pb, live, epoch, limit_ns, TWO: tl.constexpr, INTERPRET: tl.constexpr,
               LAMPORT: tl.constexpr):
    """Block-wide polling: masked volatile loads of the stale words, a reduction per round."""
    va = tl.load(pa, mask=live, other=0, volatile=True)
    oka, pending = _stale(va, live, epoch, LAMPORT)
    if TWO:
        vb = tl.load(pb, mask=live, other=0, volatile=True)
        okb, more = _stale(vb, live, epoch, LAMPORT)
        pending += more
    else:
        vb = va
        okb = oka
    t0 = now_ns(INTERPRET)
    elapsed = t0 - t0
    while (pending > 0) & (elapsed < limit_ns):
        va = tl.where(oka, va, tl.load(pa, mask=oka == 0, other=0, volatile=True))
        oka, pending = _stale(va, live, epoch, LAMPORT)
        if TWO:
            vb = tl.where(okb, vb, tl.load(pb, mask=okb == 0, other=0, volatile=True))
            okb, more = _stale(vb, live, epoch, LAMPORT)
            pending += more
        else:
            vb = va
            okb = oka
        if INTERPRET:
            elapsed = elapsed + _INTERP_SPIN_NS
        else:
            elapsed = now_ns(INTERPRET) - t0
    return va, vb, pending


@triton.jit
def wait_signal(addr, expect, limit_ns, INTERPRET: tl.constexpr):
    """Wait until the int64 signal at ``addr`` equals ``expect`` (acquire), at most
    ``limit_ns``. Returns True when it did."""
    s = ld_acquire(addr, INTERPRET)
    t0 = now_ns(INTERPRET)
    elapsed = t0 - t0
    while (s != expect) & (elapsed < limit_ns):
        s = ld_acquire(addr, INTERPRET)
        if INTERPRET:
            elapsed = elapsed + _INTERP_SPIN_NS
        else:
            elapsed = now_ns(INTERPRET) - t0
    return s == expect


@triton.jit
def pdl_begin(PDL: tl.constexpr, INTERPRET: tl.constexpr, NEXT: tl.constexpr = True):
    """The first step of a kernel launched with programmatic dependent launch (``PDL``, sm_90+):
    wait until the grid before it in the stream has finished and its writes are visible
    (nothing before this touches memory: not the input, not the epoch counters the previous
    call left), then (``NEXT``) let the next grid launch; it waits here the same way. Only the
    launch overlaps, never the work. Without ``NEXT`` the next grid launches when this one
    ends, as without PDL. A no-op without ``PDL`` and under the interpreter."""
    if PDL:
        if not INTERPRET:
            gdc_wait()
            if NEXT:
                gdc_launch_dependents()


@triton.jit
def call_state(ctr_ptr, err_dev, limit_ns, pid):
    """This CTA's state for the current call: (epoch, wait limit, slot parity, LL flag word).
    The epoch is the CTA's counter + 1 (stored back at the end of the call); after an earlier
    timeout on this rank (error word set) every wait gives up at once."""
    epoch = tl.load(ctr_ptr + pid) + 1
    limit = tl.where(tl.load(err_dev) != 0, 0, limit_ns).to(tl.int64)
    par = (epoch & 1).to(tl.int64)
    flag = epoch.to(tl.uint32).to(tl.uint64) << 32
    return epoch, limit, par, flag


@triton.jit
def end_call(ctr_ptr, epoch, pid, G, MAXC: tl.constexpr):
    """Advance this CTA's share of the epoch counters (slots pid, pid + G, ... below MAXC) to
    ``epoch``, after every thread of the CTA read the old value: the last step of a call."""
    tl.debug_barrier()
    idx = pid + G * tl.arange(0, MAXC)
    tl.store(ctr_ptr + idx, tl.zeros([MAXC], tl.int32) + epoch, mask=idx < MAXC)


@triton.jit
def record_error(err_dev, err_host, step, peer, pid):
    """Write the timeout record (step, peer, CTA) to the device error word (which poisons later
    calls) and to the host-mapped one (read by the host without a sync)."""
    code = (
        ERR_MARK
        | (tl.cast(step, tl.int64) << 32)
        | (tl.cast(peer, tl.int64) << 16)
        | tl.cast(pid, tl.int64)
    )
    tl.store(err_dev, code)
    tl.store(err_host.to(tl.pointer_type(tl.int64)), code)


@triton.jit
def load_chunk(x_ptr, start, n, BLOCK: tl.constexpr):
    """Elements ``[start, start + BLOCK)`` of ``x`` (zeros past ``n``); unmasked when full."""
    e = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        v = tl.load(x_ptr + e)
    else:
        v = tl.load(x_ptr + e, mask=e < n, other=0)
    return v


@triton.jit
def store_chunk(y_ptr, start, n, v, BLOCK: tl.constexpr):
    """Store ``v`` to elements ``[start, start + BLOCK)`` of ``y`` that are below ``n``."""
    e = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        tl.store(y_ptr + e, v)
    else:
        tl.store(y_ptr + e, v, mask=e < n)


@triton.jit
def ptr_as(addr, DT: tl.constexpr):
    """A 16-byte aligned int64 address as a pointer to ``DT`` (the hint lets Triton vectorize)."""
    return tl.multiple_of(addr.to(tl.pointer_type(DT)), 16)


@triton.jit
def load_pair(x_ptr, start, n, H: tl.constexpr):
    """A chunk of 2H elements of ``x`` as its two halves (a, b), each [H] (zeros past ``n``).

    Chunks travel as halves so that packing two 16-bit elements into one LL word pairs element
    i with element i + H, which the same thread holds: no layout conversion in the kernels.
    """
    return load_chunk(x_ptr, start, n, H), load_chunk(x_ptr, start + H, n, H)


@triton.jit
def store_pair(y_ptr, start, n, a, b, H: tl.constexpr):
    """Inverse of ``load_pair``: elements below ``n`` only."""
    store_chunk(y_ptr, start, n, a, H)
    store_chunk(y_ptr, start + H, n, b, H)


@triton.jit
def put_ll(a, b, dst, flag, PACK: tl.constexpr, H: tl.constexpr):
    """Store the halves (a, b) as LL words at ``dst`` (uint64 pointer to the chunk's first word):
    H words a|b<<16 for 16-bit dtypes (PACK=2), else 2H words (a's, then b's)."""
    if PACK == 2:
        w = a.to(tl.uint16, bitcast=True).to(tl.uint32) | (
            b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        )
        tl.store(dst + tl.arange(0, H), w.to(tl.uint64) | flag)
    else:
        tl.store(dst + tl.arange(0, H), a.to(tl.uint32, bitcast=True).to(tl.uint64) | flag)
        tl.store(dst + H + tl.arange(0, H), b.to(tl.uint32, bitcast=True).to(tl.uint64) | flag)


@triton.jit
def decode_ll(wa, wb, DT: tl.constexpr, PACK: tl.constexpr):
    """LL words from ``wait_ll`` back to the halves (a, b) in dtype ``DT``."""
    if PACK == 2:
        a = (wa & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        b = ((wa >> 16) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
    else:
        a = (wa & 0xFFFFFFFF).to(tl.uint32).to(DT, bitcast=True)
        b = (wb & 0xFFFFFFFF).to(tl.uint32).to(DT, bitcast=True)
    return a, b


@triton.jit
def pick(i, b0, b1, b2, b3, b4, b5, b6, b7):
    """``(b0, ..., b7)[i]`` for a runtime ``i`` (scalar selects, keeps divisibility hints)."""
    r = tl.where(i == 0, b0, b1)
    r = tl.where(i == 2, b2, r)
    r = tl.where(i == 3, b3, r)
    r = tl.where(i == 4, b4, r)
    r = tl.where(i == 5, b5, r)
    r = tl.where(i == 6, b6, r)
    r = tl.where(i == 7, b7, r)
    return r
