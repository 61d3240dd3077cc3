"""NVRAR's symmetric-buffer layout and launch geometry (pure Python, no CUDA).

One symmetric byte buffer per rank holds every receive slot; the kernels address a peer's slot
as ``peer_base + region offset + slot index * slot bytes`` (peer bases from ``nvshmem_ptr``).

Regions (``ll`` = LL words: 8 bytes per 4 payload bytes; ``sig`` = raw payload):

==============  =============================  ==================================================
region          shape                          written by
==============  =============================  ==================================================
``oneshot``     [parity][W src] LL slots       every rank, one-shot push (``nvrar_oneshot``)
``lamport``     [parity][W src] 16-bit slots   every rank, one-shot push (``nvrar_lamport``;
                                               2 parities, 3 with ``lamport_parities=3``);
                                               the sentinel 0x8000 where empty (``init_buffer``);
                                               two-shot lamport: reduce-scatter chunks in the
                                               first half of a slot, all-gather in the second
``rs_ll/sig``   [L src] shard slots            node peers, reduce-scatter push
``ag_ll/sig``   [L src] shard slots            node peers, all-gather push
``rd_ll/sig``   [parity][step] shard slots     the inter-node partner of each step
``stage``       [parity][step] shard slots     this rank (source of NVSHMEM puts)
``signals``     int64 [parity][phase][L][chunk] signal protocol flags (phase 0 RS, 1 AG, 2+ RD)
==============  =============================  ==================================================

Why parity where it is: a one-shot or recursive-doubling writer can run one call ahead of a
reader (it needs nothing back from that reader first); two calls ahead it cannot (it needs the
reader's data of the call in between). RS/AG slots need none: a node peer only writes them in
call k+1 after it received this rank's all-gather (resp. reduce-scatter) data of a later phase.
Flags and signals hold the call's epoch; the epoch counter lives in device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BLOCKS",
    "BLOCK_MAX",
    "LAMPORT_BLOCK_MAX",
    "STEP_ONESHOT",
    "STEP_RS",
    "STEP_AG",
    "STEP_NORM",
    "Nodes",
    "Layout",
    "step_name",
    "cdiv",
    "round_up",
]

#: Chunk sizes (elements per CTA chunk) the kernels are built for.
BLOCKS = (256, 512, 1024, 2048, 4096, 8192)
BLOCK_MAX = max(BLOCKS)
#: The largest chunk of a lamport plan: one thread per 8-byte word, at most 1024 threads. With
#: more words than threads Triton 3.6 puts a thread's words in two layouts and runs the poll in
#: both, so a word could be cleared by one thread while another still polls it (an offline sm_90
#: build at 8192 showed it; every block up to 4096 compiles to one layout).
LAMPORT_BLOCK_MAX = 4096
#: Counter slots per rank (>= the largest grid); all equal between calls.
MAX_CTAS = 256
#: Shard boundaries are multiples of this many elements (16-byte aligned for every dtype).
SHARD_ALIGN = 16
_ALIGN = 256  # region alignment, bytes

# Error step codes written by the kernels (``record_error``).
STEP_ONESHOT = 0
STEP_RS = 1
STEP_AG = 2
STEP_RD0 = 3  # + RD step index (fold-in and fold-out come after the doubling steps)
STEP_NORM = 0x7FFF  # a fused add + RMSNorm's exchange between the CTAs of a row (one rank)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


@dataclass(frozen=True)
class Nodes:
    """The (possibly virtual) node grouping: ``nodes`` × ``local`` ranks, rank = node*local+l.

    Recursive doubling runs over the largest power of two ``p2`` <= nodes; the ``extra`` nodes
    beyond it fold into node ``g - p2`` before the doubling and get the result after it
    (MPICH's scheme for non-power-of-two counts).
    """

    nodes: int
    local: int

    @property
    def world(self) -> int:
        return self.nodes * self.local

    @property
    def log2p(self) -> int:
        return self.nodes.bit_length() - 1

    @property
    def p2(self) -> int:
        return 1 << self.log2p

    @property
    def extra(self) -> int:
        return self.nodes - self.p2

    @property
    def steps(self) -> int:
        """Inter-node receive steps: the doubling steps, then fold-in and fold-out if needed."""
        if self.nodes == 1:
            return 0
        return self.log2p + (2 if self.extra else 0)

    @property
    def step_fold_in(self) -> int:
        return self.log2p

    @property
    def step_fold_out(self) -> int:
        return self.log2p + 1

    def partners(self, rank: int) -> list[tuple[str, int]]:
        """The inter-node exchanges of ``rank`` in order: (what, peer rank). For docs/tests."""
        g, lr = divmod(rank, self.local)
        out: list[tuple[str, int]] = []
        if self.nodes == 1:
            return out
        if g >= self.p2:
            return [("fold-in send", (g - self.p2) * self.local + lr),
                    ("fold-out recv", (g - self.p2) * self.local + lr)]
        if g < self.extra:
            out.append(("fold-in recv", (g + self.p2) * self.local + lr))
        for k in range(self.log2p):
            out.append((f"step {k}", (g ^ (1 << k)) * self.local + lr))
        if g < self.extra:
            out.append(("fold-out send", (g + self.p2) * self.local + lr))
        return out


def step_name(step: int, nodes: Nodes) -> str:
    """Human name of an error step code."""
    if step == STEP_ONESHOT:
        return "one-shot exchange"
    if step == STEP_RS:
        return "intra-node reduce-scatter"
    if step == STEP_AG:
        return "intra-node all-gather"
    if step == STEP_NORM:
        return "fused add + RMSNorm's exchange of partial sums between this rank's CTAs"
    s = step - STEP_RD0
    if nodes.extra and s == nodes.step_fold_in:
        return "inter-node fold-in (non-power-of-two nodes)"
    if nodes.extra and s == nodes.step_fold_out:
        return "inter-node fold-out (non-power-of-two nodes)"
    return f"inter-node recursive-doubling step {s}"


def _shard_bytes(message_bytes: int, local: int) -> int:
    """Payload bytes of one shard slot for messages up to ``message_bytes`` (with the padding
    of a shard rounded to SHARD_ALIGN and its last chunk rounded to BLOCK_MAX, fp32 worst)."""
    return round_up(cdiv(message_bytes, local) + 4 * (SHARD_ALIGN + BLOCK_MAX), _ALIGN)


@dataclass(frozen=True)
class Layout:
    """Byte offsets and sizes of every region of one rank's symmetric buffer."""

    nodes: Nodes
    max_bytes: int  # largest message (any algorithm)
    oneshot_bytes: int  # largest one-shot message (0: no one-shot region)
    ll_bytes: int  # largest two-shot/hierarchical LL message
    #: lamport slot parities: 2, or 3 where each lamport call empties the previous one's slots
    #: (ARTUNE_NVRAR_CLEAR_AHEAD; ``nvrar_lamport._ahead``)
    lamport_parities: int = 2

    def __post_init__(self) -> None:
        if self.lamport_parities not in (2, 3):
            raise ValueError(f"Layout: lamport_parities={self.lamport_parities} (2 or 3)")

    # ---- slot sizes (bytes) ----
    @property
    def oneshot_slot(self) -> int:
        """One [parity][src] LL slot: 8 bytes per 4 payload bytes, plus one chunk of padding."""
        return round_up(2 * self.oneshot_bytes + 8 * BLOCK_MAX, _ALIGN) if self.oneshot_bytes else 0

    @property
    def lamport_slot(self) -> int:
        """One [parity][src] lamport slot: 2 bytes per 16-bit element, plus one chunk."""
        return round_up(self.oneshot_bytes + 2 * BLOCK_MAX, _ALIGN) if self.oneshot_bytes else 0

    @property
    def lamport_ag(self) -> int:
        """Byte offset of the all-gather half of a lamport slot (two-shot lamport: the first half
        receives reduce-scatter chunks, the second all-gather chunks)."""
        return (self.lamport_slot // 2) // _ALIGN * _ALIGN

    def lamport2_fits(self, nbytes: int) -> bool:
        """Whether a two-shot lamport message of ``nbytes`` (16-bit elements) fits the slot
        halves whatever the block: a shard is cdiv(elements, W) rounded up to a chunk."""
        shard = round_up(cdiv(nbytes // 2, self.nodes.world), BLOCK_MAX)
        return self.nodes.nodes == 1 and 2 * shard <= self.lamport_ag

    @property
    def ll_slot(self) -> int:
        return 2 * _shard_bytes(self.ll_bytes, self.nodes.local)

    @property
    def sig_slot(self) -> int:
        return _shard_bytes(self.max_bytes, self.nodes.local)

    @property
    def max_chunks(self) -> int:
        """Signal slots per shard: enough for the smallest block of the smallest dtype."""
        return cdiv(self.sig_slot, 2 * min(BLOCKS))

    @property
    def phases(self) -> int:
        return 2 + self.nodes.steps

    # ---- region offsets (bytes) ----
    def _sizes(self) -> list[tuple[str, int]]:
        n, steps = self.nodes, self.nodes.steps
        stage = 2 * steps * max(self.ll_slot, self.sig_slot) if n.nodes > 1 else 0
        local = n.local if n.local > 1 else 0
        return [
            ("oneshot", 2 * n.world * self.oneshot_slot if n.nodes == 1 else 0),
            ("lamport", self.lamport_parities * n.world * self.lamport_slot
             if n.nodes == 1 else 0),
            ("rs_ll", local * self.ll_slot),
            ("ag_ll", local * self.ll_slot),
            ("rd_ll", 2 * steps * self.ll_slot),
            ("rs_sig", local * self.sig_slot),
            ("ag_sig", local * self.sig_slot),
            ("rd_sig", 2 * steps * self.sig_slot),
            ("stage", stage),
            ("signals", 2 * self.phases * n.local * self.max_chunks * 8),
        ]

    def offsets(self) -> dict[str, int]:
        out, at = {}, 0
        for name, size in self._sizes():
            out[name] = at
            at += round_up(size, _ALIGN)
        out["total"] = at
        return out

    @property
    def total_bytes(self) -> int:
        return self.offsets()["total"]

    def region(self, name: str) -> tuple[int, int]:
        """(byte offset, bytes) of region ``name``."""
        return self.offsets()[name], dict(self._sizes())[name]

    def check_message(self, nbytes: int, algo: str, proto: str) -> str | None:
        """Why a message of ``nbytes`` does not fit ``algo``/``proto`` here, or None."""
        if nbytes > self.max_bytes:
            return f"{nbytes} B exceeds the buffers' capacity of {self.max_bytes} B"
        if proto == "lamport" and algo != "oneshot":
            if self.nodes.nodes > 1:
                return "a two-shot with proto='lamport' runs on one node only"
            if nbytes > self.ll_bytes:  # fp32 takes it as LL
                return f"{nbytes} B exceeds the LL capacity of {self.ll_bytes} B"
            if not self.lamport2_fits(nbytes):
                return (f"{nbytes} B exceeds the two-shot lamport capacity (twice the one-shot "
                        f"capacity of {self.oneshot_bytes} B times {self.nodes.world} ranks, "
                        f"halved, less a chunk per shard)")
            return None
        if algo == "oneshot":
            if self.nodes.nodes > 1:
                return "one-shot runs on one node only (ranks_per_node < world size)"
            if nbytes > self.oneshot_bytes:
                return f"{nbytes} B exceeds the one-shot capacity of {self.oneshot_bytes} B"
        elif proto == "ll" and nbytes > self.ll_bytes:
            return f"{nbytes} B exceeds the LL capacity of {self.ll_bytes} B"
        return None
