"""The KVM_RUN loop of one vCPU, and exit dispatch.

One thread per vCPU runs ``Vcpu.run_loop``.  KVM_RUN is called with the GIL
released; each exit is dispatched to the port-I/O or MMIO bus, or ends the VM
with an ``ExitStatus`` that says why (triple fault, an instruction the host
could not emulate, a failed VM entry, ...).  The loop leaves KVM_RUN when the
machine kicks it (``immediate_exit`` plus a signal), so stop and pause never
wait for the guest.
"""

from __future__ import annotations

import errno
import signal
import threading
import traceback
from collections import Counter
from typing import TYPE_CHECKING

from .cpustate import CpuState, Segment
from .exitstatus import ExitReason
from .kvm.system import VcpuFd, ffi, lib

if TYPE_CHECKING:  # pragma: no cover
    from .machine import Machine

#: The signal that kicks a vCPU thread out of KVM_RUN (a no-op handler is installed in C).
KICK_SIGNAL = signal.SIGRTMIN + 3

# struct kvm_run exit reasons we name in metrics.
EXIT_NAMES = {
    getattr(lib, name): name[len("KVM_EXIT_") :].lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}

#: KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES (linux/kvm.h).
EMULATION_FLAG_INSTRUCTION_BYTES = 1

# Boot MSRs (Firecracker's set): SYSENTER and SYSCALL state cleared, fast strings on,
# MTRRs enabled with write-back as the default type.
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6

# Local APIC registers (SDM Vol. 3A §11.5.1): LVT LINT0/LINT1 and delivery modes.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def boot_msrs(supported: set[int]) -> dict[int, int]:
    msrs = {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
    }
    return {k: v for k, v in msrs.items() if k in supported}


def _set_segment(dst, seg: Segment) -> None:
    dst.selector = seg.selector
    dst.base = seg.base
    dst.limit = seg.limit
    dst.type = seg.type
    dst.present = seg.present
    dst.dpl = seg.dpl
    dst.db = seg.db
    dst.s = seg.s
    dst.l = seg.l
    dst.g = seg.g
    dst.avl = seg.avl
    dst.unusable = seg.unusable


class Vcpu:
    """A vCPU of a Machine: its fd, its thread, its exit counters."""

    def __init__(self, machine: Machine, fd: VcpuFd) -> None:
        self.machine = machine
        self.fd = fd
        self.index = fd.id
        self.exits: Counter[str] = Counter()
        self.thread: threading.Thread | None = None
        self._run = fd.run_struct

    # ---- setup ---------------------------------------------------------------
    def apply(self, state: CpuState) -> None:
        """Load a loader's CpuState into the vCPU."""
        sregs = self.fd.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            _set_segment(getattr(sregs, name), getattr(state, name))
        if state.tr is not None:
            _set_segment(sregs.tr, state.tr)
        sregs.gdt.base, sregs.gdt.limit = state.gdt
        sregs.idt.base, sregs.idt.limit = state.idt
        sregs.cr0 = state.cr0
        sregs.cr3 = state.cr3
        sregs.cr4 = state.cr4
        sregs.efer = state.efer
        self.fd.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        for name, value in state.gprs.items():
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        regs.rip = state.rip
        regs.rflags = state.rflags
        self.fd.set_regs(regs)
        if state.msrs:
            self.fd.set_msrs(state.msrs)

    def set_fpu_defaults(self) -> None:
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw = 0x37F  # x87 default control word (FNINIT state)
        fpu.mxcsr = 0x1F80  # SSE default: all exceptions masked
        self.fd.set_fpu(fpu)

    def setup_lapic(self) -> None:
        """LINT0 = ExtINT, LINT1 = NMI: the PC's virtual-wire mode (as Firecracker sets)."""
        blob = bytearray(self.fd.get_blob("lapic"))

        def set_mode(reg: int, mode: int) -> None:
            value = int.from_bytes(blob[reg : reg + 4], "little")
            value = (value & ~0x700) | (mode << 8)
            blob[reg : reg + 4] = value.to_bytes(4, "little")

        set_mode(APIC_LVT_LINT0, APIC_MODE_EXTINT)
        set_mode(APIC_LVT_LINT1, APIC_MODE_NMI)
        self.fd.set_blob("lapic", bytes(blob))

    # ---- the loop --------------------------------------------------------------
    def kick(self) -> None:
        """Make KVM_RUN return now (or immediately on its next call)."""
        run = self._run
        if run is not None:
            run.immediate_exit = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:  # the thread ended meanwhile
                pass

    def run_loop(self) -> None:
        m = self.machine
        try:
            self._loop(m)
        except BaseException as exc:  # a VMM bug: end the VM, never hang it
            m.request_exit(
                ExitReason.VMM_ERROR,
                detail=f"vCPU {self.index}: {type(exc).__name__}: {exc}",
                extra={"traceback": traceback.format_exc()},
            )

    def _loop(self, m: Machine) -> None:
        run = self._run
        fd = self.fd
        view = fd.run_view
        pio = m.pio_bus
        mmio = m.mmio_bus
        exits = self.exits
        EXIT_IO = lib.KVM_EXIT_IO
        EXIT_MMIO = lib.KVM_EXIT_MMIO
        IO_OUT = lib.KVM_EXIT_IO_OUT
        names = EXIT_NAMES
        while True:
            if m.stopping:
                return
            if m.paused:
                m.park(self)
                continue
            ret = fd.run()
            if ret < 0:
                if ret in (-errno.EINTR, -errno.EAGAIN):
                    exits["intr"] += 1
                    run.immediate_exit = 0
                    continue
                m.request_exit(
                    ExitReason.KVM_ERROR,
                    detail=f"vCPU {self.index}: KVM_RUN failed: {errno.errorcode.get(-ret, -ret)}",
                    vcpu=self.index,
                )
                return
            reason = run.exit_reason
            if reason == EXIT_IO:
                io = run.io
                size = io.size
                port = io.port
                off = io.data_offset
                count = io.count
                try:
                    if io.direction == IO_OUT:
                        for i in range(count):
                            o = off + i * size
                            pio.write(port, size, int.from_bytes(view[o : o + size], "little"))
                    else:
                        for i in range(count):
                            o = off + i * size
                            view[o : o + size] = pio.read(port, size).to_bytes(size, "little")
                except Exception as exc:
                    self._device_bug(f"port {port:#x}", exc)
                    return
                exits["io"] += 1
            elif reason == EXIT_MMIO:
                mm = run.mmio
                addr = mm.phys_addr
                n = mm.len
                try:
                    if mm.is_write:
                        mmio.write(addr, n, int.from_bytes(ffi.buffer(mm.data, n), "little"))
                    else:
                        ffi.memmove(mm.data, mmio.read(addr, n).to_bytes(n, "little"), n)
                except Exception as exc:
                    self._device_bug(f"MMIO address {addr:#x}", exc)
                    return
                exits["mmio"] += 1
            else:
                exits[names.get(reason, str(reason))] += 1
                if self._special_exit(reason):
                    return

    def _device_bug(self, where: str, exc: Exception) -> None:
        self.machine.request_exit(
            ExitReason.VMM_ERROR,
            detail=f"vCPU {self.index}: device at {where} raised {type(exc).__name__}: {exc}",
            vcpu=self.index,
            extra={"traceback": traceback.format_exc()},
        )

    def _special_exit(self, reason: int) -> bool:
        """Handle a rare exit; True when the VM ends."""
        m = self.machine
        run = self._run
        if reason == lib.KVM_EXIT_SHUTDOWN:
            rip, insn = self.current_instruction()
            m.request_exit(
                ExitReason.TRIPLE_FAULT,
                detail=f"vCPU {self.index} triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}",
                vcpu=self.index,
                rip=rip,
                insn_bytes=insn,
            )
            return True
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            self._internal_error()
            return True
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = run.fail_entry
            m.request_exit(
                ExitReason.KVM_ERROR,
                detail=(
                    f"vCPU {self.index}: VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason "
                    f"{fe.hardware_entry_failure_reason:#x}): the register state is invalid for this CPU"
                ),
                vcpu=self.index,
            )
            return True
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev = run.system_event.type
            if ev == lib.KVM_SYSTEM_EVENT_RESET:
                m.request_exit(ExitReason.REBOOT, detail="KVM system event: reset")
            elif ev == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                m.request_exit(ExitReason.POWEROFF, detail="KVM system event: shutdown")
            else:
                m.request_exit(ExitReason.KVM_ERROR, detail=f"KVM system event {ev}", vcpu=self.index)
            return True
        if reason in (lib.KVM_EXIT_HLT,):
            # Only without an in-kernel LAPIC; we always have one.  Treat as a guest stop.
            m.request_exit(ExitReason.POWEROFF, detail=f"vCPU {self.index} halted with no irqchip")
            return True
        if reason in (lib.KVM_EXIT_IRQ_WINDOW_OPEN, lib.KVM_EXIT_INTR):
            return False
        rip, insn = self.current_instruction()
        m.request_exit(
            ExitReason.KVM_ERROR,
            detail=f"vCPU {self.index}: unexpected exit {EXIT_NAMES.get(reason, reason)} at RIP {rip:#x}",
            vcpu=self.index,
            rip=rip,
            insn_bytes=insn,
        )
        return True

    def _internal_error(self) -> None:
        run = self._run
        internal = run.internal
        sub = internal.suberror
        rip, insn = self.current_instruction()
        if sub == lib.KVM_INTERNAL_ERROR_EMULATION:
            ef = run.emulation_failure
            if ef.ndata >= 3 and ef.flags & EMULATION_FLAG_INSTRUCTION_BYTES and ef.insn_size:
                insn = bytes(ef.insn_bytes[0 : min(ef.insn_size, 15)])
            name = describe_instruction(insn) if insn else "unknown instruction"
            hexed = insn.hex(" ") if insn else "unreadable"
            self.machine.request_exit(
                ExitReason.EMULATION_FAILURE,
                detail=(
                    f"vCPU {self.index}: the host's KVM could not emulate the guest instruction at "
                    f"RIP {rip:#x} (bytes {hexed}: {name}); this host runs guest ring 0 by "
                    "emulation and does not support this instruction there"
                ),
                vcpu=self.index,
                rip=rip,
                insn_bytes=insn,
            )
            return
        data = [hex(internal.data[i]) for i in range(min(internal.ndata, 16))]
        names = {
            lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
            lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit",
        }
        self.machine.request_exit(
            ExitReason.KVM_ERROR,
            detail=(
                f"vCPU {self.index}: KVM internal error {sub} ({names.get(sub, 'unknown')}) at RIP "
                f"{rip:#x}, data {data}"
            ),
            vcpu=self.index,
            rip=rip,
            insn_bytes=insn,
        )

    def current_instruction(self) -> tuple[int, bytes | None]:
        """(RIP, up to 15 instruction bytes at CS:RIP translated through the guest's paging)."""
        try:
            regs = self.fd.get_regs()
            sregs = self.fd.get_sregs()
        except Exception:
            return 0, None
        rip = int(regs.rip)
        linear = (int(sregs.cs.base) + rip) & 0xFFFFFFFFFFFFFFFF
        try:
            if sregs.cr0 & 0x80000000:
                gpa, valid = self.fd.translate(linear)
                if not valid:
                    return rip, None
            else:
                gpa = linear & 0xFFFFFFFF
            mem = self.machine.memory
            page_left = 0x1000 - (gpa & 0xFFF)
            n = min(15, page_left)
            if not mem.contains(gpa, n):
                return rip, None
            return rip, mem.read(gpa, n)
        except Exception:
            return rip, None


# Instructions this kind of host is known not to emulate in ring 0, by opcode prefix.
_KNOWN = [
    (bytes.fromhex("9bdbe3"), "fninit (x87 initialisation)"),
    (bytes.fromhex("dbe3"), "fninit (x87 initialisation)"),
    (bytes.fromhex("cc"), "int3 (breakpoint)"),
    (bytes.fromhex("cd03"), "int $3 (breakpoint)"),
    (bytes.fromhex("0f0b"), "ud2 (undefined instruction)"),
    (bytes.fromhex("0f01d0"), "xgetbv"),
    (bytes.fromhex("0f01d1"), "xsetbv"),
]


def describe_instruction(insn: bytes) -> str:
    """Name the instruction at the start of ``insn`` when it is one we know the host trips on."""
    for prefix, name in _KNOWN:
        if insn.startswith(prefix):
            return name
    body = insn
    while body and body[0] in (0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47,
                               0x48, 0x49, 0x4A, 0x4B, 0x4C, 0x4D, 0x4E, 0x4F):
        body = body[1:]
    if len(body) >= 3 and body[0] == 0x0F and body[1] == 0xC7 and (body[2] >> 3) & 7 == 1:
        rex_w = any(0x48 <= b <= 0x4F for b in insn[: len(insn) - len(body)])
        return "cmpxchg16b" if rex_w else "cmpxchg8b"
    if len(body) >= 3 and body[0] == 0x0F and body[1] == 0xAE:
        sub = {0: "fxsave", 1: "fxrstor", 2: "ldmxcsr", 3: "stmxcsr", 4: "xsave", 5: "xrstor", 6: "xsaveopt"}
        reg = (body[2] >> 3) & 7
        if body[2] >> 6 != 3 and reg in sub:
            return sub[reg]
    if len(body) >= 3 and body[0] == 0x0F and body[1] == 0xC7 and (body[2] >> 3) & 7 in (3, 4, 5):
        return {3: "xrstors", 4: "xsavec", 5: "xsaves"}[(body[2] >> 3) & 7]
    if body and 0xD8 <= body[0] <= 0xDF:
        return "an x87 floating-point instruction"
    return "an instruction the host cannot emulate"
