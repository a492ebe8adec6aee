"""The PC port-I/O devices on one bus, as a guest reaches them: every port, width and value.

COM1 (16550), the i8042 (data 0x60, command 0x64), debug-exit, the boot
timer and the ACPI sleep/reset registers sit on a port-I/O ``Bus`` at their
``vmm.layout`` ports; rules do ``in``/``out`` of widths 1, 2, 4 and 8 (and
widths no CPU makes) at and around each device, including the ports between
them.  The oracle is a small model per device: what each read returns, which
VM-ending requests (reboot, power-off, guest exit) and boot-time notes the
devices make, in order; the UART part is ``UartModel``.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from vmm import layout
from vmm.bus import Bus
from vmm.devices import RecordingVmControl
from vmm.devices.acpi_pm import AcpiPm
from vmm.devices.boot_timer import BootTimer
from vmm.devices.debug_exit import DebugExit
from vmm.devices.i8042 import I8042
from vmm.devices.serial import Serial
from vmm.exitstatus import ExitReason
from vmm.irq import RecordingIrqLine

from ..models.uart import UartModel
from ..oracles import violation
from ..strategies import access_sizes, interesting_ints
from .base import FuzzMachine

#: (base, span) of each device range; ports are drawn around them.
DEVICES = {
    "serial": (layout.COM1_PORT, 8),
    "i8042-data": (layout.I8042_DATA_PORT, 1),
    "i8042-command": (layout.I8042_COMMAND_PORT, 1),
    "debug-exit": (layout.DEBUG_EXIT_PORT, DebugExit.SIZE),
    "boot-timer": (layout.BOOT_TIMER_PORT, BootTimer.SIZE),
    "acpi-pm": (AcpiPm.BASE, AcpiPm.SIZE),
}


@st.composite
def legacy_ports(draw: st.DrawFn) -> int:
    base, span = DEVICES[draw(st.sampled_from(sorted(DEVICES)))]
    return base + draw(st.integers(-2, span + 1))


def legacy_values() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0xFE, 0xF0, 0xFF, 0xAA, 0x01, 123, 0x34, 0x14, 0x20, 0x80, 0x03, 0x10, 0x0F]),
        interesting_ints(64),
    )


class LegacyModel:
    """i8042, debug-exit, boot-timer and ACPI power ports as a guest sees them."""

    def __init__(self) -> None:
        self.exits: list[tuple[ExitReason, int | None]] = []
        self.boot_notes = 0
        self.last_write_was_command = False

    def read_byte(self, dev: str, off: int) -> int:
        if dev in ("i8042-data", "i8042-command"):
            if off != 0:
                return 0xFF
            return (0x04 | (0x08 if self.last_write_was_command else 0)) if dev == "i8042-command" else 0
        if dev == "acpi-pm":
            return (
                0
                if off in range(AcpiPm.SIZE)
                and AcpiPm.BASE + off
                in (layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT)
                else 0xFF
            )
        return 0

    def read(self, dev: str, off: int, size: int) -> int:
        if dev in ("debug-exit", "boot-timer"):
            return 0
        if not 1 <= size <= 8:
            return 0
        return sum(self.read_byte(dev, off + i) << (8 * i) for i in range(size))

    def write(self, dev: str, off: int, size: int, value: int) -> None:
        if dev == "debug-exit":
            if size >= 1:
                self.exits.append((ExitReason.GUEST_EXIT, value & ((1 << (8 * size)) - 1)))
            return
        if dev == "boot-timer":
            if off == 0 and size >= 1 and value & ((1 << (8 * size)) - 1) == layout.BOOT_TIMER_MAGIC:
                self.boot_notes += 1
            return
        if not 1 <= size <= 8:
            return
        for i in range(size):
            self.write_byte(dev, off + i, value >> (8 * i) & 0xFF)

    def write_byte(self, dev: str, off: int, v: int) -> None:
        if dev in ("i8042-data", "i8042-command"):
            if off != 0:
                return
            self.last_write_was_command = dev == "i8042-command"
            if dev == "i8042-command" and v >= 0xF0 and not v & 1:
                self.exits.append((ExitReason.REBOOT, None))
        elif dev == "acpi-pm":
            port = AcpiPm.BASE + off
            if port == layout.ACPI_SLEEP_CONTROL_PORT and v & 0x20 and (v >> 2) & 7 == layout.ACPI_S5_SLP_TYP:
                self.exits.append((ExitReason.POWEROFF, None))
            elif port == layout.ACPI_RESET_PORT and v == layout.ACPI_RESET_VALUE:
                self.exits.append((ExitReason.REBOOT, None))


class LegacyPortsMachine(FuzzMachine):
    target = "legacy-ports"

    def __init__(self) -> None:
        super().__init__()
        self.control = RecordingVmControl()
        self.bus = Bus("port-I/O")
        self.irq = RecordingIrqLine(layout.COM1_IRQ)
        self.sent = bytearray()
        self.serial = Serial(self.irq, self.sent.extend)
        self.bus.register(layout.COM1_PORT, Serial.SIZE, self.serial, "serial0")
        I8042(self.control).register(self.bus)
        self.bus.register(layout.DEBUG_EXIT_PORT, DebugExit.SIZE, DebugExit(self.control), "debug-exit")
        self.bus.register(layout.BOOT_TIMER_PORT, BootTimer.SIZE, BootTimer(self.control), "boot-timer")
        self.bus.register(AcpiPm.BASE, AcpiPm.SIZE, AcpiPm(self.control), "acpi-pm")
        self.uart = UartModel()
        self.model = LegacyModel()

    def _owner(self, port: int) -> tuple[str, int] | None:
        for name, (base, span) in DEVICES.items():
            if base <= port < base + span:
                return name, port - base
        return None

    @rule(port=legacy_ports(), size=access_sizes(), value=legacy_values(), write=st.booleans())
    def port_io(self, port: int, size: int, value: int, write: bool) -> None:
        owner = self._owner(port)
        mask = (1 << (8 * size)) - 1
        if write:
            with self.step(f"out({port:#x}, {size}, {value & mask:#x})"):
                self.bus.write(port, size, value & mask)
            if owner is None:
                return
            name, off = owner
            if name == "serial":
                self.uart.write(off, size, value & mask)
            else:
                self.model.write(name, off, size, value & mask)
            return
        with self.step(f"in({port:#x}, {size})"):
            got = self.bus.read(port, size)
        if owner is None:
            want = mask
        elif owner[0] == "serial":
            want = self.uart.read(owner[1], size) & mask
        else:
            want = self.model.read(owner[0], owner[1], size) & mask
        if got != want:
            raise violation("port-io-matches-model", f"in({port:#x}, {size}) = {got:#x}, model {want:#x}")

    @rule(data=st.binary(max_size=24))
    def serial_input(self, data: bytes) -> None:
        with self.step("serial feed", allowance=len(data)):
            self.serial.feed(data)
        self.uart.feed(data)

    @invariant()
    def requests_match(self) -> None:
        got = [(r, c) for r, c, _ in self.control.exits]
        if got != self.model.exits:
            raise violation("port-io-matches-model", f"VM requests {got[-4:]} != model {self.model.exits[-4:]}")
        if self.control.boot_times != self.model.boot_notes:
            raise violation(
                "port-io-matches-model", f"boot-time notes {self.control.boot_times} != {self.model.boot_notes}"
            )
        if bytes(self.sent) != bytes(self.uart.output) or self.irq.level != self.uart.irq:
            raise violation("uart-matches-model", "serial output or IRQ level differs from the model")
