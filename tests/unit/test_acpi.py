"""ACPI tables as a guest finds them: RSDP scan, checksums, every table's fields."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmm import layout
from vmm.acpi import fadt as F
from vmm.acpi import madt as M
from vmm.acpi import sdt, write_acpi_tables
from vmm.acpi.amldecode import decode_terms
from vmm.boot.types import MmioDeviceInfo
from vmm.errors import ConfigError
from vmm.memory import GuestMemory


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 2 * layout.MiB)])
    yield mem
    mem.close()


def tables(memory, **kw):
    kw.setdefault("vcpus", 2)
    kw.setdefault("serial_ports", [(layout.COM1_PORT, layout.COM1_IRQ)])
    return write_acpi_tables(memory, **kw)


def scan_rsdp(memory) -> int:
    """ACPI 6.4 §5.2.5.1: search 0xE0000-0xFFFFF on 16-byte boundaries."""
    for addr in range(layout.BIOS_AREA_START, layout.BIOS_AREA_END, 16):
        if memory.read(addr, 8) == b"RSD PTR " and sdt.table_checksum_ok(memory.read(addr, 20)):
            return addr
    raise AssertionError("no RSDP in the BIOS area")


def read_table(memory, addr: int) -> bytes:
    length = memory.read_u32(addr + 4)
    return memory.read(addr, length)


def follow(memory) -> dict[bytes, tuple[int, bytes]]:
    """Every table reachable from the RSDP, the way a guest walks them."""
    rsdp_addr = scan_rsdp(memory)
    rsdp = memory.read(rsdp_addr, 36)
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = read_table(memory, xsdt_addr)
    out = {b"XSDT": (xsdt_addr, xsdt)}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = read_table(memory, addr)
        out[t[:4]] = (addr, t)
    fadt = out[b"FACP"][1]
    dsdt_addr = struct.unpack_from("<Q", fadt, F.OFF_X_DSDT)[0]
    out[b"DSDT"] = (dsdt_addr, read_table(memory, dsdt_addr))
    return out


def test_rsdp_is_where_the_scan_and_the_boot_protocol_look(memory):
    t = tables(memory)
    assert t.rsdp_addr == layout.ACPI_TABLES_ADDR == scan_rsdp(memory)
    raw = memory.read(t.rsdp_addr, sdt.RSDP_SIZE)
    sig, _, _, rev, rsdt, length, xsdt, _, _ = sdt.RSDP.unpack(raw)
    assert sig == b"RSD PTR " and rev == 2 and length == 36 and rsdt == 0
    assert sum(raw[:20]) & 0xFF == 0
    assert sum(raw) & 0xFF == 0
    assert xsdt == t.tables["XSDT"][0]


def test_every_table_checksum_and_length(memory):
    t = tables(memory, vcpus=4, mmio_devices=[MmioDeviceInfo(0xD000_0000, 0x1000, 5)])
    found = follow(memory)
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for sig, (addr, raw) in found.items():
        assert sdt.table_checksum_ok(raw), sig
        assert struct.unpack_from("<I", raw, 4)[0] == len(raw)
        assert raw[10:16] == sdt.OEM_ID
        assert t.tables[sig.decode()] == (addr, len(raw))
    # Everything sits inside the BIOS area, 16-byte aligned and non-overlapping.
    spans = sorted(t.tables.values())
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b
    for a, n in spans:
        assert a % 16 == 0
        assert layout.BIOS_AREA_START <= a and a + n <= layout.BIOS_AREA_END


def test_fadt_fields(memory):
    tables(memory, i8042=True)
    found = follow(memory)
    fadt = found[b"FACP"][1]
    assert len(fadt) == 276 and fadt[8] == 6
    assert fadt[F.OFF_MINOR_VERSION] == F.FADT_MINOR_VERSION
    flags = struct.unpack_from("<I", fadt, F.OFF_FLAGS)[0]
    assert flags & F.FLAG_HW_REDUCED_ACPI and flags & F.FLAG_RESET_REG_SUP
    # No FACS in a hardware-reduced system.
    assert struct.unpack_from("<I", fadt, F.OFF_FIRMWARE_CTRL)[0] == 0
    assert struct.unpack_from("<Q", fadt, F.OFF_X_FIRMWARE_CTRL)[0] == 0
    dsdt_addr = found[b"DSDT"][0]
    assert struct.unpack_from("<I", fadt, F.OFF_DSDT)[0] == dsdt_addr
    # SCI and PM blocks stay zero.
    assert fadt[46:56] == bytes(10) and fadt[56:88] == bytes(32)

    def gas(off):
        return sdt.GAS.unpack_from(fadt, off)

    assert gas(F.OFF_SLEEP_CONTROL_REG) == (sdt.GAS_SYSTEM_IO, 8, 0, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert gas(F.OFF_SLEEP_STATUS_REG) == (sdt.GAS_SYSTEM_IO, 8, 0, 1, layout.ACPI_SLEEP_STATUS_PORT)
    assert gas(F.OFF_RESET_REG) == (sdt.GAS_SYSTEM_IO, 8, 0, 1, layout.ACPI_RESET_PORT)
    assert fadt[F.OFF_RESET_VALUE] == layout.ACPI_RESET_VALUE
    arch = struct.unpack_from("<H", fadt, F.OFF_IAPC_BOOT_ARCH)[0]
    assert arch & F.IAPC_VGA_NOT_PRESENT and arch & F.IAPC_CMOS_RTC_NOT_PRESENT
    assert arch & F.IAPC_8042


def test_fadt_without_i8042(memory):
    tables(memory, i8042=False)
    fadt = follow(memory)[b"FACP"][1]
    assert not struct.unpack_from("<H", fadt, F.OFF_IAPC_BOOT_ARCH)[0] & F.IAPC_8042


def madt_entries(raw: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 44
    while pos < len(raw):
        typ, length = raw[pos], raw[pos + 1]
        assert length >= 2
        out.append((typ, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return out


@pytest.mark.parametrize("vcpus", [1, 4, 64])
def test_madt_one_lapic_per_vcpu(memory, vcpus):
    tables(memory, vcpus=vcpus)
    madt = follow(memory)[b"APIC"][1]
    assert madt[8] == M.MADT_REVISION
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.LAPIC_ADDR and flags & M.PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for t, e in entries if t == M.TYPE_LOCAL_APIC]
    assert [(uid, apic_id) for _, _, uid, apic_id, _ in lapics] == [(i, i) for i in range(vcpus)]
    assert all(length == 8 and f & M.LAPIC_ENABLED for _, length, _, _, f in lapics)
    (ioapic,) = [struct.unpack("<BBBBII", e) for t, e in entries if t == M.TYPE_IO_APIC]
    assert ioapic[4:] == (layout.IOAPIC_ADDR, 0)
    overrides = [struct.unpack("<BBBBIH", e) for t, e in entries if t == M.TYPE_INTERRUPT_SOURCE_OVERRIDE]
    assert [(bus, irq, gsi) for _, _, bus, irq, gsi, _ in overrides] == [(0, 0, 2)]
    (nmi,) = [struct.unpack("<BBBHB", e) for t, e in entries if t == M.TYPE_LOCAL_APIC_NMI]
    assert nmi[2] == 0xFF and nmi[4] == 1


def test_madt_needs_a_vcpu(memory):
    with pytest.raises(ConfigError, match="--vcpus"):
        tables(memory, vcpus=0)


def test_madt_x2apic_for_big_guests(memory):
    tables(memory, vcpus=300)
    entries = madt_entries(follow(memory)[b"APIC"][1])
    xapic_ids = [e[3] for t, e in entries if t == M.TYPE_LOCAL_APIC]
    x2 = [struct.unpack("<BBHIII", e) for t, e in entries if t == M.TYPE_LOCAL_X2APIC]
    assert xapic_ids == list(range(255))
    assert [(apic_id, uid) for _, _, _, apic_id, _, uid in x2] == [(i, i) for i in range(255, 300)]
    assert any(t == M.TYPE_LOCAL_X2APIC_NMI for t, _ in entries)


def test_dsdt_holds_the_devices(memory):
    mmio = [MmioDeviceInfo(0xD000_0000, 0x1000, 5), MmioDeviceInfo(0xD000_1000, 0x1000, 6)]
    tables(memory, mmio_devices=mmio)
    dsdt = follow(memory)[b"DSDT"][1]
    assert dsdt[8] == 2
    terms = decode_terms(dsdt[36:])
    names = [d.name for d in terms[-1].children]
    assert names == ["COM1", "PS2K", "VR00", "VR01"]


def test_tables_must_fit_the_bios_area(memory):
    from vmm.acpi import aml

    huge = [aml.Device(f"X{i:03X}", [aml.Name("DATA", bytes(4000))]) for i in range(40)]
    with pytest.raises(ConfigError, match="BIOS area"):
        tables(memory, extra_devices=huge)


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_every_table(memory, tmp_path):
    tables(memory, vcpus=3, mmio_devices=[MmioDeviceInfo(0xD000_0000, 0x1000, 5)])
    for sig, (_, raw) in follow(memory).items():
        path = tmp_path / f"{sig.decode().lower()}.dat"
        path.write_bytes(raw)
        res = subprocess.run(["iasl", "-d", str(path)], check=False, capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        dsl = path.with_suffix(".dsl").read_text()
        assert "Invalid" not in dsl and "**** " not in dsl, dsl
    fadt = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in fadt
    assert "Address : 00000000000003C0" in fadt  # sleep control register
    dsdt = (tmp_path / "dsdt.dsl").read_text()
    assert 'EisaId ("PNP0501")' in dsdt and '"LNRO0005"' in dsdt
