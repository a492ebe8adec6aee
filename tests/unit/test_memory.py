import pytest

from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory, x86_ram_layout

PAGE = 4096


@pytest.fixture
def mem():
    with GuestMemory([(0, 16 * PAGE), (0x10000000, 4 * PAGE)]) as m:
        yield m


def test_round_trip_every_width(mem):
    mem.write_u8(1, 0x1FF)  # masked to the width
    mem.write_u16(2, 0xBEEF)
    mem.write_u32(4, 0xDEADBEEF)
    mem.write_u64(8, 0x0123456789ABCDEF)
    assert mem.read_u8(1) == 0xFF
    assert mem.read_u16(2) == 0xBEEF
    assert mem.read_u32(4) == 0xDEADBEEF
    assert mem.read_u64(8) == 0x0123456789ABCDEF
    assert mem.read(2, 2) == b"\xef\xbe"


def test_second_region(mem):
    mem.write(0x10000000 + 4 * PAGE - 3, b"abc")
    assert mem.read(0x10000000 + 4 * PAGE - 3, 3) == b"abc"


@pytest.mark.parametrize(
    "gpa,length",
    [
        (16 * PAGE, 1),  # just past region 0
        (16 * PAGE - 1, 2),  # straddles the end
        (0x10000000 - 1, 2),  # straddles into region 1 from the hole
        (0x10000000 + 4 * PAGE, 0),  # empty range at the very end is outside
        ((1 << 64) - 1, 2),  # wraps past 2**64
        (-1, 1),  # Python would happily index from the end
        (0, -1),
    ],
)
def test_out_of_range_raises_one_error_type(mem, gpa, length):
    with pytest.raises(GuestMemoryError) as info:
        mem.read(gpa, max(length, 0)) if length >= 0 else mem.check(gpa, length)
    assert f"{gpa:#x}" in str(info.value)


def test_write_outside_changes_nothing(mem):
    mem.write(16 * PAGE - 2, b"zz")
    with pytest.raises(GuestMemoryError):
        mem.write(16 * PAGE - 2, b"abc")
    assert mem.read(16 * PAGE - 2, 2) == b"zz"


def test_u64_at_end_of_region(mem):
    with pytest.raises(GuestMemoryError):
        mem.read_u64(16 * PAGE - 4)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(16 * PAGE - 2, 1)


def test_contains_and_view(mem):
    assert mem.contains(0, 16 * PAGE)
    assert not mem.contains(0, 16 * PAGE + 1)
    v = mem.view(100, 4)
    v[:] = b"wxyz"
    assert mem.read(100, 4) == b"wxyz"
    v.release()


def test_fill_and_read_into(mem):
    mem.fill(10, 5, 0xAA)
    buf = bytearray(5)
    mem.read_into(10, buf)
    assert buf == b"\xaa" * 5


def test_overlapping_regions_rejected():
    with pytest.raises(ValueError, match="overlaps"):
        GuestMemory([(0, 2 * PAGE), (PAGE, PAGE)])


def test_unaligned_region_rejected():
    with pytest.raises(ValueError, match="page aligned"):
        GuestMemory([(0, 100)])


def test_x86_layout_splits_around_hole():
    gap, end = 0xC000_0000, 0x1_0000_0000
    assert x86_ram_layout(128 << 20, gap, end) == [(0, 128 << 20)]
    assert x86_ram_layout(4 << 30, gap, end) == [(0, gap), (end, (4 << 30) - gap)]


def test_size_and_end(mem):
    assert mem.size == 20 * PAGE
    assert mem.end == 0x10000000 + 4 * PAGE


def test_fill_zero_large_unaligned_range(mem):
    mem.fill(0, 16 * PAGE, 0x55)
    mem.fill(100, 10 * PAGE, 0)
    assert mem.read(0, 100) == b"\x55" * 100
    assert mem.read(100, 10 * PAGE) == bytes(10 * PAGE)
    assert mem.read(100 + 10 * PAGE, 16 * PAGE - 100 - 10 * PAGE) == b"\x55" * (6 * PAGE - 100)
