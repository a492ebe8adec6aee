"""The debug-exit port reports the guest's value as written."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.bus import Bus
from vmm.devices import RecordingVmControl
from vmm.devices.debug_exit import DebugExit
from vmm.exitstatus import ExitReason, ExitStatus


@pytest.mark.parametrize(
    "size, value, code",
    [(1, 0, 0), (1, 1, 1), (1, 0xFF, 0xFF), (2, 0x1234, 0x1234), (4, 0xDEADBEEF, 0xDEADBEEF), (4, 3, 3)],
)
def test_write_ends_the_vm_with_the_value_as_written(size: int, value: int, code: int) -> None:
    ctl = RecordingVmControl()
    bus = Bus("pio")
    bus.register(layout.DEBUG_EXIT_PORT, DebugExit.SIZE, DebugExit(ctl), "debug-exit")
    bus.write(layout.DEBUG_EXIT_PORT, size, value)
    assert len(ctl.exits) == 1
    reason, got, detail = ctl.exits[0]
    assert reason is ExitReason.GUEST_EXIT
    assert got == code  # not QEMU's (V << 1) | 1
    assert f"{layout.DEBUG_EXIT_PORT:#x}" in detail


def test_code_is_masked_to_the_access_width() -> None:
    ctl = RecordingVmControl()
    dev = DebugExit(ctl)
    dev.write(0, 1, 0x1_42)
    dev.write(0, 2, 0xAB_CDEF)
    assert [c for _, c, _ in ctl.exits] == [0x42, 0xCDEF]
    assert dev.exits == 2 and dev.last_code == 0xCDEF


def test_process_exit_code_of_the_reported_status() -> None:
    ctl = RecordingVmControl()
    DebugExit(ctl).write(0, 4, 0x103)
    reason, code, detail = ctl.exits[0]
    status = ExitStatus(reason, code=code, detail=detail)
    assert status.process_exit_code == 3
    assert not status.ok


@pytest.mark.parametrize("size", [1, 2, 4])
def test_reads_return_zero_and_do_not_exit(size: int) -> None:
    ctl = RecordingVmControl()
    dev = DebugExit(ctl)
    assert dev.read(0, size) == 0
    assert ctl.exits == []


def test_zero_width_write_is_ignored() -> None:
    ctl = RecordingVmControl()
    DebugExit(ctl).write(0, 0, 5)
    assert ctl.exits == []


def test_metrics_count_exit_requests() -> None:
    dev = DebugExit(RecordingVmControl())
    dev.write(0, 1, 0)
    assert dev.metrics() == {"exits": 1}
