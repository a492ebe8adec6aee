"""virtio-blk over a raw image file (virtio 1.2 §5.2).

One request queue.  Requests are handled synchronously in the notifying
thread, straight between the file and guest memory (``preadv``/``pwrite`` on
checked views of guest RAM), so no host buffer grows with the request size.

Request framing follows §2.7.4 ("the device MUST NOT make assumptions about
the particular arrangement of descriptors"): the 16-byte header may be split
over several readable descriptors and the status byte is the last byte of
the device-writable part, wherever the descriptor boundaries are.  What the
device answers:

* header shorter than 16 bytes: IOERR;
* no device-writable byte at all (so no status byte): the request cannot be
  answered; the device sets DEVICE_NEEDS_RESET (as QEMU does);
* IN/OUT data not a multiple of 512, ``sector`` or ``sector + count``
  beyond ``capacity`` (no overflow: Python integers, checked before any
  offset is computed): IOERR, nothing reaches the file;
* OUT, DISCARD or WRITE_ZEROES on a read-only device: IOERR, the file is
  opened read-only and untouched (§5.2.6.2);
* GET_ID with a data buffer other than 20 bytes (§5.2.6.1): IOERR;
* DISCARD/WRITE_ZEROES with data not a multiple of 16 bytes or more than
  ``max_*_seg`` segments: IOERR; unknown flag bits, or ``unmap`` on DISCARD:
  UNSUPP (§5.2.6.2); either command without its feature negotiated: UNSUPP;
* any other type: UNSUPP;
* FLUSH: ``fsync`` before the status byte is written.

``used.len`` is the number of bytes written into device-writable buffers:
the data read plus the status byte (1 on any error).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import struct
from collections.abc import Sequence

from ...errors import DeviceError, GuestError
from .device import VIRTIO_ID_BLOCK, VirtioDevice, bit
from .queue import DescriptorChain

# ---- §5.2.3 Feature bits ----------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# ---- §5.2.6 Device Operation ---------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

#: struct virtio_blk_req header: le32 type, le32 reserved, le64 sector.
VIRTIO_BLK_REQ_HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
VIRTIO_BLK_DISCARD_SEGMENT = struct.Struct("<QII")
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x1
#: The device ID string of GET_ID: NUL-padded ASCII, up to 20 bytes.
VIRTIO_BLK_ID_BYTES = 20
#: The protocol's unit, whatever the backing block size (§5.2.4).
SECTOR_SIZE = 512

# ---- §5.2.4 struct virtio_blk_config, up to unused1 -------------------------------
_CONFIG = struct.Struct(
    "<Q"  # capacity
    "I"  # size_max
    "I"  # seg_max
    "HBB"  # geometry: cylinders, heads, sectors
    "I"  # blk_size
    "BBHI"  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BBH"  # writeback, unused0, num_queues
    "III"  # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # write_zeroes_may_unmap, unused1[3]
)

DEFAULT_QUEUE_SIZE = 256
#: Limits we announce for DISCARD / WRITE_ZEROES (per segment, per request).
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB
MAX_DISCARD_SEGMENTS = 16
#: Chunk for writing zeroes where the file system cannot zero a range itself.
_ZERO_CHUNK = 1 << 20

# fallocate(2) modes (linux/falloc.h).
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


class _BlkError(Exception):
    """A request ends with a non-OK status; ``kind`` is what gets counted."""

    def __init__(self, status: int, kind: str) -> None:
        super().__init__(kind)
        self.status = status
        self.kind = kind


def default_serial(path: str) -> str:
    """A stable 20-character device ID derived from the image's absolute path."""
    return hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:VIRTIO_BLK_ID_BYTES]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) through libc; False where the file system does not support ``mode``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    fn.restype = ctypes.c_int
    if fn(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class VirtioBlock(VirtioDevice):
    """A virtio-blk device backed by a raw file; capacity is the file size in whole sectors."""

    device_id = VIRTIO_ID_BLOCK
    name = "blk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        serial: str | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        discard: bool = True,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
            size = os.fstat(self._fd).st_size
        except OSError as e:
            raise DeviceError(f"{self.path}: cannot open block image: {e.strerror}") from None
        self.capacity = size // SECTOR_SIZE
        ident = serial if serial is not None else default_serial(self.path)
        try:
            raw = ident.encode("ascii")
        except UnicodeEncodeError:
            raise DeviceError(f"{self.path}: block serial {ident!r} is not ASCII") from None
        if len(raw) > VIRTIO_BLK_ID_BYTES:
            raise DeviceError(f"{self.path}: block serial {ident!r} is longer than 20 bytes")
        self.serial = raw.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.queue_size = queue_size
        self.last_backend_error = ""
        self.discard = discard and not read_only
        self._features = (
            bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
        )
        if read_only:
            self._features |= bit(VIRTIO_BLK_F_RO)
        if self.discard:
            self._features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        self._config = _CONFIG.pack(
            self.capacity,
            0,  # size_max (not offered)
            max(queue_size - 2, 1),  # seg_max: room for the header and status descriptors
            0, 0, 0,  # geometry (not offered)
            SECTOR_SIZE,  # blk_size
            0, 0, 0, 0,  # topology (not offered)
            0, 0, 0,  # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS if self.discard else 0,
            MAX_DISCARD_SEGMENTS if self.discard else 0,
            1 if self.discard else 0,  # discard_sector_alignment
            MAX_DISCARD_SECTORS if self.discard else 0,
            MAX_DISCARD_SEGMENTS if self.discard else 0,
            1 if self.discard else 0,  # write_zeroes_may_unmap
        )

    # ---- VirtioDevice ------------------------------------------------------------------
    def device_features(self) -> int:
        return self._features

    def queue_max_sizes(self) -> Sequence[int]:
        return (self.queue_size,)

    def config_bytes(self) -> bytes:
        return self._config

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def handle_queue(self, index: int) -> None:
        assert self.link is not None
        q = self.link.queues[index]
        for chain in q.drain():
            written = self._process(chain)
            q.add_used(chain, written)

    # ---- requests ------------------------------------------------------------------------
    def _process(self, chain: DescriptorChain) -> int:
        """Handle one request; returns the used length.  Raises GuestError if unanswerable."""
        m = self.metrics
        m.requests += 1
        if chain.writable_len < 1:
            m.error("no-status-byte")
            raise GuestError(f"virtio-blk: request at head {chain.head} has no device-writable status byte")
        status_at = chain.writable_len - 1
        data_in = 0
        try:
            if chain.readable_len < VIRTIO_BLK_REQ_HEADER.size:
                raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-short-header")
            rtype, _reserved, sector = VIRTIO_BLK_REQ_HEADER.unpack(chain.read(0, VIRTIO_BLK_REQ_HEADER.size))
            out_len = chain.readable_len - VIRTIO_BLK_REQ_HEADER.size
            in_len = status_at
            if rtype == VIRTIO_BLK_T_IN:
                m.ops["in"] += 1
                data_in = self._read(chain, sector, in_len)
            elif rtype == VIRTIO_BLK_T_OUT:
                m.ops["out"] += 1
                self._write(chain, sector, out_len)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                m.ops["flush"] += 1
                self._flush()
            elif rtype == VIRTIO_BLK_T_GET_ID:
                m.ops["get-id"] += 1
                if in_len != VIRTIO_BLK_ID_BYTES:
                    raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-get-id-length")
                chain.write(0, self.serial)
                data_in = VIRTIO_BLK_ID_BYTES
            elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and self._negotiated(rtype):
                m.ops["discard" if rtype == VIRTIO_BLK_T_DISCARD else "write-zeroes"] += 1
                self._discard_or_zero(chain, rtype, out_len)
            else:
                m.ops["unsupported"] += 1
                raise _BlkError(VIRTIO_BLK_S_UNSUPP, "unsupp-type")
            status = VIRTIO_BLK_S_OK
        except _BlkError as e:
            m.error(e.kind)
            status, data_in = e.status, 0
        except OSError as e:
            m.error("ioerr-backend")
            self.last_backend_error = f"{self.path}: {e.strerror or e}"
            status, data_in = VIRTIO_BLK_S_IOERR, 0
        chain.write(status_at, bytes((status,)))
        m.bytes_written += data_in + 1
        return data_in + 1

    def _negotiated(self, rtype: int) -> bool:
        assert self.link is not None
        f = VIRTIO_BLK_F_DISCARD if rtype == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
        return self.link.has_feature(f)

    def _range(self, sector: int, nbytes: int) -> int:
        """Byte offset of a data transfer, or IOERR if it is not whole sectors inside the disk."""
        if nbytes % SECTOR_SIZE:
            raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-length")
        if sector > self.capacity or nbytes // SECTOR_SIZE > self.capacity - sector:
            raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-capacity")
        return sector * SECTOR_SIZE

    def _read(self, chain: DescriptorChain, sector: int, nbytes: int) -> int:
        offset = self._range(sector, nbytes)
        for view in chain.writable_views(0, nbytes):
            with view:
                done = 0
                while done < len(view):
                    n = os.preadv(self._fd, [view[done:]], offset + done)
                    if n == 0:  # the file shrank under us: the rest reads as zeroes
                        view[done:] = bytes(len(view) - done)
                        break
                    done += n
                offset += len(view)
        return nbytes

    def _write(self, chain: DescriptorChain, sector: int, nbytes: int) -> None:
        if self.read_only:
            raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-read-only")
        offset = self._range(sector, nbytes)
        for view in chain.readable_views(VIRTIO_BLK_REQ_HEADER.size, nbytes):
            with view:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], offset + done)
                offset += len(view)
        self.metrics.bytes_read += nbytes

    def _flush(self) -> None:
        os.fsync(self._fd)

    def _discard_or_zero(self, chain: DescriptorChain, rtype: int, nbytes: int) -> None:
        if self.read_only:
            raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-read-only")
        seg_size = VIRTIO_BLK_DISCARD_SEGMENT.size
        if nbytes == 0 or nbytes % seg_size or nbytes // seg_size > MAX_DISCARD_SEGMENTS:
            raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-segments")
        raw = chain.read(VIRTIO_BLK_REQ_HEADER.size, nbytes)
        self.metrics.bytes_read += nbytes
        segments = [VIRTIO_BLK_DISCARD_SEGMENT.unpack_from(raw, i) for i in range(0, nbytes, seg_size)]
        # Validate every segment before touching the file.
        for sector, count, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _BlkError(VIRTIO_BLK_S_UNSUPP, "unsupp-flags")
            if rtype == VIRTIO_BLK_T_DISCARD and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _BlkError(VIRTIO_BLK_S_UNSUPP, "unsupp-discard-unmap")
            if count > MAX_DISCARD_SECTORS:
                raise _BlkError(VIRTIO_BLK_S_IOERR, "ioerr-segment-too-large")
            self._range(sector, count * SECTOR_SIZE)
        for sector, count, flags in segments:
            offset, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if not length:
                continue
            if rtype == VIRTIO_BLK_T_DISCARD:
                # §5.2.6.2: the device MAY deallocate; reads afterwards are unspecified.
                _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                self._zero(offset, length, unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))

    def _zero(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make [offset, offset+length) read as zeroes; deallocate only if ``unmap``."""
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE if unmap else _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, mode, offset, length):
            return
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = os.pwrite(self._fd, memoryview(zeroes)[: min(len(zeroes), end - offset)], offset)
            offset += n

    def summary(self) -> dict[str, object]:
        return {
            **super().summary(),
            "path": self.path,
            "capacity_sectors": self.capacity,
            "read_only": self.read_only,
            "last_backend_error": self.last_backend_error,
        }
