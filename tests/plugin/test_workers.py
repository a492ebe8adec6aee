"""Per-worker names and ports: distinct across pytest-xdist workers."""

from __future__ import annotations

import pytest

from pytest_microvm import workers


@pytest.mark.parametrize("wid, index", [("gw0", 0), ("gw7", 7), ("main", 0)])
def test_worker_index(monkeypatch, wid, index):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", wid)
    assert workers.worker_index() == index


def test_names_and_ports_differ_between_workers(monkeypatch):
    seen_taps, seen_ports = set(), set()
    for w in range(8):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{w}")
        for n in range(3):
            seen_taps.add(workers.tap_name(n))
            seen_ports.add(workers.port(n))
    assert len(seen_taps) == len(seen_ports) == 24
    assert all(len(t) <= workers.IFNAME_MAX for t in seen_taps)


def test_limits_are_errors(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with pytest.raises(ValueError, match="port index 500"):
        workers.port(500)
    with pytest.raises(ValueError, match="longer than 15"):
        workers.tap_name(1, prefix="averyveryverylong")


def test_xdist_workers_have_separate_temp_dirs(pytester):
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.parametrize("n", range(4))
        def test_dir(microvm_factory, n, tmp_path_factory):
            vm = microvm_factory()
            wid = os.environ["PYTEST_XDIST_WORKER"]
            assert str(tmp_path_factory.getbasetemp()).endswith(wid)
            assert str(vm.workdir).startswith(str(tmp_path_factory.getbasetemp()))
            assert vm.start().wait().ok
        """
    )
    pytester.runpytest_subprocess("-p", "xdist", "-n", "2").assert_outcomes(passed=4)
