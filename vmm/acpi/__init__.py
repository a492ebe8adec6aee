"""ACPI tables for a hardware-reduced x86 microVM.

``write_acpi_tables`` lays out RSDP, XSDT, FADT, MADT and DSDT in the BIOS
read-only area (``layout.ACPI_TABLES_ADDR``), so a guest finds the RSDP either
through the boot protocol (zero page ``acpi_rsdp_addr``, PVH ``rsdp_paddr``)
or by the spec's scan of 0xE0000-0xFFFFF on 16-byte boundaries (ACPI 6.4
§5.2.5.1).  The e820 map marks that area reserved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .. import layout
from ..errors import ConfigError
from ..memory import GuestMemory
from . import aml, sdt
from .dsdt import Dsdt, build_dsdt
from .fadt import build_fadt
from .madt import build_madt

__all__ = ["AcpiTables", "Dsdt", "aml", "build_dsdt", "write_acpi_tables"]

TABLE_ALIGN = 16


@dataclass
class AcpiTables:
    """Where each table went (guest-physical addresses) and its size."""

    rsdp_addr: int
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return max(a + n for a, n in self.tables.values())


def write_acpi_tables(
    memory: GuestMemory,
    *,
    vcpus: int,
    serial_ports: Sequence[tuple[int, int]],
    mmio_devices: Iterable = (),
    i8042: bool = True,
    extra_devices: Iterable[aml.AmlObject] = (),
    dsdt: Dsdt | None = None,
) -> AcpiTables:
    """Write every table and return their addresses; ConfigError if they overflow the BIOS area."""
    if dsdt is None:
        dsdt = build_dsdt(
            serial_ports=serial_ports, mmio_devices=mmio_devices, i8042=i8042, extra_devices=extra_devices
        )
    dsdt_bytes = dsdt.encode()
    madt_bytes = build_madt(vcpus)

    # Order: RSDP first (the scan needs it 16-byte aligned), then XSDT, FADT, MADT, DSDT.
    rsdp_addr = layout.ACPI_TABLES_ADDR
    xsdt_addr = _align(rsdp_addr + sdt.RSDP_SIZE)
    xsdt_size = len(sdt.xsdt([0, 0]))  # FADT and MADT
    fadt_addr = _align(xsdt_addr + xsdt_size)
    fadt_bytes = build_fadt(0, i8042=i8042)  # sized first; the DSDT address comes next
    madt_addr = _align(fadt_addr + len(fadt_bytes))
    dsdt_addr = _align(madt_addr + len(madt_bytes))
    end = dsdt_addr + len(dsdt_bytes)
    if end > layout.BIOS_AREA_END:
        raise ConfigError(
            f"--vcpus/devices: ACPI tables need {end - rsdp_addr} bytes, more than the BIOS area "
            f"{layout.ACPI_TABLES_ADDR:#x}-{layout.BIOS_AREA_END:#x} holds"
        )
    fadt_bytes = build_fadt(dsdt_addr, i8042=i8042)
    xsdt_bytes = sdt.xsdt([fadt_addr, madt_addr])

    out = AcpiTables(rsdp_addr)
    for name, addr, data in (
        ("RSDP", rsdp_addr, sdt.rsdp(xsdt_addr)),
        ("XSDT", xsdt_addr, xsdt_bytes),
        ("FACP", fadt_addr, fadt_bytes),
        ("APIC", madt_addr, madt_bytes),
        ("DSDT", dsdt_addr, dsdt_bytes),
    ):
        memory.write(addr, data)
        out.tables[name] = (addr, len(data))
    return out


def _align(addr: int) -> int:
    return (addr + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)
