"""Hypothesis strategies for what a hostile guest can send to the devices.

Public and stable: tests of other device models (and users fuzzing their
own) import these.  Each strategy says which attack classes of the fuzzing
checklist it can produce (the numbers in ``docs/fuzzing.md``).

Accesses
    ``access_sizes``, ``port_accesses``, ``mmio_accesses``,
    ``virtio_register_values``, ``uart_values``, ``uart_programs``,
    ``i8042_accesses``.
Split virtqueues
    ``queue_sizes``, ``ring_layouts`` (valid, unaligned, outside RAM, in the
    MMIO hole, overlapping, straddling the end of a region),
    ``descriptor_chains`` (valid, almost valid, hostile), ``avail_indices``.
Device requests
    ``blk_requests`` (headers split anywhere, bad sectors, lengths, types,
    DISCARD/WRITE_ZEROES segments), ``net_frames`` (virtio-net header plus
    frame, with hostile csum/gso fields and sizes).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

from hypothesis import strategies as st

from vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

# ---- accesses (checklist 1, 2, 21, 25) ----------------------------------------------------

#: The widths a bus hands a device, plus widths no CPU produces (0, 3, 16) that must still be safe.
VALID_SIZES = (1, 2, 4, 8)
ODD_SIZES = (0, 3, 5, 16)


@functools.cache
def access_sizes(*, odd: bool = True) -> st.SearchStrategy[int]:
    """Access widths: mostly 1/2/4/8; with ``odd``, sometimes a width no bus produces."""
    valid = st.sampled_from(VALID_SIZES)
    return st.one_of(valid, valid, valid, st.sampled_from(ODD_SIZES)) if odd else valid


@functools.cache
def interesting_ints(bits: int) -> st.SearchStrategy[int]:
    """Values at the edges of a ``bits``-wide field: 0, 1, all ones, powers of two and their neighbours."""
    top = (1 << bits) - 1
    edges = sorted({0, 1, 2, top, top - 1, top >> 1, (top >> 1) + 1} | {1 << i for i in range(bits)})
    return st.one_of(st.sampled_from(edges), st.integers(0, top))


@dataclass(frozen=True)
class Access:
    """One guest access: ``kind`` is "r" or "w"; ``value`` is ignored for reads."""

    kind: str
    offset: int
    size: int
    value: int = 0


@functools.cache
def port_accesses(span: int, *, beyond: int = 8, odd_sizes: bool = True) -> st.SearchStrategy[Access]:
    """Reads and writes at offsets 0..span-1 (and up to ``beyond`` past the end), any width."""
    offsets = st.one_of(st.integers(0, span - 1), st.integers(0, span - 1), st.integers(0, span + beyond - 1))
    return st.builds(
        Access,
        kind=st.sampled_from("rw"),
        offset=offsets,
        size=access_sizes(odd=odd_sizes),
        value=interesting_ints(64),
    )


#: virtio-mmio register offsets (§4.2.2), including the reserved and write-only ones.
VIRTIO_MMIO_REGISTERS = (
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC, 0x0B0, 0x0B4, 0x0B8,
    0x0BC, 0x0C0, 0x0FC,
)  # fmt: skip


@functools.cache
def virtio_register_values() -> st.SearchStrategy[int]:
    """32-bit values that matter to some register: status bit sets, queue indices, sizes, addresses."""
    status_bits = st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), max_size=8).map(sum)
    return st.one_of(status_bits, st.integers(0, 4), interesting_ints(32))


@functools.cache
def mmio_accesses(window: int = 0x200, *, config_size: int = 0x40) -> st.SearchStrategy[Access]:
    """virtio-mmio accesses: defined registers at any width and alignment, undefined offsets, config space."""
    offsets = st.one_of(
        st.sampled_from(VIRTIO_MMIO_REGISTERS),
        st.sampled_from(VIRTIO_MMIO_REGISTERS).flatmap(lambda r: st.integers(r, r + 3)),  # unaligned
        st.integers(0x100, 0x100 + config_size + 8),  # config space and just past it
        st.integers(0, window - 1),
    )
    values = st.one_of(virtio_register_values(), interesting_ints(64))
    return st.builds(Access, kind=st.sampled_from("rw"), offset=offsets, size=access_sizes(), value=values)


# ---- UART (checklist 19-21) ------------------------------------------------------------------


@functools.cache
def uart_values() -> st.SearchStrategy[int]:
    """Byte values with the register bits that matter: DLAB, FIFO enable/reset/trigger, LOOP, OUT2, IER bits."""
    return st.one_of(
        st.integers(0, 255),
        st.sampled_from(
            [0x00, 0x01, 0x03, 0x07, 0x0F, 0x80, 0x83, 0xC7, 0x47, 0x87, 0x08, 0x0B, 0x10, 0x18, 0x1F, 0xFF]
        ),
    )


@dataclass(frozen=True)
class HostEvent:
    """Something the host does to the UART: ``feed``, ``queue``, ``modem`` or ``reset``."""

    kind: str
    data: bytes = b""
    modem: tuple[bool, bool, bool, bool] = (True, True, False, True)


def _uart_reg_write(reg: int, value: int) -> Access:
    return Access("w", reg, 1, value)


@st.composite
def uart_programs(draw: st.DrawFn, max_ops: int = 24) -> list[Access | HostEvent]:
    """UART programs: random register traffic mixed with the classic hostile patterns.

    Patterns: a zero divisor (DLL=DLM=0), DLAB flipped in the middle of a
    stream, a TX flood, host input larger than the FIFO, loopback with a full
    FIFO, FIFO resets and every trigger level, IIR/LSR/MSR read-to-clear.
    """
    ops: list[Access | HostEvent] = []
    pattern = draw(st.sampled_from(["random", "divisor", "dlab-flip", "tx-flood", "rx-flood", "loopback", "fcr"]))
    if pattern == "divisor":
        ops += [_uart_reg_write(3, 0x80), _uart_reg_write(0, 0), _uart_reg_write(1, 0), _uart_reg_write(3, 0x03)]
    elif pattern == "dlab-flip":
        text = draw(st.binary(min_size=1, max_size=8))
        ops += [_uart_reg_write(0, b) for b in text[: len(text) // 2]]
        ops += [_uart_reg_write(3, 0x83), _uart_reg_write(0, draw(uart_values()))]
        ops += [_uart_reg_write(0, b) for b in text[len(text) // 2 :]]
        ops += [_uart_reg_write(3, 0x03)]
    elif pattern == "tx-flood":
        ops += [Access("w", 0, draw(st.sampled_from([1, 2, 4, 8])), draw(interesting_ints(64))) for _ in range(8)]
    elif pattern == "rx-flood":
        ops += [_uart_reg_write(2, draw(st.sampled_from([0x01, 0xC7, 0x41, 0x81]))), _uart_reg_write(1, 0x05)]
        ops += [HostEvent(draw(st.sampled_from(["feed", "queue"])), draw(st.binary(min_size=17, max_size=80)))]
    elif pattern == "loopback":
        ops += [_uart_reg_write(2, 0x07), _uart_reg_write(4, draw(st.sampled_from([0x10, 0x1F, 0x18])))]
        ops += [_uart_reg_write(0, i) for i in range(draw(st.integers(15, 20)))]
    elif pattern == "fcr":
        ops += [_uart_reg_write(2, v) for v in draw(st.lists(uart_values(), min_size=1, max_size=4))]
    ops += draw(st.lists(_uart_ops(), max_size=max_ops))
    return ops


@functools.cache
def _uart_ops() -> st.SearchStrategy[Access | HostEvent]:
    return st.one_of(
        st.builds(Access, kind=st.sampled_from("rw"), offset=st.integers(0, 7), size=st.just(1), value=uart_values()),
        port_accesses(8),
        st.builds(HostEvent, kind=st.sampled_from(["feed", "queue"]), data=st.binary(max_size=24)),
        st.builds(HostEvent, kind=st.just("modem"), modem=st.tuples(*[st.booleans()] * 4)),
    )


# ---- i8042 (checklist 22) ---------------------------------------------------------------------


@functools.cache
def i8042_accesses() -> st.SearchStrategy[tuple[str, Access]]:
    """(port, access) on the controller's data or command port: reset commands, unknown ones, wide I/O."""
    values = st.one_of(st.sampled_from([0xFE, 0xF0, 0xFF, 0xFC, 0xAA, 0xAD, 0xD1, 0x20, 0x60]), interesting_ints(32))
    return st.tuples(
        st.sampled_from(["data", "command"]),
        st.builds(Access, kind=st.sampled_from("rw"), offset=st.integers(0, 3), size=access_sizes(), value=values),
    )


# ---- split virtqueues (checklist 5, 6, 8-15) ----------------------------------------------------------


@functools.cache
def queue_sizes(max_size: int) -> st.SearchStrategy[int]:
    """QueueNum values: valid powers of two up to ``max_size`` and the invalid ones (0, odd, too big, u32 edges)."""
    valid = [1 << i for i in range(max_size.bit_length()) if 1 << i <= max_size]
    invalid = [0, 3, max_size + 1, max_size * 2, 32768, 32769, 65535, 65536, U32]
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(invalid))


@dataclass(frozen=True)
class RingLayout:
    """Where a queue's three areas are, and which hostile placement produced it ("valid" if none)."""

    size: int
    desc: int
    avail: int
    used: int
    placement: str = "valid"


#: Hostile placements ``ring_layouts`` can produce.
PLACEMENTS = ("valid", "unaligned", "outside-ram", "mmio-hole", "overlapping", "straddling", "zero", "u64-edge")


@st.composite
def ring_layouts(
    draw: st.DrawFn,
    size: int,
    area: tuple[int, int],
    *,
    ram_end: int,
    hole: tuple[int, int] | None = None,
    hostile: bool = True,
) -> RingLayout:
    """Ring placements for a queue of ``size`` inside guest-physical ``area`` = (start, end).

    A valid layout keeps the three areas aligned (16/2/4), inside ``area``
    and apart.  Hostile ones move one area: unaligned, past ``ram_end``, into
    the MMIO ``hole``, overlapping another area, straddling the end of RAM, to
    address 0, or to the top of the 64-bit space.
    """
    start, end = area
    d_len, a_len, u_len = desc_table_size(size), avail_ring_size(size), used_ring_size(size)
    total = d_len + a_len + u_len + 64
    base = draw(st.integers(start, max(start, end - total))) & ~0xF
    desc = base
    avail = (desc + d_len + draw(st.integers(0, 16)) + 1) & ~1
    used = (avail + a_len + draw(st.integers(0, 16)) + 3) & ~3
    placement = draw(st.sampled_from(PLACEMENTS)) if hostile else "valid"
    which = draw(st.sampled_from(["desc", "avail", "used"]))
    addrs = {"desc": desc, "avail": avail, "used": used}
    lens = {"desc": d_len, "avail": a_len, "used": u_len}
    if placement == "unaligned":
        addrs[which] += {"desc": draw(st.integers(1, 15)), "avail": 1, "used": draw(st.integers(1, 3))}[which]
    elif placement == "outside-ram":
        addrs[which] = ram_end + draw(st.integers(0, 1 << 20)) * 16
    elif placement == "mmio-hole" and hole is not None:
        addrs[which] = draw(st.integers(hole[0], hole[1] - 16)) & ~0xF
    elif placement == "overlapping":
        other = draw(st.sampled_from([k for k in addrs if k != which]))
        addrs[which] = addrs[other]
    elif placement == "straddling":
        addrs[which] = (ram_end - lens[which] // 2) & ~0xF
    elif placement == "zero":
        addrs[which] = 0
    elif placement == "u64-edge":
        addrs[which] = (U64 - draw(st.integers(0, 64))) & ~0xF
    else:
        placement = "valid"
    return RingLayout(size, addrs["desc"], addrs["avail"], addrs["used"], placement)


@dataclass(frozen=True)
class Desc:
    """One descriptor as the driver writes it (any field may be hostile)."""

    addr: int
    length: int
    flags: int
    next: int


@dataclass
class ChainPlan:
    """Descriptors to write: ``table`` maps index -> Desc in the ring's table; ``indirect`` maps a
    guest address -> list of Desc for indirect tables; ``data`` maps a guest address -> bytes the
    driver puts in a buffer; ``head`` is what goes in the available ring."""

    head: int
    table: dict[int, Desc] = field(default_factory=dict)
    indirect: dict[int, list[Desc]] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    kind: str = "valid"


#: How ``descriptor_chains`` bends a valid chain (checklist 8, 9, 11-14).
CHAIN_FAULTS = (
    "self-loop",
    "loop",
    "next-out-of-range",
    "too-long",
    "zero-length",
    "huge-length",
    "addr-overflow",
    "addr-outside-ram",
    "write-then-read",
    "unknown-flags",
    "indirect-next",
    "indirect-nested",
    "indirect-bad-length",
    "indirect-huge",
    "indirect-inner-next",
    "indirect-loop",
    "direct-then-indirect",
    "at-ring",
)
#: The faults that need an indirect table (drawn half the time when one is available).
INDIRECT_FAULTS = tuple(f for f in CHAIN_FAULTS if f.startswith(("indirect", "direct-then")))


@st.composite
def descriptor_chains(
    draw: st.DrawFn,
    *,
    size: int,
    free: list[int],
    buffers: tuple[int, int],
    ram_end: int,
    ring_addr: int = 0,
    readable: st.SearchStrategy[list[int]] | None = None,
    writable: st.SearchStrategy[list[int]] | None = None,
    indirect_table: int | None = None,
    mode: str | None = None,
) -> ChainPlan:
    """A chain over free descriptor indices ``free``, buffers inside ``buffers`` = (start, end).

    ``mode`` is "valid", "almost" (one fault from ``CHAIN_FAULTS``) or
    "hostile" (every field drawn at random); None draws one.  A valid chain
    has its readable buffers (``readable`` lengths) before its writable ones
    and may go through an indirect table at ``indirect_table``.
    """
    mode = mode or draw(st.sampled_from(["valid", "valid", "almost", "almost", "hostile"]))
    lo, hi = buffers
    if mode == "hostile":
        n = draw(st.integers(1, min(4, size)))
        idxs = [draw(st.integers(0, size - 1)) for _ in range(n)]
        table = {
            i: Desc(
                draw(st.one_of(st.integers(lo, hi - 1), interesting_ints(64))),
                draw(st.one_of(st.integers(0, 4096), interesting_ints(32))),
                draw(st.one_of(st.integers(0, 7), interesting_ints(16))),
                draw(st.one_of(st.integers(0, size), interesting_ints(16))),
            )
            for i in idxs
        }
        return ChainPlan(head=draw(st.one_of(st.sampled_from(idxs), interesting_ints(16))), table=table, kind="hostile")

    r_lens = draw(readable if readable is not None else st.lists(st.integers(0, 64), max_size=3))
    w_lens = draw(writable if writable is not None else st.lists(st.integers(0, 64), min_size=1, max_size=3))
    lens = [(n, False) for n in r_lens] + [(n, True) for n in w_lens]
    if not lens:
        lens = [(1, True)]
    bufs = []
    for n, w in lens:
        a = draw(st.integers(lo, max(lo, hi - max(n, 1))))
        bufs.append(Desc(a, n, VIRTQ_DESC_F_WRITE if w else 0, 0))
    fault = None
    if mode == "almost":
        indirect_ok = indirect_table is not None and draw(st.booleans())
        fault = draw(st.sampled_from(INDIRECT_FAULTS if indirect_ok else CHAIN_FAULTS))
    use_indirect = indirect_table is not None and (
        fault
        in (
            "indirect-next",
            "indirect-nested",
            "indirect-bad-length",
            "indirect-huge",
            "indirect-inner-next",
            "indirect-loop",
        )
        or (fault is None and draw(st.booleans()))
    )
    if fault == "too-long" and not use_indirect:
        bufs = (bufs * (size + 1))[: size + 1]
    if fault == "zero-length":
        i = draw(st.integers(0, len(bufs) - 1))
        bufs[i] = Desc(bufs[i].addr, 0, bufs[i].flags, 0)
    elif fault == "huge-length":
        i = draw(st.integers(0, len(bufs) - 1))
        bufs[i] = Desc(bufs[i].addr, draw(st.sampled_from([U32, 1 << 31, ram_end])), bufs[i].flags, 0)
    elif fault == "addr-overflow":
        i = draw(st.integers(0, len(bufs) - 1))
        bufs[i] = Desc(U64 - draw(st.integers(0, 15)), max(bufs[i].length, 32), bufs[i].flags, 0)
    elif fault == "addr-outside-ram":
        i = draw(st.integers(0, len(bufs) - 1))
        bufs[i] = Desc(ram_end - draw(st.integers(0, 8)), max(bufs[i].length, 16), bufs[i].flags, 0)
    elif fault == "write-then-read" and len(bufs) >= 1:
        bufs = [Desc(b.addr, b.length, VIRTQ_DESC_F_WRITE, 0) for b in bufs[:1]] + [Desc(bufs[-1].addr, 4, 0, 0)]
    elif fault == "unknown-flags":
        i = draw(st.integers(0, len(bufs) - 1))
        bufs[i] = Desc(
            bufs[i].addr, bufs[i].length, bufs[i].flags | draw(st.sampled_from([0x8, 0x10, 0x80, 0x8000])), 0
        )
    elif fault == "at-ring":
        i = draw(st.integers(0, len(bufs) - 1))
        bufs[i] = Desc(ring_addr, max(bufs[i].length, 16), bufs[i].flags, 0)

    def link(descs: list[Desc], positions: list[int]) -> list[Desc]:
        out = []
        for k, d in enumerate(descs):
            last = k == len(descs) - 1
            out.append(
                Desc(
                    d.addr,
                    d.length,
                    (d.flags & ~VIRTQ_DESC_F_NEXT) | (0 if last else VIRTQ_DESC_F_NEXT),
                    0 if last else positions[k + 1],
                )
            )
        return out

    plan = ChainPlan(head=0, kind=f"almost:{fault}" if fault else "valid")
    if use_indirect:
        assert indirect_table is not None
        if not free:
            return ChainPlan(head=draw(st.integers(0, size - 1)), kind="no-free-descriptor")
        inner = link(bufs, list(range(len(bufs))))
        if fault == "indirect-inner-next":
            inner[-1] = Desc(
                inner[-1].addr,
                inner[-1].length,
                inner[-1].flags | VIRTQ_DESC_F_NEXT,
                len(inner) + draw(st.integers(0, 4)),
            )
        elif fault == "indirect-loop":
            inner[-1] = Desc(inner[-1].addr, inner[-1].length, inner[-1].flags | VIRTQ_DESC_F_NEXT, 0)
        elif fault == "indirect-nested":
            inner[0] = Desc(indirect_table, VIRTQ_DESC_SIZE * len(inner), VIRTQ_DESC_F_INDIRECT, 0)
        length = VIRTQ_DESC_SIZE * len(inner)
        flags = VIRTQ_DESC_F_INDIRECT
        if fault == "indirect-bad-length":
            length = draw(st.sampled_from([0, length - 1, length + 8, 17]))
        elif fault == "indirect-huge":
            length = draw(st.sampled_from([U32 & ~0xF, 1 << 30, VIRTQ_DESC_SIZE * (size + 1)]))
        elif fault == "indirect-next":
            flags |= VIRTQ_DESC_F_NEXT
        plan.indirect[indirect_table] = inner
        head = free[0]
        plan.table[head] = Desc(
            indirect_table, length, flags, free[1] if flags & VIRTQ_DESC_F_NEXT and len(free) > 1 else 0
        )
        if fault == "indirect-next" and len(free) > 1:
            plan.table[free[1]] = Desc(bufs[0].addr, 1, VIRTQ_DESC_F_WRITE, 0)
        plan.head = head
        return plan
    if fault == "direct-then-indirect" and indirect_table is not None and len(free) >= 2:
        # A normal descriptor, then one that points to an indirect table (valid, §2.7.5.3).
        first = bufs[0] if not bufs[0].flags & VIRTQ_DESC_F_WRITE else Desc(bufs[0].addr, 0, 0, 0)
        rest = link(bufs[1:] or [Desc(bufs[0].addr, 1, VIRTQ_DESC_F_WRITE, 0)], list(range(max(len(bufs) - 1, 1))))
        plan.table[free[0]] = Desc(first.addr, first.length, VIRTQ_DESC_F_NEXT, free[1])
        plan.table[free[1]] = Desc(indirect_table, VIRTQ_DESC_SIZE * len(rest), VIRTQ_DESC_F_INDIRECT, 0)
        plan.indirect[indirect_table] = rest
        plan.head = free[0]
        return plan
    if len(bufs) > len(free):
        # Not enough free descriptors: reuse indices (the device sees whatever the table holds).
        positions = [free[k % len(free)] if free else k % size for k in range(len(bufs))]
    else:
        positions = free[: len(bufs)]
    linked = link(bufs, positions)
    if fault == "self-loop":
        linked[-1] = Desc(linked[-1].addr, linked[-1].length, linked[-1].flags | VIRTQ_DESC_F_NEXT, positions[-1])
    elif fault == "loop":
        linked[-1] = Desc(linked[-1].addr, linked[-1].length, linked[-1].flags | VIRTQ_DESC_F_NEXT, positions[0])
    elif fault == "next-out-of-range":
        linked[-1] = Desc(
            linked[-1].addr,
            linked[-1].length,
            linked[-1].flags | VIRTQ_DESC_F_NEXT,
            size + draw(st.integers(0, U16 - size)),
        )
    for p, d in zip(positions, linked):
        plan.table[p] = d
    plan.head = positions[0]
    return plan


def avail_indices(next_avail: int, size: int) -> st.SearchStrategy[int]:
    """avail.idx values: just ahead of the device, exactly qsize ahead, too far ahead, backwards, wrapping."""
    return st.one_of(
        st.integers(0, size).map(lambda k: (next_avail + k) & U16),
        st.integers(size + 1, U16).map(lambda k: (next_avail + k) & U16),
        st.sampled_from([0, U16, 0x8000, (next_avail - 1) & U16]),
    )


# ---- device requests (checklist 16, 17) ------------------------------------------------------

VIRTIO_BLK_T = {
    "in": 0,
    "out": 1,
    "flush": 4,
    "get-id": 8,
    "get-lifetime": 10,
    "discard": 11,
    "write-zeroes": 13,
    "secure-erase": 14,
}


@dataclass(frozen=True)
class BlkRequest:
    """A virtio-blk request: header fields, out data, in-buffer length, status length, and how the
    driver splits the readable and writable parts into descriptors (lengths per descriptor)."""

    rtype: int
    sector: int
    out: bytes
    in_len: int
    status_len: int
    readable_split: tuple[int, ...]
    writable_split: tuple[int, ...]
    reserved: int = 0
    #: Bytes of the 16-byte header the driver actually supplies (short headers: checklist 16).
    header_len: int = 16

    @property
    def header(self) -> bytes:
        return struct.pack("<IIQ", self.rtype & U32, self.reserved & U32, self.sector & U64)

    @property
    def readable(self) -> bytes:
        """The readable part as the driver lays it out (a short header stays short)."""
        return self.header[: self.header_len] + self.out


def _split(draw: st.DrawFn, total: int, max_parts: int) -> tuple[int, ...]:
    """Split ``total`` bytes into 1..max_parts descriptor lengths (a zero-length one now and then)."""
    if total == 0:
        return draw(st.sampled_from([(), (0,)]))
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=max_parts - 1)))
    points = [0, *cuts, total]
    return tuple(b - a for a, b in zip(points, points[1:]))


@functools.cache
def discard_segments(capacity: int) -> st.SearchStrategy[bytes]:
    """struct virtio_blk_discard_write_zeroes entries: in range, past capacity, bad flags, too many."""
    seg = st.builds(
        lambda s, n, f: struct.pack("<QII", s & U64, n & U32, f & U32),
        st.one_of(st.integers(0, capacity), interesting_ints(64)),
        st.one_of(st.integers(0, 8), interesting_ints(32)),
        st.one_of(st.sampled_from([0, 1]), interesting_ints(32)),
    )
    return st.lists(seg, min_size=0, max_size=18).map(b"".join)


@st.composite
def blk_requests(draw: st.DrawFn, capacity: int, *, max_parts: int = 3) -> BlkRequest:
    """virtio-blk requests: mostly well-formed reads, writes, flushes, GET_ID, DISCARD and
    WRITE_ZEROES inside the disk, and every malformation in checklist 16 (short or split headers,
    head-only chains, no status byte, sector overflow, past capacity, lengths not a multiple of
    512, GET_ID not 20 bytes, unknown types, bad DISCARD/WRITE_ZEROES segments)."""
    if draw(st.integers(0, 9)) < 6:
        return draw(_valid_blk_request(capacity, max_parts))
    name = draw(st.sampled_from([*VIRTIO_BLK_T, "unknown"]))
    rtype = VIRTIO_BLK_T.get(name, draw(st.one_of(st.integers(2, 20), interesting_ints(32))))
    sector = draw(
        st.one_of(
            st.integers(0, max(capacity - 1, 0)),
            st.integers(0, max(capacity - 1, 0)),
            st.sampled_from([capacity, capacity + 1, U64, U64 // 512, (U64 // 512) + 1, 1 << 55]),
        )
    )
    sectors = draw(st.integers(0, 3))
    data_len = draw(st.one_of(st.just(512 * sectors), st.just(512 * sectors), st.integers(0, 1100)))
    out = b""
    in_len = 0
    if name == "out":
        out = draw(st.binary(min_size=data_len, max_size=data_len))
    elif name in ("discard", "write-zeroes", "secure-erase"):
        out = draw(discard_segments(capacity))
    elif name == "get-id":
        in_len = draw(st.sampled_from([20, 20, 0, 19, 21, 512]))
    elif name == "in":
        in_len = data_len
    else:
        in_len = draw(st.sampled_from([0, 0, 512]))
    status_len = draw(st.sampled_from([1, 1, 1, 0, 2, 16]))
    header_len = draw(st.sampled_from([16, 16, 16, 0, 8, 15]))
    rsplit = _split(draw, header_len + len(out), max_parts)
    wsplit = _split(draw, in_len + status_len, max_parts)
    reserved = draw(st.sampled_from([0, 0, 1, U32]))
    return BlkRequest(rtype, sector, out, in_len, status_len, rsplit, wsplit, reserved, header_len)


@st.composite
def _valid_blk_request(draw: st.DrawFn, capacity: int, max_parts: int) -> BlkRequest:
    name = draw(st.sampled_from(["in", "in", "out", "out", "flush", "get-id", "discard", "write-zeroes"]))
    sectors = draw(st.integers(0, min(3, capacity)))
    # Now and then the request ends just past the disk (almost valid: the capacity check's edge).
    over = draw(st.sampled_from([0, 0, 0, 0, 1, 2]))
    sector = capacity - sectors + over if over and sectors else draw(st.integers(0, capacity - sectors))
    out, in_len = b"", 0
    if name == "in":
        in_len = 512 * sectors
    elif name == "out":
        out = draw(st.binary(min_size=512 * sectors, max_size=512 * sectors))
    elif name == "get-id":
        in_len = 20
    elif name in ("discard", "write-zeroes"):
        segs = draw(
            st.lists(
                st.tuples(st.integers(0, capacity - 1), st.integers(0, 4), st.sampled_from([0, 1])),
                min_size=1,
                max_size=3,
            )
        )
        out = b"".join(
            struct.pack("<QII", s, min(n, capacity - s), f if name == "write-zeroes" else 0) for s, n, f in segs
        )
    rsplit = _split(draw, 16 + len(out), max_parts)
    wsplit = _split(draw, in_len + 1, max_parts)
    return BlkRequest(VIRTIO_BLK_T[name], sector, out, in_len, 1, rsplit, wsplit)


# ---- virtio-net frames (checklist 17) -------------------------------------------------------------

#: struct virtio_net_hdr_v1 (§5.1.6): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")


@st.composite
def net_frames(draw: st.DrawFn, *, max_frame: int = 1600) -> bytes:
    """A TX buffer as the guest hands it to virtio-net: a 12-byte header and an Ethernet frame.

    Can be shorter than the header or header-only, longer than 65550 bytes
    (as a length; the bytes are zero), with csum_start/csum_offset and
    hdr_len/gso_size pointing outside the frame.
    """
    shape = draw(st.sampled_from(["normal", "normal", "short", "header-only", "huge", "bad-offsets"]))
    frame_len = {
        "normal": draw(st.integers(14, max_frame)),
        "short": 0,
        "header-only": 0,
        "huge": 65551,
        "bad-offsets": 60,
    }[shape]
    flags = draw(st.sampled_from([0, 1, 2, 3, 0xFF]))
    gso = draw(st.sampled_from([0, 1, 3, 4, 5, 0x80, 0xFF]))
    hdr = VIRTIO_NET_HDR.pack(
        flags,
        gso,
        draw(interesting_ints(16)) if shape == "bad-offsets" else 14,
        draw(interesting_ints(16)) if shape == "bad-offsets" else 0,
        draw(interesting_ints(16)) if shape == "bad-offsets" else 0,
        draw(interesting_ints(16)) if shape == "bad-offsets" else 0,
        0,
    )
    if shape == "short":
        return hdr[: draw(st.integers(0, 11))]
    frame = draw(st.binary(min_size=min(frame_len, 64), max_size=min(frame_len, 64)))
    return hdr + frame + bytes(max(0, frame_len - len(frame)))
