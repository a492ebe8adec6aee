"""Identity page tables for guests entered in 64-bit long mode.

Documentation/arch/x86/boot.rst (64-bit boot protocol) asks for an identity
mapping of the loaded kernel's ``init_size`` range, the zero page and the
command line.  We map the whole low 4 GiB, which covers all of those wherever
they sit below the MMIO hole, plus the hole itself (LAPIC, IOAPIC, virtio).

Only 2 MiB pages are used (PDE.PS), never 1 GiB pages (PDPTE.PS): some nested
KVM hosts triple-fault on the first access through a 1 GiB page, and 2 MiB
pages are what Firecracker and cloud-hypervisor build too.

Intel SDM Vol. 3A §4.5 (4-level paging), Tables 4-14 (PML4E), 4-16 (PDPTE
referencing a page directory) and 4-17 (PDE mapping a 2 MiB page).
"""

from __future__ import annotations

from .. import layout
from ..memory import GuestMemory

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PDE: maps a 2 MiB page

PAGE_SIZE_2M = 2 * layout.MiB
ENTRIES_PER_TABLE = 512
TABLE_SIZE = 4096
#: Bits 51:12 of a paging-structure entry hold the next table's address.
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000

#: What the identity map covers: PD_COUNT page directories of 1 GiB each.
IDENTITY_MAP_END = layout.PD_COUNT * layout.GiB


def write_identity_map(memory: GuestMemory) -> int:
    """Write PML4, PDPT and PD_COUNT page directories; return the CR3 value."""
    table_flags = PTE_PRESENT | PTE_WRITABLE
    memory.fill(layout.PML4_ADDR, TABLE_SIZE)
    memory.fill(layout.PDPT_ADDR, TABLE_SIZE)
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | table_flags)
    pds = bytearray(TABLE_SIZE * layout.PD_COUNT)
    for i in range(layout.PD_COUNT * ENTRIES_PER_TABLE):
        entry = (i * PAGE_SIZE_2M) | table_flags | PTE_PAGE_SIZE
        pds[8 * i : 8 * i + 8] = entry.to_bytes(8, "little")
    for d in range(layout.PD_COUNT):
        memory.write_u64(layout.PDPT_ADDR + 8 * d, (layout.PD_ADDR + d * TABLE_SIZE) | table_flags)
    memory.write(layout.PD_ADDR, bytes(pds))
    return layout.PML4_ADDR
