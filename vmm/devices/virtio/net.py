"""virtio-net over a Linux tap device (virtio 1.2 §5.1).

One receive queue and one transmit queue (receiveq1 = 0, transmitq1 = 1), no
control queue.  Offered features: MAC (the address in configuration space),
STATUS (link always up), CSUM and GUEST_CSUM.  Every packet carries the
12-byte ``struct virtio_net_hdr_v1`` (§5.1.6; ``num_buffers`` is always
present with VERSION_1), and the tap is opened with a 12-byte vnet header,
so checksum offload is the kernel's own (``tap.py``):

* CSUM: a transmitted frame with NEEDS_CSUM goes to the tap with its
  ``csum_start``/``csum_offset``; the kernel completes the checksum.
* GUEST_CSUM: the tap is told (TUNSETOFFLOAD) that partially checksummed
  frames may be handed over; they reach the guest with NEEDS_CSUM, others
  possibly with DATA_VALID.  Without GUEST_CSUM, flags are zero (§5.1.6.4.1)
  and any partial checksum the kernel still hands over is completed here.

Transmit (in the notifying vCPU's thread): the header is read, rewritten to
what we negotiated and written with the frame in one ``writev`` straight from
guest memory.  What is dropped and counted (``metrics.errors``), the chain
still returned with used length 0:

* a chain shorter than the header, header-only, or a frame shorter than an
  Ethernet header (14 bytes) or longer than 65550 bytes (§5.1.6.3: the
  largest TCP/UDP packet plus the Ethernet header);
* ``gso_type`` other than NONE (no HOST_TSO/UFO/USO feature is offered,
  §5.1.6.2.1), NEEDS_CSUM without CSUM, or ``csum_start + csum_offset + 2``
  beyond the frame;
* a frame the tap refuses (interface down, ...).
Unknown flag bits are ignored (§5.1.6.2.2); ``hdr_len`` is not used.
Device-writable descriptors in a transmit chain are ignored and counted.

Receive: a device thread (``worker.DeviceWorker``) polls the tap while the
host-side backlog (bounded in frames and bytes) has room, and fills the
guest's receive buffers through ``link.run_locked``; a receive notification
from the driver drains the backlog too.  Without MRG_RXBUF each packet needs
one chain that holds header and frame (§5.1.6.3.2, ``num_buffers`` = 1): a
chain too small for the next frame is returned with used length 0 and the
frame dropped (counted); device-readable descriptors in a receive chain are
ignored and counted.  The thread runs from DRIVER_OK to reset or close.

``tap=NAME`` names an existing tap (made with ``ip tuntap add``, in the
network namespace of the thread that builds the device); with CAP_NET_ADMIN
and no such interface the kernel creates a transient one that disappears on
close.  The MAC is ``mac=`` or one derived from the tap name.  Frames the
kernel queued on the tap while the driver was reset stay queued and reach the
next driver.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from ...errors import ConfigError
from .device import VIRTIO_ID_NET, DeviceLink, VirtioDevice, bit
from .queue import DescriptorChain
from .tap import TUN_F_CSUM, VNET_HDR_SIZE, Tap
from .worker import EVENT_READ, DeviceWorker

# ---- §5.1.3 Feature bits -----------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17

# ---- §5.1.4 Device configuration layout ---------------------------------------
VIRTIO_NET_S_LINK_UP = 1
#: struct virtio_net_config up to ``status`` (the fields our features make exist).
_CONFIG = struct.Struct("<6sH")

# ---- §5.1.6 struct virtio_net_hdr (v1: num_buffers always present) ---------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_ECN = 0x80
#: u8 flags, u8 gso_type, le16 hdr_len, le16 gso_size, le16 csum_start, le16 csum_offset, le16 num_buffers
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
assert VIRTIO_NET_HDR.size == VNET_HDR_SIZE

# ---- §5.1.2 Virtqueues ----------------------------------------------------------
RX_QUEUE = 0
TX_QUEUE = 1

ETH_HLEN = 14
#: §5.1.6.3: "the maximum size of a TCP or UDP packet, plus the 14 byte ethernet header".
MAX_FRAME = 65550

DEFAULT_QUEUE_SIZE = 256
#: Host-side receive backlog: frames read from the tap and not yet in guest buffers.
DEFAULT_RX_BACKLOG_FRAMES = 256
DEFAULT_RX_BACKLOG_BYTES = 2 * 1024 * 1024
#: Frames read from the tap per wakeup before the guest gets them.
_READ_BURST = 64
#: Read buffer: header + the largest frame + a VLAN tag and then some; longer frames are dropped.
_READ_BUF = VNET_HDR_SIZE + MAX_FRAME + 64


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; ConfigError naming --net otherwise (unicast only)."""
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"--net: mac {text!r} is not six colon-separated hex bytes") from None
    if raw[0] & 1:
        raise ConfigError(f"--net: mac {text!r} is a multicast address")
    return raw


def default_mac(tap: str) -> bytes:
    """A stable, locally administered unicast address derived from the tap name (52:54:00:xx:xx:xx)."""
    return b"\x52\x54\x00" + hashlib.sha256(tap.encode()).digest()[:3]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def inet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit ones' complement of the ones' complement sum of ``data`` (RFC 1071)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class VirtioNet(VirtioDevice):
    """A virtio-net device on an already existing tap interface."""

    device_id = VIRTIO_ID_NET
    name = "net"

    def __init__(
        self,
        tap: str | Tap,
        *,
        mac: bytes | str | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        rx_backlog_frames: int = DEFAULT_RX_BACKLOG_FRAMES,
        rx_backlog_bytes: int = DEFAULT_RX_BACKLOG_BYTES,
        offloads: bool = True,
    ) -> None:
        super().__init__()
        if rx_backlog_frames < 1 or rx_backlog_bytes < _READ_BUF:
            raise ValueError(
                f"virtio-net: backlog of {rx_backlog_frames} frames / {rx_backlog_bytes} bytes is too small"
            )
        self.tap = tap if isinstance(tap, Tap) else Tap(tap)
        if isinstance(mac, str):
            mac = parse_mac(mac)
        self.mac = mac if mac is not None else default_mac(self.tap.name)
        if len(self.mac) != 6:
            raise ValueError(f"virtio-net: MAC address must be 6 bytes, not {len(self.mac)}")
        self.queue_size = queue_size
        self._features = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS)
        if offloads:
            self._features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)
        self._backlog_frames = rx_backlog_frames
        self._backlog_bytes = rx_backlog_bytes
        #: Guards the backlog (taken after the transport lock, never before it).
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self._backlog_size = 0
        self._worker: DeviceWorker | None = None
        self._guest_csum = False
        self._csum = False
        self.last_backend_error = ""

    # ---- VirtioDevice ------------------------------------------------------------------
    def device_features(self) -> int:
        return self._features

    def queue_max_sizes(self) -> Sequence[int]:
        return (self.queue_size, self.queue_size)

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP)

    def activate(self, link: DeviceLink) -> None:
        self._stop_worker()
        super().activate(link)
        self._csum = link.has_feature(VIRTIO_NET_F_CSUM)
        self._guest_csum = link.has_feature(VIRTIO_NET_F_GUEST_CSUM)
        self.tap.set_offload(TUN_F_CSUM if self._guest_csum else 0)
        self._worker = DeviceWorker(f"virtio-net {self.tap.name}", self._rx_loop, self._worker_crashed)
        self._worker.start()

    def reset(self) -> None:
        self._stop_worker()
        with self._lock:
            self._backlog.clear()
            self._backlog_size = 0
        super().reset()

    def close(self) -> None:
        self._stop_worker()
        self.tap.close()

    def handle_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._transmit()
        elif index == RX_QUEUE:
            self._deliver()
            if self._worker is not None:
                self._worker.wake()  # the backlog may have room again

    def summary(self) -> dict[str, Any]:
        with self._lock:
            backlog = len(self._backlog)
        return {
            **super().summary(),
            "tap": self.tap.name,
            "mac": format_mac(self.mac),
            "rx_backlog": backlog,
            "last_backend_error": self.last_backend_error,
        }

    # ---- life cycle of the receive thread -------------------------------------------
    def _stop_worker(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.stop()

    def _worker_crashed(self, exc: BaseException) -> None:
        link, w = self.link, self._worker
        if link is not None and w is not None:
            w.run_locked(link, lambda: link.needs_reset(f"virtio-net receive thread failed: {exc!r}"))

    # ---- transmit ------------------------------------------------------------------------
    def _transmit(self) -> None:
        assert self.link is not None
        q = self.link.queues[TX_QUEUE]
        for chain in q.drain():
            self._transmit_one(chain)
            q.add_used(chain, 0)

    def _transmit_one(self, chain: DescriptorChain) -> None:
        m = self.metrics
        m.requests += 1
        m.ops["tx"] += 1
        if chain.writable_len:
            m.error("tx-writable-buffer")  # ignored: transmit buffers are device-readable (§2.7.4)
        total = chain.readable_len
        if total < VNET_HDR_SIZE:
            m.error("tx-short-header")
            return
        frame_len = total - VNET_HDR_SIZE
        if frame_len == 0:
            m.error("tx-header-only")
            return
        if frame_len < ETH_HLEN:
            m.error("tx-runt-frame")
            return
        if frame_len > MAX_FRAME:
            m.error("tx-frame-too-long")
            return
        flags, gso_type, _hdr_len, _gso_size, csum_start, csum_offset, _nb = VIRTIO_NET_HDR.unpack(
            chain.read(0, VNET_HDR_SIZE)
        )
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            m.error("tx-gso-not-negotiated")
            return
        needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
        if needs_csum:
            if not self._csum:
                m.error("tx-csum-not-negotiated")
                return
            if csum_start + csum_offset + 2 > frame_len:
                m.error("tx-csum-outside-frame")
                return
        else:
            csum_start = csum_offset = 0  # §5.1.6.2.2: not used without NEEDS_CSUM
        header = VIRTIO_NET_HDR.pack(needs_csum, VIRTIO_NET_HDR_GSO_NONE, 0, 0, csum_start, csum_offset, 0)
        views = list(chain.readable_views(VNET_HDR_SIZE, frame_len))
        try:
            self.tap.write([header, *views])
        except OSError as e:
            m.error("tx-backend-error")
            self.last_backend_error = f"tap {self.tap.name}: write: {e.strerror or e}"
            return
        finally:
            for v in views:
                v.release()
        m.bytes_read += frame_len

    # ---- receive -----------------------------------------------------------------------------
    def _rx_loop(self, worker: DeviceWorker) -> None:
        buf = bytearray(_READ_BUF)
        while not worker.stopping:
            with self._lock:
                room = self._has_room()
                pending = bool(self._backlog)
            if pending:
                worker.run_locked(self.link, self._deliver)
                with self._lock:
                    room = self._has_room()
            ready = worker.poll({self.tap: EVENT_READ if room else 0})
            if ready:
                self._read_tap(buf)

    def _has_room(self) -> bool:
        return len(self._backlog) < self._backlog_frames and self._backlog_size + _READ_BUF <= self._backlog_bytes

    def _read_tap(self, buf: bytearray) -> None:
        m = self.metrics
        for _ in range(_READ_BURST):
            with self._lock:
                if not self._has_room():
                    return
            try:
                n = self.tap.read_into(buf)
            except OSError as e:
                m.error("rx-backend-error")
                self.last_backend_error = f"tap {self.tap.name}: read: {e.strerror or e}"
                return
            if n is None:
                return
            frame = self._received(memoryview(buf)[:n])
            if frame is not None:
                with self._lock:
                    self._backlog.append(frame)
                    self._backlog_size += len(frame)

    def _received(self, raw: memoryview) -> bytes | None:
        """A frame from the tap made into what the guest may see (§5.1.6.4.1), or None to drop it."""
        m = self.metrics
        if len(raw) < VNET_HDR_SIZE + ETH_HLEN:
            m.error("rx-runt-frame")
            return None
        if len(raw) > VNET_HDR_SIZE + MAX_FRAME:
            m.error("rx-frame-too-long")
            return None
        flags, gso_type, _hdr_len, _gso_size, csum_start, csum_offset, _nb = VIRTIO_NET_HDR.unpack_from(raw)
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            m.error("rx-gso-from-tap")  # never enabled with TUNSETOFFLOAD
            return None
        frame = raw[VNET_HDR_SIZE:]
        if self._guest_csum:
            flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
            if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                csum_start = csum_offset = 0
            return VIRTIO_NET_HDR.pack(flags, 0, 0, 0, csum_start, csum_offset, 1) + frame.tobytes()
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            # Offload was off when the kernel queued this frame: finish the checksum ourselves.
            end = csum_start + csum_offset + 2
            if end > len(frame):
                m.error("rx-csum-outside-frame")
                return None
            data = bytearray(frame)
            csum = inet_checksum(data[csum_start:]) or 0xFFFF
            data[csum_start + csum_offset : end] = csum.to_bytes(2, "big")
            m.ops["rx-csum-completed"] += 1
            return VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + bytes(data)
        return VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + frame.tobytes()

    def _deliver(self) -> None:
        """Move backlog frames into receive chains (under the transport lock)."""
        link = self.link
        if link is None:
            return
        q = link.queues[RX_QUEUE]
        m = self.metrics
        with self._lock:
            for _ in range(q.size):
                if not self._backlog:
                    return
                chain = q.pop()
                if chain is None:
                    return
                frame = self._backlog.popleft()
                self._backlog_size -= len(frame)
                if chain.readable_len:
                    m.error("rx-readable-buffer")  # ignored: receive buffers are device-writable
                if chain.writable_len < len(frame):
                    m.error("rx-buffer-too-small")
                    q.add_used(chain, 0)
                    continue
                chain.write(0, frame)
                q.add_used(chain, len(frame))
                m.ops["rx"] += 1
                m.bytes_written += len(frame)


def from_spec(spec: Any) -> VirtioNet:
    """``--net tap=NAME[,mac=..]`` (``spec.NetSpec``)."""
    mac = parse_mac(spec.mac) if spec.mac else None
    return VirtioNet(spec.tap, mac=mac)
