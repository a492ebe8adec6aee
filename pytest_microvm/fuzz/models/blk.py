"""A reference model of virtio-blk (virtio 1.2 §5.2.6) over an in-memory disk.

``blk_model(machine, chain, shadow)`` does to the shadow guest RAM and to
``machine.disk`` what a correct device does with one request, following the
choices ``vmm.devices.virtio.blk`` documents: the header may be split over
descriptors, the status byte is the last writable byte, IOERR for short
headers, bad lengths, ranges past the capacity and writes to a read-only
disk, UNSUPP for unknown types and flags, GET_ID needs exactly 20 bytes.
Sectors after DISCARD are unspecified (``machine.unknown``): reads of them
are not compared.
"""

from __future__ import annotations

import struct
from typing import Any

from vmm.memory import GuestMemory

from .virtio import Complete, Fail, Outcome, ParsedChain

SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14
MAX_SEGMENTS = 16
MAX_SECTORS_PER_SEGMENT = 1 << 22


class _Status(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _gather(mem: GuestMemory, bufs: list[tuple[int, int]], offset: int, length: int) -> bytes:
    out = bytearray()
    for addr, n in bufs:
        if length <= 0:
            break
        if offset >= n:
            offset -= n
            continue
        k = min(n - offset, length)
        out += mem.read(addr + offset, k)
        length -= k
        offset = 0
    return bytes(out)


def _scatter(mem: GuestMemory, bufs: list[tuple[int, int]], offset: int, data: bytes) -> list[tuple[int, int]]:
    """Write ``data`` at ``offset`` of the concatenated buffers; returns the guest ranges written."""
    pos = 0
    written = []
    for addr, n in bufs:
        if pos >= len(data):
            break
        if offset >= n:
            offset -= n
            continue
        k = min(n - offset, len(data) - pos)
        mem.write(addr + offset, data[pos : pos + k])
        written.append((addr + offset, k))
        pos += k
        offset = 0
    return written


def _check_range(machine: Any, sector: int, nbytes: int) -> None:
    cap = len(machine.disk) // SECTOR
    if nbytes % SECTOR:
        raise _Status(S_IOERR)
    if sector > cap or nbytes // SECTOR > cap - sector:
        raise _Status(S_IOERR)


def blk_model(machine: Any, chain: ParsedChain, shadow: GuestMemory) -> Outcome:
    if chain.writable_len < 1:
        return Fail("no-status-byte")
    status_at = chain.writable_len - 1
    data_in = 0
    features = machine.model.driver_features
    try:
        if chain.readable_len < 16:
            raise _Status(S_IOERR)
        rtype, _reserved, sector = struct.unpack("<IIQ", _gather(shadow, chain.readable, 0, 16))
        out_len = chain.readable_len - 16
        if rtype == T_IN:
            _check_range(machine, sector, status_at)
            data = bytes(machine.disk[sector * SECTOR : sector * SECTOR + status_at])
            ranges = _scatter(shadow, chain.writable, 0, data)
            for s in range(sector, sector + status_at // SECTOR):
                if s in machine.unknown:
                    off = (s - sector) * SECTOR
                    machine.dont_care.extend(_ranges_of(chain.writable, off, SECTOR))
            del ranges
            data_in = status_at
        elif rtype == T_OUT:
            if machine.read_only:
                raise _Status(S_IOERR)
            _check_range(machine, sector, out_len)
            data = _gather(shadow, chain.readable, 16, out_len)
            machine.disk[sector * SECTOR : sector * SECTOR + out_len] = data
            machine.unknown -= set(range(sector, sector + out_len // SECTOR))
        elif rtype == T_FLUSH:
            pass
        elif rtype == T_GET_ID:
            if status_at != 20:
                raise _Status(S_IOERR)
            _scatter(shadow, chain.writable, 0, machine.device.serial)
            data_in = 20
        elif rtype in (T_DISCARD, T_WRITE_ZEROES) and features & (F_DISCARD if rtype == T_DISCARD else F_WRITE_ZEROES):
            if machine.read_only:
                raise _Status(S_IOERR)
            if out_len == 0 or out_len % 16 or out_len // 16 > MAX_SEGMENTS:
                raise _Status(S_IOERR)
            raw = _gather(shadow, chain.readable, 16, out_len)
            segs = [struct.unpack_from("<QII", raw, i) for i in range(0, out_len, 16)]
            for s, n, flags in segs:
                if flags & ~1:
                    raise _Status(S_UNSUPP)
                if rtype == T_DISCARD and flags & 1:
                    raise _Status(S_UNSUPP)
                if n > MAX_SECTORS_PER_SEGMENT:
                    raise _Status(S_IOERR)
                _check_range(machine, s, n * SECTOR)
            for s, n, _flags in segs:
                if rtype == T_DISCARD:
                    machine.unknown |= set(range(s, s + n))
                else:
                    machine.disk[s * SECTOR : (s + n) * SECTOR] = bytes(n * SECTOR)
                    machine.unknown -= set(range(s, s + n))
        else:
            raise _Status(S_UNSUPP)
        status = S_OK
    except _Status as e:
        status, data_in = e.status, 0
    _scatter(shadow, chain.writable, status_at, bytes([status]))
    return Complete(data_in + 1)


def _ranges_of(bufs: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int]]:
    out = []
    for addr, n in bufs:
        if length <= 0:
            break
        if offset >= n:
            offset -= n
            continue
        k = min(n - offset, length)
        out.append((addr + offset, k))
        length -= k
        offset = 0
    return out
