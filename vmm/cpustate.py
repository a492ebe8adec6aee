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
    def from_descriptor(cls, selector: int, desc: int) -> "Segment":
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


#: The boot GDT every entry state uses: null, 64-bit code, 32-bit code, data, TSS.
BOOT_GDT = (
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x08: 64-bit code
    gdt_entry(0xC09B, 0, 0xFFFFF),  # 0x10: 32-bit code
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x18: data
    gdt_entry(0x808B, 0, 0xFFFFF),  # 0x20: TSS (placeholder; the guest loads its own)
)
SEL_CODE64 = 0x08
SEL_CODE32 = 0x10
SEL_DATA = 0x18
SEL_TSS = 0x20


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
    def flat_protected32(cls, rip: int, **gprs: int) -> "CpuState":
        """32-bit protected mode, paging off, flat 4 GiB segments (PVH, multiboot)."""
        code = Segment.from_descriptor(SEL_CODE32, BOOT_GDT[2])
        data = Segment.from_descriptor(SEL_DATA, BOOT_GDT[3])
        tss = Segment.from_descriptor(SEL_TSS, BOOT_GDT[4])
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
            gdt=(layout.BOOT_GDT_ADDR, len(BOOT_GDT) * 8 - 1),
            idt=(layout.BOOT_IDT_ADDR, 0),
            cr0=CR0_PE | CR0_ET,
            mode="protected32",
        )

    @classmethod
    def flat_long64(cls, rip: int, cr3: int, rsp: int = layout.BOOT_STACK_POINTER, **gprs: int) -> "CpuState":
        """64-bit long mode with paging on (Linux 64-bit boot protocol, Hermit)."""
        code = Segment.from_descriptor(SEL_CODE64, BOOT_GDT[1])
        data = Segment.from_descriptor(SEL_DATA, BOOT_GDT[3])
        tss = Segment.from_descriptor(SEL_TSS, BOOT_GDT[4])
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
    """Write BOOT_GDT and an empty IDT where the entry states point."""
    for i, desc in enumerate(BOOT_GDT):
        memory.write_u64(layout.BOOT_GDT_ADDR + 8 * i, desc)
    memory.write_u64(layout.BOOT_IDT_ADDR, 0)
