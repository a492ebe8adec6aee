"""What a virtio device model implements, independent of the transport.

A device (blk, rng, net, console, vsock) subclasses ``VirtioDevice`` and
knows only its feature bits, its configuration space, its queues and its
backend.  The transport (``mmio.VirtioMmioTransport``) owns the registers,
the status state machine, feature negotiation, the ``Virtqueue`` objects,
interrupts and the one lock everything runs under; it hands the device a
``DeviceLink`` when the driver sets DRIVER_OK.

The contract, in the order the transport calls it:

``device_id`` / ``name``
    The virtio device ID (§5) and a short name for errors and metrics.
``device_features() -> int``
    Device-specific feature bits (0..23, 50..).  The transport adds the
    ring and version bits it implements (VERSION_1, INDIRECT_DESC, EVENT_IDX).
``queue_max_sizes() -> Sequence[int]``
    One QueueNumMax per queue (powers of two, at most 32768).
``config_bytes() -> bytes`` / ``write_config(offset, data) -> bool``
    The device-specific configuration space, little-endian.  The transport
    bounds-checks every access; ``write_config`` returns False to refuse a
    write (read-only field).  A device that changes its configuration on its
    own calls ``self.config_changed()`` (bumps ConfigGeneration, raises the
    configuration-change interrupt).
``accept_features(features) -> bool``
    Called when the driver sets FEATURES_OK with a subset of the offered
    bits that includes VERSION_1; return False to refuse a combination.
``activate(link)``
    DRIVER_OK was set.  ``link`` gives guest memory, the queues, the
    negotiated features and the way back to the transport.
``handle_queue(index)``
    The driver notified queue ``index`` (only while DRIVER_OK, the queue is
    ready and no reset is needed).  Runs in the notifying vCPU's thread under
    the transport lock; pop chains with ``queue.drain()``, complete them with
    ``queue.add_used()``.  The transport signals used buffers afterwards.
    Raise ``GuestError`` (``VirtqueueError`` included) for guest input the
    device cannot answer: the transport sets DEVICE_NEEDS_RESET.
``reset()``
    The driver wrote 0 to Status: drop every reference to guest buffers.
``close()``
    The machine is going away: release files, sockets and threads.

Work can move off the vCPU thread: a device thread calls
``link.run_locked(fn)``, which runs ``fn`` under the transport lock only if
the device has not been reset since ``link`` was handed out, and afterwards
signals any used buffers ``fn`` added.  Late completions after a reset are
thereby dropped and counted, never written to guest memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import threading

    from ...memory import GuestMemory
    from .queue import Virtqueue

# ---- §2.1 Device Status Field ----------------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128

# ---- §6 Reserved Feature Bits (bit numbers) ------------------------------
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40

# ---- §5 Device Types --------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19


def bit(n: int) -> int:
    """The feature mask of feature bit number ``n``."""
    return 1 << n


@dataclass
class DeviceMetrics:
    """Per-device counters for the VMM's summary."""

    requests: int = 0
    #: Bytes the device read from guest buffers / wrote into guest buffers.
    bytes_read: int = 0
    bytes_written: int = 0
    #: Errors by kind ("ioerr-capacity", "unsupp-type", ...).
    errors: Counter[str] = field(default_factory=Counter)
    #: Requests by operation ("in", "out", "flush", ...), for devices that have several.
    ops: Counter[str] = field(default_factory=Counter)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": dict(self.errors),
            "ops": dict(self.ops),
        }


class DeviceLink(Protocol):
    """What an activated device may use; provided by the transport."""

    memory: GuestMemory
    queues: Sequence[Virtqueue]
    #: Negotiated feature bits.
    features: int
    #: The transport's lock (re-entrant); held during ``handle_queue``.
    lock: threading.RLock

    def has_feature(self, bit_number: int) -> bool: ...

    @property
    def current(self) -> bool:
        """False once the device was reset after this link was handed out."""
        ...

    def signal_used(self, queue_index: int) -> None:
        """Raise the used-buffer interrupt if the queue's suppression rules want one."""
        ...

    def needs_reset(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET (and notify the driver if DRIVER_OK)."""
        ...

    def run_locked(self, fn: Callable[[], object]) -> bool:
        """From a device thread: run ``fn`` under the lock if still current; False if dropped."""
        ...


class VirtioDevice:
    """Base class of device models; see the module docstring for the contract."""

    device_id: int = 0
    name: str = "virtio"

    def __init__(self) -> None:
        self.metrics = DeviceMetrics()
        self.link: DeviceLink | None = None
        self._config_notifier: Callable[[], None] | None = None

    # ---- identity and negotiation -------------------------------------------
    def device_features(self) -> int:
        return 0

    def queue_max_sizes(self) -> Sequence[int]:
        raise NotImplementedError

    def accept_features(self, features: int) -> bool:
        return True

    # ---- configuration space --------------------------------------------------
    def config_bytes(self) -> bytes:
        return b""

    def write_config(self, offset: int, data: bytes) -> bool:
        return False

    def bind_config_notifier(self, notifier: Callable[[], None] | None) -> None:
        """Called by the transport that owns this device."""
        self._config_notifier = notifier

    def config_changed(self) -> None:
        """The device changed its own configuration: tell the driver (§4.2.2, §3.2.1)."""
        if self._config_notifier is not None:
            self._config_notifier()

    # ---- life cycle -----------------------------------------------------------
    def activate(self, link: DeviceLink) -> None:
        self.link = link

    def reset(self) -> None:
        self.link = None

    def handle_queue(self, index: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release host resources (files, sockets, threads) when the machine goes away."""

    def summary(self) -> dict[str, Any]:
        return {"device": self.name, **self.metrics.as_dict()}
