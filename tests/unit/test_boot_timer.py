"""Firecracker's boot-timer port."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.bus import Bus
from vmm.devices import RecordingVmControl
from vmm.devices.boot_timer import BootTimer


@pytest.fixture
def setup() -> tuple[Bus, BootTimer, RecordingVmControl]:
    ctl = RecordingVmControl()
    dev = BootTimer(ctl)
    bus = Bus("pio")
    bus.register(layout.BOOT_TIMER_PORT, BootTimer.SIZE, dev, "boot-timer")
    return bus, dev, ctl


def test_magic_write_notes_the_boot_time(setup: tuple[Bus, BootTimer, RecordingVmControl]) -> None:
    bus, dev, ctl = setup
    bus.write(layout.BOOT_TIMER_PORT, 1, layout.BOOT_TIMER_MAGIC)
    assert ctl.boot_times == 1
    assert dev.signals == 1
    assert ctl.exits == []


@pytest.mark.parametrize("value", [0, 122, 124, 0xFF, 123 << 8])
def test_other_values_are_ignored_and_counted(
    setup: tuple[Bus, BootTimer, RecordingVmControl], value: int
) -> None:
    bus, dev, ctl = setup
    bus.write(layout.BOOT_TIMER_PORT, 2, value)
    assert ctl.boot_times == 0
    assert dev.ignored_writes == 1


def test_the_value_is_compared_as_written_at_any_width(
    setup: tuple[Bus, BootTimer, RecordingVmControl],
) -> None:
    bus, _, ctl = setup
    bus.write(layout.BOOT_TIMER_PORT, 2, layout.BOOT_TIMER_MAGIC)
    bus.write(layout.BOOT_TIMER_PORT, 4, layout.BOOT_TIMER_MAGIC)
    assert ctl.boot_times == 2


def test_each_signal_is_passed_on(setup: tuple[Bus, BootTimer, RecordingVmControl]) -> None:
    bus, dev, ctl = setup
    for _ in range(3):
        bus.write(layout.BOOT_TIMER_PORT, 1, layout.BOOT_TIMER_MAGIC)
    assert ctl.boot_times == 3 and dev.signals == 3


def test_reads_return_zero(setup: tuple[Bus, BootTimer, RecordingVmControl]) -> None:
    bus, _, ctl = setup
    assert bus.read(layout.BOOT_TIMER_PORT, 1) == 0
    assert ctl.boot_times == 0


def test_write_off_the_port_or_without_width_is_ignored() -> None:
    ctl = RecordingVmControl()
    dev = BootTimer(ctl)
    dev.write(1, 1, layout.BOOT_TIMER_MAGIC)
    dev.write(0, 0, layout.BOOT_TIMER_MAGIC)
    assert ctl.boot_times == 0 and dev.ignored_writes == 2


def test_metrics() -> None:
    dev = BootTimer(RecordingVmControl())
    dev.write(0, 1, layout.BOOT_TIMER_MAGIC)
    dev.write(0, 1, 7)
    assert dev.metrics() == {"signals": 1, "ignored_writes": 1}
