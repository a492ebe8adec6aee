import pytest

from vmm.bus import Bus
from vmm.errors import DeviceError


class Reg:
    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x1122334455667788

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_dispatch_relative_offset_and_masking():
    bus = Bus("pio")
    dev = Reg()
    bus.register(0x3F8, 8, dev, "uart")
    assert bus.read(0x3F9, 1) == 0x88
    assert bus.read(0x3F8, 2) == 0x7788
    bus.write(0x3FF, 1, 0x1AB)
    assert dev.log[-1] == ("w", 7, 1, 0xAB)


def test_unhandled_reads_all_ones_and_counted():
    bus = Bus("pio")
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 4) == 0xFFFFFFFF
    bus.write(0x81, 1, 0)
    assert bus.stats.unhandled_reads == 2
    assert bus.stats.unhandled_writes == 1
    assert bus.stats.last_unhandled[-1] == 0x81


def test_overlap_rejected_with_names():
    bus = Bus("mmio")
    bus.register(0x1000, 0x100, Reg(), "a")
    with pytest.raises(DeviceError, match="overlaps a"):
        bus.register(0x10FF, 0x10, Reg(), "b")


def test_bytes_helpers_little_endian():
    bus = Bus("mmio")
    dev = Reg()
    bus.register(0, 16, dev)
    bus.write_bytes(4, b"\x01\x02\x03\x04")
    assert dev.log[-1] == ("w", 4, 4, 0x04030201)
    assert bus.read_bytes(0, 2) == b"\x88\x77"


def test_boundaries():
    bus = Bus("pio")
    dev = Reg()
    bus.register(0x10, 4, dev)
    assert bus.find(0x0F) is None
    assert bus.find(0x10) is not None
    assert bus.find(0x13) is not None
    assert bus.find(0x14) is None
    bus.unregister(dev)
    assert bus.find(0x10) is None
