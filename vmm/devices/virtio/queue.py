"""The split virtqueue (virtio 1.2 §2.7), independent of any device and transport.

A ``Virtqueue`` holds what the driver configured through the transport (size
and the three area addresses) and the device's ring state (next available
index, next used index, the used index at the last notification decision).
It turns available-ring entries into ``DescriptorChain`` objects and writes
used-ring entries back; it never interprets buffer contents.

Everything read from the guest is treated as hostile:

* every address and length goes through ``GuestMemory`` (which checks the
  whole range, including overflow past 2**64), and is masked to its wire
  width (u16 ring indices, u32 lengths, u64 addresses) where it is read;
  ring indices and flags are aligned 16-bit ``read_u16``/``write_u16`` accesses, which ``GuestMemory``
  performs as single loads and stores: the driver may be running on another
  vCPU, and must never see a torn or intermediate ``used.idx``;
* a chain is at most the queue size descriptors long (§2.7.5 "A driver MUST
  NOT create a descriptor chain longer than the Queue Size"), which also ends
  every loop; an indirect table is walked at most its own length;
* the whole chain is at most 2**32-1 bytes (§2.7.5: at most 2**32 bytes in
  total; one byte less so that ``used.len`` always fits its u32);
* ``avail.idx`` more than the queue size ahead of the device, a head or a
  ``next`` outside its table, a head that is already in flight, INDIRECT
  without the feature, INDIRECT|NEXT, nested indirect tables, tables whose
  length is 0 or not a multiple of 16, and device-readable descriptors after
  device-writable ones (§2.7.4.2) all raise ``VirtqueueError``.

Unknown descriptor flag bits are ignored (the spec defines no device
reaction), zero-length descriptors are skipped without looking at their
address, and the WRITE flag of a descriptor that points to an indirect table
is ignored (§2.7.5.3.2).

``VirtqueueError`` carries a short ``kind`` (for counting), what was wrong and
the guest address involved.  The queue marks itself broken and does no more
work until it is enabled again; the device (through the transport) answers
with DEVICE_NEEDS_RESET (§2.1.2).

Each call does a bounded amount of work: ``pop()`` walks one chain (at most
queue-size descriptors), and a device handler pops at most ``size`` chains per
notification (``drain()``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ...errors import GuestError, GuestMemoryError
from ...memory import GuestMemory

# ---- §2.7.5 The Virtqueue Descriptor Table ---------------------------------
#: This marks a buffer as continuing via the next field.
VIRTQ_DESC_F_NEXT = 0x1
#: This marks a buffer as device write-only (otherwise device read-only).
VIRTQ_DESC_F_WRITE = 0x2
#: This means the buffer contains a list of buffer descriptors (§2.7.5.3).
VIRTQ_DESC_F_INDIRECT = 0x4
#: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
VIRTQ_DESC_SIZE = 16

# ---- §2.7.6 The Virtqueue Available Ring -----------------------------------
VIRTQ_AVAIL_F_NO_INTERRUPT = 0x1
# ---- §2.7.8 The Virtqueue Used Ring ----------------------------------------
VIRTQ_USED_F_NO_NOTIFY = 0x1
#: struct virtq_used_elem { le32 id; le32 len; }
VIRTQ_USED_ELEM_SIZE = 8

# ---- §2.7 size and alignment table -----------------------------------------
#: "The maximum Queue Size value is 32768."
VIRTQ_MAX_SIZE = 32768
VIRTQ_DESC_ALIGN = 16
VIRTQ_AVAIL_ALIGN = 2
VIRTQ_USED_ALIGN = 4

#: Longest chain, in bytes, that we accept (fits ``used.len``).
VIRTQ_MAX_CHAIN_BYTES = 0xFFFF_FFFF

U16_MASK = 0xFFFF
U32_MASK = 0xFFFF_FFFF
U64_MASK = 0xFFFF_FFFF_FFFF_FFFF

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def desc_table_size(size: int) -> int:
    """Bytes of a descriptor table for ``size`` entries (§2.7)."""
    return VIRTQ_DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of an available ring, ``used_event`` included (§2.7)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of a used ring, ``avail_event`` included (§2.7)."""
    return 6 + VIRTQ_USED_ELEM_SIZE * size


class VirtqueueError(GuestError):
    """The driver broke a split-ring rule; names the queue, the rule and the address."""

    def __init__(self, queue: str, kind: str, problem: str, gpa: int | None = None) -> None:
        self.queue = queue
        self.kind = kind
        self.problem = problem
        self.gpa = gpa
        where = f" (guest address {gpa:#x})" if gpa is not None else ""
        super().__init__(f"{queue}: {problem}{where}")


class Buffer(NamedTuple):
    """One guest buffer of a chain, already checked to lie inside guest RAM.

    A named tuple rather than a dataclass: one is built per descriptor on the
    request path, and a tuple is several times cheaper to create.
    """

    addr: int
    length: int


@dataclass
class QueueStats:
    chains: int = 0
    descriptors: int = 0
    completions: int = 0
    notifications: int = 0
    suppressed_notifications: int = 0
    #: Completions that arrived after a reset or disable and were dropped.
    stale_completions: int = 0
    errors: int = 0


#: Builds a Buffer without the generated ``__new__`` (one per descriptor on the request path).
_new_buffer = tuple.__new__


class DescriptorChain:
    """A parsed chain: its head, readable buffers first, then writable ones.

    The buffers are a snapshot taken when the chain was popped; later guest
    edits of the descriptor table do not change them (TOCTOU-safe).  Buffer
    contents are read and written through ``GuestMemory`` on demand.
    """

    __slots__ = ("generation", "head", "queue", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        queue: Virtqueue,
        head: int,
        readable: tuple[Buffer, ...],
        writable: tuple[Buffer, ...],
        generation: int,
        readable_len: int | None = None,
        writable_len: int | None = None,
    ) -> None:
        self.queue = queue
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = sum(b.length for b in readable) if readable_len is None else readable_len
        self.writable_len = sum(b.length for b in writable) if writable_len is None else writable_len
        self.generation = generation

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B/{len(self.readable)}, "
            f"writable={self.writable_len}B/{len(self.writable)})"
        )

    # ---- scatter/gather over the buffers -----------------------------------
    @staticmethod
    def _slices(buffers: tuple[Buffer, ...], offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(gpa, n) pieces covering [offset, offset+length) of the concatenated buffers."""
        for b in buffers:
            if length <= 0:
                return
            if offset >= b.length:
                offset -= b.length
                continue
            n = min(b.length - offset, length)
            yield b.addr + offset, n
            length -= n
            offset = 0

    def _check(self, total: int, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > total:
            # A device bug, not guest input: devices size their accesses by *_len.
            raise ValueError(f"{what} access {offset}+{length} outside chain {self!r}")

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` device-readable bytes from ``offset``; the caller bounds ``length``."""
        self._check(self.readable_len, offset, length, "read")
        mem = self.queue.memory
        first = self.readable[0] if self.readable else None
        if first is not None and offset + length <= first.length:  # the common case: one buffer
            return mem.read(first.addr + offset, length)
        return b"".join(mem.read(gpa, n) for gpa, n in self._slices(self.readable, offset, length))

    def readable_views(self, offset: int, length: int) -> Iterator[memoryview]:
        """Zero-copy views of device-readable bytes (for bulk I/O; never kept)."""
        self._check(self.readable_len, offset, length, "read")
        mem = self.queue.memory
        for gpa, n in self._slices(self.readable, offset, length):
            yield mem.view(gpa, n)

    def writable_views(self, offset: int, length: int) -> Iterator[memoryview]:
        """Zero-copy views of device-writable bytes (for bulk I/O; never kept)."""
        self._check(self.writable_len, offset, length, "write")
        mem = self.queue.memory
        for gpa, n in self._slices(self.writable, offset, length):
            yield mem.view(gpa, n)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Scatter ``data`` into the device-writable buffers from ``offset``."""
        self._check(self.writable_len, offset, len(data), "write")
        mem = self.queue.memory
        last = self.writable[-1] if self.writable else None
        tail = self.writable_len - last.length if last is not None else 0
        if last is not None and offset >= tail:  # the common case: a status byte at the end
            mem.write(last.addr + offset - tail, data)
            return
        src = memoryview(data)
        pos = 0
        for gpa, n in self._slices(self.writable, offset, len(data)):
            mem.write(gpa, src[pos : pos + n])
            pos += n

    def fill(self, offset: int, length: int, byte: int = 0) -> None:
        """Fill device-writable bytes with ``byte`` (no host buffer of ``length`` bytes)."""
        self._check(self.writable_len, offset, length, "write")
        mem = self.queue.memory
        for gpa, n in self._slices(self.writable, offset, length):
            mem.fill(gpa, n, byte)


class Virtqueue:
    """One split virtqueue: driver-set configuration plus device-side ring state.

    Not thread-safe on its own: the transport serialises every call under its
    lock (register accesses, notifications, and late completions alike).
    """

    def __init__(self, memory: GuestMemory, index: int, max_size: int, name: str = "") -> None:
        if not 0 < max_size <= VIRTQ_MAX_SIZE or max_size & (max_size - 1):
            raise ValueError(f"virtqueue {index}: maximum size {max_size} is not a power of two <= 32768")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.name = name or f"virtqueue {index}"
        self.stats = QueueStats()
        #: Bumped on every reset/disable/enable: chains from an older generation are stale.
        self.generation = 0
        self.reset()

    # ---- configuration (written through the transport) ---------------------
    def reset(self) -> None:
        """Back to the state after device reset: not ready, default size, zero addresses."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self._disable()

    def _disable(self) -> None:
        self.ready = False
        self.broken = False
        self.indirect = False
        self.event_idx = False
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = 0
        self._in_flight = bytearray()
        self.generation += 1

    def disable(self) -> None:
        """QueueReady := 0.  In-flight chains become stale; the configuration stays."""
        self._disable()

    def validate(self) -> None:
        """Raise ``VirtqueueError`` unless the configuration can be used (§2.7, §4.2.2)."""
        size = self.size
        if size == 0 or size > self.max_size or size & (size - 1):
            raise VirtqueueError(
                self.name, "bad-size", f"queue size {size} is not a power of two in 1..{self.max_size}"
            )
        for what, addr, align, length in (
            ("descriptor table", self.desc_addr, VIRTQ_DESC_ALIGN, desc_table_size(size)),
            ("available ring", self.avail_addr, VIRTQ_AVAIL_ALIGN, avail_ring_size(size)),
            ("used ring", self.used_addr, VIRTQ_USED_ALIGN, used_ring_size(size)),
        ):
            if addr % align:
                raise VirtqueueError(self.name, "bad-alignment", f"{what} is not {align}-byte aligned", addr)
            if not self.memory.contains(addr, length):
                raise VirtqueueError(
                    self.name, "ring-outside-ram", f"{what} of {length:#x} bytes is outside guest RAM", addr
                )

    def enable(self, *, indirect: bool, event_idx: bool) -> None:
        """QueueReady := 1 with the negotiated ring features; raises if the setup is invalid."""
        self.validate()
        self._disable()
        self.indirect = indirect
        self.event_idx = event_idx
        self._in_flight = bytearray(self.size)
        self.ready = True

    def state(self) -> dict[str, int]:
        """Ring state for snapshots."""
        return {"next_avail": self.next_avail, "next_used": self.next_used, "signalled_used": self.signalled_used}

    def restore_state(self, next_avail: int, next_used: int, signalled_used: int | None = None) -> None:
        """Restore ring indices (masked to u16; a bad pair shows up as an error at the next pop)."""
        self.next_avail = next_avail & U16_MASK
        self.next_used = next_used & U16_MASK
        self.signalled_used = (next_used if signalled_used is None else signalled_used) & U16_MASK

    # ---- helpers -----------------------------------------------------------
    def _fail(self, kind: str, problem: str, gpa: int | None = None) -> VirtqueueError:
        self.broken = True
        self.stats.errors += 1
        return VirtqueueError(self.name, kind, problem, gpa)

    def _avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_addr + 2) & U16_MASK

    def pending(self) -> int:
        """Chains the driver has made available and the device has not popped."""
        if not self.ready or self.broken:
            return 0
        idx = self._avail_idx()
        n = (idx - self.next_avail) & U16_MASK
        if n > self.size:
            raise self._fail(
                "avail-idx-ahead",
                f"avail.idx {idx} is {n} entries ahead of the device's {self.next_avail} (queue size {self.size})",
                self.avail_addr + 2,
            )
        return n

    # ---- the available side ------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None if there is none (or the queue is not usable)."""
        if not self.pending():
            return None
        size = self.size
        slot_gpa = self.avail_addr + 4 + 2 * (self.next_avail % size)
        head = self.memory.read_u16(slot_gpa) & U16_MASK
        if head >= size:
            raise self._fail("head-out-of-range", f"available ring entry {head} >= queue size {size}", slot_gpa)
        if self._in_flight[head]:
            raise self._fail("head-in-flight", f"head {head} made available again while still in flight", slot_gpa)
        chain = self._read_chain(head)
        self._in_flight[head] = 1
        self.next_avail = (self.next_avail + 1) & U16_MASK
        if self.event_idx:
            # §2.7.10: tell the driver which entry to notify us about next.
            self.memory.write_u16(self.used_addr + 4 + VIRTQ_USED_ELEM_SIZE * size, self.next_avail)
        self.stats.chains += 1
        return chain

    def drain(self, budget: int | None = None) -> Iterator[DescriptorChain]:
        """Pop chains until none is left or ``budget`` (default: the queue size) is spent."""
        limit = self.size if budget is None else budget
        for _ in range(limit):
            chain = self.pop()
            if chain is None:
                return
            yield chain

    def _read_chain(self, head: int) -> DescriptorChain:
        mem = self.memory
        read, contains, new_buffer = mem.read, mem.contains, _new_buffer
        size = self.size
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        total = 0
        writable_len = 0
        walked = 0  # buffer descriptors in this chain, direct and indirect (<= size)
        table, table_len, in_table = self.desc_addr, size, 0
        indirect = False
        index = head
        while True:
            if walked >= size:
                raise self._fail(
                    "chain-too-long",
                    f"chain from head {head} is longer than the queue size {size} (a loop?)",
                    table + VIRTQ_DESC_SIZE * index,
                )
            if indirect and in_table >= table_len:
                raise self._fail(
                    "indirect-too-long",
                    f"chain in the indirect table is longer than its {table_len} entries (a loop?)",
                    table + VIRTQ_DESC_SIZE * index,
                )
            gpa = table + VIRTQ_DESC_SIZE * index
            try:
                addr, length, flags, nxt = _DESC.unpack(read(gpa, VIRTQ_DESC_SIZE))
            except GuestMemoryError as e:  # only possible if RAM changed under us
                raise self._fail("desc-outside-ram", f"descriptor {index} is outside guest RAM", gpa) from e
            in_table += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise self._fail("indirect-nested", "INDIRECT descriptor inside an indirect table", gpa)
                if not self.indirect:
                    raise self._fail(
                        "indirect-not-negotiated", "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", gpa
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise self._fail("indirect-next", "descriptor has both INDIRECT and NEXT", gpa)
                if length == 0 or length % VIRTQ_DESC_SIZE:
                    raise self._fail(
                        "indirect-bad-length", f"indirect table length {length} is not a non-zero multiple of 16", gpa
                    )
                # §2.7.5.3 sets no alignment for indirect tables: any address in RAM will do.
                if not contains(addr, length):
                    raise self._fail(
                        "indirect-outside-ram", f"indirect table of {length:#x} bytes is outside guest RAM", addr
                    )
                indirect = True
                table, table_len, in_table, index = addr, length // VIRTQ_DESC_SIZE, 0, 0
                continue
            walked += 1
            if length:
                if not contains(addr, length):
                    raise self._fail(
                        "buffer-outside-ram",
                        f"descriptor {index}: buffer {addr:#x}+{length:#x} is outside guest RAM",
                        gpa,
                    )
                total += length
                if total > VIRTQ_MAX_CHAIN_BYTES:
                    raise self._fail("chain-too-big", f"chain from head {head} is longer than 2**32-1 bytes", gpa)
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append(new_buffer(Buffer, (addr, length)))
                    writable_len += length
                elif writable:
                    raise self._fail(
                        "readable-after-writable",
                        f"descriptor {index}: device-readable buffer after a writable one",
                        gpa,
                    )
                else:
                    readable.append(new_buffer(Buffer, (addr, length)))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise self._fail("next-out-of-range", f"descriptor {index}: next {nxt} >= table size {table_len}", gpa)
            index = nxt
        self.stats.descriptors += walked
        return DescriptorChain(
            self, head, tuple(readable), tuple(writable), self.generation, total - writable_len, writable_len
        )

    # ---- the used side -----------------------------------------------------
    def add_used(self, chain: DescriptorChain, written: int) -> bool:
        """Return ``chain`` to the driver with ``written`` bytes in its writable part.

        §2.7.8.2: ``len`` and the data are in place before ``used.idx`` moves.
        Returns False (and counts it) if the queue was reset, disabled or
        re-enabled since the chain was popped: that completion is dropped.
        """
        if chain.queue is not self or chain.generation != self.generation or not self.ready:
            self.stats.stale_completions += 1
            return False
        if not 0 <= written <= chain.writable_len:
            raise ValueError(f"{self.name}: used length {written} exceeds writable {chain.writable_len} of {chain!r}")
        if not self._in_flight[chain.head]:
            raise ValueError(f"{self.name}: head {chain.head} completed twice")
        self._in_flight[chain.head] = 0
        slot = self.used_addr + 4 + VIRTQ_USED_ELEM_SIZE * (self.next_used % self.size)
        self.memory.write(slot, _USED_ELEM.pack(chain.head, written & U32_MASK))
        self.next_used = (self.next_used + 1) & U16_MASK
        self.memory.write_u16(self.used_addr + 2, self.next_used)  # one 16-bit store (memory.py)
        self.stats.completions += 1
        return True

    def in_flight(self) -> int:
        """Chains popped and not yet completed."""
        return sum(self._in_flight)

    def needs_notification(self) -> bool:
        """Whether the used entries added since the last call require a notification (§2.7.7, §2.7.10).

        Without VIRTIO_F_EVENT_IDX: notify unless ``avail.flags`` has
        VIRTQ_AVAIL_F_NO_INTERRUPT.  With it: notify exactly when the new
        entries crossed ``used_event``, i.e. the ``idx`` that placed an entry
        equalled ``used_event`` (the ``vring_need_event`` rule, which also
        covers several entries added at once).  Calling it consumes the
        decision: a second call without new entries returns False.
        """
        if not self.ready:
            return False
        old, new = self.signalled_used, self.next_used
        self.signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            used_event = self.memory.read_u16(self.avail_addr + 4 + 2 * self.size) & U16_MASK
            need = ((new - used_event - 1) & U16_MASK) < ((new - old) & U16_MASK)
        else:
            need = not self.memory.read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
        if need:
            self.stats.notifications += 1
        else:
            self.stats.suppressed_notifications += 1
        return need
