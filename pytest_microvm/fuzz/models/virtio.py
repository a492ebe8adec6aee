"""Reference models of the virtio-mmio transport and the split virtqueue.

``TransportModel`` predicts every register a driver can read (§4.2.2), the
status state machine (§2.1, §3.1) and InterruptStatus, following the choices
``vmm.devices.virtio.mmio`` documents.  ``parse_chain`` and ``RingModel``
predict what a device does with the available ring (§2.7): which chains it
completes, in which order, with which used length, and where it stops with
an error.  A device is described to ``RingModel`` by a function from a parsed
chain to an outcome (``Complete(n)`` or ``Fail(kind)``).

The models read guest memory through a plain ``GuestMemory`` (never the
tracing one), so their own reads do not count as device accesses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Union

from vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vmm.memory import GuestMemory

U16 = 0xFFFF
U32 = 0xFFFF_FFFF

# ---- §2.1 status bits, §4.2.2 registers (spelled out again on purpose: a model, not an import) ----
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
STATUS_DEFINED = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | NEEDS_RESET | FAILED
INT_VRING, INT_CONFIG = 1, 2
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 1 << 28, 1 << 29, 1 << 32

REG = {
    "magic": 0x000, "version": 0x004, "device_id": 0x008, "vendor": 0x00C,
    "device_features": 0x010, "device_features_sel": 0x014,
    "driver_features": 0x020, "driver_features_sel": 0x024,
    "queue_sel": 0x030, "queue_num_max": 0x034, "queue_num": 0x038, "queue_ready": 0x044,
    "queue_notify": 0x050, "interrupt_status": 0x060, "interrupt_ack": 0x064, "status": 0x070,
    "queue_desc_low": 0x080, "queue_desc_high": 0x084, "queue_driver_low": 0x090, "queue_driver_high": 0x094,
    "queue_device_low": 0x0A0, "queue_device_high": 0x0A4, "shm_sel": 0x0AC,
    "shm_len_low": 0x0B0, "shm_len_high": 0x0B4, "shm_base_low": 0x0B8, "shm_base_high": 0x0BC,
    "queue_reset": 0x0C0, "config_generation": 0x0FC,
}  # fmt: skip
CONFIG_BASE = 0x100
MAGIC = 0x74726976
VENDOR = 0x4D565950
_ADDR_REGS = {
    REG["queue_desc_low"]: ("desc", 0), REG["queue_desc_high"]: ("desc", 32),
    REG["queue_driver_low"]: ("avail", 0), REG["queue_driver_high"]: ("avail", 32),
    REG["queue_device_low"]: ("used", 0), REG["queue_device_high"]: ("used", 32),
}  # fmt: skip


# ---- the split ring ----------------------------------------------------------------------------
@dataclass
class ParsedChain:
    """What a correct device makes of one chain: buffers, or the rule it breaks."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None
    #: Guest ranges the walk had to read (descriptors) and the tables it entered.
    touched: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


_DESC = struct.Struct("<QIHH")


def parse_chain(mem: GuestMemory, desc_addr: int, size: int, head: int, indirect_ok: bool) -> ParsedChain:
    """Walk the chain at ``head`` by the rules of §2.7.5 as ``queue.py`` documents them.

    The limits: at most ``size`` buffer descriptors in all, an indirect table
    walked at most its own length, no INDIRECT inside a table or with NEXT,
    a table length that is a non-zero multiple of 16, every non-empty buffer
    inside RAM, at most 2**32-1 bytes in all, readable before writable.
    """
    out = ParsedChain(head)
    table, table_len, in_table, index = desc_addr, size, 0, head
    nested = False
    count = 0
    total = 0

    def fail(kind: str) -> ParsedChain:
        out.error = kind
        return out

    while True:
        if count >= size:
            return fail("chain-too-long")
        if nested and in_table >= table_len:
            return fail("indirect-too-long")
        gpa = table + VIRTQ_DESC_SIZE * index
        out.touched.append((gpa, VIRTQ_DESC_SIZE))
        if not mem.contains(gpa, VIRTQ_DESC_SIZE):
            return fail("desc-outside-ram")
        addr, length, flags, nxt = _DESC.unpack(mem.read(gpa, VIRTQ_DESC_SIZE))
        in_table += 1
        if flags & VIRTQ_DESC_F_INDIRECT:
            if nested:
                return fail("indirect-nested")
            if not indirect_ok:
                return fail("indirect-not-negotiated")
            if flags & VIRTQ_DESC_F_NEXT:
                return fail("indirect-next")
            if length == 0 or length % VIRTQ_DESC_SIZE:
                return fail("indirect-bad-length")
            if not mem.contains(addr, length):
                return fail("indirect-outside-ram")
            out.touched.append((addr, length))
            nested, table, table_len, in_table, index = True, addr, length // VIRTQ_DESC_SIZE, 0, 0
            continue
        count += 1
        if length:
            if not mem.contains(addr, length):
                return fail("buffer-outside-ram")
            total += length
            if total > U32:
                return fail("chain-too-big")
            if flags & VIRTQ_DESC_F_WRITE:
                out.writable.append((addr, length))
            elif out.writable:
                return fail("readable-after-writable")
            else:
                out.readable.append((addr, length))
        if not flags & VIRTQ_DESC_F_NEXT:
            return out
        if nxt >= table_len:
            return fail("next-out-of-range")
        index = nxt


@dataclass(frozen=True)
class Complete:
    """The device returns the chain with ``used_len`` bytes written."""

    used_len: int


@dataclass(frozen=True)
class Fail:
    """The device cannot answer the chain: DEVICE_NEEDS_RESET, chain not returned."""

    kind: str


Outcome = Union[Complete, Fail]
DeviceModel = Callable[[ParsedChain], Outcome]


@dataclass
class QueueModel:
    """One queue: what the driver wrote to its registers and the device-side ring state."""

    max_size: int
    size: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    ready: bool = False
    indirect: bool = False
    event_idx: bool = False
    next_avail: int = 0
    next_used: int = 0
    signalled: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size

    def reset(self) -> None:
        self.size, self.desc, self.avail, self.used = self.max_size, 0, 0, 0
        self.disable()

    def disable(self) -> None:
        self.ready = False
        self.indirect = self.event_idx = False
        self.next_avail = self.next_used = self.signalled = 0

    def areas(self) -> list[tuple[int, int]]:
        """The three ring areas (gpa, length)."""
        s = self.size
        return [(self.desc, desc_table_size(s)), (self.avail, avail_ring_size(s)), (self.used, used_ring_size(s))]

    def used_area(self) -> tuple[int, int]:
        return self.used, used_ring_size(self.size)

    def valid(self, mem: GuestMemory) -> str | None:
        """Why QueueReady=1 must be refused, or None (§2.7 sizes and alignments, areas in RAM)."""
        s = self.size
        if s == 0 or s > self.max_size or s & (s - 1):
            return "bad-size"
        for addr, align, length in (
            (self.desc, 16, desc_table_size(s)),
            (self.avail, 2, avail_ring_size(s)),
            (self.used, 4, used_ring_size(s)),
        ):
            if addr % align:
                return "bad-alignment"
            if not mem.contains(addr, length):
                return "ring-outside-ram"
        return None


@dataclass
class RingResult:
    """What one notification should do to one queue."""

    completed: list[tuple[int, int]] = field(default_factory=list)
    chains: list[ParsedChain] = field(default_factory=list)
    error: str | None = None


def process_queue(mem: GuestMemory, q: QueueModel, device: DeviceModel, in_flight: set[int]) -> RingResult:
    """Pop and complete every available chain of ``q`` the way a synchronous device must (§2.7.13)."""
    res = RingResult()
    for _ in range(q.size):
        idx = mem.read_u16(q.avail + 2)
        pending = (idx - q.next_avail) & U16
        if pending > q.size:
            res.error = "avail-idx-ahead"
            return res
        if pending == 0:
            return res
        head = mem.read_u16(q.avail + 4 + 2 * (q.next_avail % q.size))
        if head >= q.size:
            res.error = "head-out-of-range"
            return res
        if head in in_flight:
            res.error = "head-in-flight"
            return res
        chain = parse_chain(mem, q.desc, q.size, head, q.indirect)
        res.chains.append(chain)
        if chain.error:
            res.error = chain.error
            return res
        q.next_avail = (q.next_avail + 1) & U16
        outcome = device(chain)
        if isinstance(outcome, Fail):
            in_flight.add(head)
            res.error = outcome.kind
            return res
        res.completed.append((head, outcome.used_len))
        q.next_used = (q.next_used + 1) & U16
    return res


def needs_notification(mem: GuestMemory, q: QueueModel) -> bool:
    """§2.7.7 / §2.7.10: whether the completions since the last decision must interrupt the driver."""
    old, new = q.signalled, q.next_used
    q.signalled = new
    if old == new:
        return False
    if q.event_idx:
        used_event = mem.read_u16(q.avail + 4 + 2 * q.size)
        return ((new - used_event - 1) & U16) < ((new - old) & U16)
    return not mem.read_u16(q.avail) & 1


# ---- the transport -------------------------------------------------------------------------------
class TransportModel:
    """virtio-mmio registers and status as a driver sees them."""

    def __init__(self, device_id: int, offered: int, max_sizes: list[int], config: bytes) -> None:
        self.device_id = device_id
        self.offered = offered
        self.config = config
        self.queues = [QueueModel(m) for m in max_sizes]
        self.interrupt_status = 0
        self.config_generation = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.dev_sel = 0
        self.drv_sel = 0
        self.driver_features = 0
        self.features_beyond = False
        self.queue_sel = 0
        for q in self.queues:
            q.reset()
        self.interrupt_status = 0

    @property
    def live(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.status & (FAILED | NEEDS_RESET)

    def selected(self) -> QueueModel | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def needs_reset(self) -> None:
        """§2.1.2: DEVICE_NEEDS_RESET, with a configuration change interrupt after DRIVER_OK."""
        if self.status & NEEDS_RESET:
            return
        self.status |= NEEDS_RESET
        if self.status & DRIVER_OK:
            self.interrupt_status |= INT_CONFIG

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & U32
        if self.status & DRIVER_OK:
            self.interrupt_status |= INT_CONFIG

    # ---- reads ------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_BASE:
            off = offset - CONFIG_BASE
            if size not in (1, 2, 4, 8) or off + size > len(self.config):
                return 0
            return int.from_bytes(self.config[off : off + size], "little")
        if size != 4 or offset % 4:
            return 0
        q = self.selected()
        table = {
            REG["magic"]: MAGIC,
            REG["version"]: 2,
            REG["device_id"]: self.device_id,
            REG["vendor"]: VENDOR,
            REG["device_features"]: (self.offered >> (32 * self.dev_sel)) & U32 if self.dev_sel < 64 else 0,
            REG["queue_num_max"]: q.max_size if q else 0,
            REG["queue_ready"]: int(q.ready) if q else 0,
            REG["interrupt_status"]: self.interrupt_status,
            REG["status"]: self.status,
            REG["shm_len_low"]: U32,
            REG["shm_len_high"]: U32,
            REG["shm_base_low"]: U32,
            REG["shm_base_high"]: U32,
            REG["config_generation"]: self.config_generation,
        }
        return table.get(offset, 0)

    # ---- writes (everything but QueueNotify, which the caller runs through process_queue) -------
    def write(self, offset: int, size: int, value: int, mem: GuestMemory) -> str | None:
        """Apply a register write; returns "reset", "activate" or "notify" when the device is involved."""
        if offset >= CONFIG_BASE:
            return None  # writable config fields are device-specific; the devices modelled here have none
        if size != 4 or offset % 4:
            return None
        value &= U32
        q = self.selected()
        if offset == REG["status"]:
            return self._write_status(value)
        if offset == REG["queue_notify"]:
            return "notify"
        if offset == REG["interrupt_ack"]:
            self.interrupt_status &= ~value & (INT_VRING | INT_CONFIG)
        elif offset == REG["device_features_sel"]:
            self.dev_sel = value
        elif offset == REG["driver_features_sel"]:
            self.drv_sel = value
        elif offset == REG["driver_features"]:
            if self.status & DRIVER and not self.status & (FEATURES_OK | FAILED):
                if self.drv_sel < 2:
                    shift = 32 * self.drv_sel
                    self.driver_features = (self.driver_features & ~(U32 << shift)) | (value << shift)
                elif value:
                    self.features_beyond = True
        elif offset == REG["queue_sel"]:
            self.queue_sel = value
        elif offset == REG["queue_ready"] and q is not None:
            if value == 0:
                q.disable()
            elif value == 1 and not q.ready:
                if self.status & FEATURES_OK and not self.status & (FAILED | NEEDS_RESET):
                    if q.valid(mem) is not None:
                        self.needs_reset()
                    else:
                        q.disable()
                        q.ready = True
                        q.indirect = bool(self.driver_features & F_INDIRECT_DESC)
                        q.event_idx = bool(self.driver_features & F_EVENT_IDX)
        elif (offset == REG["queue_num"] or offset in _ADDR_REGS) and q is not None and not q.ready:
            if offset == REG["queue_num"]:
                q.size = value
            else:
                attr, shift = _ADDR_REGS[offset]
                old = getattr(q, attr)
                setattr(q, attr, (old & ~(U32 << shift)) | (value << shift))
        return None

    def _features_ok(self) -> bool:
        f = self.driver_features
        return not self.features_beyond and not f & ~self.offered and bool(f & F_VERSION_1)

    def _write_status(self, value: int) -> str | None:
        if value == 0:
            self._reset_registers()
            return "reset"
        if value & ~STATUS_DEFINED:
            return None
        have = self.status & ~NEEDS_RESET
        want = value & ~NEEDS_RESET
        if have & ~want:
            return None  # clearing a bit other than by reset
        new = want & ~have
        if not new:
            return None
        if new & FAILED:
            self.status |= FAILED
            return None
        if self.status & (FAILED | NEEDS_RESET):
            return None
        target = have | new
        for b, needs in ((DRIVER, ACKNOWLEDGE), (FEATURES_OK, DRIVER), (DRIVER_OK, FEATURES_OK)):
            if new & b and not target & needs:
                return None
        if new & FEATURES_OK and not self._features_ok():
            new &= ~(FEATURES_OK | DRIVER_OK)
        self.status |= new
        return "activate" if new & DRIVER_OK else None
