"""The Hermit loader against the three real Hermit 0.6.9 images and broken copies of them.

The images live outside the repository (see MICROVM_HERMIT_DIR); their
sha256 is checked so a test never passes on the wrong data.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from vmm.boot import hermit
from vmm.boot.types import BootRequest
from vmm.devices.uhyve import translate
from vmm.errors import ConfigError, GuestError, ImageError
from vmm.memory import GuestMemory

REPO = Path(__file__).resolve().parents[2]
HERMIT_DIR = Path(os.environ.get("MICROVM_HERMIT_DIR", REPO / ".." / "shared" / "guests" / "hermit"))
SHA256 = {
    "hello_world": "9ec5d6747c4ac7e1899d145a18badde148da73a42b7f9e3bfa720ba7b814f4a4",
    "hello_c": "36a3eb9896b5b9ee21b505c35425d15258f2261629d9328435def2182816af87",
    "rusty_demo": "e854349fee4c17b02f3e77ae063afb2ecc8fbf937891e3fbf7b92415431ca18f",
}
MiB = 1 << 20


def image(name: str) -> tuple[Path, bytes]:
    path = HERMIT_DIR / name
    if not path.is_file():
        pytest.skip(f"Hermit test image {path} not found (set MICROVM_HERMIT_DIR)")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[name], f"{path} is not the expected image"
    return path, data


def load(name: str, data: bytes | None = None, mem_bytes: int = 16 * MiB, **kw):
    path, real = image(name)
    memory = GuestMemory([(0, mem_bytes)])
    memory.fill(0, mem_bytes, 0xAA)  # prove the loader zeroes what it must
    setup = hermit.load(BootRequest(kernel=path, memory=memory, **kw), real if data is None else data)
    return setup, memory


# ---- ELF facts read independently of the loader ----------------------------------


def phdrs(data: bytes) -> list[tuple]:
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]


def dynamic(data: bytes) -> dict[int, int]:
    (dyn,) = [p for p in phdrs(data) if p[0] == 2]
    tags = {}
    for off in range(dyn[2], dyn[2] + dyn[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        tags[tag] = val
    return tags


def rela_entries(data: bytes) -> list[tuple[int, int, int, int]]:
    """(file offset of the entry, r_offset, type, addend) of every RELA entry."""
    tags = dynamic(data)
    start, size = tags[7], tags[8]  # DT_RELA is a vaddr; the first segment maps vaddr == offset here
    out = []
    for off in range(0, size, 24):
        r_offset, r_info, addend = struct.unpack_from("<QQq", data, start + off)
        out.append((start + off, r_offset, r_info & 0xFFFFFFFF, addend))
    return out


def note_offset(data: bytes) -> int:
    (note,) = [p for p in phdrs(data) if p[0] == 4]
    return note[2]


# ---- probe and parse ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHA256))
def test_probe_accepts_the_real_images(name):
    assert hermit.probe(image(name)[1])


def test_probe_rejects_other_files():
    assert not hermit.probe(b"")
    assert not hermit.probe(b"MZ" + b"\0" * 100)
    assert not hermit.probe(Path(sys.executable).resolve().read_bytes()[: 1 << 16] or b"")
    _, data = image("hello_world")
    flipped = bytearray(data)
    struct.pack_into("<I", flipped, note_offset(data) + 8, 0x5A01)
    assert not hermit.probe(bytes(flipped))


@pytest.mark.parametrize("name, relocatable", [("hello_world", True), ("rusty_demo", True), ("hello_c", False)])
def test_notes_and_kind(name, relocatable):
    path, data = image(name)
    img = hermit.parse(data, path)
    assert img.entry_version == 4
    assert img.uhyve_interface_version == 1
    assert img.hermit_version is None and img.legacy_mapping
    assert img.relocatable is relocatable


# ---- placement and relocation ---------------------------------------------------------


@pytest.mark.parametrize("name", ["hello_world", "rusty_demo"])
def test_static_pie_is_relocated_at_uhyves_kernel_offset(name):
    _, data = image(name)
    setup, memory = load(name)
    base = hermit.UHYVE_KERNEL_OFFSET
    relas = rela_entries(data)
    assert setup.details["relocations"] == len(relas) > 2000
    assert setup.details["kernel_address"] == base
    for _, r_offset, r_type, addend in (relas[0], relas[len(relas) // 2], relas[-1]):
        assert r_type == hermit.R_X86_64_RELATIVE
        assert memory.read_u64(base + r_offset) == base + addend
    entry = struct.unpack_from("<Q", data, 0x18)[0]
    assert setup.entry.rip == base + entry
    assert setup.details["tls"]["start"] == base + next(p for p in phdrs(data) if p[0] == 7)[3]


@pytest.mark.parametrize("name", sorted(SHA256))
def test_segments_are_copied_and_bss_zeroed(name):
    _, data = image(name)
    setup, memory = load(name)
    bias = setup.details["kernel_address"] - min(p[3] for p in phdrs(data) if p[0] == 1)
    relocated = {r[1] for r in rela_entries(data)} if setup.details["relocatable"] else set()
    for p_type, _flags, offset, vaddr, _paddr, filesz, memsz, _align in phdrs(data):
        if p_type != 1:
            continue
        loaded = memory.read(vaddr + bias, memsz)
        # Compare 8-byte words that no relocation touched.
        for off in range(0, filesz - 8, 997 * 8):
            if not any(off + vaddr - 7 <= r <= off + vaddr + 7 for r in relocated):
                assert loaded[off : off + 8] == data[offset + off : offset + off + 8]
        assert loaded[filesz:] == bytes(memsz - filesz)


def test_non_relocatable_image_loads_at_its_own_address():
    setup, _ = load("hello_c")
    assert setup.details["kernel_address"] == 0x800000
    assert setup.details["relocations"] == 0
    assert setup.entry.rip == 0x8422A0
    assert setup.entry.gprs["rsp"] == 0x800000 - hermit.UHYVE_KERNEL_STACK_SIZE


# ---- boot info, page tables, device tree, CPU state --------------------------------------


def test_boot_info_fields():
    before = time.time_ns()
    setup, memory = load("rusty_demo", mem_bytes=32 * MiB, vcpus=3)
    after = time.time_ns()
    blob = memory.read(hermit.UHYVE_BOOT_INFO_ADDR, hermit.RAW_BOOT_INFO_SIZE)
    info = hermit.HermitBootInfo.unpack(blob)
    assert (info.phys_addr_start, info.phys_addr_end) == (0, 32 * MiB)
    assert info.serial_port_base == 0x800
    assert info.device_tree == hermit.UHYVE_FDT_ADDR
    assert (info.kernel_image_start, info.kernel_image_end) == (
        setup.details["kernel_address"],
        setup.details["kernel_end"],
    )
    assert info.tls is not None and info.tls.memsz == 0xC9 and info.tls.align == 16
    assert info.num_cpus == 3 and info.has_pci is False and info.cpu_freq_khz is None
    assert before <= info.boot_time_ns <= after
    # The raw repr(C) layout hermit-entry 0.10 defines: Uhyve tag at 80, num_cpus at 96.
    assert struct.unpack_from("<I", blob, 80)[0] == hermit.PLATFORM_UHYVE
    assert struct.unpack_from("<Q", blob, 96)[0] == 3
    assert struct.unpack_from("<H", blob, 16)[0] == 0x800


def test_page_tables_identity_map_the_first_gib_with_2mib_pages():
    setup, memory = load("hello_world")
    pml4 = hermit.UHYVE_PML4_ADDR
    assert setup.entry.cr3 == pml4
    assert memory.read_u64(pml4 + 511 * 8) == pml4 | 0x3  # recursive slot
    for addr in (0, 0x40000, 0x1234567, 0x3FFF_FFFF):
        assert translate(memory, pml4, addr) == addr
    with pytest.raises(GuestError, match="not mapped"):
        translate(memory, pml4, 1 << 30)
    pdpt = memory.read_u64(pml4) & ~0xFFF
    assert not memory.read_u64(pdpt) & hermit.PTE_HUGE  # no 1 GiB page
    pd = memory.read_u64(pdpt) & ~0xFFF
    assert all(memory.read_u64(pd + 8 * i) == (i << 21) | 0x83 for i in range(512))
    assert setup.details["identity_map_end"] == 1 << 30


def test_non_legacy_mapping_ends_with_the_kernel():
    assert hermit.mapping_end(0x40000, 0x1F0000, legacy=False) == 0x1F0000
    assert hermit.mapping_end(0x40000, 0x1F0000, legacy=True) == (1 << 30) - (2 << 20)
    assert hermit.mapping_end(0x3FF00000, 0x40300000, legacy=True) == 0x40300000


def test_cpu_state_matches_uhyves_long_mode_setup():
    setup, memory = load("hello_world", vcpus=4)
    st = setup.entry
    assert st.mode == "long64"
    assert st.cr0 == 0x80000031  # PE | ET | NE | PG
    assert st.cr4 == 0x20 and st.efer == (1 << 8) | (1 << 10) | (1 << 11)
    assert st.cs.l == 1 and st.cs.selector == 0x08 and st.ss.selector == 0x10
    assert st.gprs == {"rdi": hermit.UHYVE_BOOT_INFO_ADDR, "rsi": 0, "rsp": 0x38000}
    assert st.gdt == (0, 23)
    assert [memory.read_u64(8 * i) for i in range(3)] == [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF]
    assert st.msrs == {hermit.MSR_IA32_MISC_ENABLE: 1}
    ap = setup.ap_entry(3)
    assert ap.rip == st.rip and ap.gprs["rsi"] == 3 and ap.cr3 == st.cr3


def test_argv_env_and_device_tree():
    setup, memory = load("hello_world", cmdline="-freq 2000 -- 'a b' c", env={"K": "v w"}, vcpus=2)
    assert setup.details["argv"][1:] == ["-freq", "2000", "--", "a b", "c"]
    tree = parse_dtb(memory.read(hermit.UHYVE_FDT_ADDR, hermit.UHYVE_FDT_SIZE))
    assert tree["/compatible"] == b"hermit,uhyve\0"
    assert struct.unpack(">QQ", tree["/memory@0/reg"]) == (0, 16 * MiB)
    assert tree["/chosen/bootargs"] == b"-freq 2000 env=K='v w' -- a b c\0"
    assert "/cpus/cpu@1/device_type" in tree


def test_cmdline_that_cannot_be_split_is_a_config_error():
    with pytest.raises(ConfigError, match="cmdline"):
        load("hello_world", cmdline="unterminated 'quote")


def test_cpuid_adjust_sets_uhyves_bits():
    from vmm.kvm.system import CpuidEntry  # plain data; no KVM needed

    entries = [
        CpuidEntry(f, 0, 0, 1, 2, 3, 0xFFFF_FFFF) for f in (1, 0xA, 0x8000_0001, 0x8000_0002, 0x8000_0003, 0x8000_0004)
    ]
    out = {e.function: e for e in hermit.uhyve_cpuid(entries)}
    assert out[1].ecx & (1 << 31) and out[1].ecx & (1 << 24) and out[1].edx & (1 << 5)
    assert out[0xA].eax == 0
    assert not out[0x8000_0001].edx & (1 << 26)
    brand = b"".join(
        struct.pack("<4I", e.eax, e.ebx, e.ecx, e.edx) for e in (out[0x8000_0002], out[0x8000_0003], out[0x8000_0004])
    )
    assert brand.rstrip(b"\0") == b"uhyve - unikernel hypervisor"


# ---- malformed images ------------------------------------------------------------------


def test_flipped_note_type_is_refused():
    path, data = image("hello_world")
    bad = bytearray(data)
    struct.pack_into("<I", bad, note_offset(data) + 8, 0x5A01)
    with pytest.raises(ImageError, match=r"no Hermit entry-version note .*HERMIT/0x5a01") as exc:
        load("hello_world", bytes(bad))
    assert str(path) in str(exc.value)


def test_unsupported_entry_version_is_refused():
    _, data = image("hello_world")
    bad = bytearray(data)
    assert bad[note_offset(data) + 12 : note_offset(data) + 19] == b"HERMIT\0"
    bad[note_offset(data) + 20] = 3
    with pytest.raises(ImageError, match=r"entry version 3 is not supported \(supported: 4\)"):
        load("hello_world", bytes(bad))


def test_truncated_segment_is_refused():
    _, data = image("rusty_demo")
    with pytest.raises(ImageError, match="truncated"):
        load("rusty_demo", data[: len(data) // 2])


def test_relocation_outside_the_image_is_refused():
    _, data = image("hello_world")
    bad = bytearray(data)
    entry_off = rela_entries(data)[5][0]
    struct.pack_into("<Q", bad, entry_off, 0x7FFF_FFF0)
    with pytest.raises(ImageError, match=r"relocation 5 \(R_X86_64_RELATIVE\) at r_offset 0x7ffffff0 is outside"):
        load("hello_world", bytes(bad))


def test_unsupported_relocation_type_is_refused():
    _, data = image("hello_world")
    bad = bytearray(data)
    entry_off = rela_entries(data)[7][0]
    struct.pack_into("<Q", bad, entry_off + 8, 37)  # R_X86_64_IRELATIVE
    with pytest.raises(ImageError, match="relocation 7 has unsupported type 37"):
        load("hello_world", bytes(bad))


def test_image_larger_than_guest_memory_is_refused():
    with pytest.raises(ImageError, match="guest memory ends at 0x80000"):
        load("rusty_demo", mem_bytes=512 * 1024)


def test_more_than_3_gib_is_refused_for_interface_v1():
    path, data = image("hello_world")
    memory = GuestMemory([(0, 3 << 30), (4 << 30, 1 << 30)])
    with pytest.raises(ConfigError, match="3 GiB"):
        hermit.load(BootRequest(kernel=path, memory=memory), data)


# ---- synthetic images for what the real ones do not have ------------------------------------


def synthetic(*, etype=3, vaddr=0, notes=((b"HERMIT", 0x5A00, b"\x04"),), code=b"\xf4" * 16) -> bytes:
    """A minimal ELF64 x86-64 image: one PT_LOAD with ``code`` and one PT_NOTE."""
    blob = b""
    for owner, ntype, desc in notes:
        name = owner + b"\0"
        blob += struct.pack("<III", len(name), len(desc), ntype) + name.ljust((len(name) + 3) & ~3, b"\0")
        blob += desc.ljust((len(desc) + 3) & ~3, b"\0")
    phoff, phnum = 64, 2
    note_off = phoff + 56 * phnum
    code_off = (note_off + len(blob) + 15) & ~15
    size = code_off + len(code)
    hdr = b"\x7fELF\x02\x01\x01\xff" + bytes(8)
    hdr += struct.pack("<HHIQQQIHHHHHH", etype, 62, 1, vaddr + code_off, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr, vaddr, size, size + 0x100, 0x1000)
    ph += struct.pack("<IIQQQQQQ", 4, 4, note_off, vaddr + note_off, vaddr + note_off, len(blob), len(blob), 4)
    out = (hdr + ph + blob).ljust(code_off, b"\0") + code
    assert len(out) == size
    return out


def load_synthetic(data: bytes, mem_bytes: int = 16 * MiB):
    memory = GuestMemory([(0, mem_bytes)])
    return hermit.load(BootRequest(kernel=Path("synthetic.elf"), memory=memory), data), memory


def test_synthetic_image_boots_like_the_real_ones():
    setup, memory = load_synthetic(synthetic())
    assert setup.details["kernel_address"] == hermit.UHYVE_KERNEL_OFFSET
    assert memory.read(setup.entry.rip, 16) == b"\xf4" * 16


def test_uhyve_interface_v2_is_refused():
    data = synthetic(notes=((b"HERMIT", 0x5A00, b"\x04"), (b"UHYVEIF", 0x5B00, (2).to_bytes(4, "big"))))
    with pytest.raises(ImageError, match=r"synthetic.elf: uhyve interface version 2 is not supported \(supported: 1\)"):
        load_synthetic(data)


def test_hermit_version_note_selects_the_exact_mapping():
    gnu = struct.pack("<4I", 6, 0, 10, 0)  # ELF_NOTE_OS_HERMIT, 0.10.0
    setup, memory = load_synthetic(synthetic(notes=((b"HERMIT", 0x5A00, b"\x04"), (b"GNU", 1, gnu))))
    assert setup.details["hermit_version"] == "0.10.0"
    assert setup.details["legacy_mapping"] is False
    # uhyve maps [0, kernel_end] inclusive in 2 MiB steps: here just the first page.
    assert setup.details["kernel_end"] < 2 << 20
    assert setup.details["identity_map_end"] == 2 << 20
    assert translate(memory, hermit.UHYVE_PML4_ADDR, (2 << 20) - 1) == (2 << 20) - 1
    with pytest.raises(GuestError):
        translate(memory, hermit.UHYVE_PML4_ADDR, 2 << 20)


def test_fixed_address_image_inside_the_boot_area_is_refused():
    with pytest.raises(ImageError, match="inside uhyve's boot area"):
        load_synthetic(synthetic(etype=2, vaddr=0x10000))


def test_32bit_or_foreign_elf_is_refused():
    data = bytearray(synthetic())
    struct.pack_into("<H", data, 18, 3)  # EM_386
    with pytest.raises(ImageError, match="not x86-64"):
        load_synthetic(bytes(data))


# ---- a DTB reader for the checks above (Devicetree Specification v0.4 ch. 5) -------------------


def parse_dtb(blob: bytes) -> dict[str, bytes]:
    magic, total, off_struct, off_strings, _rsv, version, last_comp = struct.unpack_from(">7I", blob, 0)
    assert magic == 0xD00DFEED and version == 17 and last_comp == 16
    assert total <= len(blob)
    props: dict[str, bytes] = {}
    path: list[str] = []
    pos = off_struct
    while True:
        (token,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if token == 1:
            end = blob.index(b"\0", pos)
            path.append(blob[pos:end].decode())
            pos = (end + 4) & ~3
        elif token == 2:
            path.pop()
        elif token == 3:
            length, nameoff = struct.unpack_from(">II", blob, pos)
            pos += 8
            name = blob[off_strings + nameoff : blob.index(b"\0", off_strings + nameoff)].decode()
            props["/".join(path) + "/" + name] = blob[pos : pos + length]
            pos = (pos + length + 3) & ~3
        elif token == 9:
            assert not path
            return props
        else:
            raise AssertionError(f"bad DTB token {token}")


def test_attach_takes_fs_root_env_and_tsc_from_the_request_and_machine(tmp_path):
    """The request's fs root and environment, and the machine's TSC rate, reach the guest."""
    from types import SimpleNamespace

    from vmm.bus import Bus
    from vmm.devices import RecordingVmControl

    setup, memory = load("hello_world", cmdline="x", hermit_fs_root=tmp_path, env={"A": "1"})
    (tmp_path / "f").write_bytes(b"")
    machine = SimpleNamespace(
        memory=memory,
        pio_bus=Bus("pio"),
        control=RecordingVmControl(),
        serial_sink=lambda data: None,
        devices={},
        tsc_khz=2_600_000,
    )
    setup.attach(machine)
    dev = machine.devices["uhyve"]
    import json

    json.dumps(setup.details)  # plain data: it goes into `microvm run --summary-json`
    assert setup.details["hermit_fs_root"] == str(tmp_path) and setup.details["env"] == {"A": "1"}
    assert dev.env == [b"A=1"] and dev.argv[1:] == [b"x"]
    tree = parse_dtb(memory.read(hermit.UHYVE_FDT_ADDR, hermit.UHYVE_FDT_SIZE))
    assert tree["/chosen/bootargs"] == b"x env=A=1\0"
    assert tree["/hermit,tsc/khz"] == (2_600_000).to_bytes(4, "big")
    assert machine.pio_bus.find(0x540).name == "uhyve-hypercalls"
    dev.close()
