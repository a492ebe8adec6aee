"""Raw guests for machine-level tests: a few bytes of 32-bit code, no loader, no kit.

Each test writes its instructions at CODE and enters them in flat 32-bit
protected mode, so what is tested is the machine itself.
"""

from __future__ import annotations

import struct

from vmm.boot.types import BootRequest, BootSetup
from vmm.cpustate import CpuState
from vmm.machine import Machine, MachineConfig

CODE = 0x10000
COUNTER = 0x20000

OUT_EAX_F4 = b"\xe7\xf4"  # out 0xf4, eax
JMP_SELF = b"\xeb\xfe"


def mov_eax(v: int) -> bytes:
    return b"\xb8" + struct.pack("<I", v)


def machine(code: bytes, **cfg) -> Machine:
    def loader(req: BootRequest) -> BootSetup:
        req.memory.write(CODE, code)
        return BootSetup("raw", CpuState.flat_protected32(CODE))

    cfg.setdefault("mem_mib", 4)
    cfg.setdefault("timeout", 30)
    return Machine(MachineConfig(kernel="<raw test code>", **cfg), loader=loader)


def run(code: bytes, **cfg):
    with machine(code, **cfg) as m:
        m.start()
        status = m.wait(60)
        assert status is not None, "the VM did not end"
        return status, m
