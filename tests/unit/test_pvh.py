"""PVH boot: the Xen PHYS32_ENTRY note, hvm_start_info, memmap and modlist."""

from __future__ import annotations

from pathlib import Path

import pytest
from boot_images import Segment, make_elf, make_pvh_elf, note

from vmm import layout
from vmm.boot import load, pvh
from vmm.boot.e820 import E820_RAM, E820_RESERVED
from vmm.boot.elf import ElfImage
from vmm.boot.types import BootRequest, MmioDeviceInfo
from vmm.cpustate import BOOT_CS, BOOT_DS, BOOT_TSS, CR0_PE, CR0_PG
from vmm.errors import ImageError
from vmm.memory import GuestMemory

MiB = layout.MiB


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 32 * MiB)])
    yield mem
    mem.close()


def boot(tmp_path: Path, memory, image: bytes, **kw):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(image)
    return load(BootRequest(kernel=kernel, memory=memory, **kw))


def start_info(memory) -> dict:
    names = [
        "magic",
        "version",
        "flags",
        "nr_modules",
        "modlist_paddr",
        "cmdline_paddr",
        "rsdp_paddr",
        "memmap_paddr",
        "memmap_entries",
        "reserved",
    ]
    raw = memory.read(layout.PVH_INFO_ADDR, pvh.HVM_START_INFO.size)
    return dict(zip(names, pvh.HVM_START_INFO.unpack(raw)))


@pytest.mark.parametrize("desc_size", [4, 8])
def test_note_is_read_in_both_widths(desc_size):
    elf = ElfImage(make_pvh_elf(0x100_0040, desc_size=desc_size))
    assert pvh.pvh_entry(elf) == 0x100_0040


def test_note_with_bad_size():
    elf = ElfImage(make_elf([Segment(0x100_0000, b"\x90")], 0x100_0000, note(b"Xen", 18, b"\x00\x00")), "k")
    with pytest.raises(ImageError, match="2-byte value"):
        pvh.pvh_entry(elf)


def test_other_xen_notes_are_not_pvh():
    elf = ElfImage(make_elf([Segment(0x100_0000, b"\x90")], 0x100_0000, note(b"Xen", 17, b"\0" * 4)))
    assert pvh.pvh_entry(elf) is None
    elf = ElfImage(make_elf([Segment(0x100_0000, b"\x90")], 0x100_0000, note(b"GNU", 18, b"\0" * 4)))
    assert pvh.pvh_entry(elf) is None


def test_pvh_entry_state_and_start_info(tmp_path, memory):
    setup = boot(tmp_path, memory, make_pvh_elf(0x100_0040), cmdline="console=hvc0")
    assert setup.protocol == "pvh"
    st = setup.entry
    assert st.mode == "protected32"
    assert st.rip == 0x100_0040
    assert st.gprs["rbx"] == layout.PVH_INFO_ADDR
    # pvh.pandoc: CR0.PE set, paging off; flat 32-bit code/data; TR base 0 limit 0x67.
    assert st.cr0 & CR0_PE and not st.cr0 & CR0_PG and st.cr4 == 0
    assert st.cs.selector == BOOT_CS and st.cs.db == 1 and st.cs.l == 0
    assert st.cs.base == 0 and st.cs.limit == 0xFFFF_FFFF
    assert st.ds.selector == BOOT_DS and st.ds.limit == 0xFFFF_FFFF
    assert st.tr.selector == BOOT_TSS and st.tr.base == 0 and st.tr.limit == 0x67 and st.tr.type == 0xB
    assert st.rflags & ((1 << 9) | (1 << 8) | (1 << 17)) == 0
    assert st.gdt[0] == layout.BOOT_GDT32_ADDR

    info = start_info(memory)
    assert info["magic"] == 0x336EC578
    assert info["version"] == 1
    assert info["nr_modules"] == 0 and info["modlist_paddr"] == 0
    assert info["cmdline_paddr"] == layout.CMDLINE_ADDR
    assert memory.read(layout.CMDLINE_ADDR, 13) == b"console=hvc0\0"
    assert info["rsdp_paddr"] == layout.ACPI_TABLES_ADDR
    assert info["memmap_paddr"] == layout.PVH_MEMMAP_ADDR
    assert info["reserved"] == 0
    entries = [
        pvh.HVM_MEMMAP_ENTRY.unpack(memory.read(layout.PVH_MEMMAP_ADDR + 24 * i, 24))
        for i in range(info["memmap_entries"])
    ]
    assert entries == [
        (0, layout.EBDA_START, E820_RAM, 0),
        (layout.EBDA_START, MiB - layout.EBDA_START, E820_RESERVED, 0),
        (MiB, 31 * MiB, E820_RAM, 0),
    ]
    # The segment went to its physical address.
    assert memory.read(0x100_0000, 0x100) == b"\x90" * 0x100


def test_pvh_initrd_module(tmp_path, memory):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x5a" * 3000)
    setup = boot(tmp_path, memory, make_pvh_elf(), initrd=initrd)
    info = start_info(memory)
    assert info["nr_modules"] == 1
    assert info["modlist_paddr"] == layout.PVH_MODLIST_ADDR
    paddr, size, cmdline, reserved = pvh.HVM_MODLIST_ENTRY.unpack(memory.read(layout.PVH_MODLIST_ADDR, 32))
    assert size == 3000 and cmdline == 0 and reserved == 0
    assert paddr == (32 * MiB - 3000) & ~0xFFF == setup.details["initrd_addr"]
    assert memory.read(paddr, 3000) == b"\x5a" * 3000


def test_pvh_gets_virtio_devices_on_its_command_line(tmp_path, memory):
    dev = MmioDeviceInfo(0xD000_0000, 0x1000, 5)
    setup = boot(tmp_path, memory, make_pvh_elf(), cmdline="quiet", mmio_devices=[dev])
    assert setup.cmdline == "quiet virtio_mmio.device=4K@0xd0000000:5"


def test_pvh_without_acpi(tmp_path, memory):
    boot(tmp_path, memory, make_pvh_elf(), acpi=False)
    assert start_info(memory)["rsdp_paddr"] == 0


def test_pvh_entry_outside_segments(tmp_path, memory):
    with pytest.raises(ImageError, match="XEN_ELFNOTE_PHYS32_ENTRY 0x200000 is not inside any PT_LOAD segment"):
        boot(tmp_path, memory, make_pvh_elf(0x20_0000))


def test_pvh_segments_outside_ram(tmp_path, memory):
    img = make_pvh_elf(0x400_0000, load_at=0x400_0000)
    with pytest.raises(ImageError, match="outside guest RAM"):
        boot(tmp_path, memory, img)


def test_pvh_32bit_elf(tmp_path, memory):
    img = make_elf(
        [Segment(0x10_0000, b"\xf4" * 64)],
        0x10_0000,
        note(b"Xen", 18, (0x10_0000).to_bytes(4, "little")),
        elf64=False,
        machine=3,
    )
    setup = boot(tmp_path, memory, img)
    assert setup.protocol == "pvh" and setup.entry.rip == 0x10_0000
