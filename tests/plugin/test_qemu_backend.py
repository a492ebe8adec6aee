"""QEMU backend pieces that need no QEMU: exit decoding, CPU and binary selection."""

from __future__ import annotations

import pytest

from pytest_microvm.backends import qemu
from pytest_microvm.errors import BackendNotInstalled
from vmm.exitstatus import ExitReason

QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize("code", [0, 1, 42, 127])
def test_debug_exit_codes_are_decoded(code):
    st = qemu.decode_exit((code << 1) | 1, "", 2, QEMU)
    assert (st.reason, st.code) == (ExitReason.GUEST_EXIT, code)


def test_exit_zero_is_a_triple_fault_only_after_kvm_exit_shutdown():
    assert qemu.decode_exit(0, "", qemu.KVM_EXIT_SHUTDOWN, QEMU).reason is ExitReason.TRIPLE_FAULT
    assert qemu.decode_exit(0, "", 2, QEMU).reason is ExitReason.POWEROFF


def test_qemu_errors_are_vmm_errors_not_guest_codes():
    st = qemu.decode_exit(1, "qemu-system-x86_64: -kernel x: could not load kernel\n", None, QEMU)
    assert st.reason is ExitReason.VMM_ERROR and "could not load kernel" in st.detail
    st = qemu.decode_exit(1, "qemu-system-x86_64: warning: host doesn't support requested feature\n", 2, QEMU)
    assert (st.reason, st.code) == (ExitReason.GUEST_EXIT, 0)
    st = qemu.decode_exit(-6, "boom\n", None, QEMU)
    assert st.reason is ExitReason.VMM_ERROR and "SIGABRT" in st.detail


def test_missing_binary_is_named():
    with pytest.raises(BackendNotInstalled, match="qemu-system-nope is not installed"):
        qemu.find_binary("qemu-system-nope")


def test_explicit_cpu_is_used_as_given():
    assert qemu.resolve_cpu(QEMU, "Skylake-Client,-hle") == "Skylake-Client,-hle"


def test_a_qemu_failure_is_reported_with_its_message(microvm_factory):
    vm = microvm_factory(kernel="tiny:hello", backend="qemu")
    vm.spec = vm.spec.replace(qemu=vm.spec.qemu.__class__(extra_args=("-no-such-option",)))
    st = vm.start().wait()
    assert st.reason is ExitReason.VMM_ERROR
    assert "-no-such-option" in st.detail
