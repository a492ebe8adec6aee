"""Linux boot protocol: setup header checks, bzImage and vmlinux loading, zero page, initrd."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from boot_images import KERNEL_VERSION, BzImageSpec, Segment, make_bzimage, make_elf
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm import layout
from vmm.boot import load
from vmm.boot import setup_header as sh
from vmm.boot import zeropage as zp
from vmm.boot.e820 import E820_RAM, E820_RESERVED
from vmm.boot.types import BootRequest, MmioDeviceInfo
from vmm.cpustate import BOOT_CS, BOOT_DS, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME
from vmm.errors import ConfigError, ImageError
from vmm.memory import GuestMemory, x86_ram_layout

MiB = layout.MiB


@pytest.fixture
def memory():
    mem = GuestMemory(x86_ram_layout(64 * MiB, layout.MMIO_GAP_START, layout.MMIO_GAP_END))
    yield mem
    mem.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def boot(tmp_path, memory, image: bytes, **kw):
    kernel = write(tmp_path, "bzImage", image)
    return load(BootRequest(kernel=kernel, memory=memory, **kw))


def zero_page_u(memory, fmt: str, off: int) -> int:
    return struct.unpack(fmt, memory.read(layout.ZERO_PAGE_ADDR + off, struct.calcsize(fmt)))[0]


# ---- setup header parsing ----------------------------------------------------
def test_parse_reads_every_field():
    img = make_bzimage(setup_sects=6, init_size=0x123000, pref_address=0x200_0000, cmdline_size=4095)
    hdr = sh.parse_setup_header(img, "bzImage")
    assert hdr.setup_sects == 6
    assert hdr.setup_size == 7 * 512
    assert hdr.version == 0x020F and hdr.version_str == "2.15"
    assert hdr.kernel_version == KERNEL_VERSION
    assert hdr.init_size == 0x123000
    assert hdr.pref_address == 0x200_0000
    assert hdr.kernel_alignment == 0x20_0000
    assert hdr.relocatable_kernel is True
    assert hdr.cmdline_size == 4095
    assert hdr.initrd_addr_max == 0x7FFF_FFFF
    assert hdr.xloadflags & sh.XLF_KERNEL_64
    assert hdr.payload_offset == 1024 and hdr.payload_length == 64
    assert hdr.raw == img[0x1F1 : sh.HEADER_END_2_15]


def test_setup_sects_zero_means_four():
    hdr = sh.parse_setup_header(make_bzimage(setup_sects=0), "bzImage")
    assert hdr.setup_sects == 4


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"boot_flag": 0x1234}, ["boot_flag", "0x1234"]),
        ({"magic": b"HdrX"}, ["magic", "HdrX"]),
        ({"version": 0x020A}, ["version is 2.10", "2.12"]),
        ({"loadflags": 0}, ["LOADED_HIGH"]),
        ({"xloadflags": 0}, ["XLF_KERNEL_64"]),
        ({"kernel_alignment": 0x30_0000}, ["kernel_alignment"]),
        ({"init_size": 0}, ["init_size"]),
        ({"cmdline_size": 0}, ["cmdline_size"]),
        ({"syssize": 0x10000}, ["truncated", "syssize"]),
        ({"payload_length": 0x100000}, ["payload_length", "truncated"]),
        ({"header_length_byte": 0x20}, ["setup header length"]),
    ],
)
def test_malformed_headers_are_named(changes, words):
    img = make_bzimage(**changes)
    with pytest.raises(ImageError) as err:
        sh.parse_setup_header(img, "/images/bzImage")
    msg = str(err.value)
    assert msg.startswith("/images/bzImage: ")
    for w in words:
        assert w in msg


@pytest.mark.parametrize("length", [0, 0x100, 0x205, 0x250])
def test_truncated_header(length):
    img = make_bzimage()[:length]
    with pytest.raises(ImageError, match="truncated"):
        sh.parse_setup_header(img, "k")


def test_truncated_protected_mode_part():
    img = make_bzimage()
    with pytest.raises(ImageError, match="truncated"):
        sh.parse_setup_header(img[: 5 * 512 + 100], "k")


# ---- bzImage loading ---------------------------------------------------------
def test_bzimage_loaded_at_pref_address_and_entered_at_startup_64(tmp_path, memory):
    spec = BzImageSpec()
    img = make_bzimage(spec)
    setup = boot(tmp_path, memory, img, cmdline="console=ttyS0")
    assert setup.protocol == "linux-bzimage"
    pm = img[5 * 512 :]
    assert memory.read(0x100_0000, len(pm)) == pm
    st = setup.entry
    assert st.rip == 0x100_0000 + 0x200
    assert st.gprs["rsi"] == layout.ZERO_PAGE_ADDR
    assert st.mode == "long64"
    assert st.cr0 & CR0_PG and st.cr4 & CR4_PAE
    assert st.efer & EFER_LME and st.efer & EFER_LMA
    assert st.cr3 == layout.PML4_ADDR
    assert st.cs.selector == BOOT_CS and st.cs.l == 1 and st.cs.db == 0
    for seg in (st.ds, st.es, st.ss):
        assert seg.selector == BOOT_DS and seg.type & 0x2  # writable data
    assert st.rflags & (1 << 9) == 0  # interrupts disabled
    assert setup.details["kernel_version"] == KERNEL_VERSION
    assert setup.details["boot_protocol"] == "2.15"


def test_pref_address_is_rounded_up_to_kernel_alignment(tmp_path, memory):
    setup = boot(tmp_path, memory, make_bzimage(pref_address=0x150_0000, kernel_alignment=0x40_0000))
    assert setup.details["load_address"] == 0x180_0000
    assert setup.entry.rip == 0x180_0200


def test_non_relocatable_kernel_loads_at_1mib(tmp_path, memory):
    img = make_bzimage(relocatable=0)
    setup = boot(tmp_path, memory, img)
    assert setup.details["load_address"] == layout.HIGH_MEMORY_START
    assert memory.read(layout.HIGH_MEMORY_START, 16) == img[5 * 512 : 5 * 512 + 16]
    assert zero_page_u(memory, "<I", sh.OFF_CODE32_START) == layout.HIGH_MEMORY_START


def test_init_size_must_fit_in_ram(tmp_path, memory):
    with pytest.raises(ImageError) as err:
        boot(tmp_path, memory, make_bzimage(init_size=60 * MiB))
    msg = str(err.value)
    assert "init_size" in msg and "64 MiB" in msg


def test_zero_page_fields(tmp_path, memory):
    img = make_bzimage()
    initrd = write(tmp_path, "initrd", b"\xab" * 10000)
    setup = boot(tmp_path, memory, img, cmdline="console=ttyS0 quiet", initrd=initrd)
    page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    # The setup header is copied; the loader's own fields are then set.
    hdr_copy = bytearray(img[0x1F1 : sh.HEADER_END_2_15])
    for off, size in (
        (sh.OFF_TYPE_OF_LOADER, 1),
        (sh.OFF_CODE32_START, 4),
        (sh.OFF_RAMDISK_IMAGE, 4),
        (sh.OFF_RAMDISK_SIZE, 4),
        (sh.OFF_CMD_LINE_PTR, 4),
    ):
        hdr_copy[off - 0x1F1 : off - 0x1F1 + size] = page[off : off + size]
    assert page[0x1F1 : sh.HEADER_END_2_15] == bytes(hdr_copy)
    assert page[sh.OFF_TYPE_OF_LOADER] == 0xFF
    assert struct.unpack_from("<H", page, sh.OFF_BOOT_FLAG)[0] == 0xAA55
    assert page[sh.OFF_HEADER : sh.OFF_HEADER + 4] == b"HdrS"
    assert struct.unpack_from("<I", page, sh.OFF_CMD_LINE_PTR)[0] == layout.CMDLINE_ADDR
    assert memory.read(layout.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert struct.unpack_from("<I", page, sh.OFF_RAMDISK_SIZE)[0] == 10000
    ramdisk = struct.unpack_from("<I", page, sh.OFF_RAMDISK_IMAGE)[0]
    assert ramdisk == setup.details["initrd_addr"]
    assert memory.read(ramdisk, 10000) == b"\xab" * 10000
    assert struct.unpack_from("<Q", page, zp.OFF_ACPI_RSDP_ADDR)[0] == layout.ACPI_TABLES_ADDR
    assert memory.read(layout.ACPI_TABLES_ADDR, 8) == b"RSD PTR "
    n = page[zp.OFF_E820_ENTRIES]
    table = [struct.unpack_from("<QQI", page, zp.OFF_E820_TABLE + 20 * i) for i in range(n)]
    assert table == [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, MiB - layout.EBDA_START, E820_RESERVED),
        (MiB, 63 * MiB, E820_RAM),
    ]


def test_no_acpi_leaves_rsdp_zero(tmp_path, memory):
    boot(tmp_path, memory, make_bzimage(), acpi=False)
    assert zero_page_u(memory, "<Q", zp.OFF_ACPI_RSDP_ADDR) == 0
    assert memory.read(layout.ACPI_TABLES_ADDR, 8) == bytes(8)


def test_command_line_limit_is_the_headers_cmdline_size(tmp_path, memory):
    img = make_bzimage(cmdline_size=2047)
    boot(tmp_path, memory, img, cmdline="x" * 2047, virtio_cmdline=False)
    with pytest.raises(ConfigError) as err:
        boot(tmp_path, memory, img, cmdline="x" * 70000)
    assert str(err.value) == (
        "--append: command line is 70000 bytes, the kernel accepts at most 2047 (setup header cmdline_size)"
    )


def test_virtio_devices_are_appended_to_the_command_line(tmp_path, memory):
    devs = [MmioDeviceInfo(0xD000_0000, 0x1000, 5), MmioDeviceInfo(0xD000_1000, 0x200, 6)]
    setup = boot(tmp_path, memory, make_bzimage(), cmdline="console=ttyS0", mmio_devices=devs)
    want = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=512@0xd0001000:6"
    assert setup.cmdline == want
    assert memory.read(layout.CMDLINE_ADDR, len(want) + 1) == want.encode() + b"\0"
    off = boot(tmp_path, memory, make_bzimage(), cmdline="console=ttyS0", mmio_devices=devs, virtio_cmdline=False)
    assert off.cmdline == "console=ttyS0"


# ---- initrd placement --------------------------------------------------------
def test_initrd_goes_page_aligned_to_the_top_of_low_ram(tmp_path, memory):
    initrd = write(tmp_path, "initrd", b"\x11" * 5000)
    setup = boot(tmp_path, memory, make_bzimage(), initrd=initrd)
    assert setup.details["initrd_addr"] == (64 * MiB - 5000) & ~0xFFF


def test_initrd_respects_initrd_addr_max(tmp_path, memory):
    initrd = write(tmp_path, "initrd", b"\x11" * 5000)
    setup = boot(tmp_path, memory, make_bzimage(initrd_addr_max=0x1FF_FFFF), initrd=initrd)
    addr = setup.details["initrd_addr"]
    assert addr == (0x200_0000 - 5000) & ~0xFFF
    assert addr + 5000 - 1 <= 0x1FF_FFFF


def test_initrd_below_the_mmio_hole_on_big_guests(tmp_path):
    mem = GuestMemory(x86_ram_layout(3 * layout.GiB + 64 * MiB, layout.MMIO_GAP_START, layout.MMIO_GAP_END))
    try:
        initrd = write(tmp_path, "initrd", b"\x22" * 8192)
        setup = boot(tmp_path, mem, make_bzimage(initrd_addr_max=0xFFFF_FFFF), initrd=initrd)
        assert setup.details["initrd_addr"] == layout.MMIO_GAP_START - 8192
        e820 = setup.details["e820"]
        assert e820[-1] == (layout.MMIO_GAP_END, 64 * MiB, E820_RAM)
    finally:
        mem.close()


def test_too_large_initrd(tmp_path, memory):
    initrd = write(tmp_path, "big-initrd.img", b"\0" * (60 * MiB))
    with pytest.raises(ImageError) as err:
        boot(tmp_path, memory, make_bzimage(), initrd=initrd)
    msg = str(err.value)
    assert msg.startswith(str(initrd))
    assert str(60 * MiB) in msg and "64 MiB" in msg


def test_missing_initrd(tmp_path, memory):
    with pytest.raises(ImageError, match="cannot read initrd"):
        boot(tmp_path, memory, make_bzimage(), initrd=tmp_path / "nope")


# ---- vmlinux ELF -------------------------------------------------------------
KMAP = 0xFFFF_FFFF_8000_0000


def vmlinux(entry=0x100_0000, segs=None) -> bytes:
    segs = segs or [
        Segment(0x100_0000, b"\xcc" * 0x300, memsz=0x1000, vaddr=KMAP + 0x100_0000),
        Segment(0x120_0000, b"\xdd" * 0x100, vaddr=KMAP + 0x120_0000),
    ]
    return make_elf(segs, entry)


def test_vmlinux_segments_at_physical_addresses(tmp_path, memory):
    memory.fill(0x100_0000, 0x1000, 0x55)  # bss must be zeroed
    setup = boot(tmp_path, memory, vmlinux(), cmdline="root=/dev/vda")
    assert setup.protocol == "linux-elf"
    assert memory.read(0x100_0000, 0x300) == b"\xcc" * 0x300
    assert memory.read(0x100_0300, 0xD00) == bytes(0xD00)
    assert memory.read(0x120_0000, 0x100) == b"\xdd" * 0x100
    assert setup.entry.rip == 0x100_0000
    assert setup.entry.mode == "long64" and setup.entry.gprs["rsi"] == layout.ZERO_PAGE_ADDR
    page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<H", page, sh.OFF_BOOT_FLAG)[0] == sh.BOOT_FLAG_MAGIC
    assert page[sh.OFF_HEADER : sh.OFF_HEADER + 4] == b"HdrS"
    assert page[sh.OFF_TYPE_OF_LOADER] == 0xFF
    assert struct.unpack_from("<I", page, sh.OFF_CMD_LINE_PTR)[0] == layout.CMDLINE_ADDR
    assert page[zp.OFF_E820_ENTRIES] == 3


def test_vmlinux_virtual_entry_is_translated(tmp_path, memory):
    setup = boot(tmp_path, memory, vmlinux(entry=KMAP + 0x100_0010))
    assert setup.entry.rip == 0x100_0010


def test_vmlinux_entry_outside_segments(tmp_path, memory):
    with pytest.raises(ImageError, match="entry point e_entry 0x5000000 is not inside any PT_LOAD segment"):
        boot(tmp_path, memory, vmlinux(entry=0x500_0000))


def test_vmlinux_segment_outside_ram(tmp_path, memory):
    img = vmlinux(segs=[Segment(0x3FF_F000, b"\x90" * 16, memsz=0x2000)], entry=0x3FF_F000)
    with pytest.raises(ImageError) as err:
        boot(tmp_path, memory, img)
    assert "segment 0" in str(err.value) and "outside guest RAM" in str(err.value)


def test_vmlinux_segment_below_1mib(tmp_path, memory):
    img = vmlinux(segs=[Segment(0x7000, b"\x90" * 16)], entry=0x7000)
    with pytest.raises(ImageError, match="below 1 MiB"):
        boot(tmp_path, memory, img)


def test_vmlinux_initrd_above_the_kernel(tmp_path, memory):
    initrd = write(tmp_path, "initrd", b"\x33" * 4096)
    setup = boot(tmp_path, memory, vmlinux(), initrd=initrd)
    assert setup.details["initrd_addr"] == 64 * MiB - 4096
    assert zero_page_u(memory, "<I", sh.OFF_RAMDISK_IMAGE) == 64 * MiB - 4096


def test_vmlinux_command_line_limit(tmp_path, memory):
    with pytest.raises(ConfigError, match="at most 2047 \\(x86 Linux COMMAND_LINE_SIZE\\)"):
        boot(tmp_path, memory, vmlinux(), cmdline="y" * 2048)


# ---- robustness: any corruption is an ImageError, never a crash ------------------
_GOOD = make_bzimage()


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0x1F0, 0x270), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_headers_raise_only_image_errors(edits):
    img = bytearray(_GOOD)
    for off, value in edits:
        img[off] = value
    try:
        hdr = sh.parse_setup_header(bytes(img), "k")
    except ImageError:
        return
    assert hdr.setup_size + hdr.syssize * 16 <= len(img)
    assert hdr.payload_offset + hdr.payload_length <= len(img) - hdr.setup_size or hdr.payload_length == 0


@settings(max_examples=100)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 200))
def test_corrupted_elf_raises_only_image_errors(tmp_path_factory, junk, cut):
    image = bytearray(vmlinux())
    image[64 : 64 + len(junk)] = junk  # program headers and beyond
    path = tmp_path_factory.mktemp("elf") / "vmlinux"
    path.write_bytes(bytes(image[: len(image) - cut]))
    mem = GuestMemory([(0, 32 * MiB)])
    try:
        load(BootRequest(kernel=path, memory=mem, acpi=False))
    except (ImageError, ConfigError):
        pass
    finally:
        mem.close()
