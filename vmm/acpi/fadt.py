"""The FADT of a hardware-reduced ACPI microVM (ACPI 6.4 §5.2.9, Table 5.9).

Hardware-reduced ACPI (§4.1) has no PM1 blocks, no SCI, no FACS: power-off
goes through SLEEP_CONTROL_REG (SLP_TYPx << 2 | SLP_EN) and reboot through
RESET_REG.  IAPC_BOOT_ARCH tells the guest what legacy hardware to skip.
"""

from __future__ import annotations

import struct

from .. import layout
from . import sdt

FADT_REVISION = 6
FADT_MINOR_VERSION = 4
FADT_SIZE = 276

# Field offsets (Table 5.9).
OFF_FIRMWARE_CTRL = 36
OFF_DSDT = 40
OFF_PREFERRED_PM_PROFILE = 45
OFF_IAPC_BOOT_ARCH = 109
OFF_FLAGS = 112
OFF_RESET_REG = 116
OFF_RESET_VALUE = 128
OFF_MINOR_VERSION = 131
OFF_X_FIRMWARE_CTRL = 132
OFF_X_DSDT = 140
OFF_SLEEP_CONTROL_REG = 244
OFF_SLEEP_STATUS_REG = 256
OFF_HYPERVISOR_VENDOR = 268

# IA-PC boot architecture flags (§5.2.9.3, Table 5.11).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# Fixed feature flags (§5.2.9, Table 5.10).
FLAG_WBINVD = 1 << 0
FLAG_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FLAG_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20

HYPERVISOR_VENDOR = b"PYMICRVM"


def build_fadt(dsdt_addr: int, *, i8042: bool) -> bytes:
    body = bytearray(FADT_SIZE - sdt.HEADER_SIZE)

    def put(fmt: str, off: int, value) -> None:
        struct.pack_into(fmt, body, off - sdt.HEADER_SIZE, value)

    def put_bytes(off: int, data: bytes) -> None:
        body[off - sdt.HEADER_SIZE : off - sdt.HEADER_SIZE + len(data)] = data

    put("<I", OFF_DSDT, dsdt_addr)
    put("<Q", OFF_X_DSDT, dsdt_addr)
    boot_arch = IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT
    if i8042:
        boot_arch |= IAPC_8042
    put("<H", OFF_IAPC_BOOT_ARCH, boot_arch)
    put("<I", OFF_FLAGS, FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON)
    put_bytes(OFF_RESET_REG, sdt.gas(sdt.GAS_SYSTEM_IO, layout.ACPI_RESET_PORT))
    put("<B", OFF_RESET_VALUE, layout.ACPI_RESET_VALUE)
    put("<B", OFF_MINOR_VERSION, FADT_MINOR_VERSION)
    put_bytes(OFF_SLEEP_CONTROL_REG, sdt.gas(sdt.GAS_SYSTEM_IO, layout.ACPI_SLEEP_CONTROL_PORT))
    put_bytes(OFF_SLEEP_STATUS_REG, sdt.gas(sdt.GAS_SYSTEM_IO, layout.ACPI_SLEEP_STATUS_PORT))
    put_bytes(OFF_HYPERVISOR_VENDOR, HYPERVISOR_VENDOR)
    return sdt.sdt(b"FACP", FADT_REVISION, bytes(body))
