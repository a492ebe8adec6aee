"""Port-I/O and MMIO address maps.

A ``Bus`` maps address ranges to devices.  A device is any object with

    read(offset: int, size: int) -> int
    write(offset: int, size: int, value: int) -> None

where ``offset`` is relative to the range's base and ``size`` is the access
width in bytes (1, 2, 4 or 8).  Values are little-endian integers already
masked to the access width; the bus does the byte conversions KVM needs.

Devices own their locking (they are called from every vCPU thread and from
host threads).  Accesses that hit no device are counted and read as all ones,
as on a PC with nothing decoding the address.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Protocol

from .errors import DeviceError


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass
class BusRange:
    base: int
    size: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass
class BusStats:
    unhandled_reads: int = 0
    unhandled_writes: int = 0
    #: The last few unhandled addresses, for error messages and summaries.
    last_unhandled: list[int] = field(default_factory=list)


class Bus:
    """An address space (``"pio"`` or ``"mmio"``) of non-overlapping device ranges."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self.stats = BusStats()

    def register(self, base: int, size: int, device: BusDevice, name: str | None = None) -> BusRange:
        if size <= 0:
            raise DeviceError(f"{self.name} bus: device {name or device!r} has size {size}")
        new = BusRange(base, size, device, name or type(device).__name__)
        for r in self._ranges:
            if base < r.end and r.base < new.end:
                raise DeviceError(
                    f"{self.name} bus: {new.name} at {base:#x}+{size:#x} overlaps "
                    f"{r.name} at {r.base:#x}+{r.size:#x}"
                )
        self._ranges.append(new)
        self._ranges.sort(key=lambda r: r.base)
        self._bases = [r.base for r in self._ranges]
        return new

    def unregister(self, device: BusDevice) -> None:
        self._ranges = [r for r in self._ranges if r.device is not device]
        self._bases = [r.base for r in self._ranges]

    def find(self, addr: int) -> BusRange | None:
        i = bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.base + r.size:
                return r
        return None

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)

    def _note_unhandled(self, addr: int) -> None:
        last = self.stats.last_unhandled
        last.append(addr)
        if len(last) > 8:
            del last[0]

    def read(self, addr: int, size: int) -> int:
        r = self.find(addr)
        if r is None:
            self.stats.unhandled_reads += 1
            self._note_unhandled(addr)
            return (1 << (8 * size)) - 1
        return r.device.read(addr - r.base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        r = self.find(addr)
        if r is None:
            self.stats.unhandled_writes += 1
            self._note_unhandled(addr)
            return
        r.device.write(addr - r.base, size, value & ((1 << (8 * size)) - 1))

    # KVM hands us raw little-endian bytes.
    def read_bytes(self, addr: int, size: int) -> bytes:
        return self.read(addr, size).to_bytes(size, "little")

    def write_bytes(self, addr: int, data: bytes) -> None:
        self.write(addr, len(data), int.from_bytes(data, "little"))
