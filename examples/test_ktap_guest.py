"""A guest that prints KTAP: check every case, and what a crash mid-suite looks like."""

import pytest

from pytest_microvm import ktap


@pytest.mark.microvm(kernel="tiny:ktap", append="ktap=pass:alloc,pass:free,skip:numa ktap_suite=mm")
def test_every_case_passes_or_skips(microvm):
    assert microvm.wait().ok
    doc = ktap.parse(microvm.serial_output)
    assert doc.complete and doc.ok
    results = {"::".join(path): case.status for path, case in ktap.reportable(doc)}
    assert results == {"mm::alloc": ktap.Status.PASS, "mm::free": ktap.Status.PASS, "mm::numa": ktap.Status.SKIP}


@pytest.mark.microvm(kernel="tiny:ktap", append="ktap=pass:a,pass:b,pass:c ktap_stop=1 ktap_stop_mode=panic")
def test_a_crash_mid_suite_is_a_crashed_case(microvm):
    status = microvm.wait()
    assert status.reason.value == "guest-panic"
    doc = ktap.parse(microvm.serial_output)
    assert not doc.complete
    statuses = [(path[-1], case.status) for path, case in ktap.reportable(doc)]
    assert statuses == [("a", ktap.Status.PASS), ("#2", ktap.Status.CRASH)]
