"""A minimal virtio driver written in Python, for tests and fuzzing.

It plays the guest: it lays split rings out in a ``GuestMemory``, drives a
virtio-mmio transport through its registers exactly as a guest would (32-bit
accesses), and submits descriptor chains.  Two levels:

* ``DriverQueue`` — the driver's half of one split ring: write any
  descriptor, publish any head, move ``avail.idx`` anywhere, read the used
  ring.  Malformed-input tests use it to build loops, bad indices, etc.
* ``VirtioMmioDriver`` — the initialisation sequence (§3.1.1), queue setup
  (§4.2.3.2) and request submission with buffers allocated in guest RAM.

Nothing here checks the device: tests do.  Nothing here is used by the VMM.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...memory import GuestMemory
from .device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    bit,
)
from .mmio import (
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DEVICE_HIGH,
    VIRTIO_MMIO_QUEUE_DEVICE_LOW,
    VIRTIO_MMIO_QUEUE_DRIVER_HIGH,
    VIRTIO_MMIO_QUEUE_DRIVER_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_STATUS,
)
from .queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

_DESC = struct.Struct("<QIHH")


class GuestAllocator:
    """A bump allocator over guest-physical [start, end), for rings and buffers."""

    def __init__(self, memory: GuestMemory, start: int, end: int) -> None:
        memory.check(start, end - start)
        self.memory = memory
        self.start = start
        self.end = end
        self.next = start

    def alloc(self, size: int, align: int = 16, *, zero: bool = True) -> int:
        gpa = (self.next + align - 1) & ~(align - 1)
        if gpa + size > self.end:
            raise MemoryError(f"guest allocator: {size:#x} bytes do not fit below {self.end:#x}")
        self.next = gpa + size
        if zero and size:
            self.memory.fill(gpa, size)
        return gpa

    def mark(self) -> int:
        return self.next

    def release(self, mark: int) -> None:
        """Free everything allocated after ``mark``."""
        self.next = mark


@dataclass
class Segment:
    """A guest buffer of a submitted request."""

    addr: int
    length: int
    writable: bool


class DriverQueue:
    """The driver's half of one split virtqueue in guest memory."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int) -> None:
        self.memory = memory
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}

    @classmethod
    def allocate(cls, memory: GuestMemory, alloc: GuestAllocator, size: int) -> DriverQueue:
        desc = alloc.alloc(desc_table_size(size), 16)
        avail = alloc.alloc(avail_ring_size(size), 2)
        used = alloc.alloc(used_ring_size(size), 4)
        return cls(memory, size, desc, avail, used)

    # ---- raw access (for malformed input) -----------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.memory.write(self.desc + VIRTQ_DESC_SIZE * index, _DESC.pack(addr, length, flags, next_))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.memory.read(self.desc + VIRTQ_DESC_SIZE * index, VIRTQ_DESC_SIZE))

    def set_ring_entry(self, slot: int, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def publish(self, head: int) -> None:
        """Put ``head`` in the next available slot and move ``avail.idx``."""
        self.set_ring_entry(self.avail_idx, head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self.memory.read_u16(self.used)

    def used_entry(self, slot: int) -> tuple[int, int]:
        a = self.used + 4 + 8 * (slot % self.size)
        return self.memory.read_u32(a), self.memory.read_u32(a + 4)

    def take_used(self) -> list[tuple[int, int]]:
        """New (id, len) entries since the last call; frees their descriptors."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            head, length = self.used_entry(self.last_used)
            out.append((head, length))
            for d in self._chains.pop(head, []):
                self._free.append(d)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # ---- well-formed chains ---------------------------------------------------
    def add_chain(self, segments: Sequence[Segment], *, publish: bool = True) -> int:
        """Write ``segments`` as a direct chain of free descriptors; return its head."""
        if not segments or len(segments) > len(self._free):
            raise ValueError(f"cannot place a chain of {len(segments)} descriptors ({len(self._free)} free)")
        idxs = [self._free.pop(0) for _ in segments]
        for i, (d, seg) in enumerate(zip(idxs, segments)):
            last = i == len(segments) - 1
            flags = (VIRTQ_DESC_F_WRITE if seg.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(d, seg.addr, seg.length, flags, 0 if last else idxs[i + 1])
        self._chains[idxs[0]] = idxs
        if publish:
            self.publish(idxs[0])
        return idxs[0]

    def add_indirect_chain(self, table: int, segments: Sequence[Segment], *, publish: bool = True) -> int:
        """Write ``segments`` as an indirect table at ``table``, referenced by one descriptor."""
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            flags = (VIRTQ_DESC_F_WRITE if seg.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.memory.write(table + VIRTQ_DESC_SIZE * i, _DESC.pack(seg.addr, seg.length, flags, 0 if last else i + 1))
        d = self._free.pop(0)
        self.write_desc(d, table, VIRTQ_DESC_SIZE * len(segments), VIRTQ_DESC_F_INDIRECT, 0)
        self._chains[d] = [d]
        if publish:
            self.publish(d)
        return d


@dataclass
class Request:
    queue: int
    head: int
    segments: list[Segment] = field(default_factory=list)

    def writable(self) -> list[Segment]:
        return [s for s in self.segments if s.writable]


class VirtioMmioDriver:
    """Drives a virtio-mmio bus device the way a guest driver would."""

    def __init__(self, transport: Any, memory: GuestMemory, alloc: GuestAllocator) -> None:
        self.transport = transport
        self.memory = memory
        self.alloc = alloc
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0

    # ---- registers ---------------------------------------------------------------
    def read32(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value & 0xFFFF_FFFF)

    @property
    def status(self) -> int:
        return self.read32(VIRTIO_MMIO_STATUS)

    def set_status(self, bits: int) -> None:
        """Read-modify-write, as Linux's virtio_add_status does."""
        self.write32(VIRTIO_MMIO_STATUS, self.status | bits)

    def reset(self) -> None:
        self.write32(VIRTIO_MMIO_STATUS, 0)
        self.queues.clear()

    def device_features(self) -> int:
        f = 0
        for sel in (0, 1):
            self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
            f |= self.read32(VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel)
        return f

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel))

    @property
    def interrupt_status(self) -> int:
        return self.read32(VIRTIO_MMIO_INTERRUPT_STATUS)

    def ack_interrupts(self) -> int:
        bits = self.interrupt_status
        self.write32(VIRTIO_MMIO_INTERRUPT_ACK, bits)
        return bits

    def config_read(self, offset: int, size: int) -> int:
        return self.transport.read(VIRTIO_MMIO_CONFIG + offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.transport.write(VIRTIO_MMIO_CONFIG + offset, size, value)

    # ---- §3.1.1 initialisation -------------------------------------------------------
    def negotiate(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the accepted features."""
        self.reset()
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.set_status(VIRTIO_CONFIG_S_DRIVER)
        offered = self.device_features()
        want = offered if features is None else features
        self.write_driver_features(want)
        self.set_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            raise RuntimeError(f"device refused features {want:#x} (offered {offered:#x})")
        self.features = want
        return want

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.write32(VIRTIO_MMIO_QUEUE_SEL, index)
        qmax = self.read32(VIRTIO_MMIO_QUEUE_NUM_MAX)
        if qmax == 0:
            raise RuntimeError(f"queue {index} is not available")
        size = qmax if size is None else size
        q = DriverQueue.allocate(self.memory, self.alloc, size)
        self.write32(VIRTIO_MMIO_QUEUE_NUM, size)
        self.set_queue_addresses(q.desc, q.avail, q.used)
        self.write32(VIRTIO_MMIO_QUEUE_READY, 1)
        self.queues[index] = q
        return q

    def set_queue_addresses(self, desc: int, avail: int, used: int) -> None:
        """Write the three area addresses of the selected queue."""
        for lo, hi, addr in (
            (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc),
            (VIRTIO_MMIO_QUEUE_DRIVER_LOW, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, avail),
            (VIRTIO_MMIO_QUEUE_DEVICE_LOW, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, used),
        ):
            self.write32(lo, addr & 0xFFFF_FFFF)
            self.write32(hi, addr >> 32)

    def driver_ok(self) -> None:
        self.set_status(VIRTIO_CONFIG_S_DRIVER_OK)

    def initialize(
        self, features: int | None = None, queues: Sequence[int] = (0,), size: int | None = None
    ) -> int:
        f = self.negotiate(features)
        for i in queues:
            self.setup_queue(i, size)
        self.driver_ok()
        return f

    # ---- requests ---------------------------------------------------------------------
    def kick(self, index: int) -> None:
        self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, index)

    def submit(
        self,
        index: int,
        out: Sequence[bytes] = (),
        in_sizes: Sequence[int] = (),
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> Request:
        """Copy ``out`` into fresh guest buffers, allocate ``in_sizes`` writable ones, submit."""
        q = self.queues[index]
        segs = []
        for data in out:
            a = self.alloc.alloc(max(len(data), 1), 16, zero=False)
            self.memory.write(a, data)
            segs.append(Segment(a, len(data), False))
        for n in in_sizes:
            a = self.alloc.alloc(max(n, 1), 16, zero=False)
            self.memory.fill(a, n, 0xA5)  # a poison pattern: tests can see what was written
            segs.append(Segment(a, n, True))
        if indirect:
            table = self.alloc.alloc(VIRTQ_DESC_SIZE * len(segs), 16)
            head = q.add_indirect_chain(table, segs)
        else:
            head = q.add_chain(segs)
        if kick:
            self.kick(index)
        return Request(index, head, segs)

    def read_segment(self, seg: Segment, length: int | None = None) -> bytes:
        return self.memory.read(seg.addr, seg.length if length is None else length)

    def used(self, index: int) -> list[tuple[int, int]]:
        return self.queues[index].take_used()


def version_1() -> int:
    """The feature mask every modern driver accepts."""
    return bit(VIRTIO_F_VERSION_1)
