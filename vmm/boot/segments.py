"""Placing an ELF kernel's PT_LOAD segments at their physical addresses.

Shared by the vmlinux 64-bit loader and the PVH loader.  Segments must lie in
guest RAM at or above 1 MiB (below it live the zero page, page tables,
command line and ACPI tables), and the entry point must be inside one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import layout
from ..memory import GuestMemory
from .elf import ElfImage


@dataclass(frozen=True)
class LoadedImage:
    #: Lowest and one-past-highest guest-physical byte the segments occupy.
    start: int
    end: int


def load_segments(memory: GuestMemory, elf: ElfImage) -> LoadedImage:
    segments = elf.load_segments()
    if not segments:
        raise elf.error("no PT_LOAD segments to load")
    ram = ", ".join(f"{a:#x}-{a + n:#x}" for a, n in memory.ranges())
    for i, ph in enumerate(segments):
        if ph.paddr < layout.HIGH_MEMORY_START:
            raise elf.error(
                f"PT_LOAD segment {i} at physical address {ph.paddr:#x} is below 1 MiB, where the boot structures live"
            )
        if not memory.contains(ph.paddr, ph.memsz):
            raise elf.error(
                f"PT_LOAD segment {i} at physical address {ph.paddr:#x}+{ph.memsz:#x} lies outside "
                f"guest RAM ({ram}; {memory.size // layout.MiB} MiB)"
            )
    for ph in segments:
        memory.write(ph.paddr, memoryview(elf.data)[ph.offset : ph.offset + ph.filesz])
        if ph.memsz > ph.filesz:
            memory.fill(ph.paddr + ph.filesz, ph.memsz - ph.filesz)
    return LoadedImage(
        start=min(ph.paddr for ph in segments),
        end=max(ph.paddr + ph.memsz for ph in segments),
    )


def physical_entry(elf: ElfImage, address: int, what: str = "entry point e_entry", *, physical: bool = False) -> int:
    """The physical address of ``address``, given as virtual (translated) or physical.

    vmlinux's e_entry is already physical (``ENTRY(phys_startup_64)``), other
    kernels' is virtual; the PVH note is physical by definition (``physical``).
    """
    segments = elf.load_segments()
    for ph in [] if physical else segments:
        if ph.vaddr <= address < ph.vaddr + ph.memsz:
            return ph.paddr + (address - ph.vaddr)
    for ph in segments:
        if ph.paddr <= address < ph.paddr + ph.memsz:
            return address
    raise elf.error(f"{what} {address:#x} is not inside any PT_LOAD segment")
