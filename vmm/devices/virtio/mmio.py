"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2), modern devices only.

``VirtioMmioTransport`` is a bus device (``read(offset, size)`` /
``write(offset, size, value)``) for one 4 KiB window.  It owns the
registers, the device status state machine (§2.1, §3.1), feature
negotiation (§2.2, §6), the ``Virtqueue`` objects, InterruptStatus and the
IRQ line, and one re-entrant lock under which every register access, every
queue notification and every late completion runs.

A device model implements the small interface of ``device.VirtioDevice``:

    device_id, name                      virtio device ID (§5) and a label
    device_features() -> int             device-specific feature bits
    queue_max_sizes() -> [int, ...]      QueueNumMax of each queue
    config_bytes() -> bytes              device configuration space (LE)
    write_config(offset, data) -> bool   driver config write; False = refused
    accept_features(features) -> bool    veto at FEATURES_OK (default: accept)
    activate(link)                       DRIVER_OK: memory, queues, features
    handle_queue(index)                  the driver notified queue ``index``
    reset()                              Status := 0
    close()                              the machine is going away

The transport adds VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC and
VIRTIO_F_EVENT_IDX to what the device offers (the ring implements them).
Notifications run synchronously in the caller's (vCPU's) thread.  A device
that completes work on its own thread uses ``link.run_locked(fn)``: ``fn``
runs under the transport lock only if no reset happened since activation,
and used-buffer interrupts are raised afterwards as needed.

What a hostile driver gets (§4.2.2 and the checklist in DESIGN.md):

* control registers answer only 32-bit aligned accesses; other widths read 0
  and writes are ignored; reads of write-only registers and undefined
  offsets read 0; writes to read-only registers are ignored.  Every such
  access is counted in ``faults`` and changes nothing;
* status bits are never cleared except by writing 0 (reset); bits must be
  set in order (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); FEATURES_OK
  does not stick unless the driver's features are a subset of the offered
  ones and include VERSION_1; FAILED is always accepted; the driver cannot
  set DEVICE_NEEDS_RESET or the reserved bits;
* DriverFeatures is writable only between DRIVER and FEATURES_OK; queue
  registers are writable only while the selected queue exists and is not
  ready; QueueReady=1 needs FEATURES_OK and a valid queue (size a power of
  two <= QueueNumMax, areas aligned and inside RAM), otherwise the queue
  stays disabled and the device enters DEVICE_NEEDS_RESET;
* QueueNotify reaches the device only when DRIVER_OK is set, neither FAILED
  nor DEVICE_NEEDS_RESET is, and the queue is ready;
* guest input the device cannot answer (a ``GuestError`` such as a
  ``VirtqueueError``) sets DEVICE_NEEDS_RESET and, after DRIVER_OK, a
  configuration-change interrupt (§2.1.2); a bug in a device model does the
  same and is logged.  Nothing raises into the vCPU thread.

Shared memory regions are absent: SHMLen and SHMBase read all ones (§4.2.2).
QueueReset reads 0: VIRTIO_F_RING_RESET is not offered.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

from ...errors import GuestError, GuestMemoryError
from ...irq import IrqLine
from ...memory import GuestMemory
from .device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    bit,
)
from .queue import Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

# ---- §4.2.2 MMIO Device Register Layout (offsets) --------------------------
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_DRIVER_LOW = 0x090
VIRTIO_MMIO_QUEUE_DRIVER_HIGH = 0x094
VIRTIO_MMIO_QUEUE_DEVICE_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_DEVICE_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

#: "virt" in little-endian.
VIRTIO_MMIO_MAGIC = 0x74726976
#: The modern (non-legacy) register layout.
VIRTIO_MMIO_VERSION_2 = 2
#: Our subsystem vendor ID: "PYVM" in little-endian.
VIRTIO_MMIO_VENDOR = 0x4D565950
#: Size of one device window (registers + configuration space).
VIRTIO_MMIO_WINDOW = 0x1000

#: InterruptStatus bits (§4.2.2): used buffer notification, configuration change.
VIRTIO_MMIO_INT_VRING = 0x1
VIRTIO_MMIO_INT_CONFIG = 0x2
_INT_DEFINED = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG

_STATUS_DEFINED = (
    VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED
)
#: ``ALL_ONES_64`` split in two halves: "a length of -1" / base 0xffff_ffff_ffff_ffff.
_ALL_ONES_32 = 0xFFFF_FFFF
U32_MASK = 0xFFFF_FFFF

_READ_ONLY = frozenset(
    {
        VIRTIO_MMIO_MAGIC_VALUE,
        VIRTIO_MMIO_VERSION,
        VIRTIO_MMIO_DEVICE_ID,
        VIRTIO_MMIO_VENDOR_ID,
        VIRTIO_MMIO_DEVICE_FEATURES,
        VIRTIO_MMIO_QUEUE_NUM_MAX,
        VIRTIO_MMIO_INTERRUPT_STATUS,
        VIRTIO_MMIO_SHM_LEN_LOW,
        VIRTIO_MMIO_SHM_LEN_HIGH,
        VIRTIO_MMIO_SHM_BASE_LOW,
        VIRTIO_MMIO_SHM_BASE_HIGH,
        VIRTIO_MMIO_CONFIG_GENERATION,
    }
)
_WRITE_ONLY = frozenset(
    {
        VIRTIO_MMIO_DEVICE_FEATURES_SEL,
        VIRTIO_MMIO_DRIVER_FEATURES,
        VIRTIO_MMIO_DRIVER_FEATURES_SEL,
        VIRTIO_MMIO_QUEUE_SEL,
        VIRTIO_MMIO_QUEUE_NUM,
        VIRTIO_MMIO_QUEUE_NOTIFY,
        VIRTIO_MMIO_INTERRUPT_ACK,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        VIRTIO_MMIO_QUEUE_DESC_HIGH,
        VIRTIO_MMIO_QUEUE_DRIVER_LOW,
        VIRTIO_MMIO_QUEUE_DRIVER_HIGH,
        VIRTIO_MMIO_QUEUE_DEVICE_LOW,
        VIRTIO_MMIO_QUEUE_DEVICE_HIGH,
        VIRTIO_MMIO_SHM_SEL,
    }
)
#: Queue address registers: offset -> (attribute, high half?).
_QUEUE_ADDR_REGS = {
    VIRTIO_MMIO_QUEUE_DESC_LOW: ("desc_addr", False),
    VIRTIO_MMIO_QUEUE_DESC_HIGH: ("desc_addr", True),
    VIRTIO_MMIO_QUEUE_DRIVER_LOW: ("avail_addr", False),
    VIRTIO_MMIO_QUEUE_DRIVER_HIGH: ("avail_addr", True),
    VIRTIO_MMIO_QUEUE_DEVICE_LOW: ("used_addr", False),
    VIRTIO_MMIO_QUEUE_DEVICE_HIGH: ("used_addr", True),
}

#: Ring features the transport's ``Virtqueue`` implements and offers by default.
RING_FEATURES = bit(VIRTIO_F_INDIRECT_DESC) | bit(VIRTIO_F_EVENT_IDX)


class _Link:
    """The ``DeviceLink`` handed to a device at DRIVER_OK (one per activation)."""

    def __init__(self, transport: VirtioMmioTransport, epoch: int) -> None:
        self._transport = transport
        self._epoch = epoch
        self.memory = transport.memory
        self.queues = transport.queues
        self.features = transport.driver_features
        self.lock = transport.lock

    def has_feature(self, bit_number: int) -> bool:
        return bool(self.features >> bit_number & 1)

    @property
    def current(self) -> bool:
        t = self._transport
        return t._epoch == self._epoch and bool(t.status & VIRTIO_CONFIG_S_DRIVER_OK)

    def signal_used(self, queue_index: int) -> None:
        with self.lock:
            if self.current and 0 <= queue_index < len(self.queues):
                self._transport._signal_used(self.queues[queue_index])

    def needs_reset(self, reason: str) -> None:
        with self.lock:
            if self.current:
                self._transport._set_needs_reset("device", reason)

    def run_locked(self, fn: Callable[[], object]) -> bool:
        t = self._transport
        with self.lock:
            if not self.current:
                t.faults["late-work-dropped"] += 1
                return False
            t._call_device("deferred work", fn)
            t._signal_all()
            return True


class VirtioMmioTransport:
    """One virtio-mmio window in front of one ``VirtioDevice``."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        irq: IrqLine,
        *,
        ring_features: int = RING_FEATURES,
        name: str | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.name = name or f"virtio-{device.name}"
        self.lock = threading.RLock()
        sizes: Sequence[int] = device.queue_max_sizes()
        self.queues: tuple[Virtqueue, ...] = tuple(
            Virtqueue(memory, i, s, name=f"{self.name} queue {i}") for i, s in enumerate(sizes)
        )
        self.offered_features = device.device_features() | bit(VIRTIO_F_VERSION_1) | (ring_features & RING_FEATURES)
        #: Register-level faults by kind (rejected accesses, state violations).
        self.faults: Counter[str] = Counter()
        #: Errors that put the device in DEVICE_NEEDS_RESET, by kind.
        self.errors: Counter[str] = Counter()
        self.last_error = ""
        self.notifications = 0
        self.config_generation = 0
        self.interrupt_status = 0
        self._epoch = 0
        #: Delivers QueueNotify writes that KVM turned into eventfd signals (notify.py), if any.
        self._notifier: Any = None
        self._reset_registers()
        device.bind_config_notifier(self.config_changed)

    # ---- bus interface -----------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                return self._read_config(offset - VIRTIO_MMIO_CONFIG, size)
            if size != 4 or offset % 4:
                self.faults["bad-width-read"] += 1
                return 0
            return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                self._write_config(offset - VIRTIO_MMIO_CONFIG, size, value)
                return
            if size != 4 or offset % 4:
                self.faults["bad-width-write"] += 1
                return
            self._write_register(offset, value & U32_MASK)

    # ---- state -------------------------------------------------------------
    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        #: The driver wrote a non-zero word at DriverFeaturesSel >= 2 (bits never offered).
        self._driver_features_beyond = False
        self.queue_sel = 0
        self.shm_sel = 0
        for q in self.queues:
            q.reset()
        self.interrupt_status = 0
        self._update_irq()

    def _reset(self) -> None:
        """Status := 0 (§2.4): every queue, feature and interrupt back to its initial state."""
        self._epoch += 1
        self._reset_registers()
        self._call_device("reset", self.device.reset, needs_reset_on_error=False)

    def _selected_queue(self) -> Virtqueue | None:
        if self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def _update_irq(self) -> None:
        self.irq.set_level(self.interrupt_status != 0)

    def _raise_interrupt(self, bits: int) -> None:
        self.interrupt_status |= bits
        self._update_irq()

    def _set_needs_reset(self, kind: str, reason: str) -> None:
        """§2.1.2: enter DEVICE_NEEDS_RESET; after DRIVER_OK also send a config change notification."""
        self.errors[kind] += 1
        self.last_error = reason
        log.debug("%s: needs reset: %s", self.name, reason)
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            return
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    @property
    def live(self) -> bool:
        """DRIVER_OK set and neither FAILED nor DEVICE_NEEDS_RESET: queues may be processed."""
        s = self.status
        return bool(s & VIRTIO_CONFIG_S_DRIVER_OK) and not s & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)

    def _call_device(self, what: str, fn: Callable[..., object], *args: Any, needs_reset_on_error: bool = True) -> bool:
        """Run device code; guest errors and device bugs end in DEVICE_NEEDS_RESET, never in the caller."""
        try:
            fn(*args)
            return True
        except VirtqueueError as e:
            kind, err = e.kind, e
        except (GuestError, GuestMemoryError) as e:
            kind, err = getattr(e, "kind", type(e).__name__), e
        except Exception as e:  # a bug in a device model must not kill a vCPU thread
            log.exception("%s: %s raised", self.name, what)
            kind, err = "device-exception", e
        if needs_reset_on_error:
            self._set_needs_reset(kind, f"{what}: {err}")
        else:
            self.errors[kind] += 1
            self.last_error = f"{what}: {err}"
        return False

    def _signal_used(self, queue: Virtqueue) -> None:
        if queue.needs_notification():
            self._raise_interrupt(VIRTIO_MMIO_INT_VRING)

    def _signal_all(self) -> None:
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            for q in self.queues:
                if q.ready:
                    self._signal_used(q)

    def config_changed(self) -> None:
        """The device changed its configuration space (may be called from any thread)."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & U32_MASK
            if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
                self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    # ---- registers ---------------------------------------------------------
    def _read_register(self, offset: int) -> int:
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VIRTIO_MMIO_VERSION_2
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VIRTIO_MMIO_VENDOR
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.offered_features >> (32 * sel)) & U32_MASK if sel < 4 else 0
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            q = self._selected_queue()
            return q.max_size if q is not None else 0
        if offset == VIRTIO_MMIO_QUEUE_READY:
            q = self._selected_queue()
            return int(q.ready) if q is not None else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == VIRTIO_MMIO_STATUS:
            return self.status
        if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH):
            return _ALL_ONES_32  # no shared memory region exists
        if offset == VIRTIO_MMIO_QUEUE_RESET:
            return 0
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        self.faults["read-write-only" if offset in _WRITE_ONLY else "read-undefined"] += 1
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == VIRTIO_MMIO_STATUS:
            self._write_status(value)
        elif offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            self._notify(value)
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            if value & ~_INT_DEFINED:
                self.faults["ack-undefined-bits"] += 1
            self.interrupt_status &= ~value & _INT_DEFINED
            self._update_irq()
        elif offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_QUEUE_READY:
            self._write_queue_ready(value)
        elif offset == VIRTIO_MMIO_QUEUE_NUM or offset in _QUEUE_ADDR_REGS:
            self._write_queue_config(offset, value)
        elif offset == VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        elif offset == VIRTIO_MMIO_QUEUE_RESET:
            self.faults["queue-reset-not-negotiated"] += 1
        elif offset in _READ_ONLY:
            self.faults["write-read-only"] += 1
        else:
            self.faults["write-undefined"] += 1

    def _write_driver_features(self, value: int) -> None:
        s = self.status
        # §3.1.1: features are written after DRIVER and never after FEATURES_OK.
        if not s & VIRTIO_CONFIG_S_DRIVER or s & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED):
            self.faults["driver-features-state"] += 1
            return
        sel = self.driver_features_sel
        if sel < 2:
            shift = 32 * sel
            self.driver_features = (self.driver_features & ~(U32_MASK << shift)) | (value << shift)
        elif value:
            self._driver_features_beyond = True

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        if self._driver_features_beyond or f & ~self.offered_features:
            self.faults["features-not-offered"] += 1
            return False
        if not f & bit(VIRTIO_F_VERSION_1):
            self.faults["features-without-version-1"] += 1
            return False
        ok = False
        try:
            ok = bool(self.device.accept_features(f))
        except Exception:
            log.exception("%s: accept_features raised", self.name)
        if not ok:
            self.faults["features-refused-by-device"] += 1
        return ok

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        if value & ~_STATUS_DEFINED:
            self.faults["status-reserved-bits"] += 1
            return
        cur = self.status
        if value & VIRTIO_CONFIG_S_NEEDS_RESET and not cur & VIRTIO_CONFIG_S_NEEDS_RESET:
            self.faults["status-driver-set-needs-reset"] += 1
        driver_cur = cur & ~VIRTIO_CONFIG_S_NEEDS_RESET
        wanted = value & ~VIRTIO_CONFIG_S_NEEDS_RESET
        if driver_cur & ~wanted:
            self.faults["status-clear"] += 1  # §2.1.1: the driver MUST NOT clear a status bit
            return
        new = wanted & ~driver_cur
        if not new:
            return
        if new & VIRTIO_CONFIG_S_FAILED:
            # The driver gave up (§2.1): accepted in any state; other new bits with it are not.
            if new != VIRTIO_CONFIG_S_FAILED:
                self.faults["status-bits-with-failed"] += 1
            self.status |= VIRTIO_CONFIG_S_FAILED
            return
        if cur & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET):
            self.faults["status-needs-reset-first"] += 1
            return
        target = driver_cur | new
        for b, needs in (
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ):
            if new & b and not target & needs:
                self.faults["status-order"] += 1
                return
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not self._features_acceptable():
            # §2.2.2: FEATURES_OK does not stick; nothing that needs it does either.
            new &= ~(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
        self.status |= new
        if new & VIRTIO_CONFIG_S_DRIVER_OK:
            self._call_device("activate", self.device.activate, _Link(self, self._epoch))

    def _write_queue_config(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            self.faults["queue-sel-out-of-range"] += 1
            return
        if q.ready:
            self.faults["queue-write-while-ready"] += 1  # §4.2.2.2
            return
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
            return
        attr, high = _QUEUE_ADDR_REGS[offset]
        old = getattr(q, attr)
        new = (old & U32_MASK) | (value << 32) if high else (old & ~U32_MASK) | value
        setattr(q, attr, new)

    def _write_queue_ready(self, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            self.faults["queue-sel-out-of-range"] += 1
            return
        if value == 0:
            q.disable()
            return
        if value != 1:
            self.faults["queue-ready-value"] += 1
            return
        if q.ready:
            return
        s = self.status
        if not s & VIRTIO_CONFIG_S_FEATURES_OK or s & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET):
            self.faults["queue-ready-state"] += 1
            return
        try:
            q.enable(
                indirect=bool(self.driver_features >> VIRTIO_F_INDIRECT_DESC & 1),
                event_idx=bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1),
            )
        except VirtqueueError as e:
            self.faults["queue-setup-rejected"] += 1
            self._set_needs_reset(e.kind, str(e))

    def _notify(self, value: int) -> None:
        self.notifications += 1
        if not self.live:
            self.faults["notify-not-live"] += 1  # §3.1.1: no notifications before DRIVER_OK
            return
        if value >= len(self.queues):
            self.faults["notify-bad-queue"] += 1
            return
        q = self.queues[value]
        if not q.ready:
            self.faults["notify-queue-not-ready"] += 1
            return
        self._call_device(f"queue {value}", self.device.handle_queue, value)
        self._signal_all()

    def notify(self, queue_index: int) -> None:
        """A QueueNotify write of ``queue_index`` that reached us other than through ``write`` (an ioeventfd)."""
        with self.lock:
            self._notify(queue_index)

    def set_notifier(self, notifier: Any) -> None:
        """Hand over the ``IoeventfdNotifier`` that delivers this window's notifications; closed with us."""
        self._notifier = notifier

    # ---- configuration space ---------------------------------------------------
    def _read_config(self, offset: int, size: int) -> int:
        cfg = self._config_bytes()
        if size not in (1, 2, 4, 8) or offset + size > len(cfg):
            self.faults["config-read-out-of-range"] += 1
            return 0
        return int.from_bytes(cfg[offset : offset + size], "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        # §3.1.1 step 4: the driver MUST NOT write configuration before FEATURES_OK.
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.faults["config-write-state"] += 1
            return
        before = self._config_bytes()
        if size not in (1, 2, 4, 8) or offset + size > len(before):
            self.faults["config-write-out-of-range"] += 1
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        accepted = [False]

        def do_write() -> None:
            accepted[0] = bool(self.device.write_config(offset, data))

        if not self._call_device("config write", do_write):
            return
        if not accepted[0]:
            self.faults["config-write-refused"] += 1
        elif self._config_bytes() != before:
            self.config_generation = (self.config_generation + 1) & U32_MASK

    def _config_bytes(self) -> bytes:
        try:
            return bytes(self.device.config_bytes())
        except Exception:
            log.exception("%s: config_bytes raised", self.name)
            return b""

    # ---- machine life cycle ------------------------------------------------------
    def close(self) -> None:
        """The machine is going away: let the device release its backend."""
        if self._notifier is not None:
            self._notifier.close()  # before taking the lock: its thread may be waiting for it
        with self.lock:
            self._epoch += 1  # late work from device threads is dropped from now on
            self.device.close()

    def metrics(self) -> dict[str, Any]:
        """For the machine's summary (same as ``summary()``)."""
        return self.summary()

    # ---- reporting -------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "name": self.name,
                "device_id": self.device.device_id,
                "status": self.status,
                "notifications": self.notifications,
                "notify_path": "ioeventfd" if self._notifier is not None else "mmio-exit",
                "faults": dict(self.faults),
                "errors": dict(self.errors),
                "last_error": self.last_error,
                "queues": [vars(q.stats).copy() for q in self.queues],
                "device": self.device.summary(),
            }
