"""Snapshots on real KVM: a running guest saved once and continued by several new VMs."""

from __future__ import annotations

import time

import pytest
from rawguest import COUNTER, machine

from vmm.exitstatus import ExitReason
from vmm.guestkit import tiny_guest
from vmm.machine import Machine, MachineConfig
from vmm.snapshot import SnapshotError, load_state, size_on_disk


def wait_for(m: Machine, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in m.console.text():
        assert m.status is None, f"VM ended: {m.status}\n{m.console.text()}"
        assert time.monotonic() < deadline, f"{text!r} not in {m.console.text()!r}"
        time.sleep(0.005)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_restored_vms_continue_independently(tmp_path, vcpus):
    snap = tmp_path / "snap"
    with Machine(MachineConfig(kernel=tiny_guest("echo"), vcpus=vcpus, timeout=30)) as m:
        m.start()
        wait_for(m, "echo: ready")
        m.send_input(b"before\n")
        wait_for(m, "echo: before")
        m.snapshot(snap)
        # The original keeps running after the snapshot.
        m.send_input(b"exit 9\n")
        assert m.wait(20).code == 9
    state = load_state(snap)
    assert len(state["vcpus"]) == vcpus
    assert size_on_disk(snap) < 128 << 20  # sparse memory files

    codes = []
    for word, code in (("alpha", 3), ("beta", 4)):
        with Machine.restore(snap, timeout=20) as r:
            r.start()
            r.send_input(f"{word}\nexit {code}\n".encode())
            status = r.wait(20)
            out = r.console.text()
            assert status is not None and status.reason is ExitReason.GUEST_EXIT, (status, out)
            assert f"echo: {word}" in out
            assert "echo: before" not in out  # a new console, continuing after the snapshot
            assert r.boot.protocol == "snapshot"
            codes.append(status.code)
    assert codes == [3, 4]


def test_restore_continues_memory_and_registers(tmp_path):
    """A guest counting in memory continues from the saved count, not from zero."""
    code = b"\xff\x05" + COUNTER.to_bytes(4, "little") + b"\xeb\xf8"  # 1: inc [COUNTER]; jmp 1b
    with machine(code, timeout=None) as m:
        m.start()
        while m.memory.read_u32(COUNTER) < 1000:
            time.sleep(0.005)
        m.pause()
        saved_count = m.memory.read_u32(COUNTER)
        m.snapshot(tmp_path / "s")
        m.kill()
    with Machine.restore(tmp_path / "s") as r:
        assert r.memory.read_u32(COUNTER) == saved_count
        r.start()
        deadline = time.monotonic() + 10
        while r.memory.read_u32(COUNTER) <= saved_count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert r.memory.read_u32(COUNTER) > saved_count
        assert r.status is None  # running the loop, not faulting
        r.kill()


def test_snapshot_errors(tmp_path):
    m = Machine(MachineConfig(kernel=tiny_guest("hello")))
    with m, pytest.raises(SnapshotError, match="only a running VM"):
        m.snapshot(tmp_path / "x")
    with pytest.raises(SnapshotError, match="not a snapshot directory"):
        Machine.restore(tmp_path)
    (tmp_path / "state.json").write_text('{"format": 99}')
    with pytest.raises(SnapshotError, match="format 99"):
        Machine.restore(tmp_path)


def test_restore_refuses_shape_changes(tmp_path):
    with Machine(MachineConfig(kernel=tiny_guest("echo"), timeout=30)) as m:
        m.start()
        wait_for(m, "echo: ready")
        m.snapshot(tmp_path / "s")
        m.kill()
    from vmm.errors import ConfigError

    with pytest.raises(ConfigError, match="mem_mib"):
        Machine.restore(tmp_path / "s", mem_mib=256)
