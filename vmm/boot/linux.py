"""The Linux x86 boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst).

Two image kinds are entered the same way, in long mode with identity page
tables and RSI pointing at the zero page:

* a bzImage: the protected-mode part is loaded at ``pref_address`` and
  entered at load address + 0x200 (``startup_64``);
* a vmlinux ELF: PT_LOAD segments at their physical addresses, entered at the
  physical address of ``e_entry``, with a synthesized setup header.

In both the command line goes to ``layout.CMDLINE_ADDR`` and the initrd as
high as the kernel allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import layout
from ..cpustate import CpuState
from ..errors import ImageError
from .cmdline import LINUX_COMMAND_LINE_SIZE, linux_cmdline, write_cmdline
from .elf import EM_X86_64, ElfImage
from .initrd import LINUX_ELF_INITRD_ADDR_MAX, place_initrd, read_image
from .pagetables import IDENTITY_MAP_END, write_identity_map
from .platform import Platform, prepare_platform
from .segments import load_segments, physical_entry
from .setup_header import SetupHeader, parse_setup_header
from .types import BootRequest, BootSetup
from .zeropage import build_zero_page, synthetic_setup_header

#: boot.rst: "the 64-bit entry point is startup_64 at offset 0x200 from the
#: start of the loaded protected-mode kernel".
STARTUP_64_OFFSET = 0x200


@dataclass(frozen=True)
class KernelLimits:
    """What the kernel accepts, from its setup header or the x86 Linux defaults."""

    cmdline_size: int = LINUX_COMMAND_LINE_SIZE - 1
    cmdline_source: str = "x86 Linux COMMAND_LINE_SIZE"
    initrd_addr_max: int = LINUX_ELF_INITRD_ADDR_MAX

    @classmethod
    def from_header(cls, hdr: SetupHeader) -> KernelLimits:
        return cls(hdr.cmdline_size, "setup header cmdline_size", hdr.initrd_addr_max)


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def bzimage_load_address(hdr: SetupHeader) -> tuple[int, int]:
    """(load address, runtime start) of the protected-mode kernel.

    A relocatable kernel is loaded at pref_address rounded up to
    kernel_alignment and runs there.  A non-relocatable one is loaded at
    1 MiB and "will unconditionally move itself and to run at" pref_address.
    """
    if hdr.relocatable_kernel:
        load = _align_up(hdr.pref_address or layout.HIGH_MEMORY_START, hdr.kernel_alignment)
        return load, load
    return layout.HIGH_MEMORY_START, hdr.pref_address or layout.HIGH_MEMORY_START


def load_bzimage(request: BootRequest, data: bytes, path: str) -> BootSetup:
    """Boot a bzImage through its 64-bit entry point."""
    hdr = parse_setup_header(data, path)
    memory = request.memory
    platform = prepare_platform(request)
    load_addr, runtime = bzimage_load_address(hdr)
    kernel = memoryview(data)[hdr.setup_size :]
    kernel_end = max(load_addr + len(kernel), runtime + hdr.init_size)
    if kernel_end > platform.low_ram_end or kernel_end > IDENTITY_MAP_END:
        raise ImageError(
            path,
            f"the kernel needs {runtime:#x}..{kernel_end:#x} (setup header init_size {hdr.init_size:#x} "
            f"from {runtime:#x}), but guest RAM below the MMIO hole ends at {platform.low_ram_end:#x} "
            f"({memory.size // layout.MiB} MiB): give the VM more memory",
        )
    memory.write(load_addr, kernel)
    setup = _finish_linux(
        request,
        platform,
        header=hdr.raw,
        limits=KernelLimits.from_header(hdr),
        kernel_end=kernel_end,
        entry=load_addr + STARTUP_64_OFFSET,
        code32_start=load_addr,
        protocol="linux-bzimage",
    )
    setup.details.update(
        boot_protocol=hdr.version_str,
        kernel_version=hdr.kernel_version,
        load_address=load_addr,
        init_size=hdr.init_size,
        relocatable=hdr.relocatable_kernel,
    )
    return setup


def load_vmlinux(request: BootRequest, elf: ElfImage, limits: KernelLimits | None = None) -> BootSetup:
    """Boot a 64-bit vmlinux ELF at the physical address of its entry point."""
    if not elf.is64 or elf.machine != EM_X86_64:
        raise elf.error(f"not an ELF64 x86-64 kernel (class {elf.elf_class}, e_machine {elf.machine})")
    limits = limits or KernelLimits()
    entry = physical_entry(elf, elf.entry)
    platform = prepare_platform(request)
    loaded = load_segments(request.memory, elf)
    if loaded.end > IDENTITY_MAP_END:
        raise elf.error(f"segments end at {loaded.end:#x}, above the 4 GiB the boot page tables map")
    header = synthetic_setup_header(limits.cmdline_size, limits.initrd_addr_max)
    setup = _finish_linux(
        request,
        platform,
        header=header,
        limits=limits,
        kernel_end=loaded.end,
        entry=entry,
        code32_start=None,
        protocol="linux-elf",
    )
    setup.details.update(load_address=loaded.start, kernel_end=loaded.end)
    return setup


def _finish_linux(
    request: BootRequest,
    platform: Platform,
    *,
    header: bytes,
    limits: KernelLimits,
    kernel_end: int,
    entry: int,
    code32_start: int | None,
    protocol: str,
) -> BootSetup:
    """Command line, initrd, zero page, page tables and the entry state."""
    memory = request.memory
    cmdline = linux_cmdline(request.cmdline, request.mmio_devices, request.virtio_cmdline)
    cmdline_addr = write_cmdline(memory, cmdline, limits.cmdline_size, limits.cmdline_source)
    initrd_addr = initrd_size = 0
    if request.initrd is not None:
        initrd = read_image(request.initrd, "initrd")
        initrd_addr = place_initrd(
            memory,
            request.initrd,
            initrd,
            lowest=kernel_end,
            addr_max=limits.initrd_addr_max,
            ram_end=platform.low_ram_end,
        )
        initrd_size = len(initrd)
    zero_page = build_zero_page(
        header,
        cmdline_addr=cmdline_addr,
        initrd_addr=initrd_addr,
        initrd_size=initrd_size,
        e820=platform.e820,
        rsdp_addr=platform.rsdp_addr,
        code32_start=code32_start,
    )
    memory.write(layout.ZERO_PAGE_ADDR, zero_page)
    cr3 = write_identity_map(memory)
    state = CpuState.flat_long64(entry, cr3, rsi=layout.ZERO_PAGE_ADDR)
    return BootSetup(
        protocol=protocol,
        entry=state,
        cmdline=cmdline,
        details={
            "entry": entry,
            "zero_page": layout.ZERO_PAGE_ADDR,
            "cmdline_addr": cmdline_addr,
            "initrd_addr": initrd_addr,
            "initrd_size": initrd_size,
            "rsdp_addr": platform.rsdp_addr,
            "e820": [(e.addr, e.size, e.type) for e in platform.e820],
        },
    )
