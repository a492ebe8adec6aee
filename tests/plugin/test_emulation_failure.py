"""A host emulation failure ends the test at once, on both backends.

The guest is a minimal PVH ELF made here whose first ring-0 instruction is
``int3``.  On hosts that emulate guest ring 0 (KVM-PVM) KVM cannot emulate it:
the VM must end with reason emulation-failure.  Where ring 0 runs natively the
breakpoint meets an empty IDT and the VM triple-faults instead.
"""

from __future__ import annotations

import struct

import pytest

from pytest_microvm import ExitReason

#: XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h): the PVH 32-bit entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_LOAD, PT_NOTE = 1, 4
LOAD_ADDR = 0x100000
#: int3; mov eax, 7; out 0xf4, eax; hlt; jmp $-1
CODE = bytes.fromhex("cc" "b807000000" "e7f4" "f4" "ebfd")


def pvh_elf(code: bytes) -> bytes:
    name = b"Xen\0"
    note = struct.pack("<III", len(name), 4, XEN_ELFNOTE_PHYS32_ENTRY) + name + struct.pack("<I", LOAD_ADDR)
    ehsize, phentsize = 64, 56
    note_off = ehsize + 2 * phentsize
    code_off = (note_off + len(note) + 15) & ~15
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, LOAD_ADDR, ehsize, 0, 0, ehsize, phentsize, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 5, code_off, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", PT_NOTE, 4, note_off, 0, 0, len(note), len(note), 4)
    image = header + load + pnote + note
    return image + bytes(code_off - len(image)) + code


@pytest.mark.parametrize("backend", ["kvm", "qemu"])
def test_int3_in_ring0(pytester, backend):
    from vmm.hostinfo import host_info

    (pytester.path / "int3.elf").write_bytes(pvh_elf(CODE))
    expected = ExitReason.TRIPLE_FAULT if host_info().ring0_native else ExitReason.EMULATION_FAILURE
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(kernel="int3.elf", timeout=60)
        def test_boot(microvm):
            microvm.console.expect("never printed")
        """
    )
    reprec = pytester.inline_run(f"--microvm-backend={backend}")
    reprec.assertoutcome(failed=1)
    (report,) = [r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "call"]
    assert f"the VM ended ({expected.value}" in str(report.longrepr)
    assert report.duration < 30  # ended at once, not by the VM's 60 s timeout
    sections = dict(report.sections)
    assert f"exit: {expected.value}" in sections["microvm vm0: exit and metrics"]
