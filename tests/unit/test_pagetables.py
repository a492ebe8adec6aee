"""Identity page tables: walk them the way the MMU does."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.boot.pagetables import (
    PTE_ADDR_MASK,
    PTE_PAGE_SIZE,
    PTE_PRESENT,
    PTE_WRITABLE,
    write_identity_map,
)
from vmm.memory import GuestMemory

GiB, MiB = layout.GiB, layout.MiB


@pytest.fixture(scope="module")
def tables():
    mem = GuestMemory([(0, 2 * MiB)])
    mem.fill(0, 2 * MiB, 0xEE)  # garbage that must not survive in the tables
    cr3 = write_identity_map(mem)
    yield mem, cr3
    mem.close()


class PageFault(Exception):
    pass


def walk(mem, cr3: int, va: int) -> tuple[int, int]:
    """Translate with 4-level paging (SDM §4.5); return (physical address, page size)."""
    pml4e = mem.read_u64((cr3 & PTE_ADDR_MASK) + 8 * ((va >> 39) & 0x1FF))
    if not pml4e & PTE_PRESENT:
        raise PageFault("PML4E")
    assert pml4e & PTE_WRITABLE
    pdpte = mem.read_u64((pml4e & PTE_ADDR_MASK) + 8 * ((va >> 30) & 0x1FF))
    if not pdpte & PTE_PRESENT:
        raise PageFault("PDPTE")
    assert not pdpte & PTE_PAGE_SIZE, "1 GiB pages are not allowed"
    pde = mem.read_u64((pdpte & PTE_ADDR_MASK) + 8 * ((va >> 21) & 0x1FF))
    if not pde & PTE_PRESENT:
        raise PageFault("PDE")
    assert pde & PTE_PAGE_SIZE, "only 2 MiB pages are expected"
    assert pde & PTE_WRITABLE
    base = pde & PTE_ADDR_MASK & ~(2 * MiB - 1)
    return base | (va & (2 * MiB - 1)), 2 * MiB


def test_cr3_is_the_pml4(tables):
    _, cr3 = tables
    assert cr3 == layout.PML4_ADDR


@pytest.mark.parametrize(
    "va",
    [0, 0x7000, layout.CMDLINE_ADDR, MiB, 16 * MiB + 0x200, GiB - 1, GiB, 0xC000_0000, layout.LAPIC_ADDR, 4 * GiB - 1],
)
def test_low_4gib_is_identity_mapped(tables, va):
    mem, cr3 = tables
    assert walk(mem, cr3, va) == (va, 2 * MiB)


def test_every_2mib_page_maps_itself(tables):
    mem, cr3 = tables
    for page in range(0, 4 * GiB, 2 * MiB):
        assert walk(mem, cr3, page + 0x1234)[0] == page + 0x1234


@pytest.mark.parametrize("va", [4 * GiB, 512 * GiB, 0xFFFF_FFFF_8100_0000])
def test_nothing_above_4gib(tables, va):
    mem, cr3 = tables
    with pytest.raises(PageFault):
        walk(mem, cr3, va)


def test_tables_stay_below_the_ebda_and_off_the_boot_structures(tables):
    end = layout.PD_ADDR + layout.PD_COUNT * 4096
    assert end <= layout.EBDA_START
    for addr in (layout.ZERO_PAGE_ADDR, layout.CMDLINE_ADDR, layout.PVH_INFO_ADDR, layout.BOOT_GDT_ADDR):
        assert not layout.PML4_ADDR <= addr < end
