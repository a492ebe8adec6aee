"""Measure what kind of KVM host this is, instead of guessing.

Some hosts (KVM-PVM nested in another VM, for one) run guest ring 0 by
emulating it one instruction at a time; others run it natively.  Tests that
need a full Linux or Hermit boot ask ``host_info().ring0_native``.

The probe boots a 32-bit guest twice with a ring-0 ``dec ecx; jnz`` loop of
two lengths and divides the time difference by the extra instructions, so
VM creation and exit costs cancel out.  Native hosts run a loop iteration in
well under a nanosecond per instruction; emulating hosts take hundreds.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time
from dataclasses import asdict, dataclass

from .boot.types import BootRequest, BootSetup
from .cpustate import CpuState
from .exitstatus import ExitReason

#: Below this many nanoseconds per ring-0 instruction we call ring 0 native.
NATIVE_THRESHOLD_NS = 20.0
_LOOP_ADDR = 0x10000
_SHORT = 10_000
_LONG = 210_000


def _loop_code(iterations: int) -> bytes:
    # mov ecx, imm32 ; 1: dec ecx ; jnz 1b ; mov al, 0 ; out 0xf4, al ; jmp $
    return b"\xb9" + struct.pack("<I", iterations) + b"\xff\xc9\x75\xfc" + b"\xb0\x00\xe6\xf4" + b"\xeb\xfe"


@dataclass(frozen=True)
class HostInfo:
    ring0_native: bool
    ring0_ns_per_instruction: float
    kvm_path: str

    def describe(self) -> str:
        kind = "native" if self.ring0_native else "emulated (nested KVM-PVM or similar)"
        return f"guest ring 0 is {kind}: {self.ring0_ns_per_instruction:.1f} ns per instruction"


def _time_loop(iterations: int, kvm_path: str) -> float:
    from .machine import Machine, MachineConfig

    def loader(req: BootRequest) -> BootSetup:
        req.memory.write(_LOOP_ADDR, _loop_code(iterations))
        return BootSetup("probe", CpuState.flat_protected32(_LOOP_ADDR))

    cfg = MachineConfig(kernel="<ring-0 probe>", mem_mib=2, timeout=60, acpi=False, kvm_path=kvm_path)
    with Machine(cfg, loader=loader) as m:
        t = time.perf_counter()
        m.start()
        status = m.wait()
        elapsed = time.perf_counter() - t
    if status is None or status.reason is not ExitReason.GUEST_EXIT:
        raise RuntimeError(f"host probe guest did not finish: {status and status.describe()}")
    return elapsed


def measure(kvm_path: str = "/dev/kvm") -> HostInfo:
    short = min(_time_loop(_SHORT, kvm_path) for _ in range(2))
    long = min(_time_loop(_LONG, kvm_path) for _ in range(2))
    instructions = 2 * (_LONG - _SHORT)
    ns = max(long - short, 0.0) * 1e9 / instructions
    return HostInfo(ns < NATIVE_THRESHOLD_NS, ns, kvm_path)


@functools.cache
def host_info(kvm_path: str = "/dev/kvm") -> HostInfo:
    """The measured host kind, cached per process (and per boot in the cache dir)."""
    cache = _cache_file()
    boot_id = _boot_id()
    if cache is not None and boot_id:
        try:
            data = json.loads(cache.read_text())
            if data.get("boot_id") == boot_id and data.get("kvm_path") == kvm_path:
                return HostInfo(data["ring0_native"], data["ring0_ns_per_instruction"], kvm_path)
        except (OSError, ValueError, KeyError):
            pass
    info = measure(kvm_path)
    if cache is not None and boot_id:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"boot_id": boot_id, **asdict(info)}))
            tmp.replace(cache)
        except OSError:
            pass
    return info


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cache_file():
    from .cache import cache_root

    return cache_root() / "hostinfo.json"
