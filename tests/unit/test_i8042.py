"""The i8042's reset line, status register and two-port registration."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.bus import Bus
from vmm.devices import RecordingVmControl
from vmm.devices.i8042 import (
    I8042,
    I8042_CMD_RESET_CPU,
    I8042_STATUS_CMD,
    I8042_STATUS_IBF,
    I8042_STATUS_OBF,
    I8042_STATUS_SYS,
)
from vmm.exitstatus import ExitReason


@pytest.fixture
def ctl() -> RecordingVmControl:
    return RecordingVmControl()


@pytest.fixture
def bus(ctl: RecordingVmControl) -> tuple[Bus, I8042]:
    bus = Bus("pio")
    kbd = I8042(ctl)
    kbd.register(bus)
    return bus, kbd


def test_registers_the_data_and_command_ports_only(bus: tuple[Bus, I8042]) -> None:
    pio, _ = bus
    ranges = {(r.base, r.size, r.name) for r in pio.ranges()}
    assert ranges == {
        (layout.I8042_DATA_PORT, 1, "i8042-data"),
        (layout.I8042_COMMAND_PORT, 1, "i8042-command"),
    }
    assert pio.find(0x61) is None  # port B (PIT/speaker) stays free for its own device


def test_fe_on_the_command_port_requests_reboot(bus: tuple[Bus, I8042], ctl: RecordingVmControl) -> None:
    pio, kbd = bus
    pio.write(layout.I8042_COMMAND_PORT, 1, I8042_CMD_RESET_CPU)
    assert len(ctl.exits) == 1
    reason, code, detail = ctl.exits[0]
    assert reason is ExitReason.REBOOT and code is None
    assert "0xfe" in detail
    assert kbd.stats.resets == 1


def test_fe_on_the_data_port_does_nothing(bus: tuple[Bus, I8042], ctl: RecordingVmControl) -> None:
    pio, kbd = bus
    pio.write(layout.I8042_DATA_PORT, 1, I8042_CMD_RESET_CPU)
    assert ctl.exits == []
    assert kbd.stats.data_writes == 1


@pytest.mark.parametrize("command", [0xF0, 0xF2, 0xFA, 0xFC])
def test_any_pulse_command_with_bit_0_clear_resets(ctl: RecordingVmControl, command: int) -> None:
    kbd = I8042(ctl)
    kbd.command_port.write(0, 1, command)
    assert [e[0] for e in ctl.exits] == [ExitReason.REBOOT]


@pytest.mark.parametrize("command", [0xFF, 0xF1, 0xFD])
def test_pulse_commands_sparing_the_reset_line_do_not_reset(ctl: RecordingVmControl, command: int) -> None:
    kbd = I8042(ctl)
    kbd.command_port.write(0, 1, command)
    assert ctl.exits == []
    assert kbd.stats.unknown_commands == 0


@pytest.mark.parametrize("command", [0x20, 0x60, 0xAA, 0xAD, 0xD1, 0x00, 0xEF])
def test_unknown_commands_are_ignored_and_counted(ctl: RecordingVmControl, command: int) -> None:
    kbd = I8042(ctl)
    kbd.command_port.write(0, 1, command)
    kbd.command_port.write(0, 1, command)
    assert ctl.exits == []
    assert kbd.stats.unknown_commands == 2
    assert kbd.last_command == command
    assert kbd.data_port.read(0, 1) == 0  # no reply byte appears


def test_status_register_says_empty_buffers_and_self_test_passed(ctl: RecordingVmControl) -> None:
    kbd = I8042(ctl)
    status = kbd.command_port.read(0, 1)
    assert status & I8042_STATUS_SYS
    assert not status & (I8042_STATUS_OBF | I8042_STATUS_IBF)
    kbd.command_port.write(0, 1, 0xAA)
    assert kbd.command_port.read(0, 1) & I8042_STATUS_CMD  # last write was a command
    kbd.data_port.write(0, 1, 0x00)
    assert not kbd.command_port.read(0, 1) & I8042_STATUS_CMD
    assert kbd.status == kbd.command_port.read(0, 1)


def test_reboot_loop_of_a_guest_polling_ibf(ctl: RecordingVmControl) -> None:
    # Linux's keyboard reboot: wait for IBF clear, write 0xFE, ten times over.
    kbd = I8042(ctl)
    for _ in range(10):
        for _ in range(3):
            assert not kbd.command_port.read(0, 1) & I8042_STATUS_IBF
        kbd.command_port.write(0, 1, I8042_CMD_RESET_CPU)
    assert len(ctl.exits) == 10  # the machine keeps the first; the device asks every time


def test_data_port_reads_zero(bus: tuple[Bus, I8042]) -> None:
    pio, _ = bus
    assert pio.read(layout.I8042_DATA_PORT, 1) == 0


def test_wide_accesses_use_the_low_byte_only(bus: tuple[Bus, I8042], ctl: RecordingVmControl) -> None:
    pio, kbd = bus
    # A 2-byte read: the port, then an undecoded byte.
    assert pio.read(layout.I8042_COMMAND_PORT, 2) == 0xFF00 | kbd.status
    pio.write(layout.I8042_COMMAND_PORT, 4, 0x12345600 | I8042_CMD_RESET_CPU)
    assert [e[0] for e in ctl.exits] == [ExitReason.REBOOT]
    pio.write(layout.I8042_COMMAND_PORT, 2, I8042_CMD_RESET_CPU << 8)  # 0xFE lands off the port
    assert len(ctl.exits) == 1
    assert kbd.stats.ignored_accesses == 3 + 1 + 1
    assert kbd.stats.unknown_commands == 1  # the 0x00 low byte


@pytest.mark.parametrize("size", [0, 9, -4])
def test_bad_widths_are_ignored(ctl: RecordingVmControl, size: int) -> None:
    kbd = I8042(ctl)
    assert kbd.command_port.read(0, size) == 0
    kbd.command_port.write(0, size, I8042_CMD_RESET_CPU)
    assert ctl.exits == []
    assert kbd.stats.ignored_accesses == 2


def test_metrics(ctl: RecordingVmControl) -> None:
    kbd = I8042(ctl)
    kbd.command_port.write(0, 1, 0x20)
    kbd.command_port.write(0, 1, I8042_CMD_RESET_CPU)
    assert kbd.metrics() == {"resets": 1, "unknown_commands": 1, "data_writes": 0, "ignored_accesses": 0}
