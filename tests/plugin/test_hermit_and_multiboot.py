"""Hermit and multiboot images wherever the plugin takes a kernel: options, marker, guest items.

The Hermit images are the real applications from the test data directory
(MICROVM_HERMIT_DIR).  Where guest ring 0 is emulated (measured), the Hermit
kernel stops at an instruction the host cannot emulate: then the tests check
that this is what the test reports; where ring 0 is native, the application's
exit code 0 is the test result.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmm.hostinfo import host_info

REPO = Path(__file__).resolve().parents[2]
HERMIT_DIR = Path(os.environ.get("MICROVM_HERMIT_DIR", REPO / ".." / "shared" / "guests" / "hermit"))


@pytest.fixture
def hello_world() -> Path:
    path = HERMIT_DIR / "hello_world"
    if not path.is_file():
        pytest.skip(f"Hermit test image {path} not found (set MICROVM_HERMIT_DIR)")
    return path


def test_hermit_kernel_through_the_option(pytester, hello_world):
    pytester.makepyfile(
        test_app="""
        from pytest_microvm import ExitReason

        def test_app(microvm):
            microvm.console.expect("Welcome to Hermit")
            status = microvm.wait()
            print("STATUS", status.describe())
            assert status.reason in (ExitReason.GUEST_EXIT, ExitReason.EMULATION_FAILURE)
        """
    )
    result = pytester.runpytest("-v", "-s", f"--microvm-kernel={hello_world}", "--microvm-mem=256")
    result.assert_outcomes(passed=1)
    assert "test_app.py::test_app[hello_world]" in result.stdout.str()  # the kernel's name in the id
    if host_info().ring0_native:
        result.stdout.fnmatch_lines(["*STATUS guest-exit: code 0*"])
    else:
        result.stdout.fnmatch_lines(["*STATUS emulation-failure*could not emulate*"])


def test_hermit_image_as_a_guest_test_item(pytester, hello_world):
    d = pytester.mkdir("apps")
    shutil.copy(hello_world, d / "hello_world")
    pytester.makeini("[pytest]\nmicrovm_guest_tests = apps/*\nmicrovm_mem = 256\n")
    result = pytester.runpytest("-v")
    if host_info().ring0_native:
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*apps/hello_world::boot FAILED*", "*emulation-failure*"])
        result.stdout.fnmatch_lines(["*Welcome to Hermit*"])  # the serial log section of the failure


def test_multiboot_kernel_through_the_marker(pytester, tiny):
    pytester.makepyfile(
        test_mb=f"""
        import pytest

        @pytest.mark.microvm(kernel={str(tiny("exitcode", "multiboot"))!r}, append="code=4")
        def test_mb(microvm):
            microvm.console.expect("entry multiboot")
            assert microvm.wait().code == 4
        """
    )
    pytester.runpytest("-v").assert_outcomes(passed=1)
