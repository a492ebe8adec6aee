"""Boot Hermit (RustyHermit) unikernels the way the uhyve hypervisor does.

A Hermit application is one ELF file (kernel and application linked
together; usually a static PIE) carrying a ``.note.hermit.entry-version``
note.  uhyve loads it, identity-maps guest memory, writes a boot-info
structure and enters every vCPU in 64-bit long mode at the ELF entry point
with ``rdi`` = boot info and ``rsi`` = CPU number.  The guest then talks to
the host through uhyve's port-I/O hypercalls (``vmm.devices.uhyve``).

References (read for the versions the supported images were built with):
- hermit-entry 0.10 (entry version 4): the note format, ``RawBootInfo`` and
  ``Entry = extern "C" fn(&RawBootInfo, cpu_id: u32) -> !``, and how a
  ``KernelObject`` is loaded and relocated (only ``R_X86_64_RELATIVE``,
  ``R_X86_64_64`` and ``R_X86_64_GLOB_DAT``).
- uhyve (hermit-os/uhyve, commit 9bcf90fb): ``X86_64MemoryLayout`` (the
  addresses below), ``initialize_pagetables`` (identity map with 2 MiB pages,
  recursive PML4 slot 511, "legacy" mapping of the whole first GiB for
  kernels without a Hermit version note), ``KvmCpu::setup_long_mode``,
  ``setup_cpuid``, ``setup_msrs`` and ``write_boot_info_to_mem``.
- The Hermit kernel 0.6.9 sources the three reference images were built
  from: what it reads from the boot info and the device tree.

Deliberate differences from uhyve, each for a reason:
- No load-address randomisation: relocatable kernels always load at
  ``UHYVE_KERNEL_OFFSET`` so runs are reproducible (uhyve's ``--aslr`` off).
- ``has_pci`` is False by default: this VMM exposes no PCI devices, and
  telling the guest so spares it a full configuration-space scan.
- ``cpu_freq`` is filled in by ``attach`` when the machine can tell the
  guest TSC frequency (KVM_GET_TSC_KHZ, as uhyve does), else left empty and
  the kernel finds the frequency itself.
- The initial IDT limit is 0, so a fault before the kernel loads its own
  IDT is a clean triple fault rather than a jump through garbage.
"""

from __future__ import annotations

import dataclasses
import shlex
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import layout
from ..cpustate import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    RFLAGS_RESERVED,
    CpuState,
    Segment,
    gdt_entry,
)
from ..errors import ConfigError, ImageError
from .elf import (
    EM_X86_64,
    ET_DYN,
    ET_EXEC,
    PT_LOAD,
    PT_TLS,
    ElfImage,
    Note,
)
from .fdt import FdtNode, build_dtb
from .types import BootRequest, BootSetup

# ---- notes (hermit-entry src/lib.rs, src/elf.rs) ----------------------------
HERMIT_NOTE_OWNER = b"HERMIT"
NT_HERMIT_ENTRY_VERSION = 0x5A00
#: Entry versions whose boot-info layout this loader writes.
SUPPORTED_ENTRY_VERSIONS = (4,)
UHYVEIF_NOTE_OWNER = b"UHYVEIF"
NT_UHYVE_INTERFACE_VERSION = 0x5B00
#: uhyve-interface versions whose hypercalls vmm.devices.uhyve implements.
#: Kernels without the note speak version 1 (uhyve's default).
SUPPORTED_UHYVE_INTERFACE_VERSIONS = (1,)
GNU_NOTE_OWNER = b"GNU"
NT_GNU_ABI_TAG = 1
ELF_NOTE_OS_HERMIT = 6
#: Kernels older than this (or without a version note) expect uhyve to map
#: the whole GiB that holds the kernel ("legacy mapping"): Hermit 0.6.x
#: unmaps everything from its end to that GiB's last 2 MiB page at boot.
LEGACY_MAPPING_BEFORE = (0, 10, 0)

# ---- relocations (System V x86-64 psABI §4.4.1) -------------------------------
R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_RELATIVE = 8
_RELOC_NAMES = {
    R_X86_64_64: "R_X86_64_64",
    R_X86_64_GLOB_DAT: "R_X86_64_GLOB_DAT",
    R_X86_64_RELATIVE: "R_X86_64_RELATIVE",
}
SHT_DYNSYM = 11
STB_WEAK = 2
SHN_UNDEF = 0
ELF64_SYM_SIZE = 24

# ---- uhyve's x86_64 memory layout (src/arch/x86_64/mod.rs), guest address 0 ----
UHYVE_GDT_ADDR = 0x0
UHYVE_GDT_ENTRIES = 3
UHYVE_FDT_ADDR = 0x1000
UHYVE_FDT_SIZE = 0x4000
UHYVE_BOOT_INFO_ADDR = UHYVE_FDT_ADDR + UHYVE_FDT_SIZE
UHYVE_BOOT_INFO_SIZE = 0x1000
UHYVE_PML4_ADDR = 0x10000
UHYVE_PAGETABLES_ADDR = 0x11000
UHYVE_KERNEL_OFFSET = 0x40000
UHYVE_KERNEL_STACK_SIZE = 0x8000
UHYVE_PAGETABLES_END = UHYVE_KERNEL_OFFSET - UHYVE_KERNEL_STACK_SIZE
#: uhyve-interface v1 passes 32-bit parameter addresses and Hermit < 0.13.2
#: assumes no RAM hole below 3 GiB: uhyve refuses more memory for v1 kernels.
UHYVE_V1_MAX_MEMORY = layout.MMIO_GAP_START
#: Selectors of uhyve's boot GDT (null, 64-bit code, data).
UHYVE_SEL_CODE = 1 << 3
UHYVE_SEL_DATA = 2 << 3
#: uhyve-interface v1 ``HypercallAddress::Uart``: the kernel's "serial port"
#: under uhyve is this hypercall port (one byte per ``out``).
UHYVE_V1_UART_PORT = 0x800

# ---- page-table entry bits (Intel SDM Vol. 3A §4.5) ---------------------------
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7
PAGE_SIZE = 0x1000
LARGE_PAGE_SIZE = 0x20_0000
GIB = 1 << 30

# ---- MSRs and CPUID (uhyve src/linux/x86_64/kvm_cpu.rs) -----------------------
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
CPUID_LEAF_FEATURES = 0x1
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_MSR = 1 << 5
CPUID_LEAF_PERFMON = 0xA
CPUID_LEAF_EXT_FEATURES = 0x8000_0001
CPUID_8000_0001_EDX_PDPE1GB = 1 << 26
CPUID_BRAND_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)
UHYVE_BRAND_STRING = b"uhyve - unikernel hypervisor"

# ---- RawBootInfo for entry version 4 (hermit-entry 0.10 boot_info/mod.rs) ------
# repr(C): RawHardwareInfo (32 bytes), RawLoadInfo (48), RawPlatformInfo (48):
# a C enum (u32 tag, then the variant union aligned to 8).
RAW_BOOT_INFO_SIZE = 128
#: RawPlatformInfo discriminants on x86_64 (LinuxBoot is not compiled in).
PLATFORM_MULTIBOOT = 0
PLATFORM_UHYVE = 1
PLATFORM_LINUX_BOOT_PARAMS = 2
PLATFORM_FDT = 3
BOOT_INFO_CPU_FREQ_OFFSET = 80 + 8 + 16


@dataclass(frozen=True)
class TlsInfo:
    start: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class HermitBootInfo:
    """The fields of ``BootInfo`` (entry version 4) with ``PlatformInfo::Uhyve``."""

    phys_addr_start: int
    phys_addr_end: int
    serial_port_base: int | None
    device_tree: int | None
    kernel_image_start: int
    kernel_image_end: int
    tls: TlsInfo | None
    has_pci: bool
    num_cpus: int
    cpu_freq_khz: int | None
    boot_time_ns: int

    def pack(self) -> bytes:
        tls = self.tls or TlsInfo(0, 0, 0, 0)
        hardware = struct.pack(
            "<QQH6xQ",
            self.phys_addr_start,
            self.phys_addr_end,
            self.serial_port_base or 0,  # Option<NonZeroU16>: 0 is None
            self.device_tree or 0,  # Option<NonZeroU64>
        )
        load = struct.pack(
            "<6Q", self.kernel_image_start, self.kernel_image_end, tls.start, tls.filesz, tls.memsz, tls.align
        )
        boot_time = (self.boot_time_ns & ((1 << 128) - 1)).to_bytes(16, "little")
        platform = struct.pack(
            "<I4x?7xQI4x16s",
            PLATFORM_UHYVE,
            self.has_pci,
            self.num_cpus,
            self.cpu_freq_khz or 0,  # Option<NonZeroU32>
            boot_time,
        )
        blob = hardware + load + platform
        assert len(blob) == RAW_BOOT_INFO_SIZE
        return blob

    @classmethod
    def unpack(cls, blob: bytes) -> HermitBootInfo:
        """Decode a RawBootInfo with PlatformInfo::Uhyve (for tests and diagnostics)."""
        start, end, serial, fdt = struct.unpack_from("<QQH6xQ", blob, 0)
        k0, k1, t0, t1, t2, t3 = struct.unpack_from("<6Q", blob, 32)
        tag, has_pci, ncpus, freq, boot_time = struct.unpack_from("<I4x?7xQI4x16s", blob, 80)
        if tag != PLATFORM_UHYVE:
            raise ValueError(f"boot info platform tag {tag} is not Uhyve ({PLATFORM_UHYVE})")
        tls = TlsInfo(t0, t1, t2, t3) if (t0 or t1 or t2 or t3) else None
        return cls(
            start,
            end,
            serial or None,
            fdt or None,
            k0,
            k1,
            tls,
            has_pci,
            ncpus,
            freq or None,
            int.from_bytes(boot_time, "little", signed=True),
        )


@dataclass(frozen=True)
class HermitImage:
    """What the loader learned from the ELF file before placing it."""

    elf: ElfImage
    entry_version: int
    uhyve_interface_version: int
    hermit_version: tuple[int, int, int] | None
    relocatable: bool
    #: Lowest p_vaddr of a PT_LOAD segment and the loaded span's size.
    min_vaddr: int
    mem_size: int

    @property
    def legacy_mapping(self) -> bool:
        return self.hermit_version is None or self.hermit_version < LEGACY_MAPPING_BEFORE


# ---- probing and parsing ---------------------------------------------------------


def _entry_note(image: ElfImage) -> Note | None:
    return image.find_note(HERMIT_NOTE_OWNER, NT_HERMIT_ENTRY_VERSION)


def probe(data: bytes) -> bool:
    """True for an ELF file with a Hermit entry-version note (any version)."""
    try:
        image = ElfImage(data)
        return _entry_note(image) is not None
    except ImageError:
        return False


def parse(data: bytes, path: object = "<memory>") -> HermitImage:
    """Check a Hermit image and read its notes; raises ImageError naming ``path``."""
    image = ElfImage(data, str(path))
    if not image.is64:
        raise image.error("Hermit kernels are 64-bit ELF files; this one is 32-bit")
    if image.machine != EM_X86_64:
        raise image.error(f"ELF machine {image.machine} is not x86-64 ({EM_X86_64})")
    if image.type not in (ET_DYN, ET_EXEC):
        raise image.error(f"ELF type {image.type} is neither ET_EXEC nor ET_DYN (static PIE)")
    notes = image.notes()
    note = next((n for n in notes if n.owner == HERMIT_NOTE_OWNER and n.type == NT_HERMIT_ENTRY_VERSION), None)
    if note is None:
        seen = ", ".join(f"{n.owner.decode('latin-1')}/{n.type:#x}" for n in notes) or "none"
        raise image.error(
            f"no Hermit entry-version note (owner HERMIT, type {NT_HERMIT_ENTRY_VERSION:#x}); "
            f"notes found: {seen}: not a Hermit kernel"
        )
    if len(note.desc) < 1:
        raise image.error("the Hermit entry-version note has an empty descriptor")
    entry_version = note.desc[0]
    if entry_version not in SUPPORTED_ENTRY_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_ENTRY_VERSIONS)
        raise image.error(f"Hermit entry version {entry_version} is not supported (supported: {supported})")

    uhyve_if = 1
    for n in notes:
        if n.owner == UHYVEIF_NOTE_OWNER and n.type == NT_UHYVE_INTERFACE_VERSION:
            if len(n.desc) != 4:
                raise image.error(f"the uhyve interface-version note has {len(n.desc)} descriptor bytes, expected 4")
            uhyve_if = int.from_bytes(n.desc, "big")  # hermit-entry stores it big-endian
    if uhyve_if not in SUPPORTED_UHYVE_INTERFACE_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_UHYVE_INTERFACE_VERSIONS)
        raise image.error(f"uhyve interface version {uhyve_if} is not supported (supported: {supported})")

    hermit_version = None
    for n in notes:
        if n.owner == GNU_NOTE_OWNER and n.type == NT_GNU_ABI_TAG and len(n.desc) == 16:
            os_id, major, minor, patch = struct.unpack("<4I", n.desc)
            if os_id == ELF_NOTE_OS_HERMIT:
                hermit_version = (major, minor, patch)

    loads = [ph for ph in image.program_headers if ph.type == PT_LOAD]
    if not loads:
        raise image.error("no PT_LOAD segment")
    min_vaddr = min(ph.vaddr for ph in loads)
    max_end = max(ph.vaddr + ph.memsz for ph in loads)
    return HermitImage(
        elf=image,
        entry_version=entry_version,
        uhyve_interface_version=uhyve_if,
        hermit_version=hermit_version,
        relocatable=image.type == ET_DYN,
        min_vaddr=min_vaddr,
        mem_size=max_end - min_vaddr,
    )


# ---- command line, environment --------------------------------------------------


def split_cmdline(cmdline: str) -> list[str]:
    """Split the kernel command line into uhyve's ``kernel_args`` (POSIX shell words).

    uhyve receives its kernel arguments as a list of words; Hermit itself
    splits a command line with shell-words, so the same rules apply here.
    """
    try:
        return shlex.split(cmdline, posix=True)
    except ValueError as exc:
        raise ConfigError(f"cmdline: cannot split {cmdline!r} into words: {exc}") from None


def _fdt(
    memory_ranges: Iterable[tuple[int, int]],
    kernel_args: list[str],
    env: dict[str, str],
    vcpus: int,
    tsc_khz: int | None,
) -> bytes:
    """The device tree uhyve's ``write_fdt_into_mem`` builds (x86_64 parts)."""
    root = FdtNode("")
    root.prop_string("compatible", "hermit,uhyve")
    root.prop_u32("#address-cells", 2)
    root.prop_u32("#size-cells", 2)
    for gpa, size in memory_ranges:
        root.child(f"memory@{gpa:x}").prop_string("device_type", "memory").prop_u64("reg", gpa, size)
    cpus = root.child("cpus").prop_u32("#address-cells", 1).prop_u32("#size-cells", 0)
    for i in range(vcpus):
        cpus.child(f"cpu@{i}").prop_string("device_type", "cpu")
    if tsc_khz:
        root.child("hermit,tsc").prop_u32("khz", tsc_khz)
    sep = kernel_args.index("--") if "--" in kernel_args else len(kernel_args)
    kargs = " ".join(kernel_args[:sep])
    for key, value in env.items():
        kargs = (kargs + " " if kargs else "") + f"env={shlex.quote(key)}={shlex.quote(value)}"
    app = " ".join(kernel_args[sep + 1 :])
    bootargs = f"{kargs} -- {app}" if kargs and app else (f"-- {app}" if app else kargs)
    root.child("chosen").prop_string("bootargs", bootargs)
    return build_dtb(root)


# ---- CPU state ------------------------------------------------------------------


def _uhyve_segments() -> tuple[Segment, Segment, Segment]:
    """CS, data and TR as uhyve's setup_long_mode leaves them."""
    code = Segment(selector=UHYVE_SEL_CODE, base=0, limit=0xFFFFFFFF, type=0xB, present=1, dpl=0, s=1, l=1, g=1)
    data = Segment(selector=UHYVE_SEL_DATA, base=0, limit=0xFFFFFFFF, type=0x3, present=1, dpl=0, s=1, l=0, g=1)
    # KVM's reset value of TR (uhyve never touches it): a busy TSS, present.
    tr = Segment(selector=0, base=0, limit=0xFFFF, type=0xB, present=1, s=0)
    return code, data, tr


def uhyve_cpu_state(entry: int, boot_info: int, stack: int, cpu_id: int) -> CpuState:
    """The register state uhyve gives every vCPU: long mode at the entry point.

    ``rdi`` = RawBootInfo address, ``rsi`` = CPU number, ``rsp`` = the *low*
    end of the 32 KiB boot stack (Hermit's ``_start`` adds the stack size).
    """
    code, data, tr = _uhyve_segments()
    fs_gs = Segment(selector=0, base=0, limit=0xFFFF, type=0x3, present=1, s=1)
    return CpuState(
        rip=entry,
        gprs={"rdi": boot_info, "rsi": cpu_id, "rsp": stack},
        rflags=RFLAGS_RESERVED,
        cs=code,
        ds=data,
        es=data,
        ss=data,
        fs=fs_gs,
        gs=dataclasses.replace(fs_gs),
        tr=tr,
        gdt=(UHYVE_GDT_ADDR, UHYVE_GDT_ENTRIES * 8 - 1),
        idt=(0, 0),
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3=UHYVE_PML4_ADDR,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA | EFER_NXE,
        msrs={MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING},
        mode="long64",
    )


def uhyve_cpuid(entries: Iterable[Any], *, hide_1gib_pages: bool = True) -> list[Any]:
    """Apply uhyve's CPUID changes to KVM's supported CPUID entries.

    Entries are ``vmm.kvm.system.CpuidEntry``-like frozen dataclasses
    (function, index, flags, eax, ebx, ecx, edx).  uhyve sets the brand
    string, the hypervisor, TSC-deadline and MSR bits and hides the
    performance-monitoring leaf.  ``hide_1gib_pages`` also clears PDPE1GB:
    Hermit maps its heap with 1 GiB pages when that bit is set, and some
    nested KVM hosts triple-fault on them; uhyve itself leaves the bit.
    """
    brand = UHYVE_BRAND_STRING.ljust(48, b"\0")
    out = []
    for e in entries:
        if e.function in CPUID_BRAND_LEAVES:
            i = CPUID_BRAND_LEAVES.index(e.function)
            eax, ebx, ecx, edx = struct.unpack_from("<4I", brand, 16 * i)
            e = dataclasses.replace(e, eax=eax, ebx=ebx, ecx=ecx, edx=edx)
        elif e.function == CPUID_LEAF_FEATURES:
            e = dataclasses.replace(
                e,
                ecx=e.ecx | CPUID_1_ECX_HYPERVISOR | CPUID_1_ECX_TSC_DEADLINE,
                edx=e.edx | CPUID_1_EDX_MSR,
            )
        elif e.function == CPUID_LEAF_PERFMON:
            e = dataclasses.replace(e, eax=0)
        elif e.function == CPUID_LEAF_EXT_FEATURES and hide_1gib_pages:
            e = dataclasses.replace(e, edx=e.edx & ~CPUID_8000_0001_EDX_PDPE1GB)
        out.append(e)
    return out


# ---- loading ----------------------------------------------------------------------


def _place_segments(img: HermitImage, memory, kernel_address: int) -> None:
    bias = kernel_address - img.min_vaddr
    memory.fill(kernel_address, img.mem_size)
    for ph in img.elf.program_headers:
        if ph.type != PT_LOAD or ph.memsz == 0:
            continue
        memory.write(ph.vaddr + bias, img.elf.segment_bytes(ph))


def _dynsyms(elf: ElfImage) -> bytes:
    for sh in elf.section_headers():
        if sh.type == SHT_DYNSYM:
            return elf.section_bytes(sh)
    return b""


def _relocate(img: HermitImage, memory, kernel_address: int) -> int:
    """Apply the dynamic relocations of a static PIE loaded at ``kernel_address``.

    Returns how many relocations were applied.  Each target must lie wholly
    inside the loaded image.
    """
    elf = img.elf
    bias = kernel_address - img.min_vaddr
    relas = elf.dynamic_relocations()
    syms: bytes | None = None
    for n, r in enumerate(relas):
        name = _RELOC_NAMES.get(r.type)
        if name is None:
            supported = ", ".join(_RELOC_NAMES.values())
            raise elf.error(f"relocation {n} has unsupported type {r.type} (supported: {supported})")
        if not (img.min_vaddr <= r.offset and r.offset + 8 <= img.min_vaddr + img.mem_size):
            raise elf.error(
                f"relocation {n} ({name}) at r_offset {r.offset:#x} is outside the loaded image "
                f"[{img.min_vaddr:#x}, {img.min_vaddr + img.mem_size:#x})"
            )
        target = r.offset + bias
        if r.type == R_X86_64_RELATIVE:
            memory.write_u64(target, bias + r.addend)
            continue
        if syms is None:
            syms = _dynsyms(elf)
        if (r.sym + 1) * ELF64_SYM_SIZE > len(syms):
            raise elf.error(f"relocation {n} ({name}) names symbol {r.sym}, past the dynamic symbol table")
        _name, info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", syms, r.sym * ELF64_SYM_SIZE)
        if info >> 4 == STB_WEAK and shndx == SHN_UNDEF:
            continue  # an undefined weak symbol stays 0, as hermit-entry leaves it
        if r.type == R_X86_64_GLOB_DAT and r.addend != 0:
            raise elf.error(f"relocation {n} (R_X86_64_GLOB_DAT) has a nonzero addend {r.addend}")
        memory.write_u64(target, bias + value + r.addend)
    return len(relas)


def _build_page_tables(memory, map_end: int) -> int:
    """Identity-map [0, map_end] with 2 MiB pages, like uhyve's initialize_pagetables.

    uhyve's mapping range is inclusive of ``map_end`` (it maps the 2 MiB page
    that starts there).  The PML4 sits at UHYVE_PML4_ADDR with its last slot
    pointing at itself (Hermit walks its page tables through that recursive
    mapping); lower tables come from a bump allocator in the page-table area.
    No 1 GiB pages are used (uhyve uses none either).  Returns the number of
    page-table pages used besides the PML4.
    """
    memory.fill(UHYVE_PML4_ADDR, UHYVE_PAGETABLES_END - UHYVE_PML4_ADDR)
    memory.write_u64(UHYVE_PML4_ADDR + 511 * 8, UHYVE_PML4_ADDR | PTE_PRESENT | PTE_WRITABLE)
    next_table = UHYVE_PAGETABLES_ADDR

    def table_at(parent: int, index: int) -> int:
        nonlocal next_table
        entry = memory.read_u64(parent + index * 8)
        if entry & PTE_PRESENT:
            return entry & 0x000F_FFFF_FFFF_F000
        if next_table + PAGE_SIZE > UHYVE_PAGETABLES_END:
            raise ImageError(
                "<page tables>",
                f"identity map up to {map_end:#x} needs more page tables than fit below {UHYVE_PAGETABLES_END:#x}",
            )
        table = next_table
        next_table += PAGE_SIZE
        memory.write_u64(parent + index * 8, table | PTE_PRESENT | PTE_WRITABLE)
        return table

    for addr in range(0, map_end + 1, LARGE_PAGE_SIZE):
        pdpt = table_at(UHYVE_PML4_ADDR, (addr >> 39) & 0x1FF)
        pd = table_at(pdpt, (addr >> 30) & 0x1FF)
        memory.write_u64(pd + ((addr >> 21) & 0x1FF) * 8, addr | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)
    return (next_table - UHYVE_PAGETABLES_ADDR) // PAGE_SIZE


def mapping_end(kernel_address: int, kernel_end: int, legacy: bool) -> int:
    """The last 2 MiB page start uhyve maps (inclusive), see initialize_pagetables."""
    if legacy:
        last_page_of_gib = (kernel_address & ~(GIB - 1)) + GIB - LARGE_PAGE_SIZE
        return max(last_page_of_gib, kernel_end)
    return kernel_end


def _write_gdt(memory) -> None:
    for i, desc in enumerate((0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF))):
        memory.write_u64(UHYVE_GDT_ADDR + 8 * i, desc)


def load(request: BootRequest, data: bytes) -> BootSetup:
    """Place a Hermit image in ``request.memory`` and describe how to enter it."""
    path = request.kernel
    img = parse(data, path)
    memory = request.memory
    ranges = list(memory.ranges())
    if ranges[0][0] != 0 or len(ranges) != 1 or memory.end > UHYVE_V1_MAX_MEMORY:
        raise ConfigError(
            f"memory: uhyve interface v1 kernels need one RAM region from 0 below {UHYVE_V1_MAX_MEMORY:#x} "
            f"(3 GiB, as uhyve enforces); this machine has {', '.join(f'{g:#x}+{s:#x}' for g, s in ranges)}"
        )
    if img.relocatable:
        kernel_address = UHYVE_KERNEL_OFFSET
    else:
        kernel_address = img.min_vaddr
        if kernel_address < UHYVE_KERNEL_OFFSET:
            raise ImageError(
                path,
                f"non-relocatable image loads at {kernel_address:#x}, inside uhyve's boot area "
                f"[0, {UHYVE_KERNEL_OFFSET:#x}) (GDT, device tree, boot info, page tables, stack)",
            )
    kernel_end = kernel_address + img.mem_size
    if kernel_end > memory.end:
        raise ImageError(
            path,
            f"image spans [{kernel_address:#x}, {kernel_end:#x}) ({img.mem_size} bytes loaded at {kernel_address:#x}) "
            f"but guest memory ends at {memory.end:#x}",
        )
    entry = img.elf.entry + (kernel_address - img.min_vaddr if img.relocatable else 0)
    if not kernel_address <= entry < kernel_end:
        raise ImageError(
            path, f"entry point {entry:#x} is outside the loaded image [{kernel_address:#x}, {kernel_end:#x})"
        )

    kernel_args = split_cmdline(request.cmdline)
    env = dict(request.env)
    argv = [str(path), *kernel_args]

    memory.fill(0, UHYVE_KERNEL_OFFSET)
    _place_segments(img, memory, kernel_address)
    nrelocs = _relocate(img, memory, kernel_address) if img.relocatable else 0

    tls = None
    for ph in img.elf.program_headers:
        if ph.type == PT_TLS:
            start = ph.vaddr + (kernel_address - img.min_vaddr if img.relocatable else 0)
            tls = TlsInfo(start, ph.filesz, ph.memsz, ph.align)
            break

    _write_gdt(memory)
    map_end = mapping_end(kernel_address, kernel_end, img.legacy_mapping)
    tables = _build_page_tables(memory, map_end)

    fdt = _fdt(ranges, kernel_args, env, request.vcpus, None)
    if len(fdt) > UHYVE_FDT_SIZE:
        raise ConfigError(
            f"cmdline/env: the device tree is {len(fdt)} bytes, more than uhyve's {UHYVE_FDT_SIZE}-byte area"
        )
    memory.write(UHYVE_FDT_ADDR, fdt)

    boot_info = HermitBootInfo(
        phys_addr_start=0,
        phys_addr_end=memory.end,
        serial_port_base=UHYVE_V1_UART_PORT,
        device_tree=UHYVE_FDT_ADDR,
        kernel_image_start=kernel_address,
        kernel_image_end=kernel_end,
        tls=tls,
        has_pci=False,
        num_cpus=request.vcpus,
        cpu_freq_khz=None,
        boot_time_ns=time.time_ns(),
    )
    memory.write(UHYVE_BOOT_INFO_ADDR, boot_info.pack())

    stack = kernel_address - UHYVE_KERNEL_STACK_SIZE
    state = uhyve_cpu_state(entry, UHYVE_BOOT_INFO_ADDR, stack, 0)

    def ap_entry(cpu: int) -> CpuState:
        # uhyve starts every vCPU itself, all at the entry point with the same
        # stack: Hermit's _start spins until CPU_ONLINE reaches its number and
        # then switches to the stack the previous CPU prepared.
        return uhyve_cpu_state(entry, UHYVE_BOOT_INFO_ADDR, stack, cpu)

    def attach(machine: Any) -> None:
        """Put the hypercall device on the machine (it lands in ``machine.devices["uhyve"]``)."""
        fs_root = request.hermit_fs_root
        final_env = env
        tsc = machine.tsc_khz
        tsc = tsc if isinstance(tsc, int) and 0 < tsc < 1 << 32 else None
        if tsc:
            # uhyve writes the device tree once the VM exists, with the TSC frequency.
            fdt = _fdt(ranges, kernel_args, final_env, request.vcpus, tsc)
            if len(fdt) > UHYVE_FDT_SIZE:
                raise ConfigError(
                    f"env: the device tree is {len(fdt)} bytes, more than uhyve's {UHYVE_FDT_SIZE}-byte area"
                )
            memory.fill(UHYVE_FDT_ADDR, UHYVE_FDT_SIZE)
            memory.write(UHYVE_FDT_ADDR, fdt)
        from ..devices.uhyve import attach_uhyve

        details["env"] = final_env
        details["hermit_fs_root"] = str(fs_root) if fs_root else None
        attach_uhyve(
            machine,
            argv=argv,
            env=final_env,
            fs_root=fs_root,
            boot_info_addr=UHYVE_BOOT_INFO_ADDR,
            root_page_table=UHYVE_PML4_ADDR,
            tsc_khz=tsc,
        )

    details = {
        "entry_version": img.entry_version,
        "uhyve_interface_version": img.uhyve_interface_version,
        "hermit_version": ".".join(map(str, img.hermit_version)) if img.hermit_version else None,
        "relocatable": img.relocatable,
        "kernel_address": kernel_address,
        "kernel_end": kernel_end,
        "entry": entry,
        "relocations": nrelocs,
        "tls": dataclasses.asdict(tls) if tls else None,
        "boot_info_addr": UHYVE_BOOT_INFO_ADDR,
        "fdt_addr": UHYVE_FDT_ADDR,
        "pml4_addr": UHYVE_PML4_ADDR,
        "identity_map_end": map_end - map_end % LARGE_PAGE_SIZE + LARGE_PAGE_SIZE,
        "page_table_pages": tables + 1,
        "legacy_mapping": img.legacy_mapping,
        "stack": (stack, kernel_address),
        "argv": argv,
        "env": env,
        "hermit_fs_root": str(request.hermit_fs_root) if request.hermit_fs_root else None,
        # uhyve's own GDT at 0 is what the entry state points at; the machine's boot GDT is not needed.
        "boot_gdt": False,
    }
    return BootSetup(
        protocol="hermit",
        entry=state,
        cmdline=request.cmdline,
        ap_entry=ap_entry,
        attach=attach,
        cpuid_filter=uhyve_cpuid,
        details=details,
    )
