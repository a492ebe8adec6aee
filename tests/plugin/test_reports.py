"""Report sections on failure only, junitxml boot time, fail-fast outcomes: on both backends."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

BACKENDS = pytest.mark.parametrize("backend", ["kvm", "qemu"])


def call_reports(reprec):
    return {r.nodeid.split("::")[-1]: r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "call"}


@BACKENDS
def test_sections_only_on_failure(pytester, backend):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(kernel="tiny:exitcode", append="code=5")
        def test_fails(microvm):
            assert microvm.wait().code == 0

        def test_passes(microvm):
            assert microvm.wait().ok
        """
    )
    reprec = pytester.inline_run(f"--microvm-backend={backend}")
    reprec.assertoutcome(passed=1, failed=1)
    reports = call_reports(reprec)
    failed = dict(reports["test_fails"].sections)
    assert "exitcode: exiting with code 5" in failed["microvm vm0: serial log (tiny:exitcode)"]
    exit_text = failed["microvm vm0: exit and metrics"]
    assert "exit: guest-exit: code 5" in exit_text
    assert f"backend: {backend}" in exit_text
    assert "exits: {" in exit_text
    assert not any(name.startswith("microvm") for name, _ in reports["test_passes"].sections)


def test_section_for_a_vm_still_running_and_for_several_vms(pytester):
    pytester.makepyfile(
        """
        def test_two(microvm_factory):
            a = microvm_factory(kernel="tiny:echo", name="alpha").start()
            b = microvm_factory(kernel="tiny:hello", name="beta").start()
            a.console.expect("echo: ready")
            b.wait()
            assert False, "boom"
        """
    )
    reprec = pytester.inline_run()
    sections = dict(call_reports(reprec)["test_two"].sections)
    assert "still running when the test failed" in sections["microvm alpha: exit and metrics"]
    assert "exit: guest-exit: code 0" in sections["microvm beta: exit and metrics"]
    assert "Hello from tiny guest" in sections["microvm beta: serial log (tiny:hello)"]


@BACKENDS
def test_junitxml_gets_the_boot_time(pytester, backend):
    pytester.makepyfile(
        """
        def test_boot(microvm):
            assert microvm.wait().ok

        def test_boot_fails(microvm):
            microvm.wait()
            assert False
        """
    )
    xml = pytester.path / "junit.xml"
    pytester.runpytest(f"--junitxml={xml}", f"--microvm-backend={backend}").assert_outcomes(passed=1, failed=1)
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    for name in ("test_boot", "test_boot_fails"):
        props = {p.get("name"): p.get("value") for p in cases[name].iter("property")}
        assert float(props["microvm_boot_time_s"]) > 0


@BACKENDS
def test_fail_fast_outcomes(pytester, backend):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(kernel="tiny:panic", append="msg=out_of_cheese", timeout=60)
        def test_panic(microvm):
            microvm.console.expect("login:")

        @pytest.mark.microvm(kernel="tiny:triple", timeout=60)
        def test_triple(microvm):
            microvm.console.expect("login:")

        @pytest.mark.microvm(kernel="tiny:echo", timeout=0.5)
        def test_vm_timeout(microvm):
            microvm.console.expect("login:", timeout=60)

        @pytest.mark.microvm(kernel="tiny:echo")
        def test_console_timeout(microvm):
            microvm.console.expect(["login:", "password:"], timeout=0.2)

        @pytest.mark.microvm(kernel="tiny:echo", timeout=0.5)
        def test_wait_on_hung_guest(microvm):
            assert microvm.wait().ok
        """
    )
    reprec = pytester.inline_run(f"--microvm-backend={backend}")
    reprec.assertoutcome(failed=5)
    reports = call_reports(reprec)
    text = {name: str(r.longrepr) for name, r in reports.items()}
    assert "VmEnded" in text["test_panic"]
    assert "the VM ended (guest-panic: panic on the console: Kernel panic - not syncing: out_of_cheese)" in text[
        "test_panic"]
    assert "before 'login:' appeared" in text["test_panic"]
    assert "the VM ended (triple-fault" in text["test_triple"]
    assert "triple: triple-faulting now" in text["test_triple"]  # the tail of the output
    assert "the VM ended (timeout: the VM ran longer than its timeout of 0.5 s)" in text["test_vm_timeout"]
    assert "ConsoleTimeout" in text["test_console_timeout"]
    assert "'login:' or 'password:' did not appear within 0.2 s (the VM is still running)" in text[
        "test_console_timeout"]
    assert "echo: ready" in text["test_console_timeout"]
    assert "timeout" in text["test_wait_on_hung_guest"]
    for r in reports.values():  # the fast ones did not wait for the VM's 60 s
        assert r.duration < 30


def test_panic_patterns_ini_key(pytester):
    pytester.makeini("[pytest]\nmicrovm_panic_patterns = ^echo: MELTDOWN\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(kernel="tiny:echo")
        def test_custom_panic(microvm):
            microvm.console.expect("ready")
            microvm.console.sendline("MELTDOWN now")
            st = microvm.wait()
            assert st.reason.value == "guest-panic" and "echo: MELTDOWN now" in st.detail
        """
    )
    pytester.inline_run().assertoutcome(passed=1)
