"""The campaign command and its reproducers, on a UART with a deliberately broken FIFO bound."""

from __future__ import annotations

import runpy

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from pytest_microvm.fuzz.campaign import run_campaign
from pytest_microvm.fuzz.oracles import InvariantViolation
from pytest_microvm.fuzz.reproducer import program_lines, signature, write_reproducer
from pytest_microvm.fuzz.stateful.uart import UartMachine
from vmm.devices.serial import Serial

#: Flipped by the test to "fix" the bug.
BROKEN = {"fifo": True}


class LeakySerial(Serial):
    """A UART whose FIFO holds 17 bytes while the bug is in."""

    def _rx_capacity(self) -> int:
        return super()._rx_capacity() + (1 if BROKEN["fifo"] and self._fifo_enabled else 0)


class LeakyUartMachine(UartMachine):
    target = "uart-leaky"

    def __init__(self) -> None:
        super().__init__()
        self.dev = LeakySerial(self.irq, self.sent.extend, input_queue_limit=48)


def test_reproducer_fails_until_the_bug_is_fixed(tmp_path) -> None:
    BROKEN["fifo"] = True
    with pytest.raises(InvariantViolation) as info:
        run_state_machine_as_test(
            LeakyUartMachine,
            settings=settings(
                max_examples=300, database=None, deadline=None, print_blob=True, report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
            ),
        )
    exc = info.value
    assert exc.name in ("uart-fifo-bounded", "uart-matches-model")
    path = write_reproducer(tmp_path, "uart-leaky", LeakyUartMachine, exc)
    assert path.name == f"test_uart_leaky_{signature(exc)}.py".replace("-", "_")
    tests = [f for name, f in runpy.run_path(str(path)).items() if name.startswith("test_")]
    assert len(tests) == 1
    with pytest.raises(InvariantViolation):
        tests[0]()
    BROKEN["fifo"] = False
    try:
        tests[0]()  # fixed: the same program passes
    finally:
        BROKEN["fifo"] = True


def test_program_lines_join_wrapped_reprs() -> None:
    text = """Falsifying example:
state = UartMachine()
state.access(op=Access(kind='w',
 offset=2, size=1, value=7))
state.check()
state.teardown()
Explanation: ..."""
    assert program_lines(text) == [
        "state = UartMachine()",
        "state.access(op=Access(kind='w', offset=2, size=1, value=7))",
        "state.check()",
        "state.teardown()",
    ]


def test_campaign_counts_examples_and_behaviours(tmp_path) -> None:
    result = run_campaign(
        "uart", max_examples=30, db=str(tmp_path / "db"), out=str(tmp_path / "out"), seed=1, status=None
    )
    assert result.ok and result.examples >= 30 and result.behaviours > 0


def test_fuzz_subcommand_parses() -> None:
    from vmm.cli import build_parser

    argv = ["fuzz", "virtio-blk", "--minutes", "2", "--jobs", "2", "--seed", "7"]
    args = build_parser(argv).parse_args(argv)
    assert (args.target, args.minutes, args.jobs, args.seed) == ("virtio-blk", 2.0, 2, 7)
