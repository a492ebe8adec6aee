"""The guest's physical memory map, built once for every boot protocol.

The Linux zero page (``boot_params.e820_table``), the PVH ``hvm_memmap_table``
and multiboot's memory map all describe the same thing, so they all come from
``build_memory_map``: RAM below the legacy EBDA, the EBDA/VGA/BIOS area
reserved up to 1 MiB (the ACPI tables live there), then RAM from 1 MiB to the
end of each region.  Whatever lies between regions (the 32-bit MMIO hole) is
simply not listed, so no guest takes it for RAM.

Entry types are the ACPI address range types (ACPI 6.4 §15, Table 15.1), which
e820 and Xen's ``XEN_HVM_MEMMAP_TYPE_*`` share.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .. import layout
from ..errors import ConfigError

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

#: struct boot_e820_entry { __u64 addr; __u64 size; __u32 type; } __packed;
E820_ENTRY = struct.Struct("<QQI")

#: The smallest guest the low-memory layout works for: the boot structures
#: below 1 MiB plus something to load a kernel into.
MIN_MEMORY = 2 * layout.MiB


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return E820_ENTRY.pack(self.addr, self.size, self.type)


def build_memory_map(ranges: Iterable[tuple[int, int]]) -> list[E820Entry]:
    """The e820 map for guest RAM made of ``ranges`` ((gpa, size) pairs, sorted).

    The first region must start at 0 and reach past 1 MiB: the boot structures
    (zero page, page tables, command line, ACPI tables) live below 1 MiB.
    """
    regions = sorted(ranges)
    if not regions or regions[0][0] != 0:
        raise ConfigError("--memory: guest RAM must start at guest-physical address 0")
    low_size = regions[0][1]
    if low_size < MIN_MEMORY:
        raise ConfigError(
            f"--memory: {low_size // layout.KiB} KiB of RAM below the MMIO hole is too little; "
            f"at least {MIN_MEMORY // layout.MiB} MiB is needed for the boot structures and a kernel"
        )
    entries = [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START, E820_RESERVED),
        E820Entry(layout.HIGH_MEMORY_START, low_size - layout.HIGH_MEMORY_START, E820_RAM),
    ]
    for gpa, size in regions[1:]:
        entries.append(E820Entry(gpa, size, E820_RAM))
    return entries


def low_ram_end(ranges: Iterable[tuple[int, int]]) -> int:
    """One past the last byte of the RAM region that starts at 0 (below the MMIO hole)."""
    regions = sorted(ranges)
    return regions[0][0] + regions[0][1]
