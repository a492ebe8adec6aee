"""GuestMemory's fixed-width accesses: aligned ones go through typed views, unaligned ones through struct.

Both must give the same little-endian values; the typed path is what makes an
aligned store a single store that a running vCPU never sees half done (see
tests/integration/test_virtio_guests.py for that, seen from a second vCPU).
"""

from __future__ import annotations

import struct

import pytest

from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

PAGE = 4096


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 * PAGE), (16 * PAGE, 2 * PAGE)])
    yield m
    m.close()


@pytest.mark.parametrize("width,fmt", [(2, "<H"), (4, "<I"), (8, "<Q")])
@pytest.mark.parametrize("gpa", [0, 6, 8, 3 * PAGE + 1, 4 * PAGE - 8, 16 * PAGE, 16 * PAGE + 5, 18 * PAGE - 8])
def test_fixed_width_round_trip(mem, width, fmt, gpa):
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + width)), "little")
    getattr(mem, f"write_u{8 * width}")(gpa, value)
    assert mem.read(gpa, width) == struct.pack(fmt, value)
    assert getattr(mem, f"read_u{8 * width}")(gpa) == value
    mem.write(gpa, bytes(range(width)))
    assert getattr(mem, f"read_u{8 * width}")(gpa) == struct.unpack(fmt, bytes(range(width)))[0]


@pytest.mark.parametrize("gpa", [4 * PAGE - 1, 4 * PAGE, 15 * PAGE, 18 * PAGE - 1, -2, (1 << 64) - 1])
def test_fixed_width_outside_ram(mem, gpa):
    with pytest.raises(GuestMemoryError):
        mem.write_u16(gpa, 1)
    with pytest.raises(GuestMemoryError):
        mem.read_u16(gpa)


def test_values_are_masked_to_the_width(mem):
    mem.write_u16(2, 0x12345)
    mem.write_u32(4, -1)
    assert mem.read(2, 6) == b"\x45\x23\xff\xff\xff\xff"


def test_close_unmaps_with_the_typed_views(mem):
    mem.write_u64(8, 1)
    mem.close()
    assert all(r.mapping.closed for r in mem.regions)
