"""Guest memory: regions of anonymous host memory behind one checked interface.

Every guest-physical access in the VMM goes through ``GuestMemory``.  A range
is checked as a whole (address, length, and overflow past 2**64) before any
byte moves, and a range must lie inside one region: straddling the MMIO hole
or the end of RAM is the same error as being outside it.  No device slices the
raw mmap; loaders that need bulk zero-copy access use ``view()``, which is
checked the same way.

``GuestMemory`` needs no KVM: device unit tests build one directly.
"""

from __future__ import annotations

import mmap
import struct
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import GuestMemoryError

U64_LIMIT = 1 << 64

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class MemoryRegion:
    """One contiguous guest-physical range backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def host_address(self) -> int:
        """The userspace address of the mapping (for KVM_SET_USER_MEMORY_REGION)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))


class GuestMemory:
    """Guest RAM made of non-overlapping regions, sorted by address."""

    def __init__(self, layout: Sequence[tuple[int, int]]) -> None:
        if not layout:
            raise ValueError("guest memory needs at least one region")
        regions: list[MemoryRegion] = []
        for gpa, size in sorted(layout):
            if size <= 0 or gpa < 0 or gpa + size > U64_LIMIT:
                raise ValueError(f"invalid guest memory region {gpa:#x}+{size:#x}")
            if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE:
                raise ValueError(f"guest memory region {gpa:#x}+{size:#x} is not page aligned")
            if regions and gpa < regions[-1].end:
                raise ValueError(f"guest memory region {gpa:#x} overlaps the one before it")
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            regions.append(MemoryRegion(gpa, size, mapping))
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self._starts = [r.gpa for r in regions]
        self._views = [memoryview(r.mapping) for r in regions]

    # ---- bookkeeping -----------------------------------------------------
    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.regions[-1].end

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views = []
        for r in self.regions:
            try:
                r.mapping.close()
            except BufferError:  # a view handed out earlier is still alive
                pass

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- checks ----------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        """Return (region index, offset in region) for a whole range, or raise."""
        if gpa < 0 or length < 0 or gpa + length > U64_LIMIT:
            raise GuestMemoryError(gpa, length, "not a valid 64-bit guest-physical range")
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.regions[i]
            off = gpa - r.gpa
            if off + length <= r.size and (length > 0 or off < r.size):
                return i, off
        raise GuestMemoryError(gpa, length)

    def check(self, gpa: int, length: int) -> None:
        """Raise ``GuestMemoryError`` unless [gpa, gpa+length) is inside one region."""
        self._locate(gpa, length)

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # ---- access ----------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        i, off = self._locate(gpa, length)
        return self._views[i][off : off + length].tobytes()

    def read_into(self, gpa: int, buf: bytearray | memoryview) -> None:
        n = len(buf)
        i, off = self._locate(gpa, n)
        buf[:] = self._views[i][off : off + n]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        i, off = self._locate(gpa, n)
        self._views[i][off : off + n] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        i, off = self._locate(gpa, length)
        view = self._views[i]
        byte &= 0xFF
        page = mmap.PAGESIZE
        start = off + (-off) % page
        end = (off + length) // page * page
        if byte == 0 and end - start >= 4 * page and hasattr(mmap, "MADV_DONTNEED"):
            # Whole pages of anonymous private memory read back as zero after
            # MADV_DONTNEED: no copying, and untouched pages stay unallocated.
            view[off:start] = bytes(start - off)
            self.regions[i].mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
            view[end : off + length] = bytes(off + length - end)
            return
        view[off : off + length] = bytes([byte]) * length

    def view(self, gpa: int, length: int) -> memoryview:
        """A checked zero-copy view; for loaders and bulk I/O, never kept past a request."""
        i, off = self._locate(gpa, length)
        return self._views[i][off : off + length]

    def read_u8(self, gpa: int) -> int:
        i, off = self._locate(gpa, 1)
        return self._views[i][off]

    def read_u16(self, gpa: int) -> int:
        i, off = self._locate(gpa, 2)
        return _U16.unpack_from(self._views[i], off)[0]

    def read_u32(self, gpa: int) -> int:
        i, off = self._locate(gpa, 4)
        return _U32.unpack_from(self._views[i], off)[0]

    def read_u64(self, gpa: int) -> int:
        i, off = self._locate(gpa, 8)
        return _U64.unpack_from(self._views[i], off)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 1)
        self._views[i][off] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 2)
        _U16.pack_into(self._views[i], off, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 4)
        _U32.pack_into(self._views[i], off, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 8)
        _U64.pack_into(self._views[i], off, value & 0xFFFFFFFFFFFFFFFF)

    def ranges(self) -> Iterable[tuple[int, int]]:
        """(gpa, size) of each region, for e820 maps and memory slots."""
        return [(r.gpa, r.size) for r in self.regions]


def x86_ram_layout(mem_bytes: int, mmio_gap_start: int, mmio_gap_end: int) -> list[tuple[int, int]]:
    """Split ``mem_bytes`` of RAM around the 32-bit MMIO hole, the way PCs do."""
    if mem_bytes <= 0:
        raise ValueError("memory size must be positive")
    if mem_bytes <= mmio_gap_start:
        return [(0, mem_bytes)]
    return [(0, mmio_gap_start), (mmio_gap_end, mem_bytes - mmio_gap_start)]
