"""A VM: guest memory, in-kernel irqchip, buses, devices and vCPU threads.

``Machine(config)`` builds everything and loads the guest; ``start()`` starts
one thread per vCPU; ``wait()`` returns an ``ExitStatus`` once the VM has
ended, for whatever reason: the guest's exit code, a power-off, a triple
fault, an instruction the host could not emulate, a timeout or ``kill()``.
The first reason wins.  ``close()`` (or the context manager) releases every
fd, thread and mapping, pass or fail.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import cpuid as cpuid_mod
from . import layout
from .boot.types import BootRequest, BootSetup, MmioDeviceInfo, SerialPortInfo
from .bus import Bus
from .console import ConsoleLog
from .errors import ConfigError, ImageError, VmmError
from .exitstatus import ExitReason, ExitStatus
from .irq import CallbackIrqLine
from .memory import GuestMemory, x86_ram_layout

#: Upper bounds a user can ask for; KVM may allow less (checked at creation).
MAX_MEM_MIB = 1 << 20
MAX_VCPUS = 254  # xAPIC IDs 0..254 (255 is broadcast)


@dataclass
class MachineConfig:
    """Everything that defines one microVM.  Option names match `microvm run`."""

    kernel: Path | str
    initrd: Path | str | None = None
    cmdline: str = ""
    mem_mib: int = 128
    vcpus: int = 1
    #: Wall-clock limit in seconds from start(); None for none.
    timeout: float | None = None
    acpi: bool = True
    #: Decompress a bzImage on the host and boot its ELF directly.
    direct_elf: bool = False
    kvm_path: str = "/dev/kvm"
    #: virtio device specs (vmm.devices.virtio.spec objects), in slot order.
    devices: list[Any] = field(default_factory=list)
    #: Directory a Hermit guest may open files in (None: no file access).
    hermit_fs_root: Path | str | None = None
    #: Environment for guests that take one at boot (Hermit).
    env: dict[str, str] = field(default_factory=dict)
    #: Most bytes of serial output kept in memory (older bytes are dropped, and counted).
    console_limit: int = 16 << 20
    cache_dir: Path | str | None = None

    def validate(self, *, need_kernel: bool = True) -> None:
        kernel = Path(self.kernel)
        if not need_kernel:
            pass
        elif not kernel.exists():
            raise ConfigError(f"--kernel: {kernel} does not exist")
        elif not kernel.is_file():
            raise ConfigError(f"--kernel: {kernel} is not a regular file")
        elif not os.access(kernel, os.R_OK):
            raise ConfigError(f"--kernel: {kernel} is not readable")
        if self.initrd is not None:
            initrd = Path(self.initrd)
            if not initrd.is_file():
                raise ConfigError(f"--initrd: {initrd} does not exist or is not a regular file")
            if not os.access(initrd, os.R_OK):
                raise ConfigError(f"--initrd: {initrd} is not readable")
        if not isinstance(self.mem_mib, int) or not 2 <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(f"--mem: {self.mem_mib!r} MiB is out of range (2..{MAX_MEM_MIB})")
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus: {self.vcpus!r} is out of range (1..{MAX_VCPUS})")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"--timeout: {self.timeout!r} must be a positive number of seconds")
        if "\0" in self.cmdline:
            raise ConfigError("--append: the command line contains a NUL byte")


_kvm_lock = threading.Lock()
_kvm_by_path: dict[str, Any] = {}
_kick_installed = False


def _system_kvm(path: str):
    """One /dev/kvm fd per process and path (its supported CPUID is cached on it)."""
    global _kick_installed
    from .kvm.system import Kvm, lib
    from .vcpu import KICK_SIGNAL

    with _kvm_lock:
        kvm = _kvm_by_path.get(path)
        if kvm is None:
            kvm = _kvm_by_path[path] = Kvm(path)
        if not _kick_installed:
            if lib.mvm_install_kick_handler(int(KICK_SIGNAL)) < 0:
                raise VmmError("cannot install the vCPU kick signal handler")
            _kick_installed = True
        return kvm


class Machine:
    """One microVM.  Not reusable: build a new one per boot."""

    def __init__(
        self,
        config: MachineConfig,
        *,
        loader: Callable[[BootRequest], BootSetup] | None = None,
        t0: float | None = None,
    ) -> None:
        self.t0 = time.monotonic() if t0 is None else t0
        config.validate(need_kernel=loader is None)
        self.config = config
        self.status: ExitStatus | None = None
        self.stopping = False
        self.paused = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._park_cond = threading.Condition()
        self._parked = 0
        self._timer: threading.Timer | None = None
        self._closed = False
        self.t_started: float | None = None
        self.t_boot: float | None = None
        self.t_ended: float | None = None
        self.vcpus: list[Any] = []
        self.devices: dict[str, Any] = {}
        self.console = ConsoleLog(config.console_limit)
        self.pio_bus = Bus("port-I/O")
        self.mmio_bus = Bus("MMIO")
        self.memory: GuestMemory | None = None
        self.vm = None
        try:
            self._build(loader)
        except BaseException:
            self.close()
            raise

    # ---- construction ------------------------------------------------------------
    def _build(self, loader: Callable[[BootRequest], BootSetup] | None) -> None:
        from .kvm.system import lib

        cfg = self.config
        kvm = _system_kvm(cfg.kvm_path)
        for cap, name in (
            (lib.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (lib.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (lib.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
            (lib.KVM_CAP_PIT2, "KVM_CAP_PIT2"),
        ):
            kvm.require(cap, name)
        max_vcpus = kvm.check_extension(lib.KVM_CAP_MAX_VCPUS) or kvm.check_extension(lib.KVM_CAP_NR_VCPUS) or 1
        if cfg.vcpus > max_vcpus:
            raise ConfigError(f"--vcpus: {cfg.vcpus} is more than this host's KVM allows ({max_vcpus})")
        self.kvm = kvm
        self.vm = kvm.create_vm()
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        mem_bytes = cfg.mem_mib * layout.MiB
        self.memory = GuestMemory(x86_ram_layout(mem_bytes, layout.MMIO_GAP_START, layout.MMIO_GAP_END))
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address())

        self._attach_legacy_devices()
        mmio_infos = self._attach_virtio_devices()

        request = BootRequest(
            kernel=Path(cfg.kernel),
            memory=self.memory,
            cmdline=cfg.cmdline,
            initrd=Path(cfg.initrd) if cfg.initrd is not None else None,
            vcpus=cfg.vcpus,
            acpi=cfg.acpi,
            mmio_devices=mmio_infos,
            virtio_cmdline=not cfg.acpi,
            serial_ports=[SerialPortInfo(layout.COM1_PORT, layout.COM1_IRQ)],
            direct_elf=cfg.direct_elf,
            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
            env=dict(cfg.env),
            hermit_fs_root=Path(cfg.hermit_fs_root) if cfg.hermit_fs_root else None,
        )
        if loader is None:
            from .boot import load as loader
        self.boot = loader(request)
        self._create_vcpus()
        if self.boot.attach is not None:
            self.boot.attach(self)

    def irq_line(self, gsi: int) -> CallbackIrqLine:
        """An interrupt line wired to the in-kernel irqchip's ``gsi``."""
        return CallbackIrqLine(gsi, self._set_irq)

    def _set_irq(self, gsi: int, level: int) -> None:
        vm = self.vm
        if vm is not None and vm.fd >= 0:
            vm.irq_line(gsi, level)

    def _attach_legacy_devices(self) -> None:
        from .devices.acpi_pm import AcpiPm
        from .devices.boot_timer import BootTimer
        from .devices.debug_exit import DebugExit
        from .devices.i8042 import I8042
        from .devices.serial import Serial

        serial = Serial(irq=self.irq_line(layout.COM1_IRQ), output=self.console.write)
        self.pio_bus.register(layout.COM1_PORT, Serial.SIZE, serial, "serial0")
        self.devices["serial0"] = serial
        i8042 = I8042(self)
        i8042.register(self.pio_bus)
        self.devices["i8042"] = i8042
        debug_exit = DebugExit(self)
        self.pio_bus.register(layout.DEBUG_EXIT_PORT, 4, debug_exit, "debug-exit")
        self.devices["debug-exit"] = debug_exit
        timer = BootTimer(self)
        self.pio_bus.register(layout.BOOT_TIMER_PORT, 1, timer, "boot-timer")
        self.devices["boot-timer"] = timer
        pm = AcpiPm(self)
        self.pio_bus.register(AcpiPm.BASE, AcpiPm.SIZE, pm, "acpi-pm")
        self.devices["acpi-pm"] = pm

    def _attach_virtio_devices(self) -> list[MmioDeviceInfo]:
        infos: list[MmioDeviceInfo] = []
        if not self.config.devices:
            return infos
        from .devices.virtio.attach import attach_virtio_device

        for index, spec in enumerate(self.config.devices):
            base, gsi = layout.virtio_mmio_slot(index)
            name, device = attach_virtio_device(self, spec, index, base, gsi)
            self.devices[name] = device
            infos.append(MmioDeviceInfo(base, layout.VIRTIO_MMIO_SIZE, gsi, name=f"VR{index:02X}"))
        return infos

    def _create_vcpus(self) -> None:
        from .cpustate import write_boot_gdt
        from .vcpu import Vcpu, boot_msrs

        cfg = self.config
        supported = self.kvm.supported_cpuid()
        from .kvm.system import lib

        tsc_deadline = bool(self.kvm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER))
        msr_list = set(self.kvm.msr_index_list())
        msrs = boot_msrs(msr_list)
        for index in range(cfg.vcpus):
            fd = self.vm.create_vcpu(index)
            vcpu = Vcpu(self, fd)
            self.vcpus.append(vcpu)
            table = cpuid_mod.normalize(supported, index, cfg.vcpus, tsc_deadline=tsc_deadline)
            if self.boot.cpuid_filter is not None:
                table = self.boot.cpuid_filter(table)
            fd.set_cpuid2(table)
            if msrs:
                fd.set_msrs(msrs)
            vcpu.set_fpu_defaults()
            vcpu.setup_lapic()
            if self.boot.restore_vcpu is not None:
                self.boot.restore_vcpu(vcpu)
            elif index == 0:
                vcpu.apply(self.boot.entry)
            elif self.boot.ap_entry is not None:
                vcpu.apply(self.boot.ap_entry(index))
                fd.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        if self.boot.entry.mode != "real" and self.boot.details.get("boot_gdt", True):
            write_boot_gdt(self.memory)

    # ---- VmControl ------------------------------------------------------------------
    def request_exit(
        self,
        reason: ExitReason,
        code: int | None = None,
        detail: str = "",
        *,
        vcpu: int | None = None,
        rip: int | None = None,
        insn_bytes: bytes | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        with self._lock:
            if self.status is not None:
                return
            self.status = ExitStatus(reason, code, detail, vcpu, rip, insn_bytes, dict(extra or {}))
            self.t_ended = time.monotonic()
            self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
        for v in self.vcpus:
            v.kick()
        with self._park_cond:
            self._park_cond.notify_all()
        self._done.set()

    def note_boot_time(self) -> None:
        if self.t_boot is None:
            self.t_boot = time.monotonic()

    @property
    def tsc_khz(self) -> int | None:
        """The guest TSC frequency, when KVM reports it."""
        from .kvm.system import lib

        if not self.vcpus or not self.kvm.check_extension(lib.KVM_CAP_GET_TSC_KHZ):
            return None
        return self.vcpus[0].fd.get_tsc_khz()

    @property
    def serial_sink(self) -> Callable[[bytes], None]:
        """Where guest console text goes (Hermit's hypercalls write here too)."""
        return self.console.write

    @property
    def control(self) -> Machine:
        return self

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> Machine:
        if self.t_started is not None:
            raise VmmError("this machine was already started; build a new one")
        self.t_started = time.monotonic()
        if self.config.timeout is not None:
            self._timer = threading.Timer(self.config.timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()
        for v in self.vcpus:
            t = threading.Thread(target=v.run_loop, name=f"vcpu{v.index}", daemon=True)
            v.thread = t
            t.start()
        return self

    def _on_timeout(self) -> None:
        self.request_exit(
            ExitReason.TIMEOUT, detail=f"the VM ran longer than its timeout of {self.config.timeout:g} s"
        )

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait until the VM ends; None if ``timeout`` seconds pass first."""
        if not self._done.wait(timeout):
            return None
        for v in self.vcpus:
            t = v.thread
            if t is not None and t is not threading.current_thread():
                t.join()
        return self.status

    @property
    def running(self) -> bool:
        return self.t_started is not None and not self._done.is_set()

    def kill(self, detail: str = "killed by the host") -> ExitStatus:
        self.request_exit(ExitReason.KILLED, detail=detail)
        status = self.wait()
        assert status is not None
        return status

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU outside KVM_RUN (for snapshots); returns once all are parked."""
        with self._park_cond:
            self.paused = True
        for v in self.vcpus:
            v.kick()
        deadline = time.monotonic() + timeout
        with self._park_cond:
            live = [v for v in self.vcpus if v.thread is not None]
            while self._parked < len(live) and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmmError(f"pause: only {self._parked} of {len(live)} vCPUs stopped in {timeout} s")
                self._park_cond.wait(left)

    def resume(self) -> None:
        with self._park_cond:
            self.paused = False
            self._park_cond.notify_all()

    def park(self, vcpu: Any) -> None:
        """Called by a vCPU thread while the machine is paused."""
        with self._park_cond:
            self._parked += 1
            self._park_cond.notify_all()
            while self.paused and not self.stopping:
                self._park_cond.wait()
            self._parked -= 1
        if vcpu._run is not None:
            vcpu._run.immediate_exit = 0

    def snapshot(self, path: str | Path) -> Path:
        """Save this running VM into directory ``path`` (see vmm.snapshot); it keeps running."""
        from .snapshot import save

        return save(self, path)

    @classmethod
    def restore(cls, path: str | Path, **overrides: Any) -> Machine:
        """A new, not yet started Machine continuing the snapshot in ``path``."""
        from .snapshot import restore

        return restore(path, **overrides)

    def send_input(self, data: bytes) -> int:
        """Type ``data`` on the guest's serial console; returns how many bytes were queued."""
        return self.devices["serial0"].queue_input(data)

    def close(self) -> None:
        """Stop the VM if it runs and release every resource.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.t_started is not None and not self._done.is_set():
            self.request_exit(ExitReason.KILLED, detail="machine closed while running")
        if self._timer is not None:
            self._timer.cancel()
        for v in self.vcpus:
            if v.thread is not None:
                v.thread.join()
        for dev in self.devices.values():
            closer = getattr(dev, "close", None)
            if closer is not None:
                try:
                    closer()
                except Exception:
                    pass
        for v in self.vcpus:
            v.fd.close()
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- results ---------------------------------------------------------------------
    @property
    def boot_time(self) -> float | None:
        """Seconds from VMM start to the guest's boot-timer write."""
        return None if self.t_boot is None else self.t_boot - self.t0

    def exits(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for v in self.vcpus:
            total.update(v.exits)
        return total

    def metrics(self) -> dict[str, Any]:
        end = self.t_ended if self.t_ended is not None else time.monotonic()
        devices = {}
        for name, dev in self.devices.items():
            m = getattr(dev, "metrics", None)
            if callable(m):
                try:
                    devices[name] = m()
                except Exception:
                    pass
        return {
            "boot_time_s": self.boot_time,
            "wall_time_s": end - self.t0,
            "run_time_s": None if self.t_started is None else end - self.t_started,
            "exits": dict(self.exits()),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "console_bytes": self.console.total,
            "unhandled_pio": self.pio_bus.stats.unhandled_reads + self.pio_bus.stats.unhandled_writes,
            "unhandled_mmio": self.mmio_bus.stats.unhandled_reads + self.mmio_bus.stats.unhandled_writes,
            "devices": devices,
            "boot": {"protocol": self.boot.protocol, **self.boot.details} if getattr(self, "boot", None) else {},
        }

    def summary(self) -> dict[str, Any]:
        """What `microvm run --summary-json` writes."""
        st = self.status
        return {
            "exit": st.to_dict() if st is not None else None,
            "guest_exit_code": st.code if st is not None else None,
            "process_exit_code": st.process_exit_code if st is not None else None,
            **self.metrics(),
        }


__all__ = ["ConfigError", "ImageError", "Machine", "MachineConfig"]
