from vmm.cpuid import L1_ECX_HYPERVISOR, normalize
from vmm.kvm.system import CpuidEntry

HOST = [
    CpuidEntry(0x1, 0, 0, 0xA10F11, 0x07020800, 0x01202000, 0x178BFBFF),
    CpuidEntry(0x4, 0, 1, 0x1C004121, 0, 0, 0),
    CpuidEntry(0xB, 0, 1, 0, 0, 0, 7),
    CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x700F, 0),
    CpuidEntry(0x8000001E, 0, 0, 7, 0x103, 0, 0),
]


def leaf(entries, fn, index=0):
    return next(e for e in entries if e.function == fn and e.index == index)


def test_apic_id_and_count_per_vcpu():
    for i in range(4):
        t = normalize(HOST, i, 4)
        l1 = leaf(t, 1)
        assert l1.ebx >> 24 == i
        assert (l1.ebx >> 16) & 0xFF == 4
        assert l1.ebx & 0xFFFF == 0x0800  # CLFLUSH size kept
        assert l1.ecx & L1_ECX_HYPERVISOR
        assert l1.edx & (1 << 28)  # HTT: more than one logical processor
        assert leaf(t, 0xB, 0).edx == i
        assert leaf(t, 0x8000001E).eax == i


def test_single_vcpu_clears_htt():
    l1 = leaf(normalize(HOST, 0, 1), 1)
    assert not l1.edx & (1 << 28)


def test_topology_levels():
    t = normalize(HOST, 2, 3)
    smt, core, end = leaf(t, 0xB, 0), leaf(t, 0xB, 1), leaf(t, 0xB, 2)
    assert (smt.ecx >> 8) & 0xFF == 1 and smt.ebx == 1
    assert (core.ecx >> 8) & 0xFF == 2 and core.ebx == 3 and core.eax == 2  # 2 bits for 3 IDs
    assert (end.ecx >> 8) & 0xFF == 0 and end.ebx == 0
    assert all(e.edx == 2 for e in (smt, core, end))


def test_amd_core_count():
    t = normalize(HOST, 0, 8)
    assert leaf(t, 0x80000008).ecx & 0xFF == 7


def test_cache_leaf_core_count():
    t = normalize(HOST, 0, 4)
    assert leaf(t, 4).eax >> 26 == 3
