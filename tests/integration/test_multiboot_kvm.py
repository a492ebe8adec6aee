"""A Multiboot kernel entered on a real vCPU: the machine state of §3.2.

The kernel is a few bytes of 32-bit code synthesized here (the a.out kludge
places it), so this checks the loader and the vCPU state together without
any guest toolchain: EAX holds the boot-loader magic, EBX points at the
information structure, whose flags, command line and memory size the code
reads before leaving through the debug-exit port with ``mem_upper``.
"""

from __future__ import annotations

import struct

from vmm import layout
from vmm.boot import multiboot as mb
from vmm.exitstatus import ExitReason
from vmm.machine import Machine, MachineConfig

LOAD_ADDR = 0x100000
FAIL = 1


def checking_kernel() -> bytes:
    info_flags = mb.MULTIBOOT_INFO_MEMORY | mb.MULTIBOOT_INFO_CMDLINE | mb.MULTIBOOT_INFO_MEM_MAP
    port = layout.DEBUG_EXIT_PORT
    code = b"".join(
        [
            b"\x3d" + struct.pack("<I", mb.MULTIBOOT_BOOTLOADER_MAGIC),  # cmp eax, 0x2badb002
            b"\x75\x1e",  # jne fail
            b"\x8b\x03",  # mov eax, [ebx]          (flags)
            b"\x25" + struct.pack("<I", info_flags),  # and eax, flags
            b"\x3d" + struct.pack("<I", info_flags),  # cmp eax, flags
            b"\x75\x10",  # jne fail
            b"\x8b\x73\x10",  # mov esi, [ebx+16]  (cmdline)
            b"\x80\x3e\x5a",  # cmp byte [esi], 'Z'
            b"\x75\x08",  # jne fail
            b"\x8b\x43\x08",  # mov eax, [ebx+8]   (mem_upper)
            bytes([0xE7, port]),  # out port, eax
            b"\xf4\xeb\xfd",  # hlt; jmp hlt
            bytes([0xB0, FAIL, 0xE6, port]),  # fail: mov al, 1; out port, al
            b"\xf4\xeb\xfd",
        ]
    )
    header_offset = 0
    size = 32 + len(code)
    flags = mb.MULTIBOOT_MEMORY_INFO | mb.MULTIBOOT_AOUT_KLUDGE
    header = struct.pack(
        "<8I",
        mb.MULTIBOOT_HEADER_MAGIC,
        flags,
        -(mb.MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFFFFFF,
        LOAD_ADDR + header_offset,
        LOAD_ADDR,
        LOAD_ADDR + size,
        LOAD_ADDR + size + 0x1000,
        LOAD_ADDR + 32,
    )
    return header + code


def test_multiboot_machine_state(tmp_path):
    kernel = tmp_path / "mb.bin"
    kernel.write_bytes(checking_kernel())
    cfg = MachineConfig(kernel=kernel, mem_mib=16, cmdline="Zcmdline", timeout=60, acpi=False)
    with Machine(cfg) as m:  # vmm.boot.load recognises the Multiboot header
        assert m.boot.protocol == "multiboot"
        m.start()
        status = m.wait()
    assert status.reason is ExitReason.GUEST_EXIT, status.describe()
    assert status.code == (16 - 1) * 1024  # mem_upper in KiB: RAM from 1 MiB to 16 MiB
