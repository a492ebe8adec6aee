"""Guest images collected as tests: exit code 0 passes, KTAP cases become subtest results."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest


@pytest.fixture
def images(pytester, tiny):
    d = pytester.mkdir("guests")
    for name in ("hello", "exitcode", "ktap"):
        shutil.copy(tiny(name), d / f"{name}.elf")
    return d


def test_ini_globs_collect_images_and_exit_code_decides(pytester, images):
    pytester.makeini("[pytest]\nmicrovm_guest_tests = guests/*.elf\n")
    result = pytester.runpytest("-v", "--microvm-append=code=9")
    result.stdout.fnmatch_lines_random([
        "guests/hello.elf::boot PASSED*",
        "guests/exitcode.elf::boot FAILED*",
        "guests/ktap.elf::boot*PASSED*",
    ])
    result.stdout.fnmatch_lines(["*exitcode.elf: the guest exited with code 9 (expected 0)*"])
    # the failure carries the serial log section, the passes do not
    result.stdout.fnmatch_lines(["*microvm exitcode.elf: serial log*", "*exitcode: exiting with code 9*"])
    assert "microvm hello.elf: serial log" not in result.stdout.str()


def test_images_named_on_the_command_line(pytester, images):
    (pytester.path / "notes.txt").write_text("not a kernel\n")
    result = pytester.runpytest("-v", "guests/hello.elf", "notes.txt")
    result.stdout.fnmatch_lines(["*collected 1 item", "", "guests/hello.elf::boot PASSED*"])


def test_ktap_cases_become_results(pytester, images):
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest(
        "-v", "guests/ktap.elf", f"--junitxml={xml}",
        "--microvm-append=ktap=pass:ok_case,fail:bad_case,skip:skipped_case,pass:never_reached ktap_stop=3 "
        "ktap_suite=demo",
    )
    result.stdout.fnmatch_lines([
        "*SUBPASSED*demo::ok_case*",
        "*SUBFAILED*demo::bad_case*",
        "*SUBSKIPPED*demo::skipped_case*(skipped on the*",
        "*SUBFAILED*demo::#4*",
        "guests/ktap.elf::boot PASSED*",  # the guest exited 0
    ])
    result.stdout.fnmatch_lines(["*KTAP test demo::bad_case failed*", "*bad_case: expected success*"])
    result.stdout.fnmatch_lines(["*KTAP test demo::#4 crashed: output ended before test 4 of 4*"])
    assert result.ret == 1
    case = ET.parse(xml).getroot().find(".//testcase")
    assert len(case.findall("failure")) == 2 and len(case.findall("skipped")) == 1


def test_guest_crash_mid_ktap_fails_the_image(pytester, images):
    result = pytester.runpytest(
        "-v", "guests/ktap.elf", "--microvm-append=ktap=pass,pass ktap_stop=1 ktap_stop_mode=triple")
    result.stdout.fnmatch_lines([
        "*SUBPASSED*tiny::case_1*", "*SUBFAILED*tiny::#2*", "guests/ktap.elf::boot FAILED*"])
    result.stdout.fnmatch_lines(["*the guest did not exit with a code: triple-fault*"])


def test_guest_items_under_xdist(pytester, images):
    pytester.makeini("[pytest]\nmicrovm_guest_tests = guests/*.elf\n")
    result = pytester.runpytest_subprocess("-v", "-n", "2", "-p", "xdist", "--microvm-append=ktap=pass,fail code=0")
    result.stdout.fnmatch_lines_random([
        "*PASSED guests/hello.elf::boot*",
        "*PASSED guests/exitcode.elf::boot*",
        "*SUBPASSED*tiny::case_1*",
        "*SUBFAILED*tiny::case_2*",
        "*PASSED guests/ktap.elf::boot*",
    ])
    result.stdout.fnmatch_lines(["*KTAP test tiny::case_2 failed*"])
    assert result.ret == 1


def test_unreadable_image_is_a_clear_failure(pytester, images):
    bad = images / "garbage.elf"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    result = pytester.runpytest("guests/garbage.elf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*garbage.elf*"])
    assert "Traceback" not in result.stdout.str()
