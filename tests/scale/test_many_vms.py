"""Scale: 512 VM tests (tiny guests), one fresh microVM each, in one `pytest -n 2` run.

Each test boots the exitcode guest with its own code and checks it came back;
every 8th test also round-trips a line through the echo guest's console.  The
whole module runs in the normal CI invocation (`pytest -n 2`).
"""

from __future__ import annotations

import pytest

from pytest_microvm import ExitReason

COUNT = 512


@pytest.mark.parametrize("n", range(COUNT))
def test_vm(microvm_factory, n):
    if n % 8 == 7:
        vm = microvm_factory(kernel="tiny:echo", timeout=30).start()
        vm.console.expect_exact("echo: ready")
        vm.console.sendline(f"exit {n % 100}")
    else:
        vm = microvm_factory(kernel="tiny:exitcode", append=f"code={n % 100}", timeout=30).start()
    status = vm.wait()
    assert (status.reason, status.code) == (ExitReason.GUEST_EXIT, n % 100), vm.serial_output
