"""Thin typed wrappers over the /dev/kvm, VM and vCPU file descriptors.

Each method is one ioctl.  Failures raise ``KvmIoctlError`` naming the ioctl;
a missing or unusable /dev/kvm raises ``KvmUnavailableError`` saying what to
check.  Nothing here knows about devices, loaders or threads.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import KvmIoctlError, KvmUnavailableError

try:
    from ._kvm import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise KvmUnavailableError(
        "the compiled KVM bindings (vmm.kvm._kvm) are missing: install the package "
        "with `pip install -e .` (needs gcc, the Python headers and <linux/kvm.h> "
        f"from linux-libc-dev) ({exc})"
    ) from exc

def _check_fresh() -> None:
    import hashlib
    from pathlib import Path

    built = ffi.string(lib.mvm_build_hash()).decode()
    source = hashlib.sha256((Path(__file__).with_name("_build.py")).read_bytes()).hexdigest()[:16]
    if built != source:
        raise KvmUnavailableError(
            "the compiled KVM bindings (vmm.kvm._kvm) are older than vmm/kvm/_build.py: "
            "rebuild them with `pip install -e .`"
        )


try:
    _check_fresh()
except AttributeError:  # built before the hash existed
    raise KvmUnavailableError(
        "the compiled KVM bindings (vmm.kvm._kvm) are stale: rebuild them with `pip install -e .`"
    ) from None

KVM_API_VERSION = 12
MAX_CPUID_ENTRIES = 256
DEFAULT_KVM_PATH = "/dev/kvm"


def _check(name: str, ret: int, detail: str = "") -> int:
    if ret < 0:
        raise KvmIoctlError(name, -ret, detail)
    return ret


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf (struct kvm_cpuid_entry2 as plain data)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def open_kvm(path: str = DEFAULT_KVM_PATH) -> Kvm:
    return Kvm(path)


class Kvm:
    """The system fd: capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str = DEFAULT_KVM_PATH) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this machine has no KVM. Check that the CPU has "
                "virtualization enabled (vmx/svm in /proc/cpuinfo, or nested virtualization "
                "on a cloud VM) and that the kvm module is loaded (`modprobe kvm_intel` or "
                "`modprobe kvm_amd`)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path} is not accessible to uid {os.getuid()}: add the user to the group "
                f"that owns it (`ls -l {path}`, usually `kvm`) or run as root"
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        version = lib.mvm_ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0)
        if version < 0:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path} is not a KVM device (KVM_GET_API_VERSION failed: {os.strerror(-version)})"
            )
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path} reports KVM API version {version}, expected {KVM_API_VERSION}"
            )
        self.vcpu_mmap_size = _check(
            "KVM_GET_VCPU_MMAP_SIZE", lib.mvm_ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0)
        )
        self._cpuid: list[CpuidEntry] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        ret = lib.mvm_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(ret, 0)

    def require(self, cap: int, name: str) -> None:
        if not self.check_extension(cap):
            raise KvmUnavailableError(f"{self.path} lacks the capability {name}, which this VMM needs")

    def supported_cpuid(self) -> list[CpuidEntry]:
        if self._cpuid is None:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
            buf.nent = MAX_CPUID_ENTRIES
            _check("KVM_GET_SUPPORTED_CPUID", lib.mvm_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf))
            self._cpuid = [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (buf.entries[i] for i in range(buf.nent))
            ]
        return list(self._cpuid)

    def msr_index_list(self) -> list[int]:
        n = 1024
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        buf.nmsrs = n
        _check("KVM_GET_MSR_INDEX_LIST", lib.mvm_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf))
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self) -> VmFd:
        fd = _check("KVM_CREATE_VM", lib.mvm_ioctl_int(self.fd, lib.KVM_CREATE_VM, 0))
        os.set_inheritable(fd, False)
        return VmFd(self, fd)


class VmFd:
    """A VM fd: memory slots, irqchip, PIT, irqfd/ioeventfd, clock, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return max(lib.mvm_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap), 0)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": size,
                "userspace_addr": userspace_addr,
            },
        )
        _check(
            "KVM_SET_USER_MEMORY_REGION",
            lib.mvm_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
            f"slot {slot} at guest {guest_phys_addr:#x} size {size:#x}",
        )

    def set_tss_addr(self, addr: int) -> None:
        _check("KVM_SET_TSS_ADDR", lib.mvm_ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr))

    def set_identity_map_addr(self, addr: int) -> None:
        p = ffi.new("uint64_t *", addr)
        _check("KVM_SET_IDENTITY_MAP_ADDR", lib.mvm_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p))

    def create_irqchip(self) -> None:
        _check("KVM_CREATE_IRQCHIP", lib.mvm_ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0))

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        _check("KVM_CREATE_PIT2", lib.mvm_ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg))

    def irq_line(self, irq: int, level: int) -> None:
        p = ffi.new("struct kvm_irq_level *")
        p.irq = irq
        p.level = level
        _check("KVM_IRQ_LINE", lib.mvm_ioctl(self.fd, lib.KVM_IRQ_LINE, p), f"irq {irq}")

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False, resample_fd: int | None = None) -> None:
        p = ffi.new("struct kvm_irqfd *")
        p.fd = fd
        p.gsi = gsi
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None:
            flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
            p.resamplefd = resample_fd
        p.flags = flags
        _check("KVM_IRQFD", lib.mvm_ioctl(self.fd, lib.KVM_IRQFD, p), f"gsi {gsi}")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        p = ffi.new("struct kvm_ioeventfd *")
        p.fd = fd
        p.addr = addr
        p.len = length
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            p.datamatch = datamatch
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        p.flags = flags
        _check("KVM_IOEVENTFD", lib.mvm_ioctl(self.fd, lib.KVM_IOEVENTFD, p), f"addr {addr:#x}")

    def get_clock(self) -> int:
        p = ffi.new("struct kvm_clock_data *")
        _check("KVM_GET_CLOCK", lib.mvm_ioctl(self.fd, lib.KVM_GET_CLOCK, p))
        return int(p.clock)

    def set_clock(self, clock: int) -> None:
        p = ffi.new("struct kvm_clock_data *")
        p.clock = clock
        _check("KVM_SET_CLOCK", lib.mvm_ioctl(self.fd, lib.KVM_SET_CLOCK, p))

    def get_irqchip(self, chip_id: int) -> bytes:
        p = ffi.new("struct kvm_irqchip *")
        p.chip_id = chip_id
        _check("KVM_GET_IRQCHIP", lib.mvm_ioctl(self.fd, lib.KVM_GET_IRQCHIP, p), f"chip {chip_id}")
        return bytes(ffi.buffer(p))

    def set_irqchip(self, blob: bytes) -> None:
        p = _blob("struct kvm_irqchip *", blob)
        _check("KVM_SET_IRQCHIP", lib.mvm_ioctl(self.fd, lib.KVM_SET_IRQCHIP, p))

    def get_pit2(self) -> bytes:
        p = ffi.new("struct kvm_pit_state2 *")
        _check("KVM_GET_PIT2", lib.mvm_ioctl(self.fd, lib.KVM_GET_PIT2, p))
        return bytes(ffi.buffer(p))

    def set_pit2(self, blob: bytes) -> None:
        _check("KVM_SET_PIT2", lib.mvm_ioctl(self.fd, lib.KVM_SET_PIT2, _blob("struct kvm_pit_state2 *", blob)))

    def enable_cap(self, cap: int, *args: int) -> None:
        p = ffi.new("struct kvm_enable_cap *")
        p.cap = cap
        for i, a in enumerate(args):
            p.args[i] = a
        _check("KVM_ENABLE_CAP", lib.mvm_ioctl(self.fd, lib.KVM_ENABLE_CAP, p), f"cap {cap}")

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = _check(
            "KVM_CREATE_VCPU", lib.mvm_ioctl_int(self.fd, lib.KVM_CREATE_VCPU, vcpu_id), f"vCPU {vcpu_id}"
        )
        os.set_inheritable(fd, False)
        return VcpuFd(self, fd, vcpu_id)


def _blob(ctype: str, blob: bytes):
    p = ffi.new(ctype)
    size = ffi.sizeof(p[0])
    if len(blob) != size:
        raise ValueError(f"{ctype}: saved state is {len(blob)} bytes, this host's struct is {size}")
    ffi.memmove(p, blob, size)
    return p


# Per-vCPU state blobs saved by snapshots: (struct, get ioctl, set ioctl).
_VCPU_BLOBS = {
    "lapic": ("struct kvm_lapic_state *", "KVM_GET_LAPIC", "KVM_SET_LAPIC"),
    "events": ("struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS"),
    "xsave": ("struct kvm_xsave *", "KVM_GET_XSAVE", "KVM_SET_XSAVE"),
    "xcrs": ("struct kvm_xcrs *", "KVM_GET_XCRS", "KVM_SET_XCRS"),
    "debugregs": ("struct kvm_debugregs *", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS"),
    "regs": ("struct kvm_regs *", "KVM_GET_REGS", "KVM_SET_REGS"),
    "sregs": ("struct kvm_sregs *", "KVM_GET_SREGS", "KVM_SET_SREGS"),
    "fpu": ("struct kvm_fpu *", "KVM_GET_FPU", "KVM_SET_FPU"),
    "mp_state": ("struct kvm_mp_state *", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE"),
}


class VcpuFd:
    """A vCPU fd and its mmap'ed ``struct kvm_run``."""

    def __init__(self, vm: VmFd, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self._mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._mmap)
        self.run_struct = ffi.cast("struct kvm_run *", self._run_buf)
        # A view of the whole mmap: port-I/O data lives at run->io.data_offset.
        self.run_view = memoryview(self._mmap)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_view.release()
            self.run_struct = None
            self._run_buf = None
            try:
                self._mmap.close()
            except BufferError:  # pragma: no cover - a cdata still refers to it
                pass
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """KVM_RUN; returns 0, or -errno (EINTR and EAGAIN are normal)."""
        return lib.mvm_kvm_run(self.fd)

    # ---- registers -------------------------------------------------------
    def get_regs(self):
        p = ffi.new("struct kvm_regs *")
        _check("KVM_GET_REGS", lib.mvm_ioctl(self.fd, lib.KVM_GET_REGS, p))
        return p

    def set_regs(self, p) -> None:
        _check("KVM_SET_REGS", lib.mvm_ioctl(self.fd, lib.KVM_SET_REGS, p))

    def get_sregs(self):
        p = ffi.new("struct kvm_sregs *")
        _check("KVM_GET_SREGS", lib.mvm_ioctl(self.fd, lib.KVM_GET_SREGS, p))
        return p

    def set_sregs(self, p) -> None:
        _check("KVM_SET_SREGS", lib.mvm_ioctl(self.fd, lib.KVM_SET_SREGS, p))

    def get_fpu(self):
        p = ffi.new("struct kvm_fpu *")
        _check("KVM_GET_FPU", lib.mvm_ioctl(self.fd, lib.KVM_GET_FPU, p))
        return p

    def set_fpu(self, p) -> None:
        _check("KVM_SET_FPU", lib.mvm_ioctl(self.fd, lib.KVM_SET_FPU, p))

    def set_msrs(self, msrs: dict[int, int]) -> None:
        items = list(msrs.items())
        p = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        p.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            p.entries[i].index = index
            p.entries[i].data = value
        n = _check("KVM_SET_MSRS", lib.mvm_ioctl(self.fd, lib.KVM_SET_MSRS, p))
        if n != len(items):
            bad = items[n][0]
            raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = list(indices)
        p = ffi.new("struct kvm_msrs *", {"nmsrs": len(idx), "entries": len(idx)})
        p.nmsrs = len(idx)
        for i, index in enumerate(idx):
            p.entries[i].index = index
        n = _check("KVM_GET_MSRS", lib.mvm_ioctl(self.fd, lib.KVM_GET_MSRS, p))
        return {int(p.entries[i].index): int(p.entries[i].data) for i in range(n)}

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        p = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        p.nent = len(entries)
        for i, e in enumerate(entries):
            d = p.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        _check("KVM_SET_CPUID2", lib.mvm_ioctl(self.fd, lib.KVM_SET_CPUID2, p), f"vCPU {self.id}")

    def get_mp_state(self) -> int:
        p = ffi.new("struct kvm_mp_state *")
        _check("KVM_GET_MP_STATE", lib.mvm_ioctl(self.fd, lib.KVM_GET_MP_STATE, p))
        return int(p.mp_state)

    def set_mp_state(self, state: int) -> None:
        p = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        _check("KVM_SET_MP_STATE", lib.mvm_ioctl(self.fd, lib.KVM_SET_MP_STATE, p))

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_GET_TSC_KHZ)."""
        return _check("KVM_GET_TSC_KHZ", lib.mvm_ioctl_int(self.fd, lib.KVM_GET_TSC_KHZ, 0))

    def translate(self, linear_address: int) -> tuple[int, bool]:
        """KVM_TRANSLATE: guest-virtual to guest-physical with the vCPU's page tables."""
        p = ffi.new("struct kvm_translation *")
        p.linear_address = linear_address
        _check("KVM_TRANSLATE", lib.mvm_ioctl(self.fd, lib.KVM_TRANSLATE, p), f"address {linear_address:#x}")
        return int(p.physical_address), bool(p.valid)

    # ---- opaque state for snapshots ---------------------------------------
    def get_blob(self, name: str) -> bytes:
        ctype, get, _ = _VCPU_BLOBS[name]
        p = ffi.new(ctype)
        _check(get, lib.mvm_ioctl(self.fd, getattr(lib, get), p), f"vCPU {self.id}")
        return bytes(ffi.buffer(p))

    def set_blob(self, name: str, blob: bytes) -> None:
        ctype, _, setter = _VCPU_BLOBS[name]
        _check(setter, lib.mvm_ioctl(self.fd, getattr(lib, setter), _blob(ctype, blob)), f"vCPU {self.id}")
