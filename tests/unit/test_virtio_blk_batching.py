"""virtio-blk with many requests per notification: merged transfers, order, one used.idx write.

The device answers a batch of requests in the order the driver made them
available, transfers runs of adjacent reads (or writes) with one vectored
syscall, and writes ``used.idx`` once after the last entry.  These tests
submit batches without notifying, then notify once, and check every
request's data, status and used length against a model of the disk.
"""

from __future__ import annotations

import os
import struct

import pytest

from vmm.devices.virtio import blk as blkmod
from vmm.devices.virtio.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from vmm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY, VirtioMmioTransport
from vmm.devices.virtio.queue import Virtqueue
from vmm.devices.virtio.testing import GuestAllocator, Segment, VirtioMmioDriver
from vmm.irq import RecordingIrqLine
from vmm.layout import MiB
from vmm.memory import GuestMemory

SECTORS = 256
BLOCK = 4096


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SECTORS * SECTOR_SIZE))
    return p


class Batch:
    """A device behind a transport, and a driver that queues requests and notifies once."""

    def __init__(self, path, *, read_only: bool = False, size: int = 64) -> None:
        self.mem = GuestMemory([(0, 16 * MiB)])
        self.dev = VirtioBlock(path, read_only=read_only)
        self.t = VirtioMmioTransport(self.dev, self.mem, RecordingIrqLine(5))
        self.alloc = GuestAllocator(self.mem, 0x10000, 16 * MiB)
        self.drv = VirtioMmioDriver(self.t, self.mem, self.alloc)
        self.drv.initialize(queues=(0,), size=size)
        self.q = self.drv.queues[0]
        self.pending: list[tuple[int, list[Segment]]] = []

    def add(self, rtype: int, sector: int = 0, data: bytes = b"", in_len: int = 0, *, split: int = 0) -> int:
        """Queue one request (not yet visible: avail.idx moves at notify); ``split`` cuts the data in two."""
        hdr = self.alloc.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        segs = [Segment(hdr, 16, False)]
        if data:
            cut = split or len(data)
            for part in (data[:cut], data[cut:]):
                if part:
                    a = self.alloc.alloc(len(part))
                    self.mem.write(a, part)
                    segs.append(Segment(a, len(part), False))
        if in_len:
            cut = split or in_len
            for n in (cut, in_len - cut):
                if n:
                    a = self.alloc.alloc(n)
                    self.mem.fill(a, n, 0xA5)
                    segs.append(Segment(a, n, True))
        status = self.alloc.alloc(1)
        self.mem.write_u8(status, 0xEE)
        segs.append(Segment(status, 1, True))
        head = self.q.add_chain(segs, publish=False)
        self.q.set_ring_entry(self.q.avail_idx + len(self.pending), head)
        self.pending.append((head, segs))
        return head

    def notify(self) -> list[tuple[int, int, bytes]]:
        """Publish every queued request, notify once; (status, used len, data) per request, in order."""
        self.q.set_avail_idx(self.q.avail_idx + len(self.pending))
        self.t.write(VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0)
        used = dict(self.q.take_used())
        out = []
        for head, segs in self.pending:
            written = b"".join(self.mem.read(s.addr, s.length) for s in segs if s.writable)
            out.append((written[-1], used[head], written[:-1]))
        assert len(used) == len(self.pending)
        self.pending = []
        return out

    def close(self) -> None:
        self.t.close()
        self.mem.close()


@pytest.fixture
def batch(image):
    b = Batch(image)
    yield b
    b.close()


def test_adjacent_reads_are_one_preadv_and_each_gets_its_data(batch, image, monkeypatch):
    calls = []
    real = os.preadv
    monkeypatch.setattr(
        blkmod.os, "preadv", lambda fd, bufs, off: calls.append((len(bufs), off)) or real(fd, bufs, off)
    )
    disk = image.read_bytes()
    for i in range(8):
        batch.add(VIRTIO_BLK_T_IN, 8 * i, in_len=BLOCK, split=512 if i % 2 else 0)
    results = batch.notify()
    for i, (status, used_len, data) in enumerate(results):
        assert status == VIRTIO_BLK_S_OK and used_len == BLOCK + 1
        assert data == disk[i * BLOCK : (i + 1) * BLOCK]
    assert calls == [(12, 0)]  # 8 requests, 4 of them over two buffers: one syscall
    assert batch.dev.metrics.ops["in"] == 8 and batch.dev.metrics.requests == 8


def test_non_adjacent_reads_are_separate_transfers(batch, image, monkeypatch):
    calls = []
    real = os.preadv
    monkeypatch.setattr(blkmod.os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off))
    disk = image.read_bytes()
    sectors = [40, 0, 8, 100, 108, 16]
    for s in sectors:
        batch.add(VIRTIO_BLK_T_IN, s, in_len=BLOCK)
    results = batch.notify()
    for s, (status, _, data) in zip(sectors, results):
        assert status == VIRTIO_BLK_S_OK and data == disk[s * 512 : s * 512 + BLOCK]
    assert calls == [40 * 512, 0, 100 * 512, 16 * 512]


def test_requests_take_effect_in_order(batch, image):
    """Write, read it back, write again, flush, read: all in one notification."""
    a, b = os.urandom(BLOCK), os.urandom(BLOCK)
    batch.add(VIRTIO_BLK_T_OUT, 16, a)
    batch.add(VIRTIO_BLK_T_OUT, 24, a, split=1024)  # adjacent: merged with the first
    batch.add(VIRTIO_BLK_T_IN, 16, in_len=2 * BLOCK)
    batch.add(VIRTIO_BLK_T_OUT, 16, b)
    batch.add(VIRTIO_BLK_T_FLUSH)
    batch.add(VIRTIO_BLK_T_IN, 16, in_len=BLOCK)
    results = batch.notify()
    assert [r[0] for r in results] == [VIRTIO_BLK_S_OK] * 6
    assert [r[1] for r in results] == [1, 1, 2 * BLOCK + 1, 1, 1, BLOCK + 1]
    assert results[2][2] == a + a
    assert results[5][2] == b
    assert image.read_bytes()[16 * 512 : 32 * 512] == b + a


def test_bad_requests_in_a_batch_get_their_own_status(tmp_path):
    path = tmp_path / "ro.img"
    data = os.urandom(SECTORS * SECTOR_SIZE)
    path.write_bytes(data)
    b = Batch(path, read_only=True)
    try:
        b.add(VIRTIO_BLK_T_IN, 0, in_len=BLOCK)
        b.add(VIRTIO_BLK_T_OUT, 8, b"\x01" * BLOCK)  # read-only
        b.add(VIRTIO_BLK_T_IN, 8, in_len=BLOCK)
        b.add(VIRTIO_BLK_T_IN, SECTORS - 4, in_len=BLOCK)  # runs past the end
        b.add(VIRTIO_BLK_T_IN, 16, in_len=100)  # not whole sectors
        b.add(0x40)  # unknown type
        b.add(VIRTIO_BLK_T_IN, 16, in_len=BLOCK)
        results = b.notify()
        assert [r[0] for r in results] == [
            VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_OK,
        ]  # fmt: skip
        assert [r[1] for r in results] == [BLOCK + 1, 1, BLOCK + 1, 1, 1, 1, BLOCK + 1]
        assert results[0][2] == data[:BLOCK] and results[2][2] == data[BLOCK : 2 * BLOCK]
        assert results[6][2] == data[16 * 512 : 16 * 512 + BLOCK]
        assert path.read_bytes() == data
        assert b.dev.metrics.errors == {"ioerr-read-only": 1, "ioerr-capacity": 1, "ioerr-length": 1, "unsupp-type": 1}
    finally:
        b.close()


def test_merged_read_past_a_shrunk_file_falls_back_per_request(batch, image):
    """The file shrank after the device sized the disk: the merged preadv comes up short."""
    disk = image.read_bytes()
    os.truncate(image, 12 * 512)
    batch.add(VIRTIO_BLK_T_IN, 0, in_len=BLOCK)
    batch.add(VIRTIO_BLK_T_IN, 8, in_len=BLOCK)
    results = batch.notify()
    assert [r[0] for r in results] == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]
    assert results[0][2] == disk[:BLOCK]
    assert results[1][2] == disk[BLOCK : 12 * 512] + bytes(4 * 512)  # past the end of the file: zeroes
    assert batch.dev.metrics.requests == 2


def test_merged_write_error_falls_back_per_request(batch, image, monkeypatch):
    def failing(fd, bufs, off):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blkmod.os, "pwritev", failing)
    batch.add(VIRTIO_BLK_T_OUT, 0, b"\x02" * BLOCK)
    batch.add(VIRTIO_BLK_T_OUT, 8, b"\x03" * BLOCK)
    results = batch.notify()
    # The per-request path (plain pwrite) then writes each one.
    assert [r[0] for r in results] == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]
    assert image.read_bytes()[: 2 * BLOCK] == b"\x02" * BLOCK + b"\x03" * BLOCK


def test_used_idx_moves_once_per_notification(batch):
    writes = []
    real = Virtqueue.publish_used

    def spy(self):
        writes.append(self.next_used)
        real(self)

    Virtqueue.publish_used = spy
    try:
        for i in range(5):
            batch.add(VIRTIO_BLK_T_IN, 8 * i, in_len=BLOCK)
        batch.notify()
    finally:
        Virtqueue.publish_used = real
    assert writes == [5] and batch.q.used_idx == 5


def test_add_used_without_publish_leaves_used_idx(image):
    b = Batch(image)
    try:
        vq = b.dev.link.queues[0]
        b.add(VIRTIO_BLK_T_IN, 0, in_len=512)
        b.q.set_avail_idx(1)
        chain = vq.pop()
        assert vq.add_used(chain, 513, publish=False)
        assert b.q.used_idx == 0 and b.q.used_entry(0) == (chain.head, 513)
        vq.publish_used()
        assert b.q.used_idx == 1
    finally:
        b.close()


def test_closing_the_transport_lets_guest_memory_unmap(image):
    b = Batch(image)
    b.t.close()
    b.mem.close()
    assert all(r.mapping.closed for r in b.mem.regions)


def test_vectored_transfers_resume_after_short_ones():
    """A vectored call may move fewer bytes than asked: the rest follows, across buffer edges."""
    src = bytes(range(200))
    bufs = [bytearray(7), bytearray(0), bytearray(50), bytearray(143)]
    calls = []

    def trickle(fd, views, offset):  # like preadv, but at most 13 bytes per call
        calls.append(offset)
        n = 0
        for v in views:
            take = min(len(v), 13 - n, len(src) - offset - n)
            v[:take] = src[offset + n : offset + n + take]
            n += take
            if n == 13 or take < len(v):
                break
        return n

    views = [memoryview(b) for b in bufs]
    assert blkmod._vectored(trickle, -1, blkmod._skip(views, 0), 0)
    assert b"".join(bufs) == src
    assert calls == list(range(0, 200, 13))
    assert blkmod._skip(views, 7 + 50)[0].nbytes == 143
    assert [v.nbytes for v in blkmod._skip(views, 10)] == [47, 143]
    # End of file before the buffers are full: False, so the caller answers each request itself.
    assert not blkmod._vectored(lambda fd, v, off: 0, -1, [memoryview(bytearray(4))], 0)
