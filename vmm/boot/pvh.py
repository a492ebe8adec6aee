"""The PVH boot ABI: an ELF kernel entered in 32-bit protected mode with EBX
pointing at ``struct hvm_start_info``.

References: Xen's docs/misc/pvh.pandoc (entry state), xen/include/public/
elfnote.h (XEN_ELFNOTE_PHYS32_ENTRY = 18, owner "Xen") and
xen/include/public/arch-x86/hvm/start_info.h (the structures below, version 1).
Linux (CONFIG_PVH), FreeBSD and several unikernels carry the note.
"""

from __future__ import annotations

import struct

from .. import layout
from ..cpustate import CpuState
from ..errors import ConfigError
from .cmdline import BUFFER_LIMIT, linux_cmdline, write_cmdline
from .e820 import E820Entry
from .elf import ElfImage
from .initrd import place_initrd, read_image
from .platform import prepare_platform
from .segments import load_segments, physical_entry
from .types import BootRequest, BootSetup

XEN_ELFNOTE_OWNER = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1

#: struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
#: cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
#: struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
#: struct hvm_memmap_table_entry: addr, size, type, reserved.
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")
MAX_MEMMAP_ENTRIES = (layout.PVH_MODLIST_ADDR - layout.PVH_MEMMAP_ADDR) // HVM_MEMMAP_ENTRY.size

#: PVH kernels are entered in 32-bit mode and find the initrd by a 64-bit
#: address, but 32-bit code must be able to reach it: keep it below 4 GiB.
PVH_INITRD_ADDR_MAX = 0xFFFF_FFFF


def pvh_entry(elf: ElfImage) -> int | None:
    """The 32-bit physical entry point from the PHYS32_ENTRY note, or None without one."""
    note = elf.find_note(XEN_ELFNOTE_OWNER, XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) not in (4, 8):
        raise elf.error(f"XEN_ELFNOTE_PHYS32_ENTRY note has a {len(note.desc)}-byte value, expected 4 or 8")
    value = int.from_bytes(note.desc, "little")
    if value >= 1 << 32:
        raise elf.error(f"XEN_ELFNOTE_PHYS32_ENTRY {value:#x} is not a 32-bit address")
    return value


def has_pvh_note(elf: ElfImage) -> bool:
    return elf.find_note(XEN_ELFNOTE_OWNER, XEN_ELFNOTE_PHYS32_ENTRY) is not None


def pack_start_info(
    *, nr_modules: int, modlist_paddr: int, cmdline_paddr: int, rsdp_paddr: int, memmap_paddr: int, memmap_entries: int
) -> bytes:
    return HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC_VALUE,
        HVM_START_INFO_VERSION,
        0,
        nr_modules,
        modlist_paddr,
        cmdline_paddr,
        rsdp_paddr,
        memmap_paddr,
        memmap_entries,
        0,
    )


def pack_memmap(entries: list[E820Entry]) -> bytes:
    if len(entries) > MAX_MEMMAP_ENTRIES:
        raise ConfigError(f"--memory: {len(entries)} memory map entries, the PVH area holds {MAX_MEMMAP_ENTRIES}")
    return b"".join(HVM_MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0) for e in entries)


def load_pvh(
    request: BootRequest,
    elf: ElfImage,
    *,
    cmdline_limit: int = BUFFER_LIMIT,
    cmdline_source: str = "the VMM's command line buffer",
) -> BootSetup:
    """Load an ELF with a PVH note and enter it at its 32-bit entry point."""
    entry_note = pvh_entry(elf)
    if entry_note is None:
        raise elf.error("no XEN_ELFNOTE_PHYS32_ENTRY note: not a PVH kernel")
    entry = physical_entry(elf, entry_note, "XEN_ELFNOTE_PHYS32_ENTRY", physical=True)
    memory = request.memory
    platform = prepare_platform(request)
    loaded = load_segments(memory, elf)

    cmdline = linux_cmdline(request.cmdline, request.mmio_devices, request.virtio_cmdline)
    cmdline_addr = write_cmdline(memory, cmdline, cmdline_limit, cmdline_source)

    nr_modules = 0
    initrd_addr = initrd_size = 0
    if request.initrd is not None:
        initrd = read_image(request.initrd, "initrd")
        initrd_addr = place_initrd(
            memory,
            request.initrd,
            initrd,
            lowest=loaded.end,
            addr_max=PVH_INITRD_ADDR_MAX,
            ram_end=platform.low_ram_end,
        )
        initrd_size = len(initrd)
        memory.write(layout.PVH_MODLIST_ADDR, HVM_MODLIST_ENTRY.pack(initrd_addr, initrd_size, 0, 0))
        nr_modules = 1

    memory.write(layout.PVH_MEMMAP_ADDR, pack_memmap(platform.e820))
    memory.write(
        layout.PVH_INFO_ADDR,
        pack_start_info(
            nr_modules=nr_modules,
            modlist_paddr=layout.PVH_MODLIST_ADDR if nr_modules else 0,
            cmdline_paddr=cmdline_addr,
            rsdp_paddr=platform.rsdp_addr,
            memmap_paddr=layout.PVH_MEMMAP_ADDR,
            memmap_entries=len(platform.e820),
        ),
    )
    state = CpuState.flat_protected32(entry, rbx=layout.PVH_INFO_ADDR)
    return BootSetup(
        protocol="pvh",
        entry=state,
        cmdline=cmdline,
        details={
            "entry": entry,
            "start_info": layout.PVH_INFO_ADDR,
            "load_address": loaded.start,
            "kernel_end": loaded.end,
            "cmdline_addr": cmdline_addr,
            "initrd_addr": initrd_addr,
            "initrd_size": initrd_size,
            "rsdp_addr": platform.rsdp_addr,
            "e820": [(e.addr, e.size, e.type) for e in platform.e820],
        },
    )
