"""virtio-mmio devices inside a real KVM machine.

The host plays the driver's set-up part (queues laid out in guest RAM through
the machine's MMIO bus); a few instructions of guest code then notify the
queue from a vCPU and leave through the debug-exit port.  That exercises the
path a guest driver takes: an MMIO exit, the device handling the request in
the vCPU thread, the used ring, and the interrupt line into the in-kernel
irqchip.
"""

from __future__ import annotations

import struct
import time

from vmm import layout
from vmm.boot.types import BootSetup
from vmm.cpustate import CpuState, write_boot_gdt
from vmm.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from vmm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY
from vmm.devices.virtio.spec import BlockSpec, RngSpec
from vmm.devices.virtio.testing import GuestAllocator, VirtioMmioDriver
from vmm.exitstatus import ExitReason
from vmm.machine import Machine, MachineConfig

GUEST_CODE_ADDR = layout.HIGH_MEMORY_START
EXIT_CODE = 42


def notify_then_exit(notify_addr: int, queue: int = 0) -> bytes:
    """32-bit code: ``mov dword [notify_addr], queue; mov al, 42; out 0xF4, al; hlt``."""
    return (
        b"\xc7\x05" + struct.pack("<II", notify_addr, queue)
        + bytes([0xB0, EXIT_CODE, 0xE6, layout.DEBUG_EXIT_PORT, 0xF4, 0xEB, 0xFD])
    )


def loader_for(code: bytes):
    def load(request) -> BootSetup:
        write_boot_gdt(request.memory)
        request.memory.write(GUEST_CODE_ADDR, code)
        return BootSetup(protocol="test", entry=CpuState.flat_protected32(GUEST_CODE_ADDR))

    return load


def machine_with(spec, code: bytes) -> Machine:
    config = MachineConfig(kernel="unused", mem_mib=16, acpi=False, timeout=60, devices=[spec])
    return Machine(config, loader=loader_for(code))


def driver_for(machine: Machine, base: int) -> VirtioMmioDriver:
    bus = machine.mmio_bus

    class Port:
        def read(self, off: int, size: int) -> int:
            return bus.read(base + off, size)

        def write(self, off: int, size: int, value: int) -> None:
            bus.write(base + off, size, value)

    return VirtioMmioDriver(Port(), machine.memory, GuestAllocator(machine.memory, 4 * layout.MiB, 8 * layout.MiB))


def used_soon(drv: VirtioMmioDriver, queue: int = 0, timeout: float = 10.0) -> list[tuple[int, int]]:
    """The queue's new used entries, waiting for the first one.

    With ``ioeventfd=True`` blk and rng notifications reach the device
    through a KVM ioeventfd and the transport's notification thread, so the
    guest (which exits right after notifying) can end before the device has
    answered.
    """
    deadline = time.monotonic() + timeout
    while True:
        used = drv.used(queue)
        if used or time.monotonic() > deadline:
            return used
        time.sleep(0.001)


def test_rng_request_notified_from_a_vcpu():
    base, _gsi = layout.virtio_mmio_slot(0)
    with machine_with(RngSpec(), notify_then_exit(base + VIRTIO_MMIO_QUEUE_NOTIFY)) as m:
        drv = driver_for(m, base)
        drv.initialize()
        req = drv.submit(0, (), (64,), kick=False)
        m.start()
        status = m.wait(60)
        assert status is not None and status.reason is ExitReason.GUEST_EXIT, status
        assert status.code == EXIT_CODE
        assert used_soon(drv) == [(req.head, 64)]
        assert drv.read_segment(req.writable()[0]) != b"\xa5" * 64
        transport = m.devices["virtio-rng0"]
        assert transport.irq.level and transport.irq.raised == 1
        assert transport.summary()["faults"] == {}
        assert m.metrics()["devices"]["virtio-rng0"]["device"]["requests"] == 1


def test_blk_read_notified_from_a_vcpu(tmp_path):
    img = tmp_path / "disk.img"
    content = bytes(range(256)) * 8
    img.write_bytes(content)
    base, _gsi = layout.virtio_mmio_slot(0)
    with machine_with(BlockSpec(str(img)), notify_then_exit(base + VIRTIO_MMIO_QUEUE_NOTIFY)) as m:
        drv = driver_for(m, base)
        drv.initialize()
        req = drv.submit(0, [struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2)], (1024, 1), kick=False)
        m.start()
        status = m.wait(60)
        assert status is not None and status.code == EXIT_CODE, status
        assert used_soon(drv) == [(req.head, 1025)]
        data, st = (drv.read_segment(s) for s in req.writable())
        assert st == bytes([VIRTIO_BLK_S_OK])
        assert data == content[1024:2048]
