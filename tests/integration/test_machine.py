"""The machine and its vCPU loop on real KVM, with a few bytes of 32-bit guest code.

These guests need no loader and no kit: each test writes its instructions at
CODE and enters them in flat 32-bit protected mode, so what is tested is the
machine itself: exits, devices, exit reasons, timeouts, kill, pause.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest
from rawguest import CODE, COUNTER, JMP_SELF, OUT_EAX_F4, machine, mov_eax, run

from vmm.errors import ConfigError
from vmm.exitstatus import ExitReason
from vmm.hostinfo import host_info
from vmm.machine import Machine, MachineConfig


def test_debug_exit_code():
    status, m = run(mov_eax(42) + OUT_EAX_F4 + JMP_SELF)
    assert status.reason is ExitReason.GUEST_EXIT
    assert status.code == 42
    assert status.process_exit_code == 42
    assert m.exits()["io"] == 1


def test_serial_output_reaches_the_console():
    code = b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
    for ch in b"hi\n":
        code += b"\xb0" + bytes([ch]) + b"\xee"  # mov al, ch ; out dx, al
    code += mov_eax(0) + OUT_EAX_F4 + JMP_SELF
    status, m = run(code)
    assert status.ok
    assert m.console.getvalue() == b"hi\n"
    assert m.devices["serial0"].stats.tx_bytes == 3


def test_unclaimed_port_reads_all_ones():
    code = b"\xe4\x99" + b"\x0f\xb6\xc0" + OUT_EAX_F4 + JMP_SELF  # in al, 0x99 ; movzx eax, al
    status, m = run(code)
    assert status.code == 0xFF
    assert m.pio_bus.stats.unhandled_reads == 1


def test_triple_fault_names_rip_and_bytes():
    status, _ = run(b"\x90\x0f\x0b")  # nop ; ud2 with an empty IDT
    assert status.reason is ExitReason.TRIPLE_FAULT
    assert status.rip == CODE + 1
    assert status.insn_bytes.startswith(b"\x0f\x0b")
    assert f"{CODE + 1:#x}" in status.detail
    assert status.process_exit_code == 250


def test_ring0_instruction_the_host_cannot_emulate():
    """int3 in ring 0 with an empty IDT: a native host triple-faults delivering the
    breakpoint; an emulating host cannot emulate int3 and must say so clearly."""
    status, _ = run(b"\xcc" + mov_eax(7) + OUT_EAX_F4 + JMP_SELF)
    assert status.rip == CODE
    assert status.insn_bytes.startswith(b"\xcc")
    if host_info().ring0_native:
        assert status.reason is ExitReason.TRIPLE_FAULT
    else:
        assert status.reason is ExitReason.EMULATION_FAILURE
        assert "int3" in status.detail and f"{CODE:#x}" in status.detail
        assert "could not emulate" in status.detail
        assert status.process_exit_code == 251


def test_timeout():
    status, m = run(JMP_SELF, timeout=0.3)
    assert status.reason is ExitReason.TIMEOUT
    assert "0.3 s" in status.detail
    assert not any(v.thread.is_alive() for v in m.vcpus)


def test_kill_a_spinning_guest_releases_threads():
    m = machine(JMP_SELF, timeout=None)
    m.start()
    time.sleep(0.05)
    status = m.kill()
    assert status.reason is ExitReason.KILLED
    assert not any(v.thread.is_alive() for v in m.vcpus)
    m.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu")]


def test_pause_stops_the_guest_and_resume_continues():
    # 1: inc dword [COUNTER] ; jmp 1b
    code = b"\xff\x05" + struct.pack("<I", COUNTER) + b"\xeb\xf8"
    with machine(code, timeout=None) as m:
        m.start()
        deadline = time.monotonic() + 10
        while m.memory.read_u32(COUNTER) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        m.pause()
        a = m.memory.read_u32(COUNTER)
        time.sleep(0.05)
        assert m.memory.read_u32(COUNTER) == a
        m.resume()
        deadline = time.monotonic() + 10
        while m.memory.read_u32(COUNTER) == a and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.memory.read_u32(COUNTER) > a
        assert m.kill().reason is ExitReason.KILLED


def test_aps_waiting_for_sipi_do_not_block_the_exit():
    status, m = run(mov_eax(3) + OUT_EAX_F4 + JMP_SELF, vcpus=4)
    assert status.code == 3
    assert len(m.vcpus) == 4
    assert not any(v.thread.is_alive() for v in m.vcpus)


def test_device_bug_ends_the_vm_with_a_named_error():
    class Broken:
        def read(self, offset, size):
            raise RuntimeError("boom")

        def write(self, offset, size, value):
            raise RuntimeError("boom")

    m = machine(b"\xe6\x99" + JMP_SELF)  # out 0x99, al
    m.pio_bus.register(0x99, 1, Broken(), "broken")
    with m:
        m.start()
        status = m.wait(30)
    assert status.reason is ExitReason.VMM_ERROR
    assert "port 0x99" in status.detail and "RuntimeError: boom" in status.detail
    assert "Traceback" in status.extra["traceback"]


def test_metrics_and_summary():
    _, m = run(mov_eax(0) + OUT_EAX_F4 + JMP_SELF)
    s = m.summary()
    assert s["exit"]["reason"] == "guest-exit"
    assert s["guest_exit_code"] == 0
    assert s["exits"]["io"] == 1
    assert s["peak_rss_kib"] > 0
    assert s["wall_time_s"] >= s["run_time_s"] > 0


@pytest.mark.parametrize(
    "cfg,option",
    [
        ({"vcpus": 0}, "--vcpus"),
        ({"vcpus": 100000}, "--vcpus"),
        ({"mem_mib": 1}, "--mem"),
        ({"timeout": -1}, "--timeout"),
        ({"cmdline": "a\0b"}, "--append"),
    ],
)
def test_bad_options_name_the_option(cfg, option):
    with pytest.raises(ConfigError, match=option):
        machine(JMP_SELF, **cfg)


def test_missing_kernel_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--kernel: .*nope does not exist"):
        Machine(MachineConfig(kernel=tmp_path / "nope"))
