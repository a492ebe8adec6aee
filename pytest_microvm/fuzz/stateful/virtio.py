"""virtio-mmio devices against the transport and ring models, one guest action at a time.

``VirtioMachine`` owns a small guest RAM with a hole in it (so rings can sit
in the "MMIO hole" or straddle the end of a region), a transport over a
``TracingGuestMemory``, and a ``TransportModel``.  Rules interleave register
accesses of any width and offset, a well-behaved initialisation, queue set-up
with valid and hostile ring layouts, descriptor chains (valid, almost valid,
hostile), avail.idx and used-ring tampering, notifications, interrupt ACKs,
resets, queue disables, host-side events (configuration change, restored ring
state) and edits of guest memory *between two device reads* (a read hook).

After every step:

* every register the driver can read equals the model's (Magic, Version,
  DeviceID constant; Status, InterruptStatus, ConfigGeneration, QueueReady);
* the IRQ line is high exactly while InterruptStatus is non-zero;
* guest memory equals the model's prediction byte for byte (used ring,
  written data), except bytes the model cannot know (random data);
* every guest byte the device changed lies in a writable buffer of a chain
  it completed or in a ready queue's used ring; it read nothing outside the
  ready queues' rings and the tables and buffers their chains name;
* ``used.idx`` moved by exactly the completions; each ``used.elem`` was
  written before the ``used.idx`` that publishes it;
* descriptor reads per notification stay within (chains + 1) x queue size;
* no device exception was swallowed by the transport ("device-exception").

Subclasses plug in a device and its model: ``device_model(chain, shadow)``
applies the device's effect on a shadow copy of guest RAM and returns
``Complete``/``Fail``, adding ranges it cannot predict to ``self.dont_care``.
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from vmm.devices.virtio.mmio import VirtioMmioTransport
from vmm.devices.virtio.rng import VirtioRng
from vmm.irq import RecordingIrqLine
from vmm.memory import GuestMemory

from ..models.virtio import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    INT_VRING,
    REG,
    Complete,
    Outcome,
    ParsedChain,
    QueueModel,
    TransportModel,
    needs_notification,
    process_queue,
)
from ..oracles import check_write_set, covered, violation
from ..strategies import (
    Access,
    ChainPlan,
    Desc,
    avail_indices,
    blk_requests,
    descriptor_chains,
    interesting_ints,
    mmio_accesses,
    ring_layouts,
)
from ..tracing import READ, VIEW, WRITE, TracingGuestMemory
from .base import FuzzMachine

# Guest RAM: two small regions with a "hole" between them (snapshots stay cheap).
REGION0 = (0x0, 0x10000)
HOLE = (0x10000, 0x20000)
REGION1 = (0x20000, 0x10000)
RAM_END = REGION1[0] + REGION1[1]
#: Rings go here; indirect tables at INDIRECT_BASE + 0x400 * queue; buffers in BUFFERS.
RING_AREA = (0x1000, 0xB000)
INDIRECT_BASE = 0xC000
BUFFERS = (0x20000, 0x2F000)

_USED_ELEM = struct.Struct("<II")
_DESC = struct.Struct("<QIHH")



def write_descriptors(ram: Any, desc_table: int, size: int, plan: ChainPlan) -> None:
    """Write ``plan``'s descriptors as a driver would: its ring-table entries (those inside a
    ``size``-entry table at ``desc_table``) and its indirect tables (at most 64 entries each),
    every field masked to its wire width (virtio 1.2 §2.7.5)."""
    for i, d in plan.table.items():
        if 0 <= i < size:
            ram.write(
                desc_table + 16 * i,
                _DESC.pack(d.addr & (2**64 - 1), d.length & 0xFFFF_FFFF, d.flags & 0xFFFF, d.next & 0xFFFF),
            )
    for addr, descs in plan.indirect.items():
        for k, d in enumerate(descs[:64]):
            ram.write(
                addr + 16 * k,
                _DESC.pack(d.addr & (2**64 - 1), d.length & 0xFFFF_FFFF, d.flags & 0xFFFF, d.next & 0xFFFF),
            )

class VirtioMachine(FuzzMachine):
    """The transport with one device; subclasses choose the device (default: virtio-rng)."""

    target = "virtio-mmio"
    #: Feature bits the well-behaved driver may pick from (VERSION_1 always, ring features maybe).
    queue_max = 8

    # ---- the device under test (overridden by subclasses) ------------------------------------
    def make_device(self) -> Any:
        return VirtioRng(queue_size=self.queue_max, max_bytes=48)

    def device_model(self, chain: ParsedChain, shadow: GuestMemory) -> Outcome:
        """virtio-rng: min(writable, max_bytes) random bytes; readable buffers ignored."""
        n = min(chain.writable_len, 48)
        left = n
        for addr, length in chain.writable:
            if left <= 0:
                break
            k = min(length, left)
            self.dont_care.append((addr, k))
            left -= k
        return Complete(n)

    # ---- set-up -----------------------------------------------------------------------------
    def __init__(self) -> None:
        super().__init__()
        self.ram = GuestMemory([REGION0, REGION1])
        self.shadow = GuestMemory([REGION0, REGION1])
        self.mem = TracingGuestMemory(self.ram)
        self.irq = RecordingIrqLine(5)
        self.device = self.make_device()
        self.transport = VirtioMmioTransport(self.device, self.mem, self.irq, name="fuzz")
        t = self.transport
        self.model = TransportModel(
            self.device.device_id, t.offered_features, [q.max_size for q in t.queues], bytes(self.device.config_bytes())
        )
        self.in_flight: list[set[int]] = [set() for _ in t.queues]
        #: The driver's next avail.idx per queue (what it last published).
        self.avail_idx = [0 for _ in t.queues]
        self.dont_care: list[tuple[int, int]] = []
        #: False after a step whose effect the models cannot predict (a TOCTOU edit).
        self.predictable = True

    def teardown(self) -> None:
        try:
            self.transport.close()
        finally:
            self.ram.close()
            self.shadow.close()
            super().teardown()

    # ---- helpers -------------------------------------------------------------------------------
    def _sync_shadow(self) -> None:
        for src, dst in zip(self.ram.regions, self.shadow.regions):
            dst.mapping[:] = src.mapping[:]

    def reg_write(self, offset: int, value: int, size: int = 4) -> None:
        self.apply(Access("w", offset, size, value))

    def reg_read(self, offset: int, size: int = 4) -> int:
        return self.apply(Access("r", offset, size))

    def apply(self, a: Access) -> int:
        """One guest access to the window, checked against the model."""
        if a.kind == "r":
            with self.step(f"read({a.offset:#x}, {a.size})"):
                got = self.transport.read(a.offset, a.size)
            want = self.model.read(a.offset, a.size)
            if got != want:
                raise violation(
                    "mmio-registers-match-model", f"read({a.offset:#x}, {a.size}) = {got:#x}, model {want:#x}"
                )
            return got
        value = a.value & ((1 << (8 * a.size)) - 1) if a.size else 0
        if a.offset == REG["queue_notify"] and a.size == 4:
            self.notify(value)
            return 0
        what = f"write({a.offset:#x}, {a.size}, {value:#x})"
        self.mem.clear()
        with self.step(what):
            self.transport.write(a.offset, a.size, value)
        if self.mem.log:
            acc = self.mem.log[0]
            raise violation("no-queue-access-while-not-ready", f"{what}: device touched guest memory {acc}")
        event = self.model.write(a.offset, a.size, value, self.ram)
        if event == "reset":
            for s in self.in_flight:
                s.clear()
        return 0

    def _device_step(self, what: str, fn: Any, allowed_writes: list[tuple[int, int]] | None = None) -> None:
        """Run ``fn`` with the memory oracles around it: nothing may be read or written unless allowed."""
        before = self.mem.snapshot()
        self.mem.clear()
        with self.step(what):
            fn()
        changed = self.mem.changed_ranges(before)
        allowed = list(allowed_writes or [])
        check_write_set(changed, allowed, what)
        for acc in self.mem.log:
            if acc.kind in (WRITE, VIEW) and not covered(allowed, acc.gpa, acc.length):
                if acc.kind == VIEW and covered(self._allowed_reads, acc.gpa, acc.length):
                    continue
                raise violation(
                    "writes-only-to-writable-and-used", f"{what}: device {acc.kind} at {acc.gpa:#x}+{acc.length:#x}"
                )
            if acc.kind == READ and not covered(self._allowed_reads, acc.gpa, acc.length):
                raise violation("no-queue-access-while-not-ready", f"{what}: device read {acc.gpa:#x}+{acc.length:#x}")
        self._allowed_reads = []

    _allowed_reads: list[tuple[int, int]] = []

    # ---- notification: the heart of the ring oracles ------------------------------------------------
    def notify(self, index: int) -> None:
        m = self.model
        self._sync_shadow()
        self.dont_care = []
        results = {}
        allowed_reads: list[tuple[int, int]] = []
        allowed_writes: list[tuple[int, int]] = []
        if m.live and index < len(m.queues) and m.queues[index].ready:
            q = m.queues[index]
            before_used = q.next_used
            res = process_queue(self.shadow, q, lambda c: self.device_model(c, self.shadow), self.in_flight[index])
            # The shadow gets the used ring writes a correct device makes.
            slot = before_used
            for head, length in res.completed:
                self.shadow.write(q.used + 4 + 8 * (slot % q.size), _USED_ELEM.pack(head, length))
                slot = (slot + 1) & 0xFFFF
            if res.completed:
                self.shadow.write_u16(q.used + 2, q.next_used)
            if q.event_idx and (
                res.completed or any(c.error is None for c in res.chains) or res.error in ("no-status-byte",)
            ):
                self.shadow.write_u16(q.used + 4 + 8 * q.size, q.next_avail)
            results[index] = res
            allowed_writes.append(q.used_area())
            for chain in res.chains:
                allowed_reads.extend(chain.touched)
                allowed_reads.extend(chain.readable)
                allowed_reads.extend(chain.writable)
            for chain in res.chains[: len(res.completed)]:
                allowed_writes.extend(chain.writable)
            if res.error:
                m.needs_reset()
        for q in m.queues:
            if q.ready:
                allowed_reads.extend(q.areas())
        # Used-buffer notifications for every ready queue (the transport signals all after a kick).
        if results and m.status & DRIVER_OK:
            for q in m.queues:
                if q.ready and needs_notification(self.shadow, q):
                    m.interrupt_status |= INT_VRING
        self._allowed_reads = allowed_reads
        reads_before = self.mem.reads_served
        self._device_step(
            f"notify({index})", lambda: self.transport.write(REG["queue_notify"], 4, index), allowed_writes
        )
        if index in results:
            res = results[index]
            self.note(f"kick: {min(len(res.completed), 3)}+ completions, error {res.error}")
            self._check_ring(index, res, self.mem.reads_served - reads_before)
        else:
            self.note("kick: not delivered")

    def _check_ring(self, index: int, res: Any, reads: int) -> None:
        q = self.model.queues[index]
        dev_q = self.transport.queues[index]
        if not self.predictable:
            return
        if (dev_q.next_avail, dev_q.next_used) != (q.next_avail, q.next_used):
            raise violation(
                "used-idx-exact",
                f"queue {index}: device at avail {dev_q.next_avail} used {dev_q.next_used}, "
                f"model at avail {q.next_avail} used {q.next_used} (completions {res.completed}, error {res.error})",
            )
        limit = (len(res.chains) + 1) * (q.size + 2) + 4 * q.size + 8
        if reads > limit:
            raise violation("bounded-work-per-kick", f"queue {index}: {reads} guest reads for {len(res.chains)} chains")
        self._check_memory_equals_shadow(f"notify({index})")
        self._check_used_order(q, len(res.completed))

    def _check_memory_equals_shadow(self, what: str) -> None:
        diff = self.mem.changed_ranges([bytes(r.mapping) for r in self.shadow.regions])
        for gpa, n in diff:
            if not covered(self.dont_care, gpa, n):
                raise violation(
                    "exactly-once-completion",
                    f"{what}: guest bytes {gpa:#x}+{n:#x} differ from the model "
                    f"(device {self.ram.read(gpa, min(n, 16)).hex()}, model {self.shadow.read(gpa, min(n, 16)).hex()})",
                )

    def _check_used_order(self, q: QueueModel, completions: int) -> None:
        """§2.7.8.2: each used element is written before the used.idx that publishes it."""
        idx_gpa = q.used + 2
        elem_writes: set[int] = set()
        published = 0
        for acc in self.mem.log:
            if acc.kind != WRITE:
                continue
            if acc.gpa == idx_gpa and acc.length == 2:
                published += 1
                if len(elem_writes) < published:
                    raise violation(
                        "used-len-before-idx", f"used.idx moved before used.ring element {published} was written"
                    )
            elif q.used + 4 <= acc.gpa < q.used + 4 + 8 * q.size:
                elem_writes.add(len(elem_writes))
        if published != completions:
            raise violation("used-idx-exact", f"used.idx was written {published} times for {completions} completions")

    # ---- start state ---------------------------------------------------------------------------------------
    @initialize(
        boot=st.sampled_from(["live", "live", "live", "features", "none"]),
        ring=st.sampled_from([True, True, True, False]),
        event_idx=st.booleans(),
        size=st.sampled_from([8, 8, 4, 2, 1]),
    )
    def boot(self, boot: str, ring: bool, event_idx: bool, size: int) -> None:
        """Most runs start from a driver that set the device up properly, so requests reach it."""
        if boot == "none":
            return
        self.initialize(ring, event_idx, 0)
        if boot == "features":
            return
        for qi in range(len(self.model.queues)):
            base = RING_AREA[0] + 0x1000 * qi
            size = min(size, self.model.queues[qi].max_size)
            desc, avail, used = base, base + 16 * size, (base + 16 * size + 6 + 2 * size + 3) & ~3
            self.ram.fill(base, 0x1000)
            self.reg_write(REG["queue_sel"], qi)
            self.reg_write(REG["queue_num"], size)
            for lo, addr in (
                (REG["queue_desc_low"], desc),
                (REG["queue_driver_low"], avail),
                (REG["queue_device_low"], used),
            ):
                self.reg_write(lo, addr)
                self.reg_write(lo + 4, 0)
            self.reg_write(REG["queue_ready"], 1)
            self.avail_idx[qi] = 0
        self.driver_ok()

    @rule()
    def recover(self) -> None:
        """After malformed input: reset and set the device up again; requests must work after it."""
        if self.model.live:
            return
        self.reg_write(REG["status"], 0)
        self.boot("live", ring=True, event_idx=bool(self.steps & 1), size=8)

    # ---- rules: registers ----------------------------------------------------------------------------
    @rule(a=mmio_accesses(config_size=0x40))
    def register_access(self, a: Access) -> None:
        self.apply(a)

    @rule(
        ring=st.booleans(),
        event_idx=st.booleans(),
        extra=st.sampled_from([0, 0, 0, 1 << 33, 1 << 3, 1 << 40]),
        version_1=st.sampled_from([True, True, True, False]),
        beyond=st.sampled_from([None, None, None, 2, 3, 0xFFFF_FFFF]),
    )
    def initialize(
        self, ring: bool, event_idx: bool, extra: int, version_1: bool = True, beyond: int | None = None
    ) -> None:
        """The §3.1.1 sequence up to FEATURES_OK, as Linux does it; sometimes with unoffered bits,
        without VERSION_1, or with a word written at DriverFeaturesSel >= 2 (checklist 4)."""
        self.reg_write(REG["status"], 0)
        self.reg_write(REG["status"], ACKNOWLEDGE)
        self.reg_write(REG["status"], ACKNOWLEDGE | DRIVER)
        offered = self.model.offered
        want = (
            (1 << 32 if version_1 else 0)
            | (offered & (1 << 28) if ring else 0)
            | (offered & (1 << 29) if event_idx else 0)
            | extra
        )
        if beyond is not None:
            self.reg_write(REG["driver_features_sel"], beyond)
            self.reg_write(REG["driver_features"], 1)
        for sel in (0, 1):
            self.reg_write(REG["driver_features_sel"], sel)
            self.reg_write(REG["driver_features"], (want >> (32 * sel)) & 0xFFFF_FFFF)
        self.reg_write(REG["status"], ACKNOWLEDGE | DRIVER | FEATURES_OK)

    @rule(data=st.data())
    def setup_queue(self, data: st.DataObject) -> None:
        """QueueSel, QueueNum, the three addresses, QueueReady=1: valid or hostile."""
        qi = data.draw(
            st.sampled_from([*range(len(self.model.queues)), len(self.model.queues), 0xFFFF_FFFF]), label="queue"
        )
        max_size = self.model.queues[0].max_size
        size = data.draw(
            st.one_of(st.sampled_from([max_size, max_size // 2, 1]), st.sampled_from([0, 3, max_size * 2, 65535])),
            label="size",
        )
        lay = data.draw(
            ring_layouts(size if 0 < size <= 32768 else max_size, RING_AREA, ram_end=RAM_END, hole=HOLE), label="layout"
        )
        self.reg_write(REG["queue_sel"], qi)
        if qi < len(self.model.queues) and not self.model.queues[qi].ready:
            # The driver zeroes its rings first (where they are in RAM).
            for addr, length in ((lay.avail, 6 + 2 * max(size, 1)), (lay.used, 6 + 8 * max(size, 1))):
                if self.ram.contains(addr, min(length, 0x10000)) and length <= 0x10000:
                    self.ram.fill(addr, length)
            self.avail_idx[qi] = 0
        self.reg_write(REG["queue_num"], size)
        for lo, addr in (
            (REG["queue_desc_low"], lay.desc),
            (REG["queue_driver_low"], lay.avail),
            (REG["queue_device_low"], lay.used),
        ):
            self.reg_write(lo, addr & 0xFFFF_FFFF)
            self.reg_write(lo + 4, addr >> 32)
        self.reg_write(REG["queue_ready"], data.draw(st.sampled_from([1, 1, 1, 0, 2]), label="ready"))

    @rule()
    def driver_ok(self) -> None:
        self.reg_write(REG["status"], self.model.status | DRIVER_OK)

    @rule(bits=st.sampled_from([1, 2, 3, 0xFFFF_FFFF, 4]))
    def ack(self, bits: int) -> None:
        self.reg_write(REG["interrupt_ack"], bits)

    @rule()
    def reset(self) -> None:
        self.reg_write(REG["status"], 0)

    @rule(q=st.integers(0, 2))
    def queue_disable(self, q: int) -> None:
        self.reg_write(REG["queue_sel"], q)
        self.reg_write(REG["queue_ready"], 0)

    @rule()
    def host_config_change(self) -> None:
        with self.step("config_changed"):
            self.device.config_changed()
        self.model.config_changed()

    # ---- rules: the rings ------------------------------------------------------------------------------------
    def _driver_queue(self, qi: int) -> QueueModel:
        """The queue as the driver set it up (the model's view; async machines keep their own)."""
        return self.model.queues[qi]

    def _ready_queue(self, data: st.DataObject) -> int | None:
        qs = [
            i
            for i in range(len(self.model.queues))
            if 0 < (q := self._driver_queue(i)).size <= 32768 and self.ram.contains(q.desc, 16 * q.size)
        ]
        if not qs:
            return None
        return data.draw(st.sampled_from(qs), label="queue")

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        """Write a chain into the table of a configured queue and publish its head (no kick)."""
        self._submit_returning(data)

    def _submit_returning(self, data: st.DataObject) -> int | None:
        qi = self._ready_queue(data)
        if qi is None:
            return None
        q = self._driver_queue(qi)
        if not (self.ram.contains(q.avail, 6 + 2 * q.size) and self.ram.contains(q.desc, 16 * q.size)):
            return None
        free = data.draw(st.permutations(range(q.size)), label="free")[: min(q.size, 6)]
        plan = data.draw(self.chain_strategy(q, qi, list(free)), label="chain")
        self.write_plan(q, plan)
        self.publish(qi, plan.head)
        return qi

    def chain_strategy(self, q: QueueModel, qi: int, free: list[int]) -> st.SearchStrategy[ChainPlan]:
        return descriptor_chains(
            size=q.size,
            free=free,
            buffers=BUFFERS,
            ram_end=RAM_END,
            ring_addr=q.used,
            indirect_table=self._next_table(qi),
        )

    def _next_table(self, qi: int) -> int:
        """Indirect tables rotate over 8 slots per queue, so chains in flight keep their own."""
        self.tables = getattr(self, "tables", 0) + 1
        return INDIRECT_BASE + 0x400 * qi + 0x80 * (self.tables % 8)

    def write_plan(self, q: QueueModel, plan: ChainPlan) -> None:
        write_descriptors(self.ram, q.desc, q.size, plan)
        for addr, blob in plan.data.items():
            if self.ram.contains(addr, len(blob)):
                self.ram.write(addr, blob)

    def publish(self, qi: int, head: int) -> None:
        q = self._driver_queue(qi)
        idx = self.avail_idx[qi]
        self.ram.write_u16(q.avail + 4 + 2 * (idx % q.size), head & 0xFFFF)
        self.avail_idx[qi] = (idx + 1) & 0xFFFF
        self.ram.write_u16(q.avail + 2, self.avail_idx[qi])

    @rule(data=st.data())
    def tamper_avail_idx(self, data: st.DataObject) -> None:
        """avail.idx far ahead, backwards, wrapping (checklist 10)."""
        qi = self._ready_queue(data)
        if qi is None:
            return
        q = self._driver_queue(qi)
        if not self.ram.contains(q.avail, 4):
            return
        value = data.draw(avail_indices(q.next_avail, q.size), label="avail.idx")
        self.ram.write_u16(q.avail + 2, value)
        self.avail_idx[qi] = value

    @rule(
        data=st.data(), what=st.sampled_from(["used_event", "avail_flags", "used_ring", "duplicate_head", "used_idx"])
    )
    def tamper_ring(self, data: st.DataObject, what: str) -> None:
        """Poisoned used_event, NO_INTERRUPT, the driver writing the used ring, a duplicate head (checklist 10, 15)."""
        qi = self._ready_queue(data)
        if qi is None:
            return
        q = self._driver_queue(qi)
        if not (self.ram.contains(q.avail, 6 + 2 * q.size) and self.ram.contains(q.used, 6 + 8 * q.size)):
            return
        v = data.draw(interesting_ints(16), label="value")
        if what == "used_event":
            self.ram.write_u16(q.avail + 4 + 2 * q.size, v)
        elif what == "avail_flags":
            self.ram.write_u16(q.avail, v & 3)
        elif what == "used_ring":
            self.ram.write_u32(q.used + 4 + 8 * (v % q.size), data.draw(interesting_ints(32), label="junk"))
        elif what == "used_idx":
            self.ram.write_u16(q.used + 2, v)
        elif self.avail_idx[qi] != q.next_avail:
            head = self.ram.read_u16(q.avail + 4 + 2 * (q.next_avail % q.size))
            self.publish(qi, head)

    @rule(index=st.one_of(st.integers(0, 2), st.sampled_from([0xFFFF, 0xFFFF_FFFF])))
    def kick(self, index: int) -> None:
        self.notify(index)

    @rule(data=st.data())
    def toctou_kick(self, data: st.DataObject) -> None:
        """Edit guest memory between two device reads during a notification (checklist 15)."""
        if not (self.model.live and any(q.ready for q in self.model.queues)):
            return
        qi = next(i for i, q in enumerate(self.model.queues) if q.ready)
        q = self.model.queues[qi]
        nth = data.draw(st.integers(0, 12), label="after read")
        target = data.draw(st.sampled_from(["avail.idx", "ring slot", "descriptor", "indirect"]), label="edit")
        value = data.draw(interesting_ints(64), label="value")
        start = self.mem.reads_served
        ram = self.ram

        def hook(n: int, gpa: int, length: int) -> None:
            if n - start != nth:
                return
            if target == "avail.idx":
                ram.write_u16(q.avail + 2, value & 0xFFFF)
            elif target == "ring slot":
                ram.write_u16(q.avail + 4 + 2 * (q.next_avail % q.size), value & 0xFFFF)
            elif target == "descriptor":
                ram.write(q.desc + 16 * (value % q.size), struct.pack("<Q", value) * 2)
            else:
                ram.write(INDIRECT_BASE + 0x400 * qi, struct.pack("<Q", value) * 2)

        self.mem.add_read_hook(hook)
        try:
            self.predictable = False
            self._toctou(qi)
        finally:
            self.mem.clear_read_hooks()

    def _toctou(self, qi: int) -> None:
        """A kick whose outcome the model cannot know: check safety only, then follow the device."""
        q = self.model.queues[qi]
        before = self.mem.snapshot()
        writable_before = writable_anywhere(self.ram, q)
        self.mem.clear()
        with self.step(f"toctou notify({qi})"):
            self.transport.write(REG["queue_notify"], 4, qi)
        changed = self.mem.changed_ranges(before)
        # Allowed: the used ring, any buffer some descriptor marked writable before or after the
        # edit, and the hook's own edits (descriptor table, avail ring, indirect table).
        allowed = [q.used_area(), (q.desc, 16 * q.size), (q.avail, 6 + 2 * q.size), (INDIRECT_BASE + 0x400 * qi, 0x400)]
        allowed += writable_before + writable_anywhere(self.ram, q)
        check_write_set(changed, allowed, "toctou notify")
        self.resync(qi)

    def resync(self, qi: int) -> None:
        """Adopt the device's ring state and status after an unpredictable step (they are still checked for sanity)."""
        dq = self.transport.queues[qi]
        q = self.model.queues[qi]
        q.next_avail, q.next_used, q.signalled = dq.next_avail, dq.next_used, dq.signalled_used
        self.in_flight[qi] = {i for i, v in enumerate(dq._in_flight) if v}
        t = self.transport
        if t.status & ~self.model.status & ~64:
            raise violation(
                "status-machine", f"status {t.status:#x} gained bits other than NEEDS_RESET over {self.model.status:#x}"
            )
        self.model.status = t.status
        self.model.interrupt_status = t.interrupt_status
        self.predictable = True

    @rule(data=st.data())
    def restore_ring_state(self, data: st.DataObject) -> None:
        """A restored snapshot with invalid next_avail / next_used (checklist 24)."""
        if not any(q.ready for q in self.model.queues):
            return
        qi = next(i for i, q in enumerate(self.model.queues) if q.ready)
        na = data.draw(interesting_ints(16), label="next_avail")
        nu = data.draw(interesting_ints(16), label="next_used")
        with self.step("restore_state"):
            self.transport.queues[qi].restore_state(na, nu)
        q = self.model.queues[qi]
        q.next_avail, q.next_used, q.signalled = na, nu, nu

    # ---- invariants -----------------------------------------------------------------------------------------
    @invariant()
    def registers_match(self) -> None:
        t = self.transport
        names = ("magic", "version", "device_id", "vendor", "status", "interrupt_status", "config_generation")
        with self.step("register check"):
            values = [t.read(REG[name], 4) for name in names]
        for name, got in zip(names, values):
            want = self.model.read(REG[name], 4)
            if got != want:
                raise violation("mmio-registers-match-model", f"{name} reads {got:#x}, model {want:#x}")
        for i, q in enumerate(self.model.queues):
            if t.queues[i].ready != q.ready:
                raise violation("mmio-registers-match-model", f"queue {i} ready {t.queues[i].ready}, model {q.ready}")
        if self.irq.level != bool(t.interrupt_status):
            raise violation(
                "interrupt-status-real-events",
                f"IRQ line {self.irq.level} with InterruptStatus {t.interrupt_status:#x}",
            )
        if t.interrupt_status & ~3:
            raise violation(
                "interrupt-status-real-events", f"InterruptStatus {t.interrupt_status:#x} has undefined bits"
            )
        if t.errors.get("device-exception"):
            raise violation("closed-error-set", f"the transport caught a device exception: {t.last_error}")
        if t.status == 0 and (any(q.ready for q in t.queues) or t.interrupt_status):
            raise violation("reset-clears-everything", "status 0 with a ready queue or a pending interrupt")


class _RequestRules:
    """Rules that weight requests (and recovery) up in the device machines (Hypothesis picks rules uniformly)."""

    @rule()
    def recover_again(self) -> None:
        self.recover()  # type: ignore[attr-defined]

    def _submit_and_kick(self, data: st.DataObject) -> None:
        queues = set()
        for _ in range(data.draw(st.integers(1, 3), label="chains")):
            queues.add(self._submit_returning(data))  # type: ignore[attr-defined]
        for qi in sorted(q for q in queues if q is not None) or [0]:
            self.notify(qi)  # type: ignore[attr-defined]

    @rule(data=st.data())
    def request(self, data: st.DataObject) -> None:
        self._submit_and_kick(data)

    @rule(data=st.data())
    def request_again(self, data: st.DataObject) -> None:
        self._submit_and_kick(data)

    @rule(data=st.data())
    def request_once_more(self, data: st.DataObject) -> None:
        self._submit_and_kick(data)


class RngMachine(_RequestRules, VirtioMachine):
    """virtio-rng: the transport machine's default device, with requests weighted up."""

    target = "virtio-rng"


# ---- virtio-blk ---------------------------------------------------------------------------------------------------
BLK_SECTORS = 16
BLK_SERIAL = b"fuzz-disk".ljust(20, b"\0")


class BlkMachine(_RequestRules, VirtioMachine):
    """virtio-blk over a small image file, against an in-memory model of the disk."""

    target = "virtio-blk"
    read_only = False

    def make_device(self) -> Any:
        from vmm.devices.virtio.blk import VirtioBlock

        fd, self.image = tempfile.mkstemp(prefix="fuzz-blk-", suffix=".img")
        content = bytes((i * 7 + 3) & 0xFF for i in range(BLK_SECTORS * 512))
        os.write(fd, content)
        os.close(fd)
        self.disk = bytearray(content)
        #: Sectors whose content is unspecified (after DISCARD).
        self.unknown: set[int] = set()
        return VirtioBlock(self.image, read_only=self.read_only, serial="fuzz-disk", queue_size=self.queue_max)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            os.unlink(self.image)

    def device_model(self, chain: ParsedChain, shadow: GuestMemory) -> Outcome:
        from ..models.blk import blk_model

        return blk_model(self, chain, shadow)

    @invariant()
    def image_matches_model(self) -> None:
        """The image file holds what the model's disk holds: nothing past the capacity, no write on a
        read-only disk, zeroes after WRITE_ZEROES (sectors after DISCARD are unspecified)."""
        with open(self.image, "rb") as f:
            content = f.read()
        if len(content) != len(self.disk):
            raise violation("blk-backend-matches-model", f"image is {len(content)} bytes, was {len(self.disk)}")
        for s in range(len(self.disk) // 512):
            if s in self.unknown:
                continue
            if content[s * 512 : (s + 1) * 512] != self.disk[s * 512 : (s + 1) * 512]:
                raise violation("blk-backend-matches-model", f"sector {s} of the image differs from the model")

    def chain_strategy(self, q: QueueModel, qi: int, free: list[int]) -> st.SearchStrategy[ChainPlan]:
        blk = _blk_chain(q, free)
        return st.one_of(super().chain_strategy(q, qi, free), blk, blk, blk)


def writable_anywhere(
    mem: GuestMemory, q: QueueModel, max_indirect: int = 64, *, readable: bool = False
) -> list[tuple[int, int]]:
    """Every buffer any descriptor of ``q`` (or an indirect table it names) marks device-writable
    (or, with ``readable``, device-readable)."""
    want = 0 if readable else 2
    out: list[tuple[int, int]] = []
    if not mem.contains(q.desc, 16 * q.size):
        return out
    for i in range(q.size):
        addr, length, flags, _ = _DESC.unpack(mem.read(q.desc + 16 * i, 16))
        if flags & 4 and length % 16 == 0 and mem.contains(addr, length):
            for k in range(min(length // 16, max_indirect)):
                a, n, f, _ = _DESC.unpack(mem.read(addr + 16 * k, 16))
                if f & 2 == want:
                    out.append((a, n))
        elif flags & 2 == want:
            out.append((addr, length))
    return out


@st.composite
def _blk_chain(draw: st.DrawFn, q: QueueModel, free: list[int]) -> ChainPlan:
    """A virtio-blk request laid out as descriptors, its parts split at arbitrary points."""
    req = draw(blk_requests(BLK_SECTORS))
    parts = [(n, False) for n in req.readable_split] + [(n, True) for n in req.writable_split]
    if len(parts) > len(free):
        # Not enough descriptors for this split: one readable and one writable descriptor instead.
        r, w = sum(req.readable_split), sum(req.writable_split)
        parts = [p for p in ((r, False), (w, True)) if p[0]][: len(free)]
    if not parts:
        return ChainPlan(head=free[0] if free else 0, kind="blk-empty")
    plan = ChainPlan(head=free[0], kind="blk")
    addr = draw(st.integers(BUFFERS[0], BUFFERS[0] + 0x1000)) & ~7
    data = req.readable
    pos = 0
    for k, (n, w) in enumerate(parts):
        last = k == len(parts) - 1
        if not w:
            plan.data[addr] = data[pos : pos + n]
            pos += n
        plan.table[free[k]] = Desc(addr, n, (2 if w else 0) | (0 if last else 1), 0 if last else free[k + 1])
        addr += n + draw(st.sampled_from([0, 0, 8, 512]))
    return plan


class BlkReadOnlyMachine(BlkMachine):
    target = "virtio-blk-ro"
    read_only = True
