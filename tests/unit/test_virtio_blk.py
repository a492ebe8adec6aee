"""virtio-blk against a real temporary image file, driven through the mmio transport."""

from __future__ import annotations

import os
import struct

import pytest

from vmm.devices.virtio import blk as blkmod
from vmm.devices.virtio.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
    default_serial,
)
from vmm.devices.virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, bit
from vmm.devices.virtio.mmio import VIRTIO_MMIO_STATUS, VirtioMmioTransport
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmm.devices.virtio.testing import GuestAllocator, VirtioMmioDriver
from vmm.errors import DeviceError
from vmm.irq import RecordingIrqLine
from vmm.layout import MiB
from vmm.memory import GuestMemory

SECTORS = 64
POISON = 0xA5


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 256) & 0xFF for i in range(n))


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(SECTORS * SECTOR_SIZE))
    return p


@pytest.fixture
def mem():
    m = GuestMemory([(0, 8 * MiB)])
    yield m
    m.close()


class Rig:
    def __init__(self, mem: GuestMemory, path, features: int | None = None, **kw) -> None:
        self.mem = mem
        self.dev = VirtioBlock(path, **kw)
        self.irq = RecordingIrqLine(6)
        self.t = VirtioMmioTransport(self.dev, mem, self.irq)
        self.alloc = GuestAllocator(mem, 0x10000, 8 * MiB)
        self.drv = VirtioMmioDriver(self.t, mem, self.alloc)
        self.drv.initialize(features, queues=(0,), size=16)

    def close(self) -> None:
        self.dev.close()

    @property
    def needs_reset(self) -> bool:
        return bool(self.t.read(VIRTIO_MMIO_STATUS, 4) & VIRTIO_CONFIG_S_NEEDS_RESET)

    def request(
        self,
        rtype: int,
        sector: int = 0,
        data: bytes = b"",
        in_len: int = 0,
        *,
        header: bytes | None = None,
        out_split: list[int] | None = None,
        in_split: list[int] | None = None,
        indirect: bool = False,
    ) -> tuple[int, int, bytes]:
        """Submit one request; returns (status, used.len, data read back from the writable part)."""
        out = (header if header is not None else struct.pack("<IIQ", rtype, 0, sector)) + data
        out_parts = _split(out, out_split)
        in_sizes = in_split if in_split is not None else ([in_len] if in_len else []) + [1]
        mark = self.alloc.mark()
        req = self.drv.submit(0, out_parts, in_sizes, indirect=indirect)
        used = self.drv.used(0)
        assert len(used) == 1 and used[0][0] == req.head, used
        written = b"".join(self.drv.read_segment(s) for s in req.writable())
        self.alloc.release(mark)
        return written[-1], used[0][1], written[:-1]


def _split(data: bytes, sizes: list[int] | None) -> list[bytes]:
    if sizes is None:
        return [data]
    parts, pos = [], 0
    for n in sizes:
        parts.append(data[pos : pos + n])
        pos += n
    assert pos == len(data)
    return parts


@pytest.fixture
def rig(mem, image):
    r = Rig(mem, image)
    yield r
    # Whatever the test sent, after a reset the next valid request works.
    r.alloc.release(r.alloc.start)
    r.drv.initialize(queues=(0,), size=16)
    status, _, data = r.request(VIRTIO_BLK_T_IN, SECTORS - 1, in_len=512)
    assert status == VIRTIO_BLK_S_OK and data == file_bytes(image)[-512:]
    r.close()


def file_bytes(path) -> bytes:
    return open(path, "rb").read()


# ---- configuration and features -------------------------------------------------------
def test_features_and_config(rig):
    f = rig.drv.device_features()
    for b in (
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        32,
    ):
        assert f & bit(b), b
    assert not f & bit(VIRTIO_BLK_F_RO)
    assert rig.drv.config_read(0, 8) == SECTORS  # capacity
    assert rig.drv.config_read(0, 4) == SECTORS and rig.drv.config_read(4, 4) == 0
    assert rig.drv.config_read(12, 4) == 254  # seg_max
    assert rig.drv.config_read(20, 4) == SECTOR_SIZE  # blk_size
    assert rig.drv.config_read(52, 4) == 16  # max_write_zeroes_seg
    assert rig.drv.config_read(56, 1) == 1  # write_zeroes_may_unmap
    assert rig.drv.config_read(57, 2) == 0  # unused1 is zero
    assert rig.drv.config_read(60, 1) == 0 and rig.t.faults["config-read-out-of-range"] == 1


def test_config_is_read_only(rig):
    rig.drv.config_write(0, 8, 1)
    assert rig.drv.config_read(0, 8) == SECTORS
    assert rig.t.faults["config-write-refused"] == 1


def test_capacity_ignores_a_partial_last_sector(mem, tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(3 * SECTOR_SIZE + 100))
    r = Rig(mem, p)
    assert r.drv.config_read(0, 8) == 3
    assert r.request(VIRTIO_BLK_T_IN, 2, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert r.request(VIRTIO_BLK_T_IN, 3, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    r.close()


def test_missing_image_is_a_host_error(tmp_path):
    with pytest.raises(DeviceError, match="nope.img"):
        VirtioBlock(tmp_path / "nope.img")


def test_bad_serial_is_a_host_error(image):
    with pytest.raises(DeviceError, match="longer than 20"):
        VirtioBlock(image, serial="x" * 21)


# ---- reads and writes ----------------------------------------------------------------------
def test_read(rig, image):
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, 3, in_len=4 * SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_OK
    assert used_len == 4 * SECTOR_SIZE + 1
    assert data == file_bytes(image)[3 * SECTOR_SIZE : 7 * SECTOR_SIZE]
    assert rig.dev.metrics.ops["in"] == 1


def test_write_reaches_exactly_the_right_bytes(rig, image):
    before = file_bytes(image)
    payload = bytes(range(256)) * 4
    status, used_len, _ = rig.request(VIRTIO_BLK_T_OUT, 5, payload)
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 1)
    after = file_bytes(image)
    assert after[5 * 512 : 7 * 512] == payload
    assert after[: 5 * 512] == before[: 5 * 512] and after[7 * 512 :] == before[7 * 512 :]
    assert rig.request(VIRTIO_BLK_T_IN, 5, in_len=1024)[2] == payload
    assert rig.dev.metrics.bytes_read == 1024


def test_zero_length_read_and_write(rig, image):
    before = file_bytes(image)
    assert rig.request(VIRTIO_BLK_T_IN, SECTORS)[:2] == (VIRTIO_BLK_S_OK, 1)
    assert rig.request(VIRTIO_BLK_T_OUT, SECTORS)[:2] == (VIRTIO_BLK_S_OK, 1)
    assert file_bytes(image) == before


def test_header_and_data_split_across_descriptors(rig, image):
    payload = pattern(1024)[::-1]
    header = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 9)
    status, _, _ = rig.request(VIRTIO_BLK_T_OUT, header=header, data=payload, out_split=[4, 4, 3, 5, 700, 324])
    assert status == VIRTIO_BLK_S_OK
    assert file_bytes(image)[9 * 512 : 11 * 512] == payload
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, 9, in_split=[100, 412, 511, 2])
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 1025)
    assert data == payload


def test_status_byte_shares_a_descriptor_with_data(rig, image):
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, 1, in_split=[SECTOR_SIZE + 1])
    assert (status, used_len) == (VIRTIO_BLK_S_OK, SECTOR_SIZE + 1)
    assert data == file_bytes(image)[512:1024]


def test_indirect_request(rig, image):
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, 0, in_len=512, indirect=True)
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 513)
    assert data == file_bytes(image)[:512]


def test_a_full_queue_in_one_notification(rig, image):
    reqs = [
        rig.drv.submit(0, [struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i)], [512, 1], indirect=True, kick=False)
        for i in range(16)
    ]
    rig.drv.kick(0)
    used = rig.drv.used(0)
    assert sorted(h for h, _ in used) == sorted(r.head for r in reqs)
    content = file_bytes(image)
    for i, req in enumerate(reqs):
        data, status = (rig.drv.read_segment(s) for s in req.writable())
        assert status == bytes([VIRTIO_BLK_S_OK]) and data == content[i * 512 : (i + 1) * 512]


# ---- malformed requests ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sector,nsect",
    [
        (SECTORS, 1),
        (SECTORS - 1, 2),
        (SECTORS + 1, 0),
        (2**64 - 1, 1),  # sector + count overflows u64
        (2**55, 1),  # sector * 512 overflows u64
        (2**64 - 1, 0),
    ],
)
def test_beyond_capacity_is_ioerr_and_touches_nothing(rig, image, sector, nsect):
    before = file_bytes(image)
    n = nsect * SECTOR_SIZE
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, sector, in_len=n)
    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
    assert data == bytes([POISON]) * n
    status, used_len, _ = rig.request(VIRTIO_BLK_T_OUT, sector, b"\x77" * n)
    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
    assert file_bytes(image) == before
    assert os.path.getsize(image) == SECTORS * SECTOR_SIZE
    assert rig.dev.metrics.errors["ioerr-capacity"] == 2
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("n", [1, 100, 511, 513])
def test_length_not_a_multiple_of_512(rig, image, n):
    before = file_bytes(image)
    status, _, data = rig.request(VIRTIO_BLK_T_IN, 0, in_len=n)
    assert status == VIRTIO_BLK_S_IOERR and data == bytes([POISON]) * n
    assert rig.request(VIRTIO_BLK_T_OUT, 0, b"\x01" * n)[0] == VIRTIO_BLK_S_IOERR
    assert file_bytes(image) == before
    assert rig.dev.metrics.errors["ioerr-length"] == 2


@pytest.mark.parametrize("header", [b"", b"\x00" * 8, b"\x00" * 15])
def test_short_header_is_ioerr(rig, header):
    status, used_len, _ = rig.request(0, header=header)
    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
    assert rig.dev.metrics.errors["ioerr-short-header"] == 1
    assert not rig.needs_reset


@pytest.mark.parametrize("rtype", [2, 3, 5, 7, 10, 12, 14, 0x80000000, 0xFFFFFFFF])
def test_unknown_types_are_unsupported(rig, rtype):
    status, used_len, _ = rig.request(rtype, 0, in_len=512)
    assert (status, used_len) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert rig.dev.metrics.errors["unsupp-type"] == 1


def test_no_writable_status_byte_needs_reset(rig, image):
    before = file_bytes(image)
    header = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0)
    rig.drv.submit(0, [header, b"\x55" * 512], [])
    assert rig.drv.used(0) == []
    assert rig.needs_reset
    assert rig.dev.metrics.errors["no-status-byte"] == 1
    assert file_bytes(image) == before
    rig.drv.initialize(queues=(0,), size=16)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[:2] == (VIRTIO_BLK_S_OK, 513)


def test_read_only_status_descriptor_needs_reset(rig, image):
    # header, writable data, then a *readable* status descriptor: a framing violation (§2.7.4.2).
    q = rig.drv.queues[0]
    hdr = rig.alloc.alloc(16)
    rig.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    data, st = rig.alloc.alloc(512), rig.alloc.alloc(1)
    q.write_desc(0, hdr, 16, VIRTQ_DESC_F_NEXT, 1)
    q.write_desc(1, data, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    q.write_desc(2, st, 1, 0, 0)
    q.publish(0)
    rig.drv.kick(0)
    assert rig.needs_reset
    assert rig.t.errors["readable-after-writable"] == 1
    rig.drv.initialize(queues=(0,), size=16)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK


def test_head_only_chain_needs_reset(rig):
    rig.drv.submit(0, [struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [])
    assert rig.needs_reset
    rig.drv.initialize(queues=(0,), size=16)
    assert rig.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


def test_ring_loop_needs_reset_and_recovers(rig):
    q = rig.drv.queues[0]
    b = rig.alloc.alloc(16)
    q.write_desc(0, b, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    q.write_desc(1, b, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)
    q.publish(0)
    rig.drv.kick(0)
    assert rig.needs_reset and rig.t.errors["chain-too-long"] == 1
    rig.drv.initialize(queues=(0,), size=16)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK


def test_reset_with_a_request_made_available(rig, image):
    before = file_bytes(image)
    rig.drv.submit(0, [struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0), b"\xee" * 512], [1], kick=False)
    rig.drv.reset()  # the request was never notified; after reset it is gone
    rig.drv.initialize(queues=(0,), size=16)
    rig.drv.kick(0)
    assert rig.drv.used(0) == []
    assert file_bytes(image) == before
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[2] == before[:512]


# ---- flush and GET_ID ---------------------------------------------------------------------------
def test_flush_syncs_before_the_status_is_written(rig, monkeypatch):
    seen = []
    real_fsync = os.fsync
    status_addr = []

    def spy(fd):
        seen.append(rig.mem.read(status_addr[0], 1))
        real_fsync(fd)

    monkeypatch.setattr(blkmod.os, "fsync", spy)
    req = rig.drv.submit(0, [struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0)], [1], kick=False)
    status_addr.append(req.writable()[0].addr)
    rig.drv.kick(0)
    assert seen == [bytes([POISON])]  # fsync ran while the status byte was still unwritten
    assert rig.mem.read(status_addr[0], 1) == bytes([VIRTIO_BLK_S_OK])
    assert rig.drv.used(0) == [(req.head, 1)]


def test_get_id_default_serial(rig, image):
    status, used_len, data = rig.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 21)
    assert data == default_serial(str(image)).encode()
    assert len(data) == 20


def test_get_id_named_serial(mem, image):
    r = Rig(mem, image, serial="disk-0")
    assert r.request(VIRTIO_BLK_T_GET_ID, in_len=20)[2] == b"disk-0" + bytes(14)
    r.close()


@pytest.mark.parametrize("n", [0, 19, 21, 512])
def test_get_id_wrong_length_is_ioerr(rig, n):
    status, used_len, data = rig.request(VIRTIO_BLK_T_GET_ID, in_len=n)
    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
    assert data == bytes([POISON]) * n


# ---- read-only -------------------------------------------------------------------------------
def test_read_only_device(mem, image):
    os.utime(image, (1_000_000, 1_000_000))
    before = file_bytes(image)
    r = Rig(mem, image, read_only=True)
    f = r.drv.device_features()
    assert f & bit(VIRTIO_BLK_F_RO) and not f & bit(VIRTIO_BLK_F_DISCARD) and not f & bit(VIRTIO_BLK_F_WRITE_ZEROES)
    assert r.request(VIRTIO_BLK_T_OUT, 0, b"\x11" * 512)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert r.request(VIRTIO_BLK_T_OUT, SECTORS, b"")[0] == VIRTIO_BLK_S_IOERR
    seg = struct.pack("<QII", 0, 1, 0)
    assert r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg)[0] == VIRTIO_BLK_S_UNSUPP
    assert r.request(VIRTIO_BLK_T_DISCARD, 0, seg)[0] == VIRTIO_BLK_S_UNSUPP
    assert r.request(VIRTIO_BLK_T_IN, 0, in_len=512)[2] == before[:512]
    assert r.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    r.close()
    assert file_bytes(image) == before
    assert os.stat(image).st_mtime == 1_000_000
    assert r.dev.metrics.errors["ioerr-read-only"] == 2


# ---- discard and write zeroes ---------------------------------------------------------------
def seg(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


@pytest.mark.parametrize("flags", [0, 1])
def test_write_zeroes(rig, image, flags):
    before = file_bytes(image)
    status, used_len, _ = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(2, 3, flags) + seg(10, 1, flags))
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 1)
    after = file_bytes(image)
    expected = bytearray(before)
    expected[2 * 512 : 5 * 512] = bytes(3 * 512)
    expected[10 * 512 : 11 * 512] = bytes(512)
    assert after == bytes(expected)
    assert rig.request(VIRTIO_BLK_T_IN, 2, in_len=1536)[2] == bytes(1536)


def test_discard_is_accepted_and_stays_inside_its_range(rig, image):
    before = file_bytes(image)
    assert rig.request(VIRTIO_BLK_T_DISCARD, 0, seg(4, 4))[0] == VIRTIO_BLK_S_OK
    after = file_bytes(image)
    assert after[: 4 * 512] == before[: 4 * 512] and after[8 * 512 :] == before[8 * 512 :]
    assert len(after) == len(before)


@pytest.mark.parametrize(
    "rtype,data,status,kind",
    [
        (VIRTIO_BLK_T_DISCARD, seg(0, 1, 1), VIRTIO_BLK_S_UNSUPP, "unsupp-discard-unmap"),
        (VIRTIO_BLK_T_DISCARD, seg(0, 1, 2), VIRTIO_BLK_S_UNSUPP, "unsupp-flags"),
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(0, 1, 0x8000_0000), VIRTIO_BLK_S_UNSUPP, "unsupp-flags"),
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(SECTORS - 1, 2), VIRTIO_BLK_S_IOERR, "ioerr-capacity"),
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(2**64 - 1, 0xFFFF_FFFF), VIRTIO_BLK_S_IOERR, "ioerr-segment-too-large"),
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(2**64 - 1, 1), VIRTIO_BLK_S_IOERR, "ioerr-capacity"),
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(0, 1) * 17, VIRTIO_BLK_S_IOERR, "ioerr-segments"),
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(0, 1)[:12], VIRTIO_BLK_S_IOERR, "ioerr-segments"),
        (VIRTIO_BLK_T_WRITE_ZEROES, b"", VIRTIO_BLK_S_IOERR, "ioerr-segments"),
        # One bad segment after a good one: nothing is zeroed.
        (VIRTIO_BLK_T_WRITE_ZEROES, seg(0, 1) + seg(SECTORS, 1), VIRTIO_BLK_S_IOERR, "ioerr-capacity"),
    ],
)
def test_bad_discard_and_write_zeroes(rig, image, rtype, data, status, kind):
    before = file_bytes(image)
    assert rig.request(rtype, 0, data)[:2] == (status, 1)
    assert rig.dev.metrics.errors[kind] == 1
    assert file_bytes(image) == before


def test_discard_without_the_feature_is_unsupported(mem, image):
    r = Rig(mem, image, features=bit(VIRTIO_F_VERSION_1))
    before = file_bytes(image)
    assert r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(0, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert file_bytes(image) == before
    r.close()


def test_metrics(rig):
    rig.request(VIRTIO_BLK_T_IN, 0, in_len=1024)
    rig.request(VIRTIO_BLK_T_OUT, 0, bytes(512))
    rig.request(99)
    s = rig.t.summary()["device"]
    assert s["requests"] == 3
    assert s["ops"] == {"in": 1, "out": 1, "unsupported": 1}
    assert s["bytes_read"] == 512
    assert s["bytes_written"] == 1025 + 1 + 1
    assert s["errors"] == {"unsupp-type": 1}
    assert s["capacity_sectors"] == SECTORS


def test_many_segments_in_an_indirect_table(rig, image):
    payload = pattern(14 * 512)[::-1]
    status, _, _ = rig.request(VIRTIO_BLK_T_OUT, 0, payload, out_split=[16] + [512] * 14, indirect=True)
    assert status == VIRTIO_BLK_S_OK
    assert file_bytes(image)[: 14 * 512] == payload


def test_write_zeroes_without_fallocate_support(rig, image, monkeypatch):
    # File systems without FALLOC_FL_ZERO_RANGE / PUNCH_HOLE: zeroes are written in bounded chunks.
    monkeypatch.setattr(blkmod, "_fallocate", lambda fd, mode, off, length: False)
    monkeypatch.setattr(blkmod, "_ZERO_CHUNK", 1024)
    before = file_bytes(image)
    assert rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(1, 5))[0] == VIRTIO_BLK_S_OK
    expected = bytearray(before)
    expected[512 : 6 * 512] = bytes(5 * 512)
    assert file_bytes(image) == bytes(expected)


def test_backend_error_is_ioerr(rig, monkeypatch):
    def broken(*a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blkmod.os, "preadv", broken)
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)
    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
    assert data == bytes([POISON]) * 512
    assert rig.dev.metrics.errors["ioerr-backend"] == 1
    assert not rig.needs_reset
