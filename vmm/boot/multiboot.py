"""Multiboot (version 1) loader: ELF images and the a.out kludge.

A Multiboot kernel carries a header in its first 8192 bytes (magic,
flags, checksum and, with flags bit 16, the physical load addresses).
The boot loader places the image, writes a Multiboot information
structure (memory sizes and map, command line, modules, boot-loader name)
and jumps to the entry point in 32-bit protected mode, paging off, with
EAX = 0x2BADB002 and EBX = the information structure's address.

Reference: the Multiboot Specification version 0.6.96, §3.1 "OS image
format" (header layout, magic fields, address fields), §3.2 "Machine
state" and §3.3 "Boot information format".  Where the specification is
silent this loader does what GRUB does: ``mmap_addr`` points at the first
entry's ``size`` field, and an ELF entry point given as a virtual address
is converted to the physical address of the segment that holds it.

The memory map is the machine's e820 map (``vmm.boot.e820``).  Not
provided: video mode information (flags bit 2 is refused: this
machine has no display, and the specification says to fail rather than
ignore a required feature), the ELF section-header table (info bit 5),
the BIOS boot device, drives and APM tables.  The command line is passed
as given, without the kernel's file name in front.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .. import layout
from ..cpustate import CpuState
from ..errors import ConfigError, ImageError
from .e820 import build_memory_map
from .elf import EM_386, EM_X86_64, ET_EXEC, PT_LOAD, ElfImage
from .platform import prepare_platform
from .types import BootRequest, BootSetup

# ---- §3.1.1 header layout -------------------------------------------------------
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_HEADER_ALIGN = 4
#: Flags bits 0-15 are requirements; bits 16-31 optional features (§3.1.2).
MULTIBOOT_PAGE_ALIGN = 1 << 0
MULTIBOOT_MEMORY_INFO = 1 << 1
MULTIBOOT_VIDEO_MODE = 1 << 2
MULTIBOOT_AOUT_KLUDGE = 1 << 16
MULTIBOOT_REQUIRED_MASK = 0xFFFF
MULTIBOOT_SUPPORTED_REQUIRED = MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO
HEADER = struct.Struct("<III")  # magic, flags, checksum
ADDRESS_FIELDS = struct.Struct("<5I")  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr

# ---- §3.2 machine state ---------------------------------------------------------
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002

# ---- §3.3 boot information format -----------------------------------------------
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_MEM_MAP = 1 << 6
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9
MULTIBOOT_INFO_SIZE = 120  # through the framebuffer fields
INFO_MEM_LOWER, INFO_MEM_UPPER, INFO_CMDLINE = 4, 8, 16
INFO_MODS_COUNT, INFO_MODS_ADDR = 20, 24
INFO_MMAP_LENGTH, INFO_MMAP_ADDR = 44, 48
INFO_BOOT_LOADER_NAME = 64
MMAP_ENTRY = struct.Struct("<IQQI")  # size (of the rest: 20), base_addr, length, type
MODULE_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
MULTIBOOT_MEMORY_AVAILABLE = 1
MULTIBOOT_MEMORY_RESERVED = 2
BOOT_LOADER_NAME = b"pytest-microvm"

# ---- where this loader puts its structures (low memory; PVH uses the same page) ----
MULTIBOOT_INFO_ADDR = layout.PVH_INFO_ADDR
MULTIBOOT_MMAP_ADDR = MULTIBOOT_INFO_ADDR + 0x100
MULTIBOOT_MMAP_MAX = 16
MULTIBOOT_MODS_ADDR = MULTIBOOT_INFO_ADDR + 0x400
MULTIBOOT_NAME_ADDR = MULTIBOOT_INFO_ADDR + 0x500
MULTIBOOT_MODSTRING_ADDR = MULTIBOOT_INFO_ADDR + 0x600
MULTIBOOT_MODSTRING_MAX = 0x400
MULTIBOOT_AREA_END = MULTIBOOT_INFO_ADDR + 0x1000
PAGE_SIZE = 0x1000
U32_LIMIT = 1 << 32


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    #: (header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr) when flags bit 16.
    addresses: tuple[int, int, int, int, int] | None


@dataclass(frozen=True)
class Placement:
    """What goes where: (guest address, bytes) pieces, zeroed ranges and the entry."""

    pieces: list[tuple[int, bytes]]
    zero: list[tuple[int, int]]
    entry: int
    start: int
    end: int


def find_header(data: bytes, path: object = "<memory>") -> MultibootHeader:
    """The first valid header in the first 8192 bytes; ImageError saying why there is none."""
    bad_checksum = None
    limit = min(len(data), MULTIBOOT_SEARCH) - HEADER.size
    for off in range(0, limit + 1, MULTIBOOT_HEADER_ALIGN):
        magic, flags, checksum = HEADER.unpack_from(data, off)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            bad_checksum = bad_checksum or (off, flags, checksum)
            continue
        addresses = None
        if flags & MULTIBOOT_AOUT_KLUDGE:
            if off + HEADER.size + ADDRESS_FIELDS.size > len(data):
                raise ImageError(
                    path,
                    f"Multiboot header at offset {off:#x} sets flags bit 16 but the file ends inside its address fields",
                )
            addresses = ADDRESS_FIELDS.unpack_from(data, off + HEADER.size)
        return MultibootHeader(off, flags, addresses)
    if bad_checksum:
        off, flags, checksum = bad_checksum
        want = (-(MULTIBOOT_HEADER_MAGIC + flags)) & 0xFFFFFFFF
        raise ImageError(
            path,
            f"Multiboot header at offset {off:#x} has checksum {checksum:#x}, expected {want:#x} (magic + flags + checksum must be 0)",
        )
    later = _find_magic(data, MULTIBOOT_SEARCH)
    where = (
        f"; a magic value appears at offset {later:#x}, past the {MULTIBOOT_SEARCH}-byte limit"
        if later is not None
        else ""
    )
    raise ImageError(
        path, f"no Multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x}) in the first {MULTIBOOT_SEARCH} bytes{where}"
    )


def _find_magic(data: bytes, start: int) -> int | None:
    needle = struct.pack("<I", MULTIBOOT_HEADER_MAGIC)
    pos = data.find(needle, start)
    while pos >= 0 and pos % MULTIBOOT_HEADER_ALIGN:
        pos = data.find(needle, pos + 1)
    return pos if pos >= 0 else None


def probe(data: bytes) -> bool:
    """True when the first 8192 bytes hold a Multiboot header with a valid checksum."""
    try:
        find_header(data)
        return True
    except ImageError:
        return False


def _check_flags(header: MultibootHeader, path: object) -> None:
    required = header.flags & MULTIBOOT_REQUIRED_MASK
    if required & MULTIBOOT_VIDEO_MODE:
        raise ImageError(
            path, "Multiboot header requires video mode information (flags bit 2); this machine has no display"
        )
    unknown = required & ~(MULTIBOOT_SUPPORTED_REQUIRED | MULTIBOOT_VIDEO_MODE)
    if unknown:
        bits = ", ".join(str(b) for b in range(16) if unknown >> b & 1)
        raise ImageError(path, f"Multiboot header requires features this loader does not know (flags bits {bits})")


def place_aout(header: MultibootHeader, data: bytes, path: object) -> Placement:
    """§3.1.3: use the header's address fields ("a.out kludge")."""
    assert header.addresses is not None
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = header.addresses
    if load_addr > header_addr:
        raise ImageError(path, f"Multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    load_offset = header.offset - (header_addr - load_addr)
    if load_offset < 0:
        raise ImageError(
            path,
            f"Multiboot header_addr {header_addr:#x} - load_addr {load_addr:#x} puts the load start before the file's beginning",
        )
    if load_end_addr == 0:
        load_end = load_addr + (len(data) - load_offset)
    elif load_end_addr <= load_addr:
        raise ImageError(path, f"Multiboot load_end_addr {load_end_addr:#x} is not above load_addr {load_addr:#x}")
    else:
        load_end = load_end_addr
    size = load_end - load_addr
    if load_offset + size > len(data):
        raise ImageError(
            path,
            f"Multiboot load_end_addr {load_end:#x} asks for {size:#x} bytes from file offset {load_offset:#x}, past the end of the file ({len(data):#x} bytes): truncated image?",
        )
    if bss_end_addr and bss_end_addr < load_end:
        raise ImageError(path, f"Multiboot bss_end_addr {bss_end_addr:#x} is below load_end_addr {load_end:#x}")
    end = max(load_end, bss_end_addr)
    if not load_addr <= entry_addr < end:
        raise ImageError(
            path, f"Multiboot entry_addr {entry_addr:#x} is outside the loaded image [{load_addr:#x}, {end:#x})"
        )
    zero = [(load_end, bss_end_addr - load_end)] if bss_end_addr > load_end else []
    return Placement([(load_addr, data[load_offset : load_offset + size])], zero, entry_addr, load_addr, end)


def place_elf(data: bytes, path: object) -> Placement:
    """ELF images: PT_LOAD segments at their physical addresses (p_paddr)."""
    elf = ElfImage(data, str(path))
    if elf.type != ET_EXEC:
        raise elf.error(f"ELF type {elf.type} is not ET_EXEC; Multiboot loads executables at fixed addresses")
    if elf.machine not in (EM_386, EM_X86_64):
        raise elf.error(f"ELF machine {elf.machine} is neither i386 nor x86-64")
    segs = [ph for ph in elf.program_headers if ph.type == PT_LOAD and ph.memsz > 0]
    if not segs:
        raise elf.error("no PT_LOAD segment")
    pieces, zero = [], []
    for ph in segs:
        if ph.paddr + ph.memsz > U32_LIMIT:
            raise elf.error(f"segment at physical {ph.paddr:#x}+{ph.memsz:#x} is above 4 GiB")
        pieces.append((ph.paddr, elf.segment_bytes(ph)))
        if ph.memsz > ph.filesz:
            zero.append((ph.paddr + ph.filesz, ph.memsz - ph.filesz))
    spans = sorted((ph.paddr, ph.paddr + ph.memsz) for ph in segs)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise elf.error(f"segments at physical [{a0:#x}, {a1:#x}) and [{b0:#x}, {b1:#x}) overlap")
    entry = elf.entry
    for ph in segs:  # as GRUB does: a virtual entry point becomes physical
        if ph.vaddr <= entry < ph.vaddr + ph.memsz:
            entry = entry - ph.vaddr + ph.paddr
            break
    else:
        raise elf.error(f"entry point {elf.entry:#x} is not inside any loaded segment")
    return Placement(pieces, zero, entry, spans[0][0], spans[-1][1])


# ---- the memory map ---------------------------------------------------------------


def memory_map(ram: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(base, length, type) entries: the machine's e820 map, shared by every protocol.

    Multiboot's memory types are e820's (1 available, 3 ACPI reclaimable,
    4 preserve on hibernation, 5 defective, anything else reserved).
    """
    return [(e.addr, e.size, e.type) for e in build_memory_map(ram)]


def _available(mmap: list[tuple[int, int, int]], start: int, end: int) -> bool:
    return any(t == MULTIBOOT_MEMORY_AVAILABLE and b <= start and end <= b + n for b, n, t in mmap)


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


# ---- loading -----------------------------------------------------------------------------


def load(request: BootRequest, data: bytes) -> BootSetup:
    path = request.kernel
    memory = request.memory
    header = find_header(data, path)
    _check_flags(header, path)
    if header.addresses is not None:
        placement = place_aout(header, data, path)
        fmt = "a.out kludge"
    else:
        placement = place_elf(data, path)
        fmt = "ELF"

    mmap = memory_map(list(memory.ranges()))
    if len(mmap) > MULTIBOOT_MMAP_MAX:
        raise ConfigError(f"memory: {len(mmap)} memory-map entries, more than {MULTIBOOT_MMAP_MAX}")
    cmdline = request.cmdline.encode()
    if b"\0" in cmdline or len(cmdline) + 1 > layout.CMDLINE_MAX:
        raise ConfigError(f"cmdline: must be at most {layout.CMDLINE_MAX - 1} bytes without NUL for Multiboot")
    boot_areas = [
        ("boot GDT/IDT", layout.BOOT_GDT_ADDR, layout.BOOT_IDT_ADDR + 8),
        ("Multiboot information", MULTIBOOT_INFO_ADDR, MULTIBOOT_AREA_END),
        ("command line", layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + len(cmdline) + 1),
    ]
    for start, blob in placement.pieces:
        _check_range(path, mmap, boot_areas, start, start + len(blob), "segment")
    for start, length in placement.zero:
        _check_range(path, mmap, boot_areas, start, start + length, "bss")

    modules: list[tuple[int, int, bytes]] = []
    if request.initrd is not None:
        try:
            initrd = Path(request.initrd).read_bytes()
        except OSError as exc:
            raise ImageError(request.initrd, f"cannot read initrd: {exc.strerror}") from None
        start = _place_module(request.initrd, mmap, len(initrd), placement.end, boot_areas)
        name = Path(request.initrd).name.encode()[: MULTIBOOT_MODSTRING_MAX - 1]
        modules.append((start, start + len(initrd), name))
        memory.write(start, initrd)

    # Everything checked: write.
    for start, blob in placement.pieces:
        memory.write(start, blob)
    for start, length in placement.zero:
        memory.fill(start, length)
    # GDTs, and ACPI tables found by the BIOS-area scan (multiboot itself has no RSDP field).
    platform = prepare_platform(request)
    memory.write(layout.CMDLINE_ADDR, cmdline + b"\0")
    memory.write(MULTIBOOT_NAME_ADDR, BOOT_LOADER_NAME + b"\0")
    info = _info_structure(mmap, modules, memory)
    memory.fill(MULTIBOOT_INFO_ADDR, MULTIBOOT_MMAP_ADDR - MULTIBOOT_INFO_ADDR)
    memory.write(MULTIBOOT_INFO_ADDR, info)

    state = CpuState.flat_protected32(placement.entry, rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=MULTIBOOT_INFO_ADDR)
    return BootSetup(
        protocol="multiboot",
        entry=state,
        cmdline=request.cmdline,
        details={
            "format": fmt,
            "header_offset": header.offset,
            "header_flags": header.flags,
            "load_start": placement.start,
            "load_end": placement.end,
            "entry": placement.entry,
            "info_addr": MULTIBOOT_INFO_ADDR,
            "mmap": mmap,
            "modules": [(s, e) for s, e, _ in modules],
            "rsdp_addr": platform.rsdp_addr,
        },
    )


def _check_range(path, mmap, boot_areas, start: int, end: int, what: str) -> None:
    if end > U32_LIMIT:
        raise ImageError(path, f"Multiboot {what} [{start:#x}, {end:#x}) is above 4 GiB")
    if not _available(mmap, start, end):
        raise ImageError(path, f"Multiboot {what} [{start:#x}, {end:#x}) is not inside available guest RAM")
    for name, a0, a1 in boot_areas:
        if _overlaps(start, end, a0, a1):
            raise ImageError(path, f"Multiboot {what} [{start:#x}, {end:#x}) overlaps the {name} at [{a0:#x}, {a1:#x})")


def _place_module(path, mmap, size: int, kernel_end: int, boot_areas) -> int:
    """The highest page-aligned spot below 4 GiB in available RAM above the kernel."""
    for base, length, kind in sorted(mmap, key=lambda e: e[0], reverse=True):
        if kind != MULTIBOOT_MEMORY_AVAILABLE:
            continue
        top = min(base + length, U32_LIMIT)
        start = (top - size) & ~(PAGE_SIZE - 1)
        if start >= max(base, kernel_end) and not any(
            _overlaps(start, start + size, a0, a1) for _, a0, a1 in boot_areas
        ):
            return start
    raise ImageError(
        path,
        f"initrd ({size:#x} bytes) does not fit in guest RAM below 4 GiB above the kernel (ends at {kernel_end:#x})",
    )


def _info_structure(mmap, modules, memory) -> bytes:
    """Write the memory map, module list and strings; return the information structure."""
    entries = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, b, n, t) for b, n, t in mmap)
    memory.write(MULTIBOOT_MMAP_ADDR, entries)
    mods = b""
    for start, end, name in modules:
        string = MULTIBOOT_MODSTRING_ADDR
        memory.write(string, name + b"\0")
        mods += MODULE_ENTRY.pack(start, end, string, 0)
    memory.write(MULTIBOOT_MODS_ADDR, mods)
    mem_lower = min(layout.EBDA_START, _contiguous_end(mmap, 0)) // 1024
    mem_upper = max(_contiguous_end(mmap, layout.HIGH_MEMORY_START) - layout.HIGH_MEMORY_START, 0) // 1024
    flags = MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_CMDLINE | MULTIBOOT_INFO_MEM_MAP | MULTIBOOT_INFO_BOOT_LOADER_NAME
    if modules:
        flags |= MULTIBOOT_INFO_MODS
    info = bytearray(MULTIBOOT_INFO_SIZE)
    struct.pack_into("<I", info, 0, flags)
    struct.pack_into("<II", info, INFO_MEM_LOWER, mem_lower, min(mem_upper, 0xFFFFFFFF))
    struct.pack_into("<I", info, INFO_CMDLINE, layout.CMDLINE_ADDR)
    struct.pack_into("<II", info, INFO_MODS_COUNT, len(modules), MULTIBOOT_MODS_ADDR if modules else 0)
    struct.pack_into("<II", info, INFO_MMAP_LENGTH, len(entries), MULTIBOOT_MMAP_ADDR)
    struct.pack_into("<I", info, INFO_BOOT_LOADER_NAME, MULTIBOOT_NAME_ADDR)
    return bytes(info)


def _contiguous_end(mmap, start: int) -> int:
    """End of the available RAM that runs without a hole from ``start`` (``start`` if none)."""
    end = start
    for base, length, kind in sorted(mmap):
        if kind == MULTIBOOT_MEMORY_AVAILABLE and base <= end < base + length:
            end = base + length
    return end
