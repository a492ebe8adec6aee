"""Why a VM ended, as plain data, and the `microvm run` process exit codes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ExitReason(str, enum.Enum):
    #: The guest wrote a code to the debug-exit port (or a Hermit/uhyve exit hypercall).
    GUEST_EXIT = "guest-exit"
    #: The guest powered off (ACPI sleep state S5).
    POWEROFF = "poweroff"
    #: The guest asked for a reset (i8042 0xFE, ACPI reset register).
    REBOOT = "reboot"
    #: KVM_EXIT_SHUTDOWN: a triple fault.
    TRIPLE_FAULT = "triple-fault"
    #: KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR, emulation failure).
    EMULATION_FAILURE = "emulation-failure"
    #: Any other KVM internal error or failed VM entry.
    KVM_ERROR = "kvm-error"
    #: The guest printed a panic pattern (detected by whoever watches the console).
    GUEST_PANIC = "guest-panic"
    #: The VM ran longer than its timeout.
    TIMEOUT = "timeout"
    #: The host stopped it (kill(), Ctrl-C, test teardown).
    KILLED = "killed"
    #: The VMM itself failed (a bug, or an I/O error on the host side).
    VMM_ERROR = "vmm-error"


#: Process exit codes of `microvm run` for endings that carry no guest code.
#: A guest's own debug-exit code V is returned as V & 0xFF; the codes below are
#: reserved, so a guest that wants unambiguous results avoids 250-255.
PROCESS_EXIT_CODES = {
    ExitReason.POWEROFF: 0,
    ExitReason.REBOOT: 0,
    ExitReason.TRIPLE_FAULT: 250,
    ExitReason.EMULATION_FAILURE: 251,
    ExitReason.KVM_ERROR: 251,
    ExitReason.GUEST_PANIC: 252,
    ExitReason.TIMEOUT: 253,
    ExitReason.VMM_ERROR: 254,
    ExitReason.KILLED: 255,
}


@dataclass
class ExitStatus:
    reason: ExitReason
    #: The guest's exit code, when it gave one (debug-exit port, uhyve exit).
    code: int | None = None
    #: One line for humans: what happened, with the register/address involved.
    detail: str = ""
    vcpu: int | None = None
    rip: int | None = None
    #: Instruction bytes at RIP, when the failure was at an instruction.
    insn_bytes: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def process_exit_code(self) -> int:
        if self.reason is ExitReason.GUEST_EXIT and self.code is not None:
            return self.code & 0xFF
        return PROCESS_EXIT_CODES[self.reason]

    @property
    def ok(self) -> bool:
        """True when the guest ended on its own with success (code 0, poweroff, reboot)."""
        if self.reason is ExitReason.GUEST_EXIT:
            return self.code == 0
        return self.reason in (ExitReason.POWEROFF, ExitReason.REBOOT)

    def describe(self) -> str:
        parts = [self.reason.value]
        if self.code is not None:
            parts.append(f"code {self.code}")
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "code": self.code,
            "detail": self.detail,
            "vcpu": self.vcpu,
            "rip": self.rip,
            "insn_bytes": self.insn_bytes.hex() if self.insn_bytes is not None else None,
            **self.extra,
        }
