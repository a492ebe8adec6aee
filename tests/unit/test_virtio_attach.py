"""virtio device specs (command-line parsing) and attaching devices to a machine's bus."""

from __future__ import annotations

import pytest

from vmm.bus import Bus
from vmm.devices.virtio.attach import attach_virtio_device, build_device
from vmm.devices.virtio.blk import VirtioBlock
from vmm.devices.virtio.mmio import VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_MAGIC_VALUE
from vmm.devices.virtio.rng import VirtioRng
from vmm.devices.virtio.spec import (
    BlockSpec,
    ConsoleSpec,
    NetSpec,
    RngSpec,
    VsockSpec,
    parse_cli_devices,
)
from vmm.devices.virtio.testing import GuestAllocator, VirtioMmioDriver
from vmm.errors import ConfigError
from vmm.irq import RecordingIrqLine
from vmm.layout import MiB, virtio_mmio_slot
from vmm.memory import GuestMemory


def test_parse_cli_devices_in_slot_order():
    specs = parse_cli_devices(
        disks=["/tmp/a.img", "/tmp/b.img,ro,serial=disk-b"],
        nets=["tap=tap0,mac=52:54:00:12:34:56"],
        console="socket=/tmp/c.sock",
        rng=True,
        vsock="cid=3,path=/tmp/v.sock",
    )
    assert specs == [
        BlockSpec("/tmp/a.img"),
        BlockSpec("/tmp/b.img", read_only=True, serial="disk-b"),
        NetSpec("tap0", "52:54:00:12:34:56"),
        ConsoleSpec("/tmp/c.sock"),
        RngSpec(),
        VsockSpec(3, "/tmp/v.sock"),
    ]
    assert parse_cli_devices() == []


@pytest.mark.parametrize(
    "kw,option",
    [
        ({"disks": [",ro"]}, "--disk"),
        ({"disks": ["a.img,rw"]}, "--disk"),
        ({"disks": ["a.img,serial=" + "x" * 21]}, "--disk"),
        ({"disks": ["a.img,serial="]}, "--disk"),
        ({"nets": ["mac=00:11:22:33:44:55"]}, "--net"),
        ({"nets": ["tap=a,tap=b"]}, "--net"),
        ({"console": "path=/x"}, "--console"),
        ({"vsock": "cid=2,path=/x"}, "--vsock"),
        ({"vsock": "cid=0xFFFFFFFF,path=/x"}, "--vsock"),
        ({"vsock": "cid=three,path=/x"}, "--vsock"),
        ({"vsock": "path=/x"}, "--vsock"),
    ],
)
def test_parse_errors_name_the_option(kw, option):
    with pytest.raises(ConfigError, match=f"^{option}:"):
        parse_cli_devices(**kw)


class FakeMachine:
    """What attach needs of a Machine: memory, the MMIO bus and IRQ lines."""

    def __init__(self) -> None:
        self.memory = GuestMemory([(0, 4 * MiB)])
        self.mmio_bus = Bus("MMIO")
        self.lines: dict[int, RecordingIrqLine] = {}

    def irq_line(self, gsi: int) -> RecordingIrqLine:
        return self.lines.setdefault(gsi, RecordingIrqLine(gsi))


def test_attach_blk_and_rng(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\x42" * 4096)
    m = FakeMachine()
    names = []
    for index, spec in enumerate([BlockSpec(str(img)), RngSpec()]):
        base, gsi = virtio_mmio_slot(index)
        name, transport = attach_virtio_device(m, spec, index, base, gsi)
        names.append(name)
        assert m.mmio_bus.find(base).device is transport
        assert m.mmio_bus.read(base + VIRTIO_MMIO_MAGIC_VALUE, 4) == VIRTIO_MMIO_MAGIC
    assert names == ["virtio-blk0", "virtio-rng1"]
    base1, gsi1 = virtio_mmio_slot(1)
    assert m.mmio_bus.read(base1 + VIRTIO_MMIO_DEVICE_ID, 4) == 4
    # Drive the rng through the bus, as a vCPU would.
    rng = m.mmio_bus.find(base1).device

    class BusPort:
        def read(self, off, size):
            return m.mmio_bus.read(base1 + off, size)

        def write(self, off, size, value):
            m.mmio_bus.write(base1 + off, size, value)

    drv = VirtioMmioDriver(BusPort(), m.memory, GuestAllocator(m.memory, 0x1000, 4 * MiB))
    drv.initialize()
    req = drv.submit(0, (), (32,))
    assert drv.used(0) == [(req.head, 32)]
    assert m.lines[gsi1].level
    assert rng.metrics()["device"]["bytes_written"] == 32
    for r in m.mmio_bus.ranges():
        r.device.close()
    m.memory.close()


def test_build_device_kinds(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(512))
    d = build_device(BlockSpec(str(img), read_only=True))
    assert isinstance(d, VirtioBlock) and d.read_only
    d.close()
    assert isinstance(build_device(RngSpec()), VirtioRng)
    with pytest.raises(ConfigError, match="unknown virtio device"):
        build_device(object())


def test_missing_image_fails_attach_and_registers_nothing(tmp_path):
    m = FakeMachine()
    base, gsi = virtio_mmio_slot(0)
    with pytest.raises(Exception, match="nope.img"):
        attach_virtio_device(m, BlockSpec(str(tmp_path / "nope.img")), 0, base, gsi)
    assert m.mmio_bus.ranges() == []
    m.memory.close()
