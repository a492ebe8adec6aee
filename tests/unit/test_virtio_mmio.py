"""The virtio-mmio transport: registers, the status machine, negotiation, queue setup, interrupts."""

from __future__ import annotations

import threading
from typing import ClassVar

import pytest

from vmm.bus import Bus
from vmm.devices.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    bit,
)
from vmm.devices.virtio.mmio import (
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_RESET,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
    VirtioMmioTransport,
)
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VirtqueueError
from vmm.devices.virtio.testing import GuestAllocator, VirtioMmioDriver
from vmm.errors import GuestError
from vmm.irq import RecordingIrqLine
from vmm.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, MiB
from vmm.memory import GuestMemory

ECHO_ID = 42
ECHO_F_SHOUT = 0  # a device-specific feature bit
ECHO_CONFIG_MAGIC = 0x11223344


class EchoDevice(VirtioDevice):
    """Copies each chain's readable bytes into its writable buffers (two queues)."""

    device_id = ECHO_ID
    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(ECHO_CONFIG_MAGIC.to_bytes(4, "little") + bytes(4))
        self.defer = False
        self.deferred: list = []
        self.fail_with: Exception | None = None
        self.activations = 0
        self.resets = 0

    def device_features(self) -> int:
        return bit(ECHO_F_SHOUT)

    def queue_max_sizes(self):
        return (8, 16)

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> bool:
        if offset < 4:  # the magic is read-only
            return False
        self.config[offset : offset + len(data)] = data
        return True

    def activate(self, link) -> None:
        super().activate(link)
        self.activations += 1

    def reset(self) -> None:
        super().reset()
        self.resets += 1
        self.deferred.clear()

    def handle_queue(self, index: int) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        q = self.link.queues[index]
        for chain in q.drain():
            if self.defer:
                self.deferred.append(chain)
                continue
            self.complete(chain)

    def complete(self, chain) -> None:
        n = min(chain.readable_len, chain.writable_len)
        data = chain.read(0, n)
        if self.link.has_feature(ECHO_F_SHOUT):
            data = data.upper()
        chain.write(0, data)
        chain.queue.add_used(chain, n)


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 * MiB)])
    yield m
    m.close()


class Rig:
    #: Every rig made by the running test; ``recovery_check`` re-initialises each one afterwards.
    live: ClassVar[list[Rig]] = []

    def __init__(self, mem: GuestMemory, **kw) -> None:
        Rig.live.append(self)
        self.mem = mem
        self.dev = EchoDevice()
        self.irq = RecordingIrqLine(5)
        self.t = VirtioMmioTransport(self.dev, mem, self.irq, **kw)
        base, size = mem.ranges()[0]
        self.alloc = GuestAllocator(mem, base + 0x10000, base + size)
        self.drv = VirtioMmioDriver(self.t, mem, self.alloc)

    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, v: int) -> None:
        self.t.write(off, 4, v)

    def echo(self, payload: bytes = b"ping", queue: int = 0) -> bytes:
        req = self.drv.submit(queue, [payload], [len(payload)])
        used = self.drv.used(queue)
        assert used == [(req.head, len(payload))]
        return self.drv.read_segment(req.writable()[0])


@pytest.fixture
def rig(mem):
    return Rig(mem)


@pytest.fixture(autouse=True)
def recovery_check(mem):
    """Whatever a test did to a device, a reset and a proper initialisation restore service."""
    Rig.live.clear()
    yield
    for r in Rig.live:
        if r.mem is not mem:
            continue  # rigs over a test's own memory are checked in that test
        r.dev.fail_with = None
        r.dev.defer = False
        vars(r.dev).pop("accept_features", None)  # undo per-test overrides
        vars(r.dev).pop("activate", None)
        r.alloc.release(r.alloc.start)
        r.drv.initialize(queues=(0, 1))
        assert r.echo(b"ok", queue=1) == b"OK"
        assert not r.t.status & VIRTIO_CONFIG_S_NEEDS_RESET
    Rig.live.clear()


def ready_rig(mem, features=None, **kw) -> Rig:
    r = Rig(mem, **kw)
    r.drv.initialize(features, queues=(0, 1))
    return r


# ---- identity and access widths ---------------------------------------------------------
def test_identity_registers_are_constant(rig):
    for _ in range(2):
        assert rig.r(VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC
        assert rig.r(VIRTIO_MMIO_VERSION) == 2
        assert rig.r(VIRTIO_MMIO_DEVICE_ID) == ECHO_ID
        assert rig.r(VIRTIO_MMIO_VENDOR_ID) == VIRTIO_MMIO_VENDOR
        rig.drv.initialize(queues=(0,))
        rig.w(VIRTIO_MMIO_MAGIC_VALUE, 0)  # read-only
        rig.drv.reset()
    assert rig.t.faults["write-read-only"] == 2


def test_works_behind_a_bus(mem):
    bus = Bus("mmio")
    r = Rig(mem)
    bus.register(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, r.t, "virtio-echo")
    assert bus.read(VIRTIO_MMIO_BASE + VIRTIO_MMIO_MAGIC_VALUE, 4) == VIRTIO_MMIO_MAGIC
    assert bus.read_bytes(VIRTIO_MMIO_BASE + VIRTIO_MMIO_DEVICE_ID, 4) == ECHO_ID.to_bytes(4, "little")


@pytest.mark.parametrize("size,offset", [(1, 0), (2, 0), (8, 0), (4, 2), (1, 0x73), (2, 0x70)])
def test_other_widths_read_zero_and_are_counted(rig, size, offset):
    assert rig.t.read(offset, size) == 0
    assert rig.t.faults["bad-width-read"] == 1


@pytest.mark.parametrize(
    "size,offset",
    [(1, VIRTIO_MMIO_STATUS), (2, VIRTIO_MMIO_STATUS), (8, VIRTIO_MMIO_STATUS), (4, VIRTIO_MMIO_STATUS + 1)],
)
def test_other_widths_write_nothing(rig, size, offset):
    rig.t.write(offset, size, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    assert rig.r(VIRTIO_MMIO_STATUS) == 0
    assert rig.t.faults["bad-width-write"] == 1


def test_write_only_and_undefined_registers_read_zero(rig):
    rig.w(VIRTIO_MMIO_QUEUE_SEL, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_SEL) == 0
    assert rig.r(VIRTIO_MMIO_QUEUE_NOTIFY) == 0
    assert rig.t.faults["read-write-only"] == 2
    for off in (0x028, 0x03C, 0x040, 0x0F0, 0x0C4):  # legacy GuestPageSize/QueueAlign/QueuePFN, gaps
        assert rig.r(off) == 0
        rig.w(off, 0xFFFF_FFFF)
    assert rig.t.faults["read-undefined"] == 5
    assert rig.t.faults["write-undefined"] == 5
    assert rig.r(VIRTIO_MMIO_STATUS) == 0


def test_shared_memory_registers_say_no_region(rig):
    for sel in (0, 7, 0xFFFF_FFFF):
        rig.w(VIRTIO_MMIO_SHM_SEL, sel)
        for off in (
            VIRTIO_MMIO_SHM_LEN_LOW,
            VIRTIO_MMIO_SHM_LEN_HIGH,
            VIRTIO_MMIO_SHM_BASE_LOW,
            VIRTIO_MMIO_SHM_BASE_HIGH,
        ):
            assert rig.r(off) == 0xFFFF_FFFF


def test_queue_reset_is_not_offered(rig):
    rig.drv.initialize(queues=(0,))
    rig.w(VIRTIO_MMIO_QUEUE_RESET, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_RESET) == 0
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 1
    assert rig.t.faults["queue-reset-not-negotiated"] == 1


# ---- features ---------------------------------------------------------------------------
def test_device_features_by_word(rig):
    f = rig.drv.device_features()
    assert f == bit(ECHO_F_SHOUT) | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_INDIRECT_DESC) | bit(VIRTIO_F_EVENT_IDX)
    for sel in (2, 3, 0xFFFF_FFFF):
        rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
        assert rig.r(VIRTIO_MMIO_DEVICE_FEATURES) == 0


def test_ring_features_can_be_withheld(mem):
    r = Rig(mem, ring_features=0)
    assert r.drv.device_features() == bit(ECHO_F_SHOUT) | bit(VIRTIO_F_VERSION_1)


def _to_features_ok(rig, features: int, *, extra_word: tuple[int, int] | None = None) -> int:
    rig.drv.reset()
    rig.drv.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    rig.drv.write_driver_features(features)
    if extra_word:
        rig.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, extra_word[0])
        rig.w(VIRTIO_MMIO_DRIVER_FEATURES, extra_word[1])
    rig.drv.set_status(VIRTIO_CONFIG_S_FEATURES_OK)
    return rig.r(VIRTIO_MMIO_STATUS)


def test_features_ok_sticks_for_a_valid_subset(rig):
    assert _to_features_ok(rig, bit(VIRTIO_F_VERSION_1)) & VIRTIO_CONFIG_S_FEATURES_OK
    assert _to_features_ok(rig, bit(VIRTIO_F_VERSION_1) | bit(ECHO_F_SHOUT)) & VIRTIO_CONFIG_S_FEATURES_OK


@pytest.mark.parametrize(
    "features,extra,fault",
    [
        (0, None, "features-without-version-1"),
        (bit(ECHO_F_SHOUT), None, "features-without-version-1"),
        (bit(VIRTIO_F_VERSION_1) | bit(3), None, "features-not-offered"),
        (bit(VIRTIO_F_VERSION_1) | bit(63), None, "features-not-offered"),
        (bit(VIRTIO_F_VERSION_1), (2, 1), "features-not-offered"),
        (bit(VIRTIO_F_VERSION_1), (0xFFFF_FFFF, 0x8000_0000), "features-not-offered"),
    ],
)
def test_features_ok_does_not_stick_for_bad_sets(rig, features, extra, fault):
    status = _to_features_ok(rig, features, extra_word=extra)
    assert status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    assert rig.t.faults[fault] == 1
    # Nothing that needs FEATURES_OK works: queues cannot be enabled, DRIVER_OK is refused.
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0
    rig.drv.set_status(VIRTIO_CONFIG_S_DRIVER_OK)
    assert not rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK
    # After a reset a good negotiation works.
    rig.drv.initialize(queues=(0,))
    assert rig.echo() == b"PING"


def test_device_can_veto_a_feature_combination(rig):
    rig.dev.accept_features = lambda f: not f & bit(ECHO_F_SHOUT)
    assert not _to_features_ok(rig, bit(VIRTIO_F_VERSION_1) | bit(ECHO_F_SHOUT)) & VIRTIO_CONFIG_S_FEATURES_OK
    assert rig.t.faults["features-refused-by-device"] == 1
    assert _to_features_ok(rig, bit(VIRTIO_F_VERSION_1)) & VIRTIO_CONFIG_S_FEATURES_OK


def test_driver_features_only_between_driver_and_features_ok(rig):
    rig.drv.reset()
    rig.w(VIRTIO_MMIO_DRIVER_FEATURES, 1)  # before DRIVER
    rig.drv.negotiate(bit(VIRTIO_F_VERSION_1))
    rig.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
    rig.w(VIRTIO_MMIO_DRIVER_FEATURES, bit(ECHO_F_SHOUT))  # after FEATURES_OK
    assert rig.t.faults["driver-features-state"] == 2
    assert rig.t.driver_features == bit(VIRTIO_F_VERSION_1)
    rig.drv.setup_queue(0)
    rig.drv.driver_ok()
    assert rig.echo() == b"ping"  # SHOUT was not negotiated


def test_negotiated_features_reach_the_device(mem):
    r = ready_rig(mem)
    assert r.dev.link.has_feature(ECHO_F_SHOUT)
    assert r.echo(b"abc", queue=1) == b"ABC"


# ---- the status machine ------------------------------------------------------------------
def test_full_initialisation(rig):
    rig.drv.initialize(queues=(0, 1))
    assert rig.r(VIRTIO_MMIO_STATUS) == (
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
    )
    assert rig.dev.activations == 1
    assert rig.echo() == b"PING"
    assert sum(rig.t.faults.values()) == 0


@pytest.mark.parametrize(
    "sequence,expected,fault",
    [
        ([VIRTIO_CONFIG_S_DRIVER], 0, "status-order"),
        (
            [VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK],
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            "status-order",
        ),
        ([VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK], 0, "status-order"),
        ([VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER], VIRTIO_CONFIG_S_ACKNOWLEDGE, "status-clear"),
        ([VIRTIO_CONFIG_S_ACKNOWLEDGE | 0x10], 0, "status-reserved-bits"),
        ([VIRTIO_CONFIG_S_ACKNOWLEDGE | 0x20], 0, "status-reserved-bits"),
        ([0x100], 0, "status-reserved-bits"),
        (
            [VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_NEEDS_RESET],
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            "status-driver-set-needs-reset",
        ),
    ],
)
def test_status_rules(rig, sequence, expected, fault):
    for v in sequence:
        rig.w(VIRTIO_MMIO_STATUS, v)
    assert rig.r(VIRTIO_MMIO_STATUS) == expected
    assert rig.t.faults[fault] >= 1


def test_acknowledge_and_driver_in_one_write(rig):
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    assert rig.r(VIRTIO_MMIO_STATUS) == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER


def test_status_bits_are_never_cleared_except_by_reset(mem):
    r = ready_rig(mem)
    full = r.r(VIRTIO_MMIO_STATUS)
    for v in (VIRTIO_CONFIG_S_ACKNOWLEDGE, full & ~VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED):
        r.w(VIRTIO_MMIO_STATUS, v)
        assert r.r(VIRTIO_MMIO_STATUS) == full
    assert r.t.faults["status-clear"] == 3
    r.w(VIRTIO_MMIO_STATUS, 0)
    assert r.r(VIRTIO_MMIO_STATUS) == 0


def test_failed_stops_the_device_until_reset(mem):
    r = ready_rig(mem)
    r.drv.set_status(VIRTIO_CONFIG_S_FAILED)
    assert r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED
    req = r.drv.submit(0, [b"x"], [1])
    assert r.drv.used(0) == []
    assert r.mem.read(req.writable()[0].addr, 1) == b"\xa5"
    assert r.t.faults["notify-not-live"] == 1
    r.drv.initialize(queues=(0,))
    assert r.echo() == b"PING"


def test_failed_in_the_middle_of_initialisation(rig):
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_DRIVER)
    assert rig.r(VIRTIO_MMIO_STATUS) == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_DRIVER)
    assert rig.r(VIRTIO_MMIO_STATUS) == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED
    assert rig.t.faults["status-needs-reset-first"] == 1


def test_reset_restores_everything(mem):
    r = ready_rig(mem)
    r.dev.config_changed()
    r.drv.submit(0, [b"x"], [1])
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    assert r.irq.level
    gen = r.r(VIRTIO_MMIO_CONFIG_GENERATION)
    resets = r.dev.resets
    r.w(VIRTIO_MMIO_STATUS, 0)
    assert r.r(VIRTIO_MMIO_STATUS) == 0
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert not r.irq.level
    for i in (0, 1):
        r.w(VIRTIO_MMIO_QUEUE_SEL, i)
        assert r.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert r.t.driver_features == 0
    assert r.dev.resets == resets + 1
    assert r.r(VIRTIO_MMIO_CONFIG_GENERATION) == gen  # monotonic, not reset
    assert r.r(VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC


# ---- queue setup -------------------------------------------------------------------------
def _features_ok(r: Rig) -> None:
    r.drv.negotiate()
    r.w(VIRTIO_MMIO_QUEUE_SEL, 0)


def test_queue_num_max_per_queue(rig):
    for sel, expected in ((0, 8), (1, 16), (2, 0), (0xFFFF_FFFF, 0)):
        rig.w(VIRTIO_MMIO_QUEUE_SEL, sel)
        assert rig.r(VIRTIO_MMIO_QUEUE_NUM_MAX) == expected
        assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0


def test_queue_sel_out_of_range_writes_are_ignored(rig):
    _features_ok(rig)
    rig.w(VIRTIO_MMIO_QUEUE_SEL, 2)
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 4)
    rig.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000)
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.t.faults["queue-sel-out-of-range"] == 3
    assert rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET == 0


@pytest.mark.parametrize("num", [0, 3, 12, 16, 0xFFFF_FFFF])
def test_bad_queue_size_is_rejected_with_needs_reset(rig, num):
    _features_ok(rig)
    q = rig.drv.setup_queue(0)  # a good layout ...
    rig.w(VIRTIO_MMIO_QUEUE_READY, 0)
    rig.w(VIRTIO_MMIO_QUEUE_NUM, num)  # ... then a bad size
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert rig.t.faults["queue-setup-rejected"] == 1
    assert rig.t.errors["bad-size"] == 1
    assert q.size == 8
    # Recovery: reset and initialise properly.
    rig.drv.initialize(queues=(0,))
    assert rig.echo() == b"PING"


def test_queue_smaller_than_max_works(rig):
    rig.drv.initialize(queues=(1,), size=2)
    for _ in range(5):
        assert rig.echo(b"ab", queue=1) == b"AB"


def test_misaligned_rings_are_rejected(rig):
    _features_ok(rig)
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 8)
    rig.drv.set_queue_addresses(0x20008, 0x21000, 0x22000)
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.t.errors["bad-alignment"] == 1


def test_rings_outside_ram_are_rejected(rig):
    _features_ok(rig)
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 8)
    rig.drv.set_queue_addresses(0x20000, 0x21000, 0xD000_0000)  # a virtio window, not RAM
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.t.errors["ring-outside-ram"] == 1


def test_ready_with_zero_addresses(mem):
    # Guest-physical 0 is RAM here, so an all-zero layout is valid (if silly) ...
    r = Rig(mem)
    _features_ok(r)
    r.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert r.r(VIRTIO_MMIO_QUEUE_READY) == 1
    # ... and where it is not RAM, it is rejected.
    m2 = GuestMemory([(MiB, 4 * MiB)])
    try:
        r2 = Rig(m2)
        _features_ok(r2)
        r2.w(VIRTIO_MMIO_QUEUE_READY, 1)
        assert r2.r(VIRTIO_MMIO_QUEUE_READY) == 0
        assert r2.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
        assert r2.t.errors["ring-outside-ram"] == 1
    finally:
        m2.close()


def test_queue_writes_while_ready_are_ignored(mem):
    r = ready_rig(mem)
    r.w(VIRTIO_MMIO_QUEUE_SEL, 0)
    q = r.t.queues[0]
    before = (q.size, q.desc_addr, q.avail_addr, q.used_addr)
    r.w(VIRTIO_MMIO_QUEUE_NUM, 2)
    r.drv.set_queue_addresses(0x100000, 0x200000, 0x300000)
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr) == before
    assert r.t.faults["queue-write-while-ready"] == 7
    assert r.echo() == b"PING"


def test_queue_ready_other_values_are_ignored(mem):
    r = Rig(mem)
    _features_ok(r)
    r.drv.setup_queue(0)
    r.w(VIRTIO_MMIO_QUEUE_READY, 2)
    assert r.r(VIRTIO_MMIO_QUEUE_READY) == 1
    r.w(VIRTIO_MMIO_QUEUE_READY, 0)
    r.w(VIRTIO_MMIO_QUEUE_READY, 0xFFFF_FFFF)
    assert r.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert r.t.faults["queue-ready-value"] == 2


def test_queue_ready_before_features_ok_is_ignored(rig):
    rig.drv.reset()
    rig.drv.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 8)
    rig.drv.set_queue_addresses(0x20000, 0x21000, 0x22000)
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.t.faults["queue-ready-state"] == 1


def test_queue_enabled_after_driver_ok(rig):
    rig.drv.initialize(queues=(0,))
    rig.drv.setup_queue(1)
    assert rig.echo(b"late", queue=1) == b"LATE"


# ---- notifications -----------------------------------------------------------------------
def test_notify_before_driver_ok_is_not_delivered(rig):
    rig.drv.negotiate()
    rig.drv.setup_queue(0)
    rig.drv.submit(0, [b"x"], [1])
    assert rig.drv.used(0) == []
    assert rig.t.faults["notify-not-live"] == 1
    rig.drv.driver_ok()
    rig.drv.kick(0)  # the buffer made available earlier is processed now
    assert len(rig.drv.used(0)) == 1


def test_notify_bad_queue_and_not_ready_queue(rig):
    rig.drv.initialize(queues=(0,))
    for v in (2, 0xFFFF, 0xFFFF_FFFF):
        rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, v)
    assert rig.t.faults["notify-bad-queue"] == 3
    rig.drv.kick(1)
    assert rig.t.faults["notify-queue-not-ready"] == 1
    assert rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    assert rig.echo() == b"PING"


def test_interrupt_status_and_ack(mem):
    r = ready_rig(mem)
    assert not r.irq.level
    r.drv.submit(0, [b"a"], [1])
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    assert r.irq.level
    r.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG)  # not pending: changes nothing
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    r.w(VIRTIO_MMIO_INTERRUPT_ACK, 0xFFFF_FFFF)
    assert r.t.faults["ack-undefined-bits"] == 1
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert not r.irq.level
    assert r.irq.events == [(5, 1), (5, 0)]


def test_no_used_interrupt_when_the_driver_suppresses_it(mem):
    r = ready_rig(mem, features=bit(VIRTIO_F_VERSION_1))
    r.drv.queues[0].set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    r.drv.submit(0, [b"a"], [1])
    assert len(r.drv.used(0)) == 1
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert not r.irq.level


def test_event_idx_through_the_transport(mem):
    r = ready_rig(mem)
    assert r.t.driver_features & bit(VIRTIO_F_EVENT_IDX)
    r.drv.queues[0].set_used_event(1)
    r.drv.submit(0, [b"a"], [1])  # used.idx 0 -> 1: not yet
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    r.drv.submit(0, [b"b"], [1])  # 1 -> 2: crosses used_event 1
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING


# ---- configuration space -----------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_config_reads_any_width_in_bounds(rig, size):
    expected = int.from_bytes(rig.dev.config[:size], "little")
    assert rig.drv.config_read(0, size) == expected
    assert rig.drv.config_read(1, 1) == 0x33  # unaligned is fine in config space


@pytest.mark.parametrize("offset,size", [(8, 1), (7, 2), (5, 4), (1, 8), (0xEFF, 1), (0, 3)])
def test_config_reads_out_of_bounds(rig, offset, size):
    assert rig.drv.config_read(offset, size) == 0
    assert rig.t.faults["config-read-out-of-range"] == 1


def test_config_writes(mem):
    r = Rig(mem)
    r.drv.reset()
    r.drv.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    r.drv.config_write(4, 4, 0xAABBCCDD)  # before FEATURES_OK: refused
    assert r.t.faults["config-write-state"] == 1
    assert r.drv.config_read(4, 4) == 0
    r.drv.initialize(queues=(0,))
    gen = r.r(VIRTIO_MMIO_CONFIG_GENERATION)
    r.drv.config_write(4, 4, 0xAABBCCDD)
    assert r.drv.config_read(4, 4) == 0xAABBCCDD
    assert r.r(VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    r.drv.config_write(0, 4, 0)  # the read-only magic
    assert r.drv.config_read(0, 4) == ECHO_CONFIG_MAGIC
    assert r.t.faults["config-write-refused"] == 1
    r.drv.config_write(6, 4, 0)  # crosses the end
    assert r.t.faults["config-write-out-of-range"] == 1
    assert r.drv.config_read(4, 4) == 0xAABBCCDD


def test_device_config_change_bumps_generation_and_interrupts(mem):
    r = Rig(mem)
    gen = r.r(VIRTIO_MMIO_CONFIG_GENERATION)
    r.dev.config_changed()  # before DRIVER_OK: no interrupt
    assert r.r(VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    r.drv.initialize(queues=(0,))
    r.dev.config_changed()
    assert r.r(VIRTIO_MMIO_CONFIG_GENERATION) == gen + 2
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert r.irq.level


# ---- errors and recovery -----------------------------------------------------------------
def test_ring_error_sets_needs_reset_with_config_interrupt(mem):
    r = ready_rig(mem)
    q = r.drv.queues[0]
    b = r.alloc.alloc(4)
    q.write_desc(0, b, 4, VIRTQ_DESC_F_NEXT, 0)  # self loop
    q.publish(0)
    r.drv.kick(0)
    assert r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert r.t.errors["chain-too-long"] == 1
    assert "queue 0" in r.t.last_error
    # Further kicks do nothing; the driver cannot set more status bits; reset restores service.
    r.drv.kick(0)
    assert r.t.faults["notify-not-live"] == 1
    r.drv.initialize(queues=(0,))
    assert r.echo() == b"PING"


@pytest.mark.parametrize(
    "exc", [RuntimeError("bug"), KeyError(3), GuestError("bad request"), VirtqueueError("q", "custom", "bad", 0x1234)]
)
def test_device_exceptions_never_escape(mem, exc):
    r = ready_rig(mem)
    r.dev.fail_with = exc
    r.drv.submit(0, [b"a"], [1])
    assert r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert sum(r.t.errors.values()) == 1
    r.dev.fail_with = None
    r.drv.initialize(queues=(0,))
    assert r.echo() == b"PING"


def test_activate_failure_sets_needs_reset(mem):
    r = Rig(mem)
    r.dev.activate = lambda link: (_ for _ in ()).throw(RuntimeError("no backend"))
    r.drv.initialize(queues=(0,))
    assert r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert r.t.errors["device-exception"] == 1


def test_reset_mid_request_drops_late_completion(mem):
    r = ready_rig(mem)
    r.dev.defer = True
    req = r.drv.submit(0, [b"late"], [4])
    assert len(r.dev.deferred) == 1
    q = r.t.queues[0]
    link = r.dev.link
    pending = list(r.dev.deferred)
    r.w(VIRTIO_MMIO_STATUS, 0)  # reset while the request is in flight
    assert not link.current
    # The backend finishes after the reset: nothing may reach guest memory.
    assert not link.run_locked(lambda: r.dev.complete(pending[0]))
    assert r.t.faults["late-work-dropped"] == 1
    assert r.mem.read(req.writable()[0].addr, 4) == b"\xa5" * 4
    assert q.next_used == 0 and q.stats.completions == 0
    r.dev.defer = False
    r.drv.initialize(queues=(0,))
    assert r.echo() == b"PING"


def test_completion_from_a_device_thread(mem):
    r = ready_rig(mem)
    r.dev.defer = True
    req = r.drv.submit(0, [b"async"], [5])
    chain = r.dev.deferred.pop()
    link = r.dev.link
    t = threading.Thread(target=lambda: link.run_locked(lambda: r.dev.complete(chain)))
    t.start()
    t.join()
    assert r.drv.used(0) == [(req.head, 5)]
    assert r.drv.read_segment(req.writable()[0]) == b"ASYNC"
    assert r.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING


def test_summary(mem):
    r = ready_rig(mem)
    r.echo()
    s = r.t.summary()
    assert s["device_id"] == ECHO_ID
    assert s["queues"][0]["completions"] == 1
    assert s["notifications"] == 1


def test_chain_with_direct_buffers_and_two_queues(mem):
    r = ready_rig(mem)
    req0 = r.drv.submit(0, [b"ab", b"cd"], [3, 1], kick=False)
    req1 = r.drv.submit(1, [b"xyz"], [3], indirect=True)
    r.drv.kick(0)
    assert r.drv.used(0) == [(req0.head, 4)]
    assert r.drv.used(1) == [(req1.head, 3)]
    w = req0.writable()
    assert r.drv.read_segment(w[0]) + r.drv.read_segment(w[1]) == b"ABCD"
    assert r.drv.read_segment(req1.writable()[0]) == b"XYZ"
