"""The MicroVM interface, the same on both backends (these tests use the plugin's own fixtures)."""

from __future__ import annotations

import pexpect
import pytest

from pytest_microvm import ExitReason, MicroVMError, WaitTimeout

BACKENDS = pytest.mark.parametrize("backend", ["kvm", "qemu"])


@BACKENDS
def test_factory_makes_configured_unstarted_vms(microvm_factory, backend):
    vm = microvm_factory(kernel="tiny:echo", backend=backend, mem_mib=64)
    assert not vm.started and vm.exit_status is None and vm.serial_output == ""
    with pytest.raises(MicroVMError, match="console needs a started VM"):
        _ = vm.console
    vm.start()
    with pytest.raises(MicroVMError, match="already started"):
        vm.start()
    vm.console.expect("echo: ready")
    assert vm.running and vm.exit_code is None


@BACKENDS
def test_wait_timeout_kill_and_metrics(microvm_factory, backend):
    vm = microvm_factory(kernel="tiny:echo", backend=backend).start()
    vm.console.expect("echo: ready")
    with pytest.raises(WaitTimeout, match="still running after 0.1 s"):
        vm.wait(timeout=0.1)
    status = vm.kill()
    assert status.reason is ExitReason.KILLED and vm.exit_code is None
    assert vm.console.expect([pexpect.EOF]) == 0
    m = vm.metrics
    assert m["backend"] == backend
    assert m["exits"].get("io", 0) > 0
    assert m["console_bytes"] == len(vm.serial_output.encode())
    assert m["peak_rss_kib"] > 0 and m["run_time_s"] > 0
    with pytest.raises(MicroVMError, match="cannot type on the console: the VM ended"):
        vm.console.sendline("too late")


@BACKENDS
def test_guest_exit_code_and_output(microvm_factory, backend):
    vm = microvm_factory(kernel="tiny:exitcode", append="code=77", backend=backend).start()
    status = vm.wait()
    assert (status.reason, status.code, vm.exit_code) == (ExitReason.GUEST_EXIT, 77, 77)
    assert "exitcode: exiting with code 77" in vm.serial_output


def test_names_are_unique_per_test(microvm_factory):
    microvm_factory(name="a")
    with pytest.raises(MicroVMError, match="a VM named 'a' already exists"):
        microvm_factory(name="a")
    assert microvm_factory().name == "vm0"


def test_output_listener_gets_every_byte_even_when_added_late(microvm_factory):
    vm = microvm_factory(kernel="tiny:hello").start()
    vm.wait()
    chunks = []
    vm.add_output_listener(chunks.append)
    assert b"".join(chunks).decode() == vm.serial_output


def test_microvm_fixture_is_started(microvm):
    assert microvm.started
    assert microvm.wait().ok
    assert repr(microvm).startswith("<MicroVM vm0 tiny:hello on kvm: guest-exit")


def test_console_sendcontrol_and_bytes_mode(microvm_factory):
    vm = microvm_factory(kernel="tiny:echo").start()
    c = vm.console
    c.expect_exact("ready")
    c.send("abc")
    c.sendcontrol("m")  # carriage return ends the line
    c.expect_exact("echo: abc")
    assert isinstance(c.before, str)


def test_workdir_is_per_vm(microvm_factory, tmp_path_factory):
    a, b = microvm_factory(), microvm_factory()
    assert a.workdir != b.workdir and a.workdir.is_dir()
    assert str(tmp_path_factory.getbasetemp()) in str(a.workdir)
