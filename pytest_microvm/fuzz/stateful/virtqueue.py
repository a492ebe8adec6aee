"""The split virtqueue on its own, against ``parse_chain`` and the ring rules.

The machine plays both the driver (descriptor tables, the available ring,
hostile indices, edits between two device reads) and the device's host side
(``pop``, completions in any order, ``needs_notification``, disable, reset,
a restored ring state), so that each ring rule is checked in isolation:

* ``pop`` returns exactly the buffers ``parse_chain`` finds, or raises
  ``VirtqueueError`` exactly when it finds a broken rule; nothing else escapes;
* no guest memory is touched while the queue is not ready, and a pop reads at
  most queue-size descriptors (+1 per indirect table) plus the ring entries;
* ``add_used`` writes only the used element and ``used.idx`` (element first),
  returns each head exactly once, and drops completions of chains popped
  before a reset or disable (late completions);
* ``needs_notification`` follows §2.7.7 / §2.7.10 (EVENT_IDX or NO_INTERRUPT).
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from vmm.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from vmm.memory import GuestMemory

from ..models.virtio import QueueModel, needs_notification, parse_chain
from ..oracles import GUEST_INPUT_ERRORS, check_write_set, covered, violation
from ..strategies import avail_indices, descriptor_chains, interesting_ints, queue_sizes, ring_layouts
from ..tracing import READ, TracingGuestMemory
from .base import FuzzMachine
from .virtio import (
    BUFFERS,
    HOLE,
    INDIRECT_BASE,
    RAM_END,
    REGION0,
    REGION1,
    RING_AREA,
    writable_anywhere,
    write_descriptors,
)

MAX_SIZE = 8
#: Ring features are mostly negotiated: chains that use them are then reachable.
MOSTLY = st.sampled_from([True, True, True, False])


class VirtqueueMachine(FuzzMachine):
    target = "virtqueue"

    def __init__(self) -> None:
        super().__init__()
        self.ram = GuestMemory([REGION0, REGION1])
        self.mem = TracingGuestMemory(self.ram)
        self.q = Virtqueue(self.mem, 0, MAX_SIZE, name="fuzz queue")
        self.model = QueueModel(MAX_SIZE)
        self.broken = False
        self.in_flight: dict[int, DescriptorChain] = {}
        self.stale: list[DescriptorChain] = []
        self.avail_idx = 0

    def teardown(self) -> None:
        self.ram.close()
        super().teardown()

    # ---- configuration -------------------------------------------------------------------
    @initialize(size=st.sampled_from([8, 4, 2, 1]), indirect=MOSTLY, event_idx=st.booleans())
    def start(self, size: int, indirect: bool, event_idx: bool) -> None:
        base = RING_AREA[0]
        self.ram.fill(base, 0x1000)
        self._enable(size, base, base + 16 * size, (base + 16 * size + 6 + 2 * size + 3) & ~3, indirect, event_idx)

    @rule(data=st.data(), indirect=MOSTLY, event_idx=st.booleans())
    def reconfigure(self, data: st.DataObject, indirect: bool, event_idx: bool) -> None:
        """Disable, then enable with a new size and layout: valid or hostile (checklist 5, 6)."""
        size = data.draw(queue_sizes(MAX_SIZE), label="size")
        lay = data.draw(
            ring_layouts(size if 0 < size <= MAX_SIZE else MAX_SIZE, RING_AREA, ram_end=RAM_END, hole=HOLE),
            label="layout",
        )
        for addr, length in ((lay.avail, 6 + 2 * MAX_SIZE), (lay.used, 6 + 8 * MAX_SIZE)):
            if self.ram.contains(addr, length):
                self.ram.fill(addr, length)
        self._enable(size, lay.desc, lay.avail, lay.used, indirect, event_idx)

    def _enable(self, size: int, desc: int, avail: int, used: int, indirect: bool, event_idx: bool) -> None:
        self.q.disable()
        self._stale_all()
        self.q.size, self.q.desc_addr, self.q.avail_addr, self.q.used_addr = size, desc, avail, used
        m = self.model
        m.size, m.desc, m.avail, m.used = size, desc, avail, used
        m.disable()
        why = m.valid(self.ram)
        self.mem.clear()
        try:
            with self.step("enable", GUEST_INPUT_ERRORS):
                self.q.enable(indirect=indirect, event_idx=event_idx)
            refused = None
        except VirtqueueError as e:
            refused = e.kind
        if (why is None) != (refused is None):
            raise violation(
                "bad-ring-setup-rejected",
                f"enable(size={size}, {desc:#x}, {avail:#x}, {used:#x}): model {why}, queue {refused}",
            )
        self._no_memory_access("enable")
        if why is None:
            m.ready, m.indirect, m.event_idx = True, indirect, event_idx
        self.broken = False
        self.avail_idx = 0

    def _stale_all(self) -> None:
        self.stale.extend(self.in_flight.values())
        self.in_flight.clear()

    def _no_memory_access(self, what: str) -> None:
        if self.mem.log:
            raise violation("no-queue-access-while-not-ready", f"{what}: queue touched guest memory {self.mem.log[0]}")

    @rule(reenable=st.sampled_from([True, True, True, False]), indirect=MOSTLY, event_idx=st.booleans())
    def disable(self, reenable: bool, indirect: bool, event_idx: bool) -> None:
        """QueueReady := 0 with chains in flight (checklist 23), usually set up again at once."""
        self.mem.clear()
        with self.step("disable"):
            self.q.disable()
        self._no_memory_access("disable")
        self.model.disable()
        self._stale_all()
        self.broken = False
        if reenable:
            self.start(8, indirect, event_idx)

    @rule(next_avail=interesting_ints(16), next_used=interesting_ints(16))
    def restore(self, next_avail: int, next_used: int) -> None:
        """A restored snapshot with any next_avail / next_used (checklist 24)."""
        with self.step("restore_state"):
            self.q.restore_state(next_avail, next_used)
        self.model.next_avail, self.model.next_used, self.model.signalled = next_avail, next_used, next_used

    # ---- the driver side ------------------------------------------------------------------------
    def _next_table(self) -> int:
        """Indirect tables rotate over 8 slots, so chains in flight keep their own."""
        self.tables = getattr(self, "tables", 0) + 1
        return INDIRECT_BASE + 0x80 * (self.tables % 8)

    def _rings_in_ram(self) -> bool:
        m = self.model
        return 0 < m.size <= MAX_SIZE and all(self.ram.contains(a, n) for a, n in m.areas())

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        if not self._rings_in_ram():
            return
        m = self.model
        free = [i for i in data.draw(st.permutations(range(m.size)), label="free") if i not in self.in_flight][:6]
        plan = data.draw(
            descriptor_chains(
                size=m.size,
                free=free,
                buffers=BUFFERS,
                ram_end=RAM_END,
                ring_addr=m.used,
                indirect_table=self._next_table(),
            ),
            label="chain",
        )
        write_descriptors(self.ram, m.desc, m.size, plan)
        self.ram.write_u16(m.avail + 4 + 2 * (self.avail_idx % m.size), plan.head & 0xFFFF)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write_u16(m.avail + 2, self.avail_idx)

    @rule(data=st.data())
    def move_avail_idx(self, data: st.DataObject) -> None:
        if not self._rings_in_ram():
            return
        self.avail_idx = data.draw(avail_indices(self.model.next_avail, self.model.size), label="avail.idx")
        self.ram.write_u16(self.model.avail + 2, self.avail_idx)

    @rule(used_event=interesting_ints(16), flags=st.sampled_from([0, 1, 0xFFFF]))
    def suppression(self, used_event: int, flags: int) -> None:
        if not self._rings_in_ram():
            return
        self.ram.write_u16(self.model.avail, flags)
        self.ram.write_u16(self.model.avail + 4 + 2 * self.model.size, used_event)

    # ---- the device side --------------------------------------------------------------------------
    def _expected_pop(self) -> tuple[object, str | None]:
        """(ParsedChain or None, error kind) for the next pop, per the model."""
        m = self.model
        if not m.ready or self.broken:
            return None, None
        idx = self.ram.read_u16(m.avail + 2)
        pending = (idx - m.next_avail) & 0xFFFF
        if pending > m.size:
            return None, "avail-idx-ahead"
        if pending == 0:
            return None, None
        head = self.ram.read_u16(m.avail + 4 + 2 * (m.next_avail % m.size))
        if head >= m.size:
            return None, "head-out-of-range"
        if head in self.in_flight:
            return None, "head-in-flight"
        chain = parse_chain(self.ram, m.desc, m.size, head, m.indirect)
        return chain, chain.error

    @rule()
    def pop(self) -> None:
        m = self.model
        expected, error = self._expected_pop()
        self.mem.clear()
        got, raised = None, None
        try:
            with self.step("pop", GUEST_INPUT_ERRORS):
                got = self.q.pop()
        except VirtqueueError as e:
            raised = e.kind
        if not m.ready:
            self._no_memory_access("pop while not ready")
        reads = sum(1 for a in self.mem.log if a.kind == READ)
        if reads > m.size + 8:
            raise violation("bounded-work-per-kick", f"one pop made {reads} guest reads (queue size {m.size})")
        self.note(f"pop: {raised or ('chain' if got is not None else 'nothing')}")
        if (error is None) != (raised is None):
            raise violation("chain-rules-match-model", f"pop: model error {error}, queue raised {raised}")
        if raised is not None:
            self.broken = True
            return
        if (expected is None) != (got is None):
            raise violation("chain-rules-match-model", f"pop: model chain {expected}, queue returned {got}")
        if got is None:
            return
        want_r = [(a, n) for a, n in expected.readable]  # type: ignore[union-attr]
        want_w = [(a, n) for a, n in expected.writable]  # type: ignore[union-attr]
        if [(b.addr, b.length) for b in got.readable] != want_r or [(b.addr, b.length) for b in got.writable] != want_w:
            raise violation(
                "chain-rules-match-model", f"pop: buffers {got.readable}/{got.writable} != model {want_r}/{want_w}"
            )
        if got.head != expected.head:  # type: ignore[union-attr]
            raise violation("used-id-outstanding-once", f"pop returned head {got.head}, model {expected.head}")  # type: ignore[union-attr]
        m.next_avail = (m.next_avail + 1) & 0xFFFF
        self.in_flight[got.head] = got

    def _submit_and_pop(self, data: st.DataObject) -> None:
        if self.broken or not self.model.ready:
            # The device answered the last error with NEEDS_RESET; the driver resets and sets up again.
            self.disable(True, data.draw(MOSTLY, label="indirect"), data.draw(st.booleans(), label="event_idx"))
        for _ in range(data.draw(st.integers(1, 3), label="chains")):
            self.submit(data)
        for _ in range(4):
            self.pop()
        if self.in_flight and data.draw(st.booleans(), label="complete"):
            self.complete(data)

    @rule(data=st.data())
    def requests(self, data: st.DataObject) -> None:
        """Submit a few chains and pop them: the path most steps should take (rules are drawn uniformly)."""
        self._submit_and_pop(data)

    @rule(data=st.data())
    def more_requests(self, data: st.DataObject) -> None:
        self._submit_and_pop(data)

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        """Return one in-flight chain (any order) with a used length within its writable part."""
        if not self.in_flight:
            return
        head = data.draw(st.sampled_from(sorted(self.in_flight)), label="head")
        chain = self.in_flight.pop(head)
        written = data.draw(st.integers(0, chain.writable_len), label="written")
        m = self.model
        before = self.mem.snapshot()
        self.mem.clear()
        with self.step("add_used"):
            ok = self.q.add_used(chain, written)
        if not ok:
            raise violation("exactly-once-completion", f"add_used of in-flight head {head} was refused")
        slot = m.used + 4 + 8 * (m.next_used % m.size)
        m.next_used = (m.next_used + 1) & 0xFFFF
        check_write_set(self.mem.changed_ranges(before), [(slot, 8), (m.used + 2, 2)], "add_used")
        if self.ram.read(slot, 8) != struct.pack("<II", head, written) or self.ram.read_u16(m.used + 2) != m.next_used:
            raise violation("used-idx-exact", f"used element/idx after completing head {head} with {written} bytes")
        order = [a.gpa for a in self.mem.log if a.kind == "write"]
        if order != [slot, m.used + 2]:
            raise violation(
                "used-len-before-idx", f"add_used wrote {[hex(g) for g in order]}, not element then used.idx"
            )

    @rule()
    def late_completion(self) -> None:
        """A completion for a chain popped before a reset or disable: dropped, nothing written (checklist 23)."""
        if not self.stale:
            return
        chain = self.stale.pop()
        before = self.mem.snapshot()
        with self.step("late add_used"):
            ok = self.q.add_used(chain, 0)
        if ok:
            raise violation("no-writes-after-reset", f"a stale completion of head {chain.head} was accepted")
        check_write_set(self.mem.changed_ranges(before), [], "late add_used")

    @rule()
    def notification(self) -> None:
        m = self.model
        if not m.ready or not self._rings_in_ram():
            return
        with self.step("needs_notification"):
            got = self.q.needs_notification()
        want = needs_notification(self.ram, m)
        if got != want:
            raise violation(
                "notification-suppression", f"needs_notification {got}, model {want} (event_idx {m.event_idx})"
            )

    @rule(data=st.data())
    def toctou_pop(self, data: st.DataObject) -> None:
        """Edit the descriptor table or avail ring between two reads of one pop (checklist 15)."""
        m = self.model
        if not m.ready or self.broken or not self._rings_in_ram():
            return
        nth = data.draw(st.integers(0, 6), label="after read")
        slot = data.draw(st.integers(0, m.size - 1), label="descriptor")
        value = data.draw(interesting_ints(64), label="value")
        start = self.mem.reads_served
        ram = self.ram

        def hook(n: int, gpa: int, length: int) -> None:
            if n - start == nth:
                ram.write(m.desc + 16 * slot, struct.pack("<QQ", value, value >> 3))

        before = writable_anywhere(self.ram, m)
        self.mem.add_read_hook(hook)
        try:
            try:
                with self.step("toctou pop", GUEST_INPUT_ERRORS):
                    got = self.q.pop()
            except VirtqueueError:
                self.broken = True
                return
        finally:
            self.mem.clear_read_hooks()
        if got is None:
            return
        after = writable_anywhere(self.ram, m)
        for b in got.writable:
            if not covered(before + after, b.addr, b.length):
                raise violation(
                    "writes-only-to-writable-and-used", f"toctou pop: writable buffer {b} was never marked writable"
                )
        m.next_avail = (m.next_avail + 1) & 0xFFFF
        self.in_flight[got.head] = got

    @invariant()
    def state_matches(self) -> None:
        q, m = self.q, self.model
        if q.ready != m.ready or (q.next_avail, q.next_used) != (m.next_avail & 0xFFFF, m.next_used & 0xFFFF):
            raise violation(
                "used-idx-exact",
                f"queue ready {q.ready} at {q.next_avail}/{q.next_used}, model {m.ready} at {m.next_avail}/{m.next_used}",
            )
        if q.in_flight() != len(self.in_flight):
            raise violation(
                "used-id-outstanding-once", f"{q.in_flight()} chains in flight, model {len(self.in_flight)}"
            )
