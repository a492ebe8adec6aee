"""The Linux zero page: ``struct boot_params`` (arch/x86/include/uapi/asm/bootparam.h).

Documentation/arch/x86/zero-page.rst lists the offsets.  The setup header at
0x1f1 is copied from the bzImage (or synthesized for a vmlinux ELF, which has
none) and then the loader's fields are filled in: type_of_loader, the command
line pointer, the initrd, the e820 map and the ACPI RSDP address.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import setup_header as sh
from .e820 import E820Entry

ZERO_PAGE_SIZE = 4096

# ---- struct boot_params offsets (zero-page.rst) ----------------------------
OFF_ACPI_RSDP_ADDR = 0x070
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_SETUP_HEADER = 0x1F1
OFF_E820_TABLE = 0x2D0
#: E820_MAX_ENTRIES_ZEROPAGE
E820_MAX_ENTRIES_ZEROPAGE = 128

#: The version a synthesized header claims: we fill every field a 2.15 loader does.
SYNTHETIC_VERSION = 0x020F


def synthetic_setup_header(cmdline_size: int, initrd_addr_max: int) -> bytes:
    """A setup header for kernels entered without one (vmlinux ELF), as Firecracker builds it."""
    hdr = bytearray(sh.HEADER_END_2_15 - sh.OFF_SETUP_SECTS)

    def put(fmt: str, off: int, value: int) -> None:
        struct.pack_into(fmt, hdr, off - sh.OFF_SETUP_SECTS, value)

    put("<H", sh.OFF_BOOT_FLAG, sh.BOOT_FLAG_MAGIC)
    hdr[sh.OFF_HEADER - sh.OFF_SETUP_SECTS : sh.OFF_HEADER - sh.OFF_SETUP_SECTS + 4] = sh.HEADER_MAGIC
    put("<H", sh.OFF_VERSION, SYNTHETIC_VERSION)
    put("<H", sh.OFF_VID_MODE, 0xFFFF)  # NORMAL_VGA
    put("<B", sh.OFF_LOADFLAGS, sh.LOADED_HIGH)
    put("<I", sh.OFF_INITRD_ADDR_MAX, initrd_addr_max)
    put("<I", sh.OFF_CMDLINE_SIZE, cmdline_size)
    put("<H", sh.OFF_XLOADFLAGS, sh.XLF_KERNEL_64)
    return bytes(hdr)


def build_zero_page(
    header: bytes,
    *,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    e820: Sequence[E820Entry],
    rsdp_addr: int,
    code32_start: int | None = None,
) -> bytes:
    """Return the 4 KiB zero page.  ``header`` is the setup header from 0x1f1."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 entries do not fit the zero page ({E820_MAX_ENTRIES_ZEROPAGE})")
    page = bytearray(ZERO_PAGE_SIZE)
    page[OFF_SETUP_HEADER : OFF_SETUP_HEADER + len(header)] = header

    def put(fmt: str, off: int, value: int) -> None:
        struct.pack_into(fmt, page, off, value)

    put("<B", sh.OFF_TYPE_OF_LOADER, sh.TYPE_OF_LOADER_UNDEFINED)
    if code32_start is not None:
        put("<I", sh.OFF_CODE32_START, code32_start)
    put("<I", sh.OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    put("<I", OFF_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    put("<I", sh.OFF_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    put("<I", OFF_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    put("<I", sh.OFF_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    put("<I", OFF_EXT_RAMDISK_SIZE, initrd_size >> 32)
    put("<Q", OFF_ACPI_RSDP_ADDR, rsdp_addr)
    put("<B", OFF_E820_ENTRIES, len(e820))
    for i, entry in enumerate(e820):
        off = OFF_E820_TABLE + i * 20
        page[off : off + 20] = entry.pack()
    return bytes(page)
