"""The same fuzz programs through real KVM exits: the fuzz-agent guest on this VMM and on QEMU.

Hypothesis draws programs of UART port accesses and virtio-mmio register
accesses; the ``fuzzagent`` tiny guest runs each from ring 3 (every access a
real port-I/O or MMIO exit) and prints what it read.  On this VMM every read
must equal the in-process reference models; on QEMU's microvm machine every
difference must be on the allowlist of deliberate ones (``QEMU_ALLOWLIST``).
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given, settings

from pytest_microvm.fuzz.agent import (
    PORT_READ,
    QEMU_ALLOWLIST,
    VIRTIO_READ,
    AgentOp,
    agent_programs,
    compare_with_qemu,
    expected_reads,
    run_microvm,
    run_qemu,
)

#: A VM boot per example: fewer examples than the in-process fuzzers.
AGENT_SETTINGS = settings(max_examples=25, deadline=None)


def test_agent_reports_what_the_devices_say() -> None:
    ops = [AgentOp(VIRTIO_READ, 4, 0x000), AgentOp(VIRTIO_READ, 4, 0x008), AgentOp(PORT_READ, 1, 0x3F8 + 3)]
    run = run_microvm(ops)
    assert run.exit_code == 0 and run.complete, run.console[-500:]
    assert run.reads == [0x74726976, 4, 0x03]


@AGENT_SETTINGS
@given(agent_programs())
def test_agent_programs_match_the_models_through_real_exits(ops: list[AgentOp]) -> None:
    run = run_microvm(ops)
    assert run.exit_code == 0 and run.complete, run.console[-500:]
    assert run.reads == expected_reads(ops)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
@AGENT_SETTINGS
@given(agent_programs())
def test_agent_programs_differ_from_qemu_only_where_allowed(ops: list[AgentOp]) -> None:
    ours, qemu = run_microvm(ops), run_qemu(ops)
    assert qemu.exit_code == 0 and qemu.complete, qemu.console[-500:]
    unexplained = [d.describe() for d in compare_with_qemu(ops, ours, qemu) if not d.allowed]
    assert not unexplained, "\n".join(unexplained)


def test_every_allowlisted_difference_is_explained() -> None:
    assert all(len(why) > 20 for why in QEMU_ALLOWLIST.values())
