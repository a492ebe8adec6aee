"""What a loader is asked to do and what it hands back to the machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..cpustate import CpuState
from ..memory import GuestMemory


@dataclass(frozen=True)
class MmioDeviceInfo:
    """A memory-mapped device the guest must be told about (cmdline and ACPI DSDT)."""

    base: int
    size: int
    gsi: int
    #: ACPI _HID; virtio-mmio devices are "LNRO0005".
    hid: str = "LNRO0005"
    #: Short name for the DSDT (4 characters, e.g. "VR00").
    name: str = ""


@dataclass(frozen=True)
class SerialPortInfo:
    port: int
    irq: int


@dataclass
class BootRequest:
    """Inputs to a loader: the image, the command line and the machine's shape."""

    kernel: Path
    memory: GuestMemory
    cmdline: str = ""
    initrd: Path | None = None
    vcpus: int = 1
    #: Build ACPI tables (RSDP/XSDT/FADT/MADT/DSDT) for the guest.
    acpi: bool = True
    mmio_devices: list[MmioDeviceInfo] = field(default_factory=list)
    serial_ports: list[SerialPortInfo] = field(default_factory=list)
    #: Add ``virtio_mmio.device=`` entries for mmio_devices to the Linux command line.
    virtio_cmdline: bool = True
    #: The machine has an i8042 (ACPI FADT IAPC_BOOT_ARCH 8042 flag, DSDT PNP0303).
    i8042: bool = True
    #: Extra AML terms (vmm.acpi.aml objects) for the DSDT's \_SB_ scope.
    acpi_devices: list[Any] = field(default_factory=list)
    #: Decompress a bzImage's payload on the host and enter the ELF directly.
    direct_elf: bool = False
    #: Where decompressed payloads are cached (by sha256); None means the default.
    cache_dir: Path | None = None
    #: Environment variables for guests whose protocol passes them (Hermit/uhyve).
    env: dict[str, str] = field(default_factory=dict)
    #: Host directory a Hermit guest may open files in through uhyve's file
    #: hypercalls (None: every open fails with ENOENT).
    hermit_fs_root: Path | None = None


@dataclass
class BootSetup:
    """What a loader produced: how to enter the guest, and what it wrote."""

    #: "linux-bzimage", "linux-elf", "pvh", "multiboot", "hermit".
    protocol: str
    #: Register state of the boot vCPU.
    entry: CpuState
    #: The command line as the guest sees it (after additions such as virtio_mmio.device=).
    cmdline: str = ""
    #: Register state of the other vCPUs when the protocol starts them itself
    #: (None: they wait for INIT/SIPI from the guest, as on real hardware).
    ap_entry: Callable[[int], CpuState] | None = None
    #: Called with the Machine once it exists, to attach protocol devices
    #: (e.g. Hermit's hypercall ports).
    attach: Callable[[Any], None] | None = None
    #: Set a vCPU's whole state instead of entering at ``entry`` (snapshot restore).
    restore_vcpu: Callable[[Any], None] | None = None
    #: Applied to each vCPU's CPUID table after the VMM's normalisation (a
    #: protocol's own CPUID conventions, e.g. uhyve's).
    cpuid_filter: Callable[[list[Any]], list[Any]] | None = None
    #: Facts for summaries, errors and tests (kernel version, load addresses, ...).
    details: dict[str, Any] = field(default_factory=dict)
