"""A device behind a real virtio-mmio transport, driven by the in-process test driver.

Devices with a host thread (net, console, vsock) complete receive buffers
asynchronously, so ``wait_used`` polls the used ring until entries appear;
its deadline only turns a hang into a failure and is never asserted on.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from vmm.devices.virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET
from vmm.devices.virtio.mmio import VIRTIO_MMIO_STATUS, VirtioMmioTransport
from vmm.devices.virtio.testing import GuestAllocator, Request, VirtioMmioDriver
from vmm.irq import RecordingIrqLine
from vmm.layout import MiB
from vmm.memory import GuestMemory

POISON = 0xA5
#: Upper bound on waiting for a device thread; a correct device answers in milliseconds.
DEADLINE_S = 10.0


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Rig:
    """Guest memory, a transport around ``device``, and a driver that has not initialised it yet."""

    def __init__(self, device: Any, mem_size: int = 32 * MiB) -> None:
        self.mem = GuestMemory([(0, mem_size)])
        self.dev = device
        self.irq = RecordingIrqLine(9)
        self.t = VirtioMmioTransport(device, self.mem, self.irq)
        self.alloc = GuestAllocator(self.mem, 0x10000, mem_size)
        self.drv = VirtioMmioDriver(self.t, self.mem, self.alloc)

    @property
    def status(self) -> int:
        return self.t.read(VIRTIO_MMIO_STATUS, 4)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_NEEDS_RESET)

    def used(self, queue: int) -> list[tuple[int, int]]:
        return self.drv.used(queue)

    def wait_used(self, queue: int, count: int = 1, timeout: float = DEADLINE_S) -> list[tuple[int, int]]:
        """At least ``count`` new used entries of ``queue`` (fails after ``timeout``)."""
        got: list[tuple[int, int]] = []

        def more() -> bool:
            got.extend(self.drv.used(queue))
            return len(got) >= count

        wait_for(more, f"{count} used buffers on queue {queue} (got {len(got)})", timeout)
        return got

    def written(self, req: Request, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into ``req``'s writable buffers."""
        data = b"".join(self.drv.read_segment(s) for s in req.writable())
        return data[:length]

    def restart(self, features: int | None = None, queues: tuple[int, ...] = (0, 1), size: int | None = None) -> int:
        """Reset and initialise again with fresh ring memory."""
        self.alloc.release(self.alloc.start)
        return self.drv.initialize(features, queues=queues, size=size)

    def close(self) -> None:
        self.t.close()
        self.mem.close()
