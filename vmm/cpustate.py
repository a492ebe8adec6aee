"""Initial vCPU register state, as plain data.

Loaders describe how a guest must be entered (mode, segments, control
registers, general-purpose registers) with a ``CpuState``; the machine
applies it to a vCPU.  Keeping it plain data lets loaders be unit-tested
without KVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import layout

# Control-register and EFER bits (Intel SDM Vol. 3A §2.5, §2.2.1).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_RESERVED = 1 << 1

# Segment descriptor types (SDM Vol. 3A §3.4.5.1).
SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_TSS_BUSY = 0xB

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@dataclass
class Segment:
    """A segment register's hidden state (what KVM calls struct kvm_segment)."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_descriptor(cls, selector: int, desc: int) -> Segment:
        """Decode a 64-bit GDT descriptor into the hidden part of a segment register."""
        base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
        limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
        g = (desc >> 55) & 1
        if g:
            limit = (limit << 12) | 0xFFF
        return cls(
            selector=selector,
            base=base,
            limit=limit,
            type=(desc >> 40) & 0xF,
            s=(desc >> 44) & 1,
            dpl=(desc >> 45) & 3,
            present=(desc >> 47) & 1,
            avl=(desc >> 52) & 1,
            l=(desc >> 53) & 1,
            db=(desc >> 54) & 1,
            g=g,
        )


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a GDT descriptor the way Linux's GDT_ENTRY() macro does.

    ``flags`` holds the access byte in bits 0-7 and the G/DB/L/AVL nibble in
    bits 12-15 (e.g. 0xA09B for a 64-bit code segment).
    """
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


# The boot GDTs.  Documentation/arch/x86/boot.rst ("32-bit boot protocol",
# "64-bit boot protocol") requires a GDT with __BOOT_CS = 0x10 (flat, execute/read)
# and __BOOT_DS = 0x18 (flat, read/write), CS = __BOOT_CS and DS/ES/SS = __BOOT_DS.
# Selector 0x10 cannot be both a 32-bit and a 64-bit code segment, so there are two
# tables with the same selectors: one for 64-bit entry (at BOOT_GDT_ADDR) and one for
# 32-bit entry (at BOOT_GDT32_ADDR).  Both keep a TSS descriptor at 0x20 so that VM
# entry has a usable TR (base 0, limit 0x67, busy; the PVH ABI asks for exactly this).
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
#: Long-mode table; 0x08 is a 32-bit code segment (Linux's __KERNEL32_CS) for guests
#: that drop back to compatibility mode.
SEL_CODE32_COMPAT = 0x08
TSS_LIMIT = 0x67

_TSS_DESC = gdt_entry(0x008B, 0, TSS_LIMIT)  # present, busy TSS, byte granular

#: 64-bit boot GDT: null, 32-bit code, 64-bit code, data, 16-byte TSS descriptor.
BOOT_GDT = (
    0,
    gdt_entry(0xC09B, 0, 0xFFFFF),  # 0x08: 32-bit code (compatibility mode)
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x10: __BOOT_CS, 64-bit code
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x18: __BOOT_DS, flat data
    _TSS_DESC,  # 0x20: TSS, low half
    0,  # 0x28: TSS, high half (base bits 63:32)
)
#: 32-bit boot GDT: null, unused, 32-bit code, data, TSS.
BOOT_GDT32 = (
    0,
    0,
    gdt_entry(0xC09B, 0, 0xFFFFF),  # 0x10: __BOOT_CS, 32-bit code
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x18: __BOOT_DS, flat data
    _TSS_DESC,  # 0x20: TSS
)
SEL_CODE64 = BOOT_CS
SEL_CODE32 = BOOT_CS
SEL_DATA = BOOT_DS
SEL_TSS = BOOT_TSS


@dataclass
class CpuState:
    """Everything a loader decides about a vCPU's first instruction."""

    rip: int
    gprs: dict[str, int] = field(default_factory=dict)
    rflags: int = RFLAGS_RESERVED
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment | None = None
    gdt: tuple[int, int] = (0, 0xFFFF)  # (base, limit)
    idt: tuple[int, int] = (0, 0xFFFF)
    cr0: int = 0x60000010
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    msrs: dict[int, int] = field(default_factory=dict)
    #: The mode, for summaries and errors: "real", "protected32", "long64".
    mode: str = "real"

    def __post_init__(self) -> None:
        for name in self.gprs:
            if name not in GPR_NAMES:
                raise ValueError(f"unknown general-purpose register {name!r}")

    @classmethod
    def flat_protected32(cls, rip: int, **gprs: int) -> CpuState:
        """32-bit protected mode, paging off, flat 4 GiB segments (PVH, multiboot)."""
        code = Segment.from_descriptor(BOOT_CS, BOOT_GDT32[BOOT_CS >> 3])
        data = Segment.from_descriptor(BOOT_DS, BOOT_GDT32[BOOT_DS >> 3])
        tss = Segment.from_descriptor(BOOT_TSS, BOOT_GDT32[BOOT_TSS >> 3])
        return cls(
            rip=rip,
            gprs=dict(gprs),
            cs=code,
            ds=data,
            es=data,
            fs=data,
            gs=data,
            ss=data,
            tr=tss,
            gdt=(layout.BOOT_GDT32_ADDR, len(BOOT_GDT32) * 8 - 1),
            idt=(layout.BOOT_IDT_ADDR, 0),
            cr0=CR0_PE | CR0_ET,
            mode="protected32",
        )

    @classmethod
    def flat_long64(cls, rip: int, cr3: int, rsp: int = layout.BOOT_STACK_POINTER, **gprs: int) -> CpuState:
        """64-bit long mode with paging on (Linux 64-bit boot protocol, Hermit)."""
        code = Segment.from_descriptor(BOOT_CS, BOOT_GDT[BOOT_CS >> 3])
        data = Segment.from_descriptor(BOOT_DS, BOOT_GDT[BOOT_DS >> 3])
        tss = Segment.from_descriptor(BOOT_TSS, BOOT_GDT[BOOT_TSS >> 3])
        regs = dict(gprs)
        regs["rsp"] = rsp
        regs.setdefault("rbp", rsp)
        return cls(
            rip=rip,
            gprs=regs,
            cs=code,
            ds=data,
            es=data,
            fs=data,
            gs=data,
            ss=data,
            tr=tss,
            gdt=(layout.BOOT_GDT_ADDR, len(BOOT_GDT) * 8 - 1),
            idt=(layout.BOOT_IDT_ADDR, 0),
            cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
            cr3=cr3,
            cr4=CR4_PAE,
            efer=EFER_LME | EFER_LMA,
            mode="long64",
        )


def write_boot_gdt(memory) -> None:
    """Write both boot GDTs and an empty IDT where the entry states point."""
    for base, table in ((layout.BOOT_GDT_ADDR, BOOT_GDT), (layout.BOOT_GDT32_ADDR, BOOT_GDT32)):
        for i, desc in enumerate(table):
            memory.write_u64(base + 8 * i, desc)
    memory.write_u64(layout.BOOT_IDT_ADDR, 0)
