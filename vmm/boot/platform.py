"""What every Linux-style loader writes below 1 MiB before the kernel itself.

The boot GDTs and the empty IDT (the entry states point at them), the e820
map every protocol hands over in its own format, and the ACPI tables.  A
loader calls ``prepare_platform`` once and uses what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import layout
from ..cpustate import write_boot_gdt
from .e820 import E820Entry, build_memory_map, low_ram_end
from .types import BootRequest


@dataclass
class Platform:
    e820: list[E820Entry]
    #: Guest-physical address of the ACPI RSDP, 0 when the machine has no ACPI tables.
    rsdp_addr: int
    #: One past the end of the RAM region that starts at 0 (below the MMIO hole).
    low_ram_end: int


def serial_ports(request: BootRequest) -> list[tuple[int, int]]:
    """(port, irq) of each UART; a request that names none gets COM1, which every machine has."""
    if request.serial_ports:
        return [(p.port, p.irq) for p in request.serial_ports]
    return [(layout.COM1_PORT, layout.COM1_IRQ)]


def prepare_platform(request: BootRequest) -> Platform:
    memory = request.memory
    e820 = build_memory_map(memory.ranges())
    write_boot_gdt(memory)
    rsdp = 0
    if request.acpi:
        from ..acpi import write_acpi_tables

        tables = write_acpi_tables(
            memory,
            vcpus=request.vcpus,
            serial_ports=serial_ports(request),
            mmio_devices=request.mmio_devices,
            i8042=request.i8042,
            extra_devices=request.acpi_devices,
        )
        rsdp = tables.rsdp_addr
    return Platform(e820=e820, rsdp_addr=rsdp, low_ram_end=low_ram_end(memory.ranges()))
