"""Hardware-reduced ACPI sleep control/status and reset registers."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.bus import Bus
from vmm.devices import RecordingVmControl
from vmm.devices.acpi_pm import (
    SLEEP_CONTROL_SLP_EN,
    SLEEP_CONTROL_SLP_TYP_SHIFT,
    SLEEP_STATUS_WAK_STS,
    AcpiPm,
)
from vmm.exitstatus import ExitReason


@pytest.fixture
def setup() -> tuple[Bus, AcpiPm, RecordingVmControl]:
    ctl = RecordingVmControl()
    dev = AcpiPm(ctl)
    bus = Bus("pio")
    bus.register(AcpiPm.BASE, AcpiPm.SIZE, dev, "acpi-pm")
    return bus, dev, ctl


def sleep_value(slp_typ: int, enable: bool = True) -> int:
    return (slp_typ << SLEEP_CONTROL_SLP_TYP_SHIFT) | (SLEEP_CONTROL_SLP_EN if enable else 0)


def test_the_range_covers_exactly_the_three_layout_ports(
    setup: tuple[Bus, AcpiPm, RecordingVmControl],
) -> None:
    bus, dev, _ = setup
    for port in (layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT):
        r = bus.find(port)
        assert r is not None and r.device is dev
    assert AcpiPm.SIZE == 3


def test_slp_en_with_s5_powers_off(setup: tuple[Bus, AcpiPm, RecordingVmControl]) -> None:
    bus, dev, ctl = setup
    # What Linux's acpi_hw_extended_sleep() does: clear WAK_STS, then SLP_TYP|SLP_EN.
    bus.write(layout.ACPI_SLEEP_STATUS_PORT, 1, SLEEP_STATUS_WAK_STS)
    assert ctl.exits == []
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(layout.ACPI_S5_SLP_TYP))
    assert [(r, c) for r, c, _ in ctl.exits] == [(ExitReason.POWEROFF, None)]
    assert "SLP_TYP 5" in ctl.exits[0][2]
    assert dev.stats.poweroffs == 1


def test_s5_type_without_slp_en_does_nothing(setup: tuple[Bus, AcpiPm, RecordingVmControl]) -> None:
    bus, dev, ctl = setup
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(layout.ACPI_S5_SLP_TYP, enable=False))
    assert ctl.exits == []
    assert dev.last_slp_typ == layout.ACPI_S5_SLP_TYP


@pytest.mark.parametrize("slp_typ", [t for t in range(8) if t != layout.ACPI_S5_SLP_TYP])
def test_other_sleep_types_are_ignored_and_counted(
    setup: tuple[Bus, AcpiPm, RecordingVmControl], slp_typ: int
) -> None:
    bus, dev, ctl = setup
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(slp_typ))
    assert ctl.exits == []
    assert dev.stats.unsupported_sleeps == 1


def test_reserved_bits_do_not_hide_s5(setup: tuple[Bus, AcpiPm, RecordingVmControl]) -> None:
    bus, _, ctl = setup
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(layout.ACPI_S5_SLP_TYP) | 0xC3)
    assert [r for r, _, _ in ctl.exits] == [ExitReason.POWEROFF]


def test_reset_value_on_the_reset_register_reboots(setup: tuple[Bus, AcpiPm, RecordingVmControl]) -> None:
    bus, dev, ctl = setup
    bus.write(layout.ACPI_RESET_PORT, 1, layout.ACPI_RESET_VALUE)
    assert [(r, c) for r, c, _ in ctl.exits] == [(ExitReason.REBOOT, None)]
    assert dev.stats.resets == 1


@pytest.mark.parametrize("value", [v for v in (0x00, 0x02, 0x06, 0x0E, 0xFF) if v != layout.ACPI_RESET_VALUE])
def test_other_reset_values_are_ignored_and_counted(
    setup: tuple[Bus, AcpiPm, RecordingVmControl], value: int
) -> None:
    bus, dev, ctl = setup
    bus.write(layout.ACPI_RESET_PORT, 1, value)
    assert ctl.exits == []
    assert dev.stats.ignored_resets == 1


def test_registers_read_zero(setup: tuple[Bus, AcpiPm, RecordingVmControl]) -> None:
    bus, _, ctl = setup
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(3, enable=False))
    for port in (layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT):
        assert bus.read(port, 1) == 0
    assert ctl.exits == []


def test_wide_accesses_are_byte_cycles(setup: tuple[Bus, AcpiPm, RecordingVmControl]) -> None:
    bus, dev, ctl = setup
    # Offsets 0..2 decode; the fourth byte of a 4-byte read does not.
    assert bus.read(AcpiPm.BASE, 4) == 0xFF00_0000
    control = layout.ACPI_SLEEP_CONTROL_PORT - AcpiPm.BASE
    reset = layout.ACPI_RESET_PORT - AcpiPm.BASE
    value = (layout.ACPI_RESET_VALUE << (8 * reset)) | (sleep_value(1) << (8 * control))
    dev.write(0, 4, value)
    assert [r for r, _, _ in ctl.exits] == [ExitReason.REBOOT]
    assert dev.stats.unsupported_sleeps == 1
    assert dev.stats.ignored_accesses == 2


@pytest.mark.parametrize("size", [0, 9])
def test_bad_widths_are_ignored(size: int) -> None:
    ctl = RecordingVmControl()
    dev = AcpiPm(ctl)
    assert dev.read(0, size) == 0
    dev.write(layout.ACPI_RESET_PORT - AcpiPm.BASE, size, layout.ACPI_RESET_VALUE)
    assert ctl.exits == []
    assert dev.stats.ignored_accesses == 2


def test_metrics() -> None:
    dev = AcpiPm(RecordingVmControl())
    dev.write(layout.ACPI_RESET_PORT - AcpiPm.BASE, 1, layout.ACPI_RESET_VALUE)
    assert dev.metrics()["resets"] == 1
