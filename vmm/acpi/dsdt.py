"""The DSDT: the devices a hardware-reduced guest cannot discover by itself.

``Dsdt`` collects AML terms; ``build_dsdt`` fills one with what every machine
has (the UARTs, the i8042, the virtio-mmio devices, the \\_S5_ soft-off
package).  Others add their own devices with ``Dsdt.add_device`` (or through
``BootRequest.acpi_devices``) before ``encode()``.

ACPI 6.4 §5.2.11.1 (DSDT), §6.1.5 (_HID), §6.1.12 (_UID), §6.2.2 (_CRS),
§7.4.2 (\\_Sx system states).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import layout
from . import aml, sdt

#: Revision 2: integers are 64 bits wide (§5.2.11.1).
DSDT_REVISION = 2
SYSTEM_BUS = "\\_SB_"

#: _HID values.
HID_UART_16550 = "PNP0501"
HID_PS2_KEYBOARD = "PNP0303"
HID_VIRTIO_MMIO = "LNRO0005"

UART_PORT_COUNT = 8
I8042_IRQ = 1
#: _STA: present, enabled, shown in UI, functioning (§6.3.7).
STA_PRESENT_ENABLED = 0x0F


class Dsdt:
    """An extensible DSDT: terms at the root and devices under \\_SB_."""

    def __init__(self) -> None:
        self.root: list = []
        self.system_bus: list = []

    def add(self, term: aml.AmlObject) -> None:
        """Add a term at the namespace root (e.g. Name("_S5_", ...))."""
        self.root.append(term)

    def add_device(self, device: aml.AmlObject) -> None:
        """Add a device (or any term) under \\_SB_."""
        self.system_bus.append(device)

    def device_names(self) -> list[str]:
        return [d.name for d in self.system_bus if isinstance(d, aml.Device)]

    def terms(self) -> list:
        return [*self.root, aml.Scope(SYSTEM_BUS, list(self.system_bus))]

    def encode(self) -> bytes:
        names = self.device_names()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"DSDT: device name(s) {', '.join(dupes)} used twice under \\_SB_")
        return sdt.sdt(b"DSDT", DSDT_REVISION, b"".join(t.encode() for t in self.terms()))


def uart_device(index: int, port: int, irq: int) -> aml.Device:
    """A 16550 UART: COM1 is IO 0x3F8/8 with IRQ 4."""
    return aml.Device(
        f"COM{index + 1}",
        [
            aml.Name("_HID", aml.EisaId(HID_UART_16550)),
            aml.Name("_UID", index),
            aml.Method.returning("_STA", STA_PRESENT_ENABLED),
            aml.Name(
                "_CRS",
                aml.ResourceTemplate([aml.Io(port, port, 1, UART_PORT_COUNT), aml.Interrupt((irq,))]),
            ),
        ],
    )


def i8042_device() -> aml.Device:
    """The i8042 keyboard controller (data 0x60, command/status 0x64, IRQ 1)."""
    return aml.Device(
        "PS2K",
        [
            aml.Name("_HID", aml.EisaId(HID_PS2_KEYBOARD)),
            aml.Method.returning("_STA", STA_PRESENT_ENABLED),
            aml.Name(
                "_CRS",
                aml.ResourceTemplate(
                    [
                        aml.Io(layout.I8042_DATA_PORT, layout.I8042_DATA_PORT, 1, 1),
                        aml.Io(layout.I8042_COMMAND_PORT, layout.I8042_COMMAND_PORT, 1, 1),
                        aml.Interrupt((I8042_IRQ,)),
                    ]
                ),
            ),
        ],
    )


def mmio_device(index: int, base: int, size: int, gsi: int, hid: str = HID_VIRTIO_MMIO, name: str = "") -> aml.Device:
    """A memory-mapped device such as virtio-mmio (Linux binds LNRO0005 to virtio_mmio)."""
    return aml.Device(
        name or f"VR{index:02X}",
        [
            aml.Name("_HID", aml.hardware_id(hid)),
            aml.Name("_UID", index),
            aml.Name("_CRS", aml.ResourceTemplate([aml.Memory32Fixed(base, size), aml.Interrupt((gsi,))])),
        ],
    )


def s5_package() -> aml.Name:
    """\\_S5_: {SLP_TYPa, SLP_TYPb, reserved, reserved}; HW-reduced uses SLP_TYPa."""
    return aml.Name("_S5_", aml.Package([layout.ACPI_S5_SLP_TYP, 0, 0, 0]))


def build_dsdt(
    *,
    serial_ports: Sequence[tuple[int, int]],
    mmio_devices: Iterable,
    i8042: bool,
    extra_devices: Iterable[aml.AmlObject] = (),
) -> Dsdt:
    """The machine's DSDT: ``serial_ports`` are (port, irq), ``mmio_devices`` MmioDeviceInfo."""
    dsdt = Dsdt()
    dsdt.add(s5_package())
    for i, (port, irq) in enumerate(serial_ports):
        dsdt.add_device(uart_device(i, port, irq))
    if i8042:
        dsdt.add_device(i8042_device())
    for i, dev in enumerate(mmio_devices):
        dsdt.add_device(mmio_device(i, dev.base, dev.size, dev.gsi, dev.hid, dev.name))
    for extra in extra_devices:
        dsdt.add_device(extra)
    return dsdt
