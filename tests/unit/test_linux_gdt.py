"""The boot GDTs: __BOOT_CS = 0x10 and __BOOT_DS = 0x18 in both entry modes (boot.rst)."""

from __future__ import annotations

import pytest

from vmm import layout
from vmm.cpustate import BOOT_CS, BOOT_DS, BOOT_TSS, CpuState, Segment, write_boot_gdt
from vmm.memory import GuestMemory


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory([(0, 1 << 20)])
    mem.fill(0, 0x1000, 0xEE)
    write_boot_gdt(mem)
    yield mem
    mem.close()


def descriptor(memory, state: CpuState, selector: int) -> Segment:
    base, limit = state.gdt
    assert selector + 7 <= limit
    return Segment.from_descriptor(selector, memory.read_u64(base + selector))


def same_hidden_state(a: Segment, b: Segment) -> bool:
    fields = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def test_boot_selectors_match_the_linux_boot_protocol():
    assert (BOOT_CS, BOOT_DS) == (0x10, 0x18)


def test_long_mode_gdt_in_memory_matches_the_entry_state(memory):
    st = CpuState.flat_long64(0x1000000, layout.PML4_ADDR)
    assert st.gdt[0] == layout.BOOT_GDT_ADDR
    cs = descriptor(memory, st, BOOT_CS)
    assert cs.l == 1 and cs.db == 0 and cs.type & 0x8 and cs.type & 0x2  # 64-bit, execute/read
    assert same_hidden_state(cs, st.cs)
    ds = descriptor(memory, st, BOOT_DS)
    assert ds.base == 0 and ds.limit == 0xFFFF_FFFF and ds.type & 0x2 and not ds.type & 0x8
    for seg in (st.ds, st.es, st.ss):
        assert same_hidden_state(ds, seg)
    # A 64-bit TSS descriptor is 16 bytes; its upper half (base 63:32) is zero.
    assert st.gdt[1] + 1 >= BOOT_TSS + 16
    assert memory.read_u64(st.gdt[0] + BOOT_TSS + 8) == 0
    assert same_hidden_state(descriptor(memory, st, BOOT_TSS), st.tr)


def test_protected_mode_gdt_in_memory_matches_the_entry_state(memory):
    st = CpuState.flat_protected32(0x100000)
    assert st.gdt[0] == layout.BOOT_GDT32_ADDR
    cs = descriptor(memory, st, BOOT_CS)
    assert cs.l == 0 and cs.db == 1 and cs.base == 0 and cs.limit == 0xFFFF_FFFF
    assert same_hidden_state(cs, st.cs)
    assert same_hidden_state(descriptor(memory, st, BOOT_DS), st.ss)
    assert same_hidden_state(descriptor(memory, st, BOOT_TSS), st.tr)


@pytest.mark.parametrize("state", [CpuState.flat_long64(0, layout.PML4_ADDR), CpuState.flat_protected32(0)])
def test_tr_is_a_usable_busy_tss(state):
    tr = state.tr
    assert tr.selector == BOOT_TSS
    assert tr.present == 1 and tr.s == 0 and tr.type == 0xB
    assert tr.base == 0 and tr.limit == 0x67 and tr.g == 0


def test_gdts_and_idt_do_not_overlap():
    spans = sorted(
        [
            (layout.BOOT_GDT_ADDR, CpuState.flat_long64(0, 0).gdt[1] + 1),
            (layout.BOOT_GDT32_ADDR, CpuState.flat_protected32(0).gdt[1] + 1),
            (layout.BOOT_IDT_ADDR, 8),
        ]
    )
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b
    assert spans[-1][0] + spans[-1][1] <= layout.PVH_INFO_ADDR
