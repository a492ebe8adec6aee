"""The split virtqueue on its own: chain parsing, ring rules, used ring, notification suppression."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)
from vmm.devices.virtio.testing import DriverQueue, GuestAllocator, Segment
from vmm.layout import MMIO_GAP_END, MMIO_GAP_START, MiB
from vmm.memory import GuestMemory

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
#: The last RAM region below the MMIO hole, and the first one above it.
LOW_TOP = MMIO_GAP_START - MiB


@pytest.fixture
def mem():
    # RAM at 0, RAM just below the MMIO hole, RAM just above it (small, sparse mappings).
    m = GuestMemory([(0, 4 * MiB), (LOW_TOP, MiB), (MMIO_GAP_END, MiB)])
    yield m
    m.close()


def write_table(mem: GuestMemory, table: int, entries: list[tuple[int, int, int, int]]) -> None:
    """Write (addr, len, flags, next) descriptors at ``table``."""
    for i, (addr, length, flags, nxt) in enumerate(entries):
        mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


class Rig:
    """A device-side Virtqueue and the driver's view of the same rings."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int = 8,
        *,
        indirect: bool = True,
        event_idx: bool = False,
        max_size: int | None = None,
    ) -> None:
        self.mem = mem
        self.alloc = GuestAllocator(mem, 0x1000, 4 * MiB)
        self.dq = DriverQueue.allocate(mem, self.alloc, size)
        self.q = Virtqueue(mem, 0, max_size or max(size, 8))
        self.q.size = size
        self.q.desc_addr, self.q.avail_addr, self.q.used_addr = self.dq.desc, self.dq.avail, self.dq.used
        self.q.enable(indirect=indirect, event_idx=event_idx)

    def buf(self, data: bytes = b"", size: int | None = None) -> int:
        a = self.alloc.alloc(size if size is not None else max(len(data), 1))
        if data:
            self.mem.write(a, data)
        return a

    def expect_error(self, kind: str) -> VirtqueueError:
        with pytest.raises(VirtqueueError) as ei:
            self.q.pop()
        assert ei.value.kind == kind, str(ei.value)
        assert self.q.broken
        # A broken queue does no more work until it is enabled again ...
        assert self.q.pop() is None
        # ... and after the driver re-initialises its rings, a valid chain works.
        self.q.disable()
        self.mem.fill(self.dq.desc, 16 * self.dq.size)
        self.mem.fill(self.dq.avail, 6 + 2 * self.dq.size)
        self.mem.fill(self.dq.used, 6 + 8 * self.dq.size)
        self.dq = DriverQueue(self.mem, self.dq.size, self.dq.desc, self.dq.avail, self.dq.used)
        self.q.restore_state(0, 0)
        self.q.enable(indirect=self.q.indirect, event_idx=self.q.event_idx)
        b = self.buf(size=4)
        h = self.dq.add_chain([Segment(b, 4, True)])
        c = self.q.pop()
        assert c.head == h and self.q.add_used(c, 4)
        assert self.dq.take_used() == [(h, 4)]
        return ei.value


def test_simple_chain_read_write_and_used_ring(mem):
    r = Rig(mem)
    out = r.buf(b"hello, ")
    out2 = r.buf(b"world")
    inb = r.buf(size=16)
    head = r.dq.add_chain([Segment(out, 7, False), Segment(out2, 5, False), Segment(inb, 16, True)])
    chain = r.q.pop()
    assert chain is not None and chain.head == head
    assert chain.readable_len == 12 and chain.writable_len == 16
    assert chain.read(0, 12) == b"hello, world"
    assert chain.read(5, 4) == b", wo"
    chain.write(0, b"HELLO")
    assert r.q.add_used(chain, 5)
    assert mem.read(inb, 5) == b"HELLO"
    assert r.dq.take_used() == [(head, 5)]
    assert r.q.pop() is None
    assert r.q.in_flight() == 0


def test_not_ready_queue_touches_no_memory(mem):
    q = Virtqueue(mem, 0, 8)
    q.avail_addr = 0xFFFF_FFFF_FFFF_0000  # would fail if it were read
    assert q.pop() is None
    assert q.pending() == 0
    assert not q.needs_notification()


@pytest.mark.parametrize(
    "setup,kind",
    [
        (lambda q: setattr(q, "size", 0), "bad-size"),
        (lambda q: setattr(q, "size", 6), "bad-size"),
        (lambda q: setattr(q, "size", 16), "bad-size"),  # > max_size 8
        (lambda q: setattr(q, "desc_addr", q.desc_addr + 8), "bad-alignment"),
        (lambda q: setattr(q, "avail_addr", q.avail_addr + 1), "bad-alignment"),
        (lambda q: setattr(q, "used_addr", q.used_addr + 2), "bad-alignment"),
        (lambda q: setattr(q, "desc_addr", 64 * MiB), "ring-outside-ram"),
        (lambda q: setattr(q, "used_addr", MMIO_GAP_START - 16), "ring-outside-ram"),  # straddles the hole
        (lambda q: setattr(q, "avail_addr", 0xFFFF_FFFF_FFFF_FFF0), "ring-outside-ram"),
    ],
)
def test_enable_validates_setup(mem, setup, kind):
    r = Rig(mem)
    r.q.disable()
    setup(r.q)
    with pytest.raises(VirtqueueError) as ei:
        r.q.enable(indirect=False, event_idx=False)
    assert ei.value.kind == kind
    assert not r.q.ready


def test_self_loop(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.write_desc(0, b, 4, NEXT, 0)
    r.dq.publish(0)
    r.expect_error("chain-too-long")


def test_two_descriptor_loop(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.write_desc(0, b, 4, NEXT, 1)
    r.dq.write_desc(1, b, 4, NEXT, 0)
    r.dq.publish(0)
    r.expect_error("chain-too-long")


def test_next_out_of_range(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.write_desc(0, b, 4, NEXT, 8)
    r.dq.publish(0)
    e = r.expect_error("next-out-of-range")
    assert e.gpa == r.dq.desc


def test_chain_of_exactly_queue_size_is_accepted(mem):
    r = Rig(mem, size=8)
    b = r.buf(size=8)
    for i in range(8):
        r.dq.write_desc(i, b + i, 1, NEXT if i < 7 else 0, i + 1 if i < 7 else 0)
    r.dq.publish(0)
    chain = r.q.pop()
    assert len(chain.readable) == 8


def test_chain_of_queue_size_plus_one_is_rejected(mem):
    # Seven direct descriptors then an indirect table of two: nine buffers in a queue of eight.
    r = Rig(mem, size=8)
    b = r.buf(size=8)
    table = r.buf(size=32)
    write_table(mem, table, [(b, 1, NEXT, 1), (b, 1, 0, 0)])
    for i in range(7):
        r.dq.write_desc(i, b, 1, NEXT, i + 1)
    r.dq.write_desc(7, table, 32, INDIRECT)
    r.dq.publish(0)
    r.expect_error("chain-too-long")


def test_chain_of_queue_size_through_an_indirect_table_is_accepted(mem):
    r = Rig(mem, size=8)
    b = r.buf(size=8)
    table = r.buf(size=16)
    write_table(mem, table, [(b, 1, 0, 0)])
    for i in range(7):
        r.dq.write_desc(i, b, 1, NEXT, i + 1)
    r.dq.write_desc(7, table, 16, INDIRECT)
    r.dq.publish(0)
    assert len(r.q.pop().readable) == 8


def test_head_out_of_range(mem):
    r = Rig(mem)
    r.dq.publish(8)
    r.expect_error("head-out-of-range")


def test_avail_idx_more_than_qsize_ahead(mem):
    r = Rig(mem)
    r.dq.set_avail_idx(9)
    e = r.expect_error("avail-idx-ahead")
    assert e.gpa == r.dq.avail + 2


def test_avail_idx_backwards_is_far_ahead(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.add_chain([Segment(b, 4, True)])
    r.q.add_used(r.q.pop(), 0)
    r.dq.set_avail_idx(0)  # "decremented": 0xFFFF entries ahead
    r.expect_error("avail-idx-ahead")


def test_avail_idx_exactly_qsize_ahead_is_fine(mem):
    r = Rig(mem, size=4)
    b = r.buf(size=4)
    heads = [r.dq.add_chain([Segment(b, 4, True)]) for _ in range(4)]
    assert r.q.pending() == 4
    assert [c.head for c in r.q.drain()] == heads


def test_indices_wrap_at_65536(mem):
    r = Rig(mem, size=4)
    b = r.buf(size=4)
    r.q.restore_state(0xFFFE, 0xFFFE)
    r.dq.avail_idx = 0xFFFE
    r.dq.last_used = 0xFFFE
    mem.write_u16(r.dq.used + 2, 0xFFFE)
    done = []
    for _ in range(4):
        h = r.dq.add_chain([Segment(b, 4, True)])
        c = r.q.pop()
        assert c.head == h
        r.q.add_used(c, 2)
        done += r.dq.take_used()
    assert len(done) == 4
    assert r.q.next_avail == 2 and r.q.next_used == 2
    assert r.dq.used_idx == 2


def test_duplicate_head_in_flight(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    h = r.dq.add_chain([Segment(b, 4, True)])
    assert r.q.pop().head == h
    r.dq.publish(h)
    r.expect_error("head-in-flight")


@pytest.mark.parametrize(
    "addr,length",
    [
        (0xFFFF_FFFF_FFFF_FFF8, 16),  # addr + len past 2**64
        (0xFFFF_FFFF_FFFF_FFFF, 1),
        (64 * MiB, 4),  # beyond RAM
        (MMIO_GAP_START - 8, 16),  # straddles the MMIO hole
        (MMIO_GAP_START, 4),  # inside the hole
        (4 * MiB - 2, 4),  # straddles the end of a region
    ],
)
def test_buffer_outside_ram(mem, addr, length):
    r = Rig(mem)
    r.dq.write_desc(0, addr, length, WRITE)
    r.dq.publish(0)
    e = r.expect_error("buffer-outside-ram")
    assert e.gpa == r.dq.desc


def test_buffers_in_high_ram_and_below_the_hole_work(mem):
    r = Rig(mem)
    r.dq.add_chain([Segment(LOW_TOP + MiB - 4, 4, False), Segment(MMIO_GAP_END, 8, True)])
    mem.write(LOW_TOP + MiB - 4, b"abcd")
    c = r.q.pop()
    assert c.read(0, 4) == b"abcd"
    c.write(0, b"12345678")
    assert mem.read(MMIO_GAP_END, 8) == b"12345678"


def test_zero_length_descriptor_is_skipped(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.write_desc(0, 0xFFFF_FFFF_FFFF_FFFF, 0, NEXT, 1)  # address never used
    r.dq.write_desc(1, b, 4, WRITE)
    r.dq.publish(0)
    c = r.q.pop()
    assert c.readable_len == 0 and c.writable_len == 4


def test_readable_after_writable_is_rejected(mem):
    r = Rig(mem)
    b = r.buf(size=8)
    r.dq.write_desc(0, b, 4, WRITE | NEXT, 1)
    r.dq.write_desc(1, b + 4, 4, 0)
    r.dq.publish(0)
    r.expect_error("readable-after-writable")


def test_unknown_flag_bits_are_ignored(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.write_desc(0, b, 4, WRITE | 0xFFF8)
    r.dq.publish(0)
    c = r.q.pop()
    assert c.writable_len == 4


def test_chain_longer_than_u32_is_rejected(mem):
    # 1024 descriptors of 4 MiB (all over the same RAM) = 2**32 bytes: one byte too many.
    r = Rig(mem, size=1024, max_size=1024)
    for i in range(1024):
        r.dq.write_desc(i, 0, 4 * MiB, WRITE | (NEXT if i < 1023 else 0), i + 1 if i < 1023 else 0)
    r.dq.publish(0)
    r.expect_error("chain-too-big")


def test_largest_chain_fits_used_len(mem):
    r = Rig(mem, size=1024, max_size=1024)
    for i in range(1024):
        length = 4 * MiB - (1 if i == 1023 else 0)
        r.dq.write_desc(i, 0, length, WRITE | (NEXT if i < 1023 else 0), i + 1 if i < 1023 else 0)
    r.dq.publish(0)
    c = r.q.pop()
    assert c.writable_len == 0xFFFF_FFFF
    assert r.q.add_used(c, 0xFFFF_FFFF)
    assert r.dq.take_used() == [(0, 0xFFFF_FFFF)]


def test_used_len_larger_than_writable_is_a_device_bug(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.add_chain([Segment(b, 4, True)])
    c = r.q.pop()
    with pytest.raises(ValueError):
        r.q.add_used(c, 5)
    assert r.dq.used_idx == 0
    assert r.q.add_used(c, 4)
    with pytest.raises(ValueError):
        r.q.add_used(c, 4)  # completed twice
    assert r.dq.used_idx == 1


def test_descriptor_edits_after_pop_do_not_change_the_chain(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    h = r.dq.add_chain([Segment(b, 4, True)])
    c = r.q.pop()
    r.dq.write_desc(h, 0xFFFF_FFFF_FFFF_FFF0, 0xFFFF_FFFF, WRITE)
    c.write(0, b"abcd")
    assert mem.read(b, 4) == b"abcd"


# ---- indirect descriptors ----------------------------------------------------------
def test_indirect_chain(mem):
    r = Rig(mem)
    a, w = r.buf(b"head"), r.buf(size=8)
    table = r.buf(size=32)
    h = r.dq.add_indirect_chain(table, [Segment(a, 4, False), Segment(w, 8, True)])
    c = r.q.pop()
    assert c.head == h and c.read(0, 4) == b"head" and c.writable_len == 8


def test_direct_then_indirect_is_valid(mem):
    r = Rig(mem)
    a, w = r.buf(b"head"), r.buf(size=8)
    table = r.buf(size=16)
    write_table(mem, table, [(w, 8, WRITE, 0)])
    r.dq.write_desc(0, a, 4, NEXT, 1)
    r.dq.write_desc(1, table, 16, INDIRECT | WRITE)  # WRITE on the table descriptor is ignored
    r.dq.publish(0)
    c = r.q.pop()
    assert c.readable_len == 4 and c.writable_len == 8


def _indirect(r: Rig, table_len: int, entries: list[tuple[int, int, int, int]], flags: int = INDIRECT) -> None:
    table = r.buf(size=max(table_len, 16))
    write_table(r.mem, table, entries)
    r.dq.write_desc(0, table, table_len, flags)
    r.dq.publish(0)


def test_indirect_without_feature(mem):
    r = Rig(mem, indirect=False)
    b = r.buf(size=4)
    _indirect(r, 16, [(b, 4, WRITE, 0)])
    r.expect_error("indirect-not-negotiated")


def test_indirect_with_next(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    _indirect(r, 16, [(b, 4, WRITE, 0)], flags=INDIRECT | NEXT)
    r.expect_error("indirect-next")


def test_nested_indirect(mem):
    r = Rig(mem)
    b = r.buf(size=16)
    _indirect(r, 16, [(b, 16, INDIRECT, 0)])
    r.expect_error("indirect-nested")


@pytest.mark.parametrize("length", [0, 8, 17, 0xFFFF_FFF8])
def test_indirect_bad_length(mem, length):
    r = Rig(mem)
    r.dq.write_desc(0, r.buf(size=32), length, INDIRECT)
    r.dq.publish(0)
    r.expect_error("indirect-bad-length")


def test_indirect_huge_table_outside_ram(mem):
    r = Rig(mem)
    r.dq.write_desc(0, 0x1000, 0xFFFF_FFF0, INDIRECT)
    r.dq.publish(0)
    r.expect_error("indirect-outside-ram")


def test_indirect_inner_next_out_of_range(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    _indirect(r, 32, [(b, 4, NEXT, 2), (b, 4, 0, 0)])
    r.expect_error("next-out-of-range")


def test_indirect_loop(mem):
    r = Rig(mem, size=8)
    b = r.buf(size=4)
    _indirect(r, 32, [(b, 4, NEXT, 1), (b, 4, NEXT, 0)])
    r.expect_error("indirect-too-long")


def test_indirect_table_longer_than_queue_is_bounded_by_queue_size(mem):
    r = Rig(mem, size=4)
    b = r.buf(size=4)
    entries = [(b, 1, NEXT, i + 1) for i in range(6)] + [(b, 1, 0, 0)]
    _indirect(r, 16 * 7, entries)
    r.expect_error("chain-too-long")


# ---- notifications (§2.7.7, §2.7.10) -----------------------------------------------
def _complete(r: Rig, n: int) -> None:
    b = r.buf(size=4)
    for _ in range(n):
        r.dq.add_chain([Segment(b, 4, True)])
        r.q.add_used(r.q.pop(), 4)
    r.dq.take_used()


def test_notification_without_event_idx_follows_flags(mem):
    r = Rig(mem)
    assert not r.q.needs_notification()  # nothing used yet
    _complete(r, 1)
    assert r.q.needs_notification()
    assert not r.q.needs_notification()  # the decision is consumed
    r.dq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    r.dq.set_used_event(0)  # ignored without EVENT_IDX
    _complete(r, 1)
    assert not r.q.needs_notification()
    r.dq.set_avail_flags(0)
    _complete(r, 1)
    assert r.q.needs_notification()


def test_event_idx_notifies_exactly_when_used_event_is_crossed(mem):
    r = Rig(mem, event_idx=True)
    r.dq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # must be ignored with EVENT_IDX
    r.dq.set_used_event(0)
    _complete(r, 1)  # used.idx 0 -> 1: the entry at idx 0 == used_event
    assert r.q.needs_notification()
    r.dq.set_used_event(3)
    decisions = []
    for _ in range(4):  # idx 1->2, 2->3, 3->4, 4->5
        _complete(r, 1)
        decisions.append(r.q.needs_notification())
    assert decisions == [False, False, True, False]


def test_event_idx_batched_completions_crossing_used_event(mem):
    r = Rig(mem, event_idx=True)
    r.dq.set_used_event(2)
    _complete(r, 4)  # 0 -> 4 crosses 2
    assert r.q.needs_notification()
    r.dq.set_used_event(2)  # stale: not crossed again by 4 -> 6
    _complete(r, 2)
    assert not r.q.needs_notification()


def test_event_idx_wraps(mem):
    r = Rig(mem, event_idx=True, size=4)
    r.q.restore_state(0xFFFF, 0xFFFF)
    r.dq.avail_idx = 0xFFFF
    r.dq.last_used = 0xFFFF
    r.dq.set_used_event(0xFFFF)
    _complete(r, 2)  # 0xFFFF -> 1 crosses 0xFFFF
    assert r.q.needs_notification()


def test_event_idx_poisoned_used_event_only_changes_the_decision(mem):
    r = Rig(mem, event_idx=True)
    r.dq.set_used_event(0xBEEF)
    _complete(r, 3)
    assert not r.q.needs_notification()


def test_avail_event_is_published_with_event_idx(mem):
    r = Rig(mem, event_idx=True)
    _complete(r, 3)
    assert r.dq.avail_event == 3


def test_no_avail_event_without_event_idx(mem):
    r = Rig(mem)
    mem.write_u16(r.dq.used + 4 + 8 * 8, 0x1234)
    _complete(r, 3)
    assert r.dq.avail_event == 0x1234


# ---- reset and late completions ------------------------------------------------------
def test_completion_after_disable_is_dropped(mem):
    r = Rig(mem)
    b = r.buf(size=4)
    r.dq.add_chain([Segment(b, 4, True)])
    c = r.q.pop()
    r.q.disable()
    r.q.enable(indirect=True, event_idx=False)
    assert not r.q.add_used(c, 4)
    assert r.q.stats.stale_completions == 1
    assert r.dq.used_idx == 0


def test_reenabled_queue_starts_from_zero(mem):
    r = Rig(mem)
    _complete(r, 3)
    r.q.disable()
    # The driver re-initialises its rings.
    mem.fill(r.dq.avail, 6 + 2 * 8)
    mem.fill(r.dq.used, 6 + 8 * 8)
    r.dq.avail_idx = r.dq.last_used = 0
    r.q.enable(indirect=True, event_idx=False)
    _complete(r, 1)
    assert r.dq.used_idx == 1


# ---- hostile layouts and state ---------------------------------------------------------
def test_restored_state_far_from_avail_idx_is_an_error(mem):
    r = Rig(mem)
    r.q.restore_state(0x8000, 0x8000)
    r.expect_error("avail-idx-ahead")


def test_driver_scribbling_on_the_used_ring_does_not_steer_the_device(mem):
    r = Rig(mem)
    _complete(r, 2)
    mem.write_u16(r.dq.used + 2, 0x7777)  # the driver must not write here; the device ignores it
    mem.fill(r.dq.used + 4, 16, 0xFF)
    b = r.buf(size=4)
    h = r.dq.add_chain([Segment(b, 4, True)])
    r.q.add_used(r.q.pop(), 1)
    assert r.dq.used_idx == 3
    assert r.dq.used_entry(2) == (h, 1)


def test_overlapping_rings_never_crash(mem):
    # Descriptor table, available ring and used ring all at one address: nonsense, but only
    # the guest's own memory is at stake.  Every outcome is a chain or a VirtqueueError.
    q = Virtqueue(mem, 0, 8)
    q.desc_addr = q.avail_addr = q.used_addr = 0x2000
    q.enable(indirect=True, event_idx=True)
    mem.write(0x2000, bytes(range(1, 200)))
    for _ in range(20):
        try:
            c = q.pop()
        except VirtqueueError:
            break
        if c is None:
            break
        q.add_used(c, 0)
        q.needs_notification()


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.binary(min_size=16 * 8, max_size=16 * 8),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
    indirect=st.binary(min_size=0, max_size=64),
    features=st.tuples(st.booleans(), st.booleans()),
)
def test_random_rings_give_valid_chains_or_one_error_type(mem, table, ring, avail_idx, indirect, features):
    q = Virtqueue(mem, 0, 8)
    q.desc_addr, q.avail_addr, q.used_addr = 0x3000, 0x3100, 0x3200
    q.enable(indirect=features[0], event_idx=features[1])
    # Point some addresses at a small indirect table at 0x4000 and at RAM, keep the rest random.
    mem.write(0x3000, table)
    mem.write(0x4000, indirect.ljust(64, b"\0"))
    for i, head in enumerate(ring):
        mem.write_u16(0x3104 + 2 * i, head)
    mem.write_u16(0x3102, avail_idx)
    for _ in range(9):
        try:
            c = q.pop()
        except VirtqueueError as e:
            assert e.kind and q.broken
            return
        if c is None:
            return
        assert 0 <= c.head < 8
        assert len(c.readable) + len(c.writable) <= 8
        assert c.readable_len + c.writable_len <= 0xFFFF_FFFF
        for b in c.readable + c.writable:
            assert mem.contains(b.addr, b.length)
        assert q.add_used(c, c.writable_len)
