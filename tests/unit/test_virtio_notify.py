"""Queue notifications through eventfds (vmm/devices/virtio/notify.py), without KVM.

The register/unregister hooks stand in for KVM_IOEVENTFD; the tests signal
the eventfds themselves, as KVM would on a matching guest write.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from vmm.bus import Bus
from vmm.devices.virtio.attach import attach_virtio_device
from vmm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY
from vmm.devices.virtio.notify import IoeventfdNotifier
from vmm.devices.virtio.spec import RngSpec
from vmm.devices.virtio.testing import GuestAllocator, VirtioMmioDriver
from vmm.errors import KvmIoctlError
from vmm.irq import RecordingIrqLine
from vmm.layout import MiB, virtio_mmio_slot
from vmm.memory import GuestMemory

ADDR = 0xD000_0050


class FakeTransport:
    name = "virtio-test0"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def notify(self, queue_index: int) -> None:
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device bug")
        self.calls.append(queue_index)


class Hooks:
    def __init__(self, fail_at: int | None = None) -> None:
        self.registered: dict[int, int] = {}  # queue -> fd
        self.unregistered: list[tuple[int, int, int]] = []
        self.fail_at = fail_at

    def register(self, fd: int, addr: int, queue: int) -> None:
        assert addr == ADDR
        if queue == self.fail_at:
            raise KvmIoctlError("KVM_IOEVENTFD", errno.ENOSPC)
        self.registered[queue] = fd

    def unregister(self, fd: int, addr: int, queue: int) -> None:
        self.unregistered.append((fd, addr, queue))


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def rig():
    t, hooks = FakeTransport(), Hooks()
    n = IoeventfdNotifier(t, 3, ADDR, hooks.register, hooks.unregister)
    n.start()
    yield t, hooks, n
    n.close()


def test_each_queue_gets_an_eventfd_and_its_signals(rig):
    t, hooks, n = rig
    assert sorted(hooks.registered) == [0, 1, 2]
    assert len(set(hooks.registered.values())) == 3
    os.eventfd_write(hooks.registered[2], 1)
    assert wait_for(lambda: t.calls == [2])
    os.eventfd_write(hooks.registered[0], 1)
    assert wait_for(lambda: t.calls == [2, 0])
    assert n.deliveries == 2


def test_signals_while_busy_become_one_delivery(rig):
    t, hooks, n = rig
    t.gate.clear()
    os.eventfd_write(hooks.registered[1], 1)
    assert wait_for(lambda: n.deliveries == 1)  # the thread is inside notify, held at the gate
    for _ in range(5):
        os.eventfd_write(hooks.registered[1], 1)
    t.gate.set()
    assert wait_for(lambda: len(t.calls) == 2)
    time.sleep(0.05)
    assert t.calls == [1, 1] and n.deliveries == 2  # nothing lost, nothing repeated


def test_a_failing_delivery_does_not_stop_the_thread(rig):
    t, hooks, n = rig
    t.fail_next = True
    os.eventfd_write(hooks.registered[0], 1)
    assert wait_for(lambda: n.deliveries == 1)
    os.eventfd_write(hooks.registered[0], 1)
    assert wait_for(lambda: t.calls == [0])


def test_close_stops_unregisters_and_closes(rig):
    t, hooks, n = rig
    fds = dict(hooks.registered)
    n.close()
    assert sorted(hooks.unregistered) == sorted((fd, ADDR, q) for q, fd in fds.items())
    assert all(closed(fd) for fd in fds.values())
    n.close()  # idempotent
    assert len(hooks.unregistered) == 3


def test_a_failed_registration_undoes_the_others():
    t, hooks = FakeTransport(), Hooks(fail_at=1)
    with pytest.raises(KvmIoctlError):
        IoeventfdNotifier(t, 3, ADDR, hooks.register, hooks.unregister)
    fd0 = hooks.registered[0]
    assert hooks.unregistered == [(fd0, ADDR, 0)]
    assert closed(fd0)


# ---- wiring through attach ------------------------------------------------------------------
class FakeVm:
    def __init__(self, fail: bool = False) -> None:
        self.fd = 99
        self.fail = fail
        self.calls: list[tuple[int, int, int, int | None, bool]] = []

    def ioeventfd(self, fd, addr, length, *, datamatch=None, deassign=False):
        if self.fail:
            raise KvmIoctlError("KVM_IOEVENTFD", errno.ENOSYS)
        self.calls.append((fd, addr, length, datamatch, deassign))


class FakeMachine:
    def __init__(self, vm: FakeVm | None) -> None:
        self.memory = GuestMemory([(0, 16 * MiB)])
        self.mmio_bus = Bus("MMIO")
        self.irq = RecordingIrqLine(5)
        if vm is not None:
            self.vm = vm

    def irq_line(self, gsi: int) -> RecordingIrqLine:
        return self.irq


def test_attach_routes_rng_notifications_through_an_eventfd():
    vm = FakeVm()
    m = FakeMachine(vm)
    base, gsi = virtio_mmio_slot(0)
    _, transport = attach_virtio_device(m, RngSpec(), 0, base, gsi, ioeventfd=True)
    try:
        assert transport.summary()["notify_path"] == "ioeventfd"
        [(fd, addr, length, datamatch, deassign)] = vm.calls
        assert (addr, length, datamatch, deassign) == (base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0, False)
        drv = VirtioMmioDriver(transport, m.memory, GuestAllocator(m.memory, MiB, 16 * MiB))
        drv.initialize()
        req = drv.submit(0, (), (32,), kick=False)
        os.eventfd_write(fd, 1)  # what KVM does for the guest's write of 0 to QueueNotify
        assert wait_for(lambda: transport.notifications == 1)
        assert wait_for(lambda: drv.queues[0].used_idx == 1)
        assert drv.used(0) == [(req.head, 32)]
        assert m.irq.level
    finally:
        transport.close()
    assert vm.calls[-1] == (fd, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0, True)


@pytest.mark.parametrize(
    "vm,wanted", [(None, True), (FakeVm(fail=True), True), (FakeVm(), False)], ids=["no-vm", "no-ioeventfd", "default"]
)
def test_attach_keeps_the_exit_path_without_ioeventfds(vm, wanted):
    m = FakeMachine(vm)
    base, gsi = virtio_mmio_slot(0)
    _, transport = attach_virtio_device(m, RngSpec(), 0, base, gsi, ioeventfd=wanted)
    try:
        assert transport.summary()["notify_path"] == "mmio-exit"
        drv = VirtioMmioDriver(transport, m.memory, GuestAllocator(m.memory, MiB, 16 * MiB))
        drv.initialize()
        req = drv.submit(0, (), (16,))  # a register write: answered before it returns
        assert drv.used(0) == [(req.head, 16)]
        assert vm is None or vm.calls == []
    finally:
        transport.close()
