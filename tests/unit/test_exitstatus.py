import pytest

from vmm.exitstatus import PROCESS_EXIT_CODES, ExitReason, ExitStatus


def test_guest_code_is_process_code():
    assert ExitStatus(ExitReason.GUEST_EXIT, 3).process_exit_code == 3
    assert ExitStatus(ExitReason.GUEST_EXIT, 0x1FF).process_exit_code == 0xFF
    assert ExitStatus(ExitReason.GUEST_EXIT, 0).ok
    assert not ExitStatus(ExitReason.GUEST_EXIT, 1).ok


def test_reserved_codes_are_distinct_for_failures():
    failures = [r for r in ExitReason if r not in (ExitReason.GUEST_EXIT, ExitReason.POWEROFF, ExitReason.REBOOT)]
    codes = {PROCESS_EXIT_CODES[r] for r in failures}
    assert all(c >= 250 for c in codes)
    assert PROCESS_EXIT_CODES[ExitReason.TRIPLE_FAULT] != PROCESS_EXIT_CODES[ExitReason.TIMEOUT]


@pytest.mark.parametrize("reason", [ExitReason.POWEROFF, ExitReason.REBOOT])
def test_clean_endings(reason):
    st = ExitStatus(reason)
    assert st.ok and st.process_exit_code == 0


def test_dict_and_describe():
    st = ExitStatus(ExitReason.EMULATION_FAILURE, detail="at RIP 0x10", rip=0x10, insn_bytes=b"\xcc")
    d = st.to_dict()
    assert d["reason"] == "emulation-failure" and d["insn_bytes"] == "cc" and d["rip"] == 0x10
    assert st.describe() == "emulation-failure: at RIP 0x10"
