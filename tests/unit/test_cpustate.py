from vmm.cpustate import BOOT_GDT, CpuState, Segment, gdt_entry


def test_gdt_entry_matches_linux_macro():
    # GDT_ENTRY(0xa09b, 0, 0xfffff) from arch/x86/include/asm/segment.h
    assert gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF


def test_descriptor_decode_round_trip():
    seg = Segment.from_descriptor(0x10, 0x00AF9B000000FFFF)
    assert (seg.type, seg.s, seg.dpl, seg.present, seg.l, seg.db, seg.g) == (0xB, 1, 0, 1, 1, 0, 1)
    assert seg.limit == 0xFFFFFFFF and seg.base == 0


def test_long_mode_state():
    st = CpuState.flat_long64(0x100200, cr3=0x9000, rsi=0x7000)
    assert st.cs.l == 1 and st.efer & (1 << 10) and st.cr0 & (1 << 31)
    assert st.gprs["rsi"] == 0x7000 and st.cr3 == 0x9000


def test_protected_mode_state():
    st = CpuState.flat_protected32(0x100000, rbx=0x6000)
    assert st.cs.db == 1 and st.cs.l == 0 and not st.cr0 & (1 << 31)
    assert st.gprs["rbx"] == 0x6000


def test_boot_gdt_has_tss():
    assert any(((d >> 40) & 0x1F) == 0x0B for d in BOOT_GDT)
