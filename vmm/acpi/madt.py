"""The MADT: one Local APIC per vCPU, the IOAPIC, and PC interrupt overrides.

ACPI 6.4 §5.2.12.  APIC IDs equal vCPU indices (KVM's default).  IDs below
255 get a Processor Local APIC entry; 255 and above need Processor Local
x2APIC entries (§5.2.12.12), since 0xFF is the xAPIC broadcast ID.
"""

from __future__ import annotations

import struct

from .. import layout
from ..errors import ConfigError
from . import sdt

MADT_REVISION = 5
#: Flags: the system also has dual 8259s (KVM's in-kernel irqchip does).
PCAT_COMPAT = 1 << 0

# Interrupt controller structure types (Table 5.21).
TYPE_LOCAL_APIC = 0
TYPE_IO_APIC = 1
TYPE_INTERRUPT_SOURCE_OVERRIDE = 2
TYPE_LOCAL_APIC_NMI = 4
TYPE_LOCAL_X2APIC = 9
TYPE_LOCAL_X2APIC_NMI = 0xA

LAPIC_ENABLED = 1 << 0
#: MPS INTI flags: 0 = conforms to the bus (ISA: edge, active high).
MPS_INTI_CONFORMS = 0
#: All processors (Local APIC NMI's ACPI Processor UID).
ALL_PROCESSORS_UID = 0xFF
ALL_PROCESSORS_UID_X2 = 0xFFFFFFFF
#: LINT1 carries NMI on PCs.
NMI_LINT = 1
MAX_XAPIC_ID = 254

#: ISA IRQ -> GSI where they differ: the PIT's IRQ0 is wired to IOAPIC pin 2.
ISA_OVERRIDES = ((0, 2),)

IOAPIC_ID = 0


def build_madt(vcpus: int) -> bytes:
    if vcpus < 1:
        raise ConfigError(f"--vcpus: {vcpus} is not a vCPU count (a MADT lists at least one)")
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, PCAT_COMPAT))
    for cpu in range(vcpus):
        if cpu <= MAX_XAPIC_ID:
            body += struct.pack("<BBBBI", TYPE_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
        else:
            body += struct.pack("<BBHIII", TYPE_LOCAL_X2APIC, 16, 0, cpu, LAPIC_ENABLED, cpu)
    body += struct.pack("<BBBBII", TYPE_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_ADDR, 0)
    for irq, gsi in ISA_OVERRIDES:
        body += struct.pack("<BBBBIH", TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq, gsi, MPS_INTI_CONFORMS)
    body += struct.pack("<BBBHB", TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID, MPS_INTI_CONFORMS, NMI_LINT)
    if vcpus > MAX_XAPIC_ID + 1:
        body += struct.pack(
            "<BBHIB3s", TYPE_LOCAL_X2APIC_NMI, 12, MPS_INTI_CONFORMS, ALL_PROCESSORS_UID_X2, NMI_LINT, b"\0\0\0"
        )
    return sdt.sdt(b"APIC", MADT_REVISION, bytes(body))
