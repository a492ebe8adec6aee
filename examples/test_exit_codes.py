"""Exit codes, panics and triple faults become test outcomes."""

import pytest

from pytest_microvm import ExitReason


@pytest.mark.parametrize("code", [0, 1, 7, 100])
def test_guest_exit_code(microvm_factory, code):
    vm = microvm_factory(kernel="tiny:exitcode", append=f"code={code}").start()
    status = vm.wait()
    assert status.reason is ExitReason.GUEST_EXIT
    assert vm.exit_code == code


@pytest.mark.microvm(kernel="tiny:hello")
def test_hello_boots_and_reports_boot_time(microvm):
    microvm.console.expect("Hello from tiny guest")
    assert microvm.wait().ok
    assert microvm.boot_time is not None and microvm.boot_time > 0
    assert microvm.metrics["boot_time_s"] == microvm.boot_time


@pytest.mark.microvm(kernel="tiny:panic", append="msg=disk_on_fire", timeout=20)
def test_a_panic_ends_the_vm_at_once(microvm):
    status = microvm.wait()
    assert status.reason is ExitReason.GUEST_PANIC
    assert "Kernel panic - not syncing: disk_on_fire" in status.detail


@pytest.mark.microvm(kernel="tiny:triple")
def test_a_triple_fault_is_reported_as_such(microvm):
    assert microvm.wait().reason is ExitReason.TRIPLE_FAULT
    assert "triple-faulting now" in microvm.serial_output
