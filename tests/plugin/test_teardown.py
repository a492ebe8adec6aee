"""No VM outlives its test: failing tests, KeyboardInterrupt, and a crashed xdist worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("vcpu", "qemu-", "microvm-"))]


START_VMS = """
import os, pytest

def start_vms(factory, pidfile):
    kvm = factory(kernel="tiny:echo", name="inproc", timeout=120).start()
    qemu = factory(kernel="tiny:echo", name="qemu", backend="qemu", timeout=120).start()
    kvm.console.expect("echo: ready")
    qemu.console.expect("echo: ready")
    with open(pidfile, "w") as f:
        f.write(str(qemu.backend.pid))
    return kvm, qemu
"""


def test_failing_test_leaves_no_vm_behind(pytester):
    pidfile = pytester.path / "qemu.pid"
    pytester.makepyfile(
        START_VMS
        + f"""
def test_fails(microvm_factory):
    start_vms(microvm_factory, {str(pidfile)!r})
    assert False, "the test failed with two VMs running"
"""
    )
    pytester.inline_run().assertoutcome(failed=1)
    pid = int(pidfile.read_text())
    assert not alive(pid)
    assert vcpu_threads() == []


def test_keyboard_interrupt_leaves_no_vm_behind(pytester):
    pidfile = pytester.path / "qemu.pid"
    report = pytester.path / "at_exit.txt"
    pytester.makeconftest(
        f"""
import os, threading

def pytest_unconfigure(config):
    threads = [t.name for t in threading.enumerate() if t.name.startswith(("vcpu", "qemu-"))]
    pid = int(open({str(pidfile)!r}).read())
    try:
        os.kill(pid, 0)
        state = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    open({str(report)!r}, "w").write(f"{{threads}} {{state}}")
"""
    )
    pytester.makepyfile(
        START_VMS
        + f"""
def test_interrupted(microvm_factory):
    start_vms(microvm_factory, {str(pidfile)!r})
    raise KeyboardInterrupt
"""
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    threads, state = report.read_text().rsplit(" ", 1)
    assert threads == "[]"  # every vCPU and QEMU helper thread joined before pytest exits
    assert state in ("gone", "Z")  # killed (and normally reaped) during pytest's own teardown
    assert not alive(int(pidfile.read_text()))


def test_crashed_xdist_worker_takes_its_qemu_with_it(pytester):
    pidfile = pytester.path / "qemu.pid"
    pytester.makepyfile(
        START_VMS
        + f"""
import signal

def test_worker_dies(microvm_factory):
    start_vms(microvm_factory, {str(pidfile)!r})
    os.kill(os.getpid(), signal.SIGKILL)  # no teardown runs: only PR_SET_PDEATHSIG can end QEMU
"""
    )
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "1", "--max-worker-restart=0")
    result.stdout.fnmatch_lines(["*worker 'gw0' crashed while running*test_worker_dies*"])
    pid = int(pidfile.read_text())
    assert wait_dead(pid), f"QEMU {pid} outlived its pytest-xdist worker"


def test_factory_teardown_kills_every_vm_even_if_one_close_fails(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def vms(microvm_factory):
            vms = [microvm_factory(kernel="tiny:echo").start() for _ in range(3)]
            yield vms

        def test_x(vms):
            for vm in vms:
                vm.console.expect("ready")
            vms[0].close()  # closing early is fine; teardown closes the rest
            assert vms[0].exit_status.reason.value == "killed"
            assert vms[1].running and vms[2].running
        """
    )
    pytester.inline_run().assertoutcome(passed=1)
    assert vcpu_threads() == []
