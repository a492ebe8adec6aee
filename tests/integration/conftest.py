"""Integration tests boot real VMs on /dev/kvm.

A machine without a usable /dev/kvm fails these tests loudly (one clear error
per test), never skips them: CI must not pass without running a VM.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def kvm_available():
    from vmm.errors import KvmUnavailableError
    from vmm.kvm.system import Kvm

    try:
        Kvm().close()
    except KvmUnavailableError as exc:
        pytest.fail(f"integration tests need KVM: {exc}", pytrace=False)



@pytest.fixture(scope="session")
def debian_linux():
    """Debian's cloud kernel and the busybox initramfs (fetched with apt, cached)."""
    from vmm.guestkit import debian_linux

    return debian_linux()
