"""The e820 map every protocol hands to the guest."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.boot.e820 import E820_RAM, E820_RESERVED, E820Entry, build_memory_map, low_ram_end
from vmm.errors import ConfigError
from vmm.memory import x86_ram_layout

MiB, GiB = layout.MiB, layout.GiB


def ram(entries):
    return [(e.addr, e.end) for e in entries if e.type == E820_RAM]


def test_small_guest():
    m = build_memory_map(x86_ram_layout(128 * MiB, layout.MMIO_GAP_START, layout.MMIO_GAP_END))
    assert m == [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, MiB - layout.EBDA_START, E820_RESERVED),
        E820Entry(MiB, 127 * MiB, E820_RAM),
    ]


def test_big_guest_skips_the_mmio_hole():
    layout_ = x86_ram_layout(4 * GiB, layout.MMIO_GAP_START, layout.MMIO_GAP_END)
    m = build_memory_map(layout_)
    assert ram(m) == [(0, layout.EBDA_START), (MiB, layout.MMIO_GAP_START), (4 * GiB, 5 * GiB)]
    # Nothing in the map claims any byte of the hole.
    for e in m:
        assert e.end <= layout.MMIO_GAP_START or e.addr >= layout.MMIO_GAP_END
    total_ram = sum(e.size for e in m if e.type == E820_RAM)
    assert total_ram == 4 * GiB - (MiB - layout.EBDA_START)
    assert low_ram_end(layout_) == layout.MMIO_GAP_START


def test_entries_are_sorted_and_disjoint():
    m = build_memory_map(x86_ram_layout(5 * GiB, layout.MMIO_GAP_START, layout.MMIO_GAP_END))
    for a, b in zip(m, m[1:]):
        assert a.end <= b.addr


def test_bios_area_and_acpi_tables_are_reserved():
    m = build_memory_map([(0, 64 * MiB)])
    reserved = [e for e in m if e.type == E820_RESERVED]
    assert any(e.addr <= layout.ACPI_TABLES_ADDR and layout.BIOS_AREA_END <= e.end for e in reserved)


def test_packing_matches_struct_boot_e820_entry():
    assert E820Entry(0x1000, 0x2000, E820_RAM).pack() == (
        (0x1000).to_bytes(8, "little") + (0x2000).to_bytes(8, "little") + (1).to_bytes(4, "little")
    )


def test_too_little_memory():
    with pytest.raises(ConfigError, match="--memory"):
        build_memory_map([(0, MiB)])


def test_ram_must_start_at_zero():
    with pytest.raises(ConfigError, match="address 0"):
        build_memory_map([(MiB, 64 * MiB)])
