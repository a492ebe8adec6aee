"""Small synthetic kernel images for loader tests: bzImages and ELF files built with struct."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmm.boot import setup_header as sh

KERNEL_VERSION = "6.9.0-synthetic (test@example) #1"
#: Where in the setup sectors the version string goes (kernel_version field + 0x200).
KERNEL_VERSION_OFFSET = 0x300


@dataclass
class BzImageSpec:
    """Fields of a synthetic bzImage; tests change one at a time to break it."""

    setup_sects: int = 4
    version: int = 0x020F
    loadflags: int = sh.LOADED_HIGH
    xloadflags: int = sh.XLF_KERNEL_64 | sh.XLF_CAN_BE_LOADED_ABOVE_4G
    boot_flag: int = sh.BOOT_FLAG_MAGIC
    magic: bytes = sh.HEADER_MAGIC
    init_size: int = 0x40_0000
    pref_address: int = 0x100_0000
    kernel_alignment: int = 0x20_0000
    relocatable: int = 1
    cmdline_size: int = 2047
    initrd_addr_max: int = 0x7FFF_FFFF
    #: Bytes of the protected-mode part before the payload ("startup code").
    head: bytes = field(default_factory=lambda: bytes(range(256)) * 4)
    payload: bytes = b"PAYLOAD!" * 8
    #: None: computed from the real size.
    syssize: int | None = None
    payload_offset: int | None = None
    payload_length: int | None = None
    header_length_byte: int = sh.HEADER_END_2_15 - 0x202


def make_bzimage(spec: BzImageSpec | None = None, **changes) -> bytes:
    spec = spec or BzImageSpec(**changes)
    setup = bytearray((max(spec.setup_sects, 0) or sh.DEFAULT_SETUP_SECTS) * 512 + 512)

    def put(fmt: str, off: int, value) -> None:
        struct.pack_into(fmt, setup, off, value)

    pm = spec.head + spec.payload
    pm += bytes(-len(pm) % 16)
    put("<B", sh.OFF_SETUP_SECTS, spec.setup_sects)
    put("<I", sh.OFF_SYSSIZE, spec.syssize if spec.syssize is not None else len(pm) // 16)
    put("<H", sh.OFF_BOOT_FLAG, spec.boot_flag)
    put("<B", sh.OFF_JUMP, 0xEB)
    put("<B", sh.OFF_JUMP + 1, spec.header_length_byte)
    setup[sh.OFF_HEADER : sh.OFF_HEADER + 4] = spec.magic
    put("<H", sh.OFF_VERSION, spec.version)
    put("<H", sh.OFF_KERNEL_VERSION, KERNEL_VERSION_OFFSET - 0x200)
    put("<B", sh.OFF_LOADFLAGS, spec.loadflags)
    put("<I", sh.OFF_CODE32_START, 0x100000)
    put("<I", sh.OFF_INITRD_ADDR_MAX, spec.initrd_addr_max)
    put("<I", sh.OFF_KERNEL_ALIGNMENT, spec.kernel_alignment)
    put("<B", sh.OFF_RELOCATABLE_KERNEL, spec.relocatable)
    put("<B", sh.OFF_MIN_ALIGNMENT, 21)
    put("<H", sh.OFF_XLOADFLAGS, spec.xloadflags)
    put("<I", sh.OFF_CMDLINE_SIZE, spec.cmdline_size)
    put("<I", sh.OFF_PAYLOAD_OFFSET, spec.payload_offset if spec.payload_offset is not None else len(spec.head))
    put("<I", sh.OFF_PAYLOAD_LENGTH, spec.payload_length if spec.payload_length is not None else len(spec.payload))
    put("<Q", sh.OFF_PREF_ADDRESS, spec.pref_address)
    put("<I", sh.OFF_INIT_SIZE, spec.init_size)
    v = KERNEL_VERSION.encode() + b"\0"
    setup[KERNEL_VERSION_OFFSET : KERNEL_VERSION_OFFSET + len(v)] = v
    return bytes(setup) + pm


# ---- ELF ---------------------------------------------------------------------
PT_LOAD = 1
PT_NOTE = 4


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


def note(owner: bytes, ntype: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    return (
        struct.pack("<III", len(name), len(desc), ntype) + name + bytes(-len(name) % 4) + desc + bytes(-len(desc) % 4)
    )


def make_elf(
    segments: list[Segment],
    entry: int,
    notes: bytes = b"",
    *,
    elf64: bool = True,
    machine: int = 62,
) -> bytes:
    """An ET_EXEC ELF with one PT_LOAD per segment and an optional PT_NOTE."""
    if elf64:
        ehdr_size, phent = 64, 56
    else:
        ehdr_size, phent = 52, 32
    nph = len(segments) + (1 if notes else 0)
    off = ehdr_size + phent * nph
    blobs: list[tuple[int, bytes]] = []
    phdrs = []
    if notes:
        blobs.append((off, notes))
        phdrs.append((PT_NOTE, 4, off, 0, 0, len(notes), len(notes), 4))
        off += len(notes)
    for seg in segments:
        off += -off % 16
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        blobs.append((off, seg.data))
        phdrs.append((PT_LOAD, 7, off, vaddr, seg.paddr, len(seg.data), memsz, 16))
        off += len(seg.data)
    out = bytearray(off)
    ident = b"\x7fELF" + bytes([2 if elf64 else 1, 1, 1]) + bytes(9)
    if elf64:
        hdr = struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, ehdr_size, 0, 0, ehdr_size, phent, nph, 64, 0, 0)
    else:
        hdr = struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, ehdr_size, 0, 0, ehdr_size, phent, nph, 40, 0, 0)
    out[0:16] = ident
    out[16 : 16 + len(hdr)] = hdr
    for i, (ptype, flags, offset, vaddr, paddr, filesz, memsz, align) in enumerate(phdrs):
        base = ehdr_size + i * phent
        if elf64:
            struct.pack_into("<IIQQQQQQ", out, base, ptype, flags, offset, vaddr, paddr, filesz, memsz, align)
        else:
            struct.pack_into("<IIIIIIII", out, base, ptype, offset, vaddr, paddr, filesz, memsz, flags, align)
    for offset, blob in blobs:
        out[offset : offset + len(blob)] = blob
    return bytes(out)


XEN_PVH_NOTE_TYPE = 18


def make_pvh_elf(entry: int = 0x100_0040, *, desc_size: int = 4, load_at: int = 0x100_0000, **kw) -> bytes:
    """A 64-bit ELF (like vmlinux) with a PHYS32_ENTRY note, virtual addresses in the kernel map."""
    desc = entry.to_bytes(desc_size, "little")
    code = bytes([0x90]) * 0x100
    seg = Segment(load_at, code, memsz=0x2000, vaddr=0xFFFF_FFFF_8000_0000 + load_at)
    return make_elf([seg], 0xFFFF_FFFF_8000_0000 + load_at, note(b"Xen", XEN_PVH_NOTE_TYPE, desc), **kw)
