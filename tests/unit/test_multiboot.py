"""Multiboot v1 loading of images synthesized here (ELF and the a.out kludge)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmm import layout
from vmm.boot import multiboot as mb
from vmm.boot.types import BootRequest
from vmm.cpustate import Segment
from vmm.errors import ImageError
from vmm.memory import GuestMemory

MiB = 1 << 20
CODE = bytes.fromhex("fa f4 eb fd") + bytes(range(60))  # cli; hlt; jmp $-1; filler


def header(flags: int = mb.MULTIBOOT_PAGE_ALIGN | mb.MULTIBOOT_MEMORY_INFO, addresses=None, checksum=None) -> bytes:
    if addresses is not None:
        flags |= mb.MULTIBOOT_AOUT_KLUDGE
    if checksum is None:
        checksum = -(mb.MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFFFFFF
    out = struct.pack("<III", mb.MULTIBOOT_HEADER_MAGIC, flags, checksum)
    if addresses is not None:
        out += struct.pack("<5I", *addresses)
    return out


def elf32(paddr=0x100000, vaddr=None, bss=0x2000, hdr=None, etype=2) -> bytes:
    """ELF32 i386 executable: one PT_LOAD [headers, multiboot header, code], bss after it.

    The Multiboot header sits at file offset 0x60 and the code (the entry) at 0x80.
    """
    vaddr = paddr if vaddr is None else vaddr
    hdr = header() if hdr is None else hdr
    body = hdr.ljust(0x20, b"\0") + CODE
    ehsize, phentsize = 52, 32
    data_off = 0x60
    filesz = data_off + len(body)
    ehdr = b"\x7fELF\x01\x01\x01" + bytes(9)
    ehdr += struct.pack(
        "<HHIIIIIHHHHHH", etype, 3, 1, vaddr + data_off + 0x20, ehsize, 0, 0, ehsize, phentsize, 1, 40, 0, 0
    )
    ph = struct.pack("<8I", 1, 0, vaddr, paddr, filesz, filesz + bss, 5, 0x1000)
    out = (ehdr + ph).ljust(data_off, b"\0") + body
    assert len(out) == filesz
    return out


def aout(
    load_addr=0x100000, header_offset=0x40, load_end=None, bss_end=None, entry=None, tail=b"", header_addr=None
) -> bytes:
    """A raw binary with the address fields set: loaded from offset 0 at load_addr."""
    size = header_offset + 32 + len(CODE)
    header_addr = load_addr + header_offset if header_addr is None else header_addr
    load_end = load_addr + size if load_end is None else load_end
    bss_end = load_addr + size + 0x1000 if bss_end is None else bss_end
    entry = load_addr + header_offset + 32 if entry is None else entry
    hdr = header(addresses=(header_addr, load_addr, load_end, bss_end, entry))
    return bytes(header_offset) + hdr + CODE + tail


def load(data: bytes, mem: int = 64 * MiB, layout_=None, **kw):
    memory = GuestMemory(layout_ or [(0, mem)])
    memory.fill(0, min(memory.regions[0].size, 4 * MiB), 0xAA)
    return mb.load(BootRequest(kernel=Path("kernel.mb"), memory=memory, **kw), data), memory


def info(memory) -> dict[str, int]:
    fields = struct.unpack_from("<23I", memory.read(mb.MULTIBOOT_INFO_ADDR, 92))
    names = [
        "flags",
        "mem_lower",
        "mem_upper",
        "boot_device",
        "cmdline",
        "mods_count",
        "mods_addr",
        "s0",
        "s1",
        "s2",
        "s3",
        "mmap_length",
        "mmap_addr",
        "drives_length",
        "drives_addr",
        "config_table",
        "boot_loader_name",
        "apm",
    ]
    return dict(zip(names, fields))


def cstring(memory, gpa: int) -> bytes:
    data = memory.read(gpa, 256)
    return data[: data.index(b"\0")]


def mmap_entries(memory, addr: int, length: int) -> list[tuple[int, int, int]]:
    out, pos = [], addr
    while pos < addr + length:
        size = memory.read_u32(pos)
        _, base, n, kind = struct.unpack_from("<IQQI", memory.read(pos, 24))
        out.append((base, n, kind))
        pos += size + 4
    return out


# ---- ELF ------------------------------------------------------------------------------


def test_elf_image_is_loaded_and_entered_in_protected_mode():
    data = elf32()
    setup, memory = load(data, cmdline="console=ttyS0 quiet")
    assert setup.protocol == "multiboot" and setup.details["format"] == "ELF"
    assert memory.read(0x100000, len(data)) == data
    assert memory.read(0x100000 + len(data), 0x2000) == bytes(0x2000)  # bss zeroed
    st = setup.entry
    assert st.mode == "protected32" and st.cr0 & 1 and not st.cr0 & (1 << 31)
    assert st.rip == 0x100080 and memory.read(st.rip, 4) == CODE[:4]
    assert st.gprs["rax"] == 0x2BADB002 and st.gprs["rbx"] == mb.MULTIBOOT_INFO_ADDR
    assert st.cs.db == 1 and st.cs.l == 0 and st.cs.limit == 0xFFFFFFFF
    assert not st.rflags & (1 << 9)  # IF clear
    # The GDT the state points at holds the flat descriptors the segment registers were loaded from.
    gdt_base, gdt_limit = st.gdt
    for seg in (st.cs, st.ds, st.ss):
        assert seg.selector + 7 <= gdt_limit
        assert Segment.from_descriptor(seg.selector, memory.read_u64(gdt_base + seg.selector)) == seg


def test_information_structure():
    _, memory = load(elf32(), mem=64 * MiB, cmdline="a=b c")
    i = info(memory)
    assert i["flags"] == (1 << 0) | (1 << 2) | (1 << 6) | (1 << 9)
    assert i["mem_lower"] == 639 and i["mem_upper"] == 63 * 1024
    assert cstring(memory, i["cmdline"]) == b"a=b c"
    assert cstring(memory, i["boot_loader_name"]) == b"pytest-microvm"
    assert i["mods_count"] == 0
    assert mmap_entries(memory, i["mmap_addr"], i["mmap_length"]) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),
        (0x100000, 63 * MiB, 1),
    ]


def test_memory_above_the_hole_is_in_the_map_but_not_in_mem_upper():
    ram = [(0, layout.MMIO_GAP_START), (layout.MMIO_GAP_END, 1 << 30)]
    _, memory = load(elf32(), layout_=ram)
    i = info(memory)
    assert i["mem_upper"] == (layout.MMIO_GAP_START - MiB) // 1024
    entries = mmap_entries(memory, i["mmap_addr"], i["mmap_length"])
    assert entries[-1] == (layout.MMIO_GAP_END, 1 << 30, 1)


def test_higher_half_entry_is_converted_to_physical():
    setup, memory = load(elf32(paddr=0x200000, vaddr=0xC0200000))
    assert setup.entry.rip == 0x200080
    assert memory.read(0x200080, 4) == CODE[:4]


def test_initrd_is_module_zero(tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 17)
    setup, memory = load(elf32(), mem=32 * MiB, initrd=initrd)
    i = info(memory)
    assert i["flags"] & (1 << 3) and i["mods_count"] == 1
    start, end, string, reserved = struct.unpack_from("<4I", memory.read(i["mods_addr"], 16))
    assert start % 4096 == 0 and end - start == initrd.stat().st_size and end <= 32 * MiB
    assert memory.read(start, end - start) == initrd.read_bytes()
    assert cstring(memory, string) == b"initrd.img" and reserved == 0
    assert start >= setup.details["load_end"]


def test_non_executable_elf_is_refused():
    with pytest.raises(ImageError, match="kernel.mb: ELF type 3 is not ET_EXEC"):
        load(elf32(etype=3))


# ---- a.out kludge --------------------------------------------------------------------------


def test_aout_kludge_uses_the_header_addresses():
    data = aout(load_addr=0x100000, tail=b"\x11" * 100)
    # The ELF header is irrelevant with bit 16 set; load_end covers only part of the file.
    setup, memory = load(data)
    assert setup.details["format"] == "a.out kludge"
    size = 0x40 + 32 + len(CODE)
    assert memory.read(0x100000, size) == data[:size]
    assert memory.read(0x100000 + size, 0x1000) == bytes(0x1000)  # up to bss_end: zero, not the tail
    assert setup.entry.rip == 0x100060


def test_aout_zero_load_end_loads_the_whole_file_and_no_bss():
    data = aout(load_end=0, bss_end=0, tail=b"\x22" * 64)
    setup, memory = load(data)
    assert memory.read(0x100000, len(data)) == data
    assert memory.read_u8(0x100000 + len(data)) == 0xAA  # nothing zeroed past the file
    assert setup.details["load_end"] == 0x100000 + len(data)


def test_aout_header_after_load_start():
    # Header at file offset 0x1000, loaded so that file offset 0x800 lands at load_addr.
    data = aout(load_addr=0x300000, header_offset=0x1000, header_addr=0x300800, load_end=0x300100, entry=0x300010)
    _, memory = load(data)
    assert memory.read(0x300000, 0x100) == data[0x800:0x900]


# ---- malformed images --------------------------------------------------------------------


def test_bad_checksum_is_named():
    data = elf32(hdr=header(checksum=0x1234))
    with pytest.raises(ImageError, match=r"kernel.mb: Multiboot header at offset 0x60 has checksum 0x1234, expected"):
        load(data)
    assert not mb.probe(data)


def test_header_past_8_kib_is_not_found():
    data = bytes(8192) + header() + CODE
    with pytest.raises(
        ImageError, match=r"no Multiboot header .* first 8192 bytes; a magic value appears at offset 0x2000"
    ):
        load(data)
    assert not mb.probe(data)
    assert mb.probe(bytes(8192 - 12) + header())  # the last aligned slot still counts


def test_unaligned_header_is_not_found():
    with pytest.raises(ImageError, match="no Multiboot header"):
        load(bytes(2) + header())


def test_load_end_before_load_addr():
    with pytest.raises(ImageError, match=r"load_end_addr 0xff000 is not above load_addr 0x100000"):
        load(aout(load_end=0xFF000))


def test_load_addr_above_header_addr():
    with pytest.raises(ImageError, match="load_addr 0x100100 is above header_addr 0x100040"):
        load(aout(load_addr=0x100100, header_addr=0x100040))


def test_load_start_before_the_file():
    with pytest.raises(ImageError, match="before the file's beginning"):
        load(aout(load_addr=0x100000, header_addr=0x100800))


def test_load_end_past_the_file_is_truncated():
    with pytest.raises(ImageError, match="past the end of the file.*truncated"):
        load(aout(load_end=0x100000 + 0x10000))


def test_bss_end_below_load_end():
    with pytest.raises(ImageError, match="bss_end_addr 0x100010 is below load_end_addr"):
        load(aout(bss_end=0x100010))


def test_entry_outside_the_image():
    with pytest.raises(ImageError, match="entry_addr 0x500000 is outside"):
        load(aout(entry=0x500000))


def test_address_fields_cut_off_by_the_end_of_file():
    hdr = header(addresses=(0, 0, 0, 0, 0))[:20]
    with pytest.raises(ImageError, match="ends inside its address fields"):
        load(bytes(64) + hdr)


def test_video_mode_requirement_is_refused():
    with pytest.raises(ImageError, match="video mode information \\(flags bit 2\\)"):
        load(elf32(hdr=header(flags=mb.MULTIBOOT_VIDEO_MODE)))


def test_unknown_required_flags_are_refused_but_optional_ones_ignored():
    with pytest.raises(ImageError, match="flags bits 5, 15"):
        load(elf32(hdr=header(flags=(1 << 5) | (1 << 15))))
    setup, _ = load(elf32(hdr=header(flags=(1 << 20) | mb.MULTIBOOT_MEMORY_INFO)))
    assert setup.entry.rip == 0x100080


def test_image_over_the_boot_structures_is_refused():
    with pytest.raises(ImageError, match="overlaps the Multiboot information"):
        load(aout(load_addr=0x6000))


def test_image_outside_ram_or_in_reserved_memory_is_refused():
    with pytest.raises(ImageError, match="not inside available guest RAM"):
        load(elf32(paddr=0x3FFF000), mem=64 * MiB)
    with pytest.raises(ImageError, match="not inside available guest RAM"):
        load(aout(load_addr=0xF0000))


def test_initrd_that_does_not_fit(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(bytes(3 * MiB))
    with pytest.raises(ImageError, match="initrd .* does not fit"):
        load(elf32(), mem=4 * MiB, initrd=big)


def test_probe():
    assert mb.probe(elf32())
    assert mb.probe(aout())
    assert not mb.probe(b"")
    assert not mb.probe(b"\x7fELF" + bytes(100))
