"""Guest CPUID: KVM_GET_SUPPORTED_CPUID, normalised per vCPU.

The supported set describes the host, not a VM: it carries the host's APIC
IDs, core counts and cache topology.  Like Firecracker's normalisation, we
rewrite the leaves that describe the machine so that each vCPU sees its own
APIC ID, the VM's vCPU count, a flat topology (one core per vCPU, one thread
per core), and the hypervisor bit.  Leaves are named after the Intel SDM
Vol. 2A "CPUID" and AMD APM Vol. 3 appendix E.
"""

from __future__ import annotations

from dataclasses import replace

from .kvm.system import CpuidEntry

# Leaf 0x1 (SDM Vol. 2A Table 3-8, 3-10, 3-11).
LEAF_FEATURES = 0x1
L1_EBX_APIC_ID_SHIFT = 24
L1_EBX_LOGICAL_COUNT_SHIFT = 16
L1_ECX_TSC_DEADLINE = 1 << 24
L1_ECX_HYPERVISOR = 1 << 31
L1_EDX_HTT = 1 << 28
# Leaf 0x4: deterministic cache parameters; EAX[31:26] = cores per package - 1.
LEAF_CACHE_PARAMS = 0x4
# Leaf 0x6: thermal/power (bit 0 of EAX: digital temperature sensor; hide it).
LEAF_THERMAL = 0x6
# Leaf 0xA: architectural PMU; we expose none.
LEAF_PMU = 0xA
# Leaf 0xB / 0x1F: extended topology (x2APIC).
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2
# AMD: 0x80000001 ECX bit 1 CmpLegacy; 0x80000008 ECX[7:0] NC = threads - 1;
# 0x8000001E extended APIC ID / core / node identifiers.
LEAF_EXT_FEATURES = 0x80000001
EXT_ECX_CMP_LEGACY = 1 << 1
EXT_ECX_TOPOEXT = 1 << 22
LEAF_EXT_ADDR_SIZES = 0x80000008
LEAF_EXT_APIC_ID = 0x8000001E


def _apic_id_width(count: int) -> int:
    """Bits needed to number ``count`` vCPUs (the x2APIC ID shift of the core level)."""
    return max(0, (count - 1).bit_length())


def normalize(supported: list[CpuidEntry], vcpu_index: int, vcpu_count: int, *, tsc_deadline: bool = True) -> list[CpuidEntry]:
    """The CPUID table for one vCPU of a ``vcpu_count``-vCPU VM."""
    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    for e in supported:
        fn = e.function
        if fn in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            # KVM lists only the subleaves the host has; we describe our own levels.
            if fn not in topology_done:
                topology_done.add(fn)
                out.extend(_topology(e, sub, vcpu_index, vcpu_count) for sub in range(3))
            continue
        if fn == LEAF_FEATURES:
            ebx = e.ebx & 0x0000FFFF
            ebx |= (vcpu_index & 0xFF) << L1_EBX_APIC_ID_SHIFT
            ebx |= (vcpu_count & 0xFF) << L1_EBX_LOGICAL_COUNT_SHIFT
            ecx = e.ecx | L1_ECX_HYPERVISOR
            if tsc_deadline:
                ecx |= L1_ECX_TSC_DEADLINE
            edx = (e.edx | L1_EDX_HTT) if vcpu_count > 1 else (e.edx & ~L1_EDX_HTT)
            e = replace(e, ebx=ebx, ecx=ecx, edx=edx)
        elif fn == LEAF_CACHE_PARAMS:
            eax = e.eax & 0x03FFFFFF
            if e.eax & 0x1F:  # a valid cache level
                eax |= ((vcpu_count - 1) & 0x3F) << 26
                # EAX[25:14]: logical processors sharing this cache - 1 (one thread per core).
                eax &= ~(0xFFF << 14)
            e = replace(e, eax=eax)
        elif fn == LEAF_THERMAL:
            e = replace(e, eax=e.eax & ~1, ecx=e.ecx & ~(1 << 3))
        elif fn == LEAF_PMU:
            e = replace(e, eax=0, ebx=0, ecx=0, edx=0)
        elif fn == LEAF_EXT_FEATURES:
            ecx = e.ecx | EXT_ECX_CMP_LEGACY if vcpu_count > 1 else e.ecx & ~EXT_ECX_CMP_LEGACY
            e = replace(e, ecx=ecx)
        elif fn == LEAF_EXT_ADDR_SIZES:
            ecx = (e.ecx & ~0xF0FF) | ((vcpu_count - 1) & 0xFF) | (_apic_id_width(vcpu_count) << 12)
            e = replace(e, ecx=ecx)
        elif fn == LEAF_EXT_APIC_ID:
            # EAX: extended APIC ID; EBX[7:0]: compute unit ID, [15:8] threads per unit - 1;
            # ECX[7:0]: node ID, [10:8] nodes per processor - 1.
            e = replace(e, eax=vcpu_index, ebx=vcpu_index & 0xFF, ecx=0, edx=0)
        out.append(e)
    return out


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


def _topology(e: CpuidEntry, subleaf: int, vcpu_index: int, vcpu_count: int) -> CpuidEntry:
    # SDM Vol. 2A, CPUID leaf 0BH: EAX[4:0] shift to the next level's ID, EBX[15:0]
    # logical processors at this level, ECX[7:0] level number, ECX[15:8] level type,
    # EDX the x2APIC ID.  One thread per core, all cores in one package.
    if subleaf == 0:
        eax, ebx, ecx = 0, 1, (TOPOLOGY_LEVEL_SMT << 8) | 0
    elif subleaf == 1:
        eax, ebx, ecx = _apic_id_width(vcpu_count), vcpu_count, (TOPOLOGY_LEVEL_CORE << 8) | 1
    else:  # the first invalid level ends the enumeration
        eax, ebx, ecx = 0, 0, subleaf & 0xFF
    return replace(
        e, index=subleaf, flags=e.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX, eax=eax, ebx=ebx, ecx=ecx, edx=vcpu_index
    )
