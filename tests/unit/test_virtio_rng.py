"""virtio-rng (entropy device) through the mmio transport."""

from __future__ import annotations

import itertools

import pytest

from vmm.devices.virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, bit
from vmm.devices.virtio.mmio import VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_STATUS, VirtioMmioTransport
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmm.devices.virtio.rng import VirtioRng
from vmm.devices.virtio.testing import GuestAllocator, VirtioMmioDriver
from vmm.irq import RecordingIrqLine
from vmm.layout import MiB
from vmm.memory import GuestMemory

POISON = 0xA5


def counting_source():
    counter = itertools.count()
    return lambda n: bytes(next(counter) & 0xFF for _ in range(n))


@pytest.fixture
def mem():
    m = GuestMemory([(0, 8 * MiB)])
    yield m
    m.close()


class Rig:
    def __init__(self, mem, **kw) -> None:
        self.mem = mem
        self.dev = VirtioRng(**kw)
        self.irq = RecordingIrqLine(7)
        self.t = VirtioMmioTransport(self.dev, mem, self.irq)
        self.alloc = GuestAllocator(mem, 0x10000, 8 * MiB)
        self.drv = VirtioMmioDriver(self.t, mem, self.alloc)
        self.drv.initialize(queues=(0,))

    def get(self, *sizes: int, out: tuple[bytes, ...] = ()) -> tuple[int, bytes]:
        req = self.drv.submit(0, out, sizes)
        used = self.drv.used(0)
        assert [h for h, _ in used] == [req.head]
        return used[0][1], b"".join(self.drv.read_segment(s) for s in req.writable())


def test_identity_and_features(mem):
    r = Rig(mem)
    assert r.t.read(VIRTIO_MMIO_DEVICE_ID, 4) == VIRTIO_ID_RNG == 4
    assert r.drv.device_features() & ((1 << 24) - 1) == 0  # no device-specific features (§5.4.3)
    assert r.drv.config_read(0, 1) == 0 and r.t.faults["config-read-out-of-range"] == 1


def test_fills_the_buffer_with_host_entropy(mem):
    r = Rig(mem)
    n, data = r.get(256)
    assert n == 256
    assert data != bytes([POISON]) * 256
    n2, data2 = r.get(256)
    assert n2 == 256 and data2 != data
    assert r.irq.level


def test_scatters_over_several_writable_buffers(mem):
    r = Rig(mem, source=counting_source())
    n, data = r.get(3, 5, 8)
    assert n == 16
    assert data == bytes(range(16))
    assert r.dev.metrics.bytes_written == 16


def test_bounded_per_request(mem):
    r = Rig(mem, max_bytes=4096, source=counting_source())
    n, data = r.get(1 * MiB)
    assert n == 4096
    assert data[:4096] == bytes(i & 0xFF for i in range(4096))
    assert data[4096:] == bytes([POISON]) * (MiB - 4096)  # the rest is untouched


def test_readable_buffers_are_ignored_and_counted(mem):
    r = Rig(mem, source=counting_source())
    n, data = r.get(4, out=(b"junk",))
    assert (n, data) == (4, bytes(range(4)))
    assert r.dev.metrics.errors["readable-buffer"] == 1


def test_no_writable_buffer_gets_zero_length(mem):
    r = Rig(mem)
    n, data = r.get(out=(b"only readable",))
    assert (n, data) == (0, b"")
    assert r.dev.metrics.errors["no-writable-buffer"] == 1
    assert r.get(8)[0] == 8


def test_malformed_chain_needs_reset_then_recovers(mem):
    r = Rig(mem)
    q = r.drv.queues[0]
    b = r.alloc.alloc(8)
    q.write_desc(0, b, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)  # self loop
    q.publish(0)
    r.drv.kick(0)
    assert r.t.read(VIRTIO_MMIO_STATUS, 4) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert r.mem.read(b, 8) == bytes(8)  # nothing was written into the looping buffer
    r.drv.initialize(queues=(0,))
    assert r.get(8)[0] == 8


def test_works_without_ring_features(mem):
    r = Rig(mem)
    r.drv.initialize(bit(VIRTIO_F_VERSION_1), queues=(0,))
    assert r.get(32)[0] == 32


def test_many_requests_in_one_notification(mem):
    r = Rig(mem, source=counting_source())
    reqs = [r.drv.submit(0, (), (2,), kick=False) for _ in range(64)]
    r.drv.kick(0)
    used = r.drv.used(0)
    assert sorted(h for h, _ in used) == sorted(x.head for x in reqs)
    assert all(n == 2 for _, n in used)
    assert r.dev.metrics.requests == 64


def test_source_returning_short_data_is_a_device_fault_not_a_crash(mem):
    r = Rig(mem, source=lambda n: b"x")
    req = r.drv.submit(0, (), (16,))
    assert r.drv.used(0) == []
    assert r.t.read(VIRTIO_MMIO_STATUS, 4) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert r.t.errors["device-exception"] == 1
    assert r.mem.read(req.writable()[0].addr, 16) == bytes([POISON]) * 16
