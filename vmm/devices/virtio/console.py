"""virtio-console with one port on a Unix stream socket (virtio 1.2 §5.3).

Queues: receiveq(port0) = 0 and transmitq(port0) = 1; no MULTIPORT, so no
control queues.  No device feature is offered: SIZE has no terminal behind
it, and EMERG_WRITE would have to accept configuration writes before
FEATURES_OK (§5.3.5.1), which the transport refuses (§3.1.1).  The
configuration space is ``struct virtio_console_config`` with every field
zero (none is valid without its feature) and read-only.

The host side is a Unix stream socket the VMM listens on (``socket=PATH``),
one client at a time; a second client is accepted and closed at once
(counted).  The listener and the device thread live from construction to
``close()``, independent of the guest driver: a client may connect before
the driver is up and stays connected across driver resets.

* Client to guest: the device thread reads from the client into a bounded
  buffer only while it has room (back-pressure through the socket), and the
  buffer is copied into the guest's receive buffers, in order, as they come.
  Bytes a client sent before it disconnected are still delivered.
* Guest to client: every byte of every device-readable descriptor of a
  transmit chain is sent, in order (several descriptors per chain are
  normal).  While a client is connected nothing is lost: when the bounded
  transmit buffer is full the device stops taking bytes from the current
  chain until the client reads (a slow client slows the guest down).  While
  none is connected, bytes are kept up to the bound for the next client and
  the rest is dropped and counted, and chains are still completed: Linux
  busy-waits for its console writes (§5.3.6 footnote), so holding them would
  hang the guest.
* Work per notification is bounded: at most a queue's worth of chains and
  ``4 * tx_buffer`` bytes; the device thread continues a longer chain.

Zero-length chains complete with used length 0; a transmit chain's
device-writable descriptors and a receive chain's device-readable ones are
ignored and counted (§5.3.6.1 forbids them).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

from .device import VIRTIO_ID_CONSOLE, DeviceLink, VirtioDevice
from .queue import DescriptorChain
from .unixsock import UnixListener
from .worker import EVENT_READ, EVENT_WRITE, DeviceWorker, HostSideWorkerMixin

# ---- §5.3.3 Feature bits ---------------------------------------------------------
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# ---- §5.3.4 struct virtio_console_config: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr --------
_CONFIG = struct.Struct("<HHII")

# ---- §5.3.2 Virtqueues ----------------------------------------------------------------
RX_QUEUE = 0
TX_QUEUE = 1

DEFAULT_QUEUE_SIZE = 256
DEFAULT_RX_BUFFER = 64 * 1024
DEFAULT_TX_BUFFER = 64 * 1024
#: Bytes moved per transmit notification, in units of the transmit buffer.
_TX_BUDGET_BUFFERS = 4


class VirtioConsole(HostSideWorkerMixin, VirtioDevice):
    """A single-port console whose host side is a Unix socket at ``path``."""

    device_id = VIRTIO_ID_CONSOLE
    worker_label = "virtio-console"
    name = "console"

    def __init__(
        self,
        path: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        rx_buffer: int = DEFAULT_RX_BUFFER,
        tx_buffer: int = DEFAULT_TX_BUFFER,
    ) -> None:
        super().__init__()
        if rx_buffer < 1 or tx_buffer < 1:
            raise ValueError(f"virtio-console: buffers must be positive ({rx_buffer}, {tx_buffer})")
        self.path = path
        self.queue_size = queue_size
        self._rx_limit = rx_buffer
        self._tx_limit = tx_buffer
        #: Guards everything below; taken after the transport lock, never before it.
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        #: Sockets the device thread must unregister and close.
        self._closing: list[socket.socket] = []
        self._rx_buf = bytearray()
        self._tx_buf = bytearray()
        #: The transmit chain being copied out, and how much of it is done.
        self._tx_chain: DescriptorChain | None = None
        self._tx_off = 0
        self.clients = 0
        self.rejected_clients = 0
        self.tx_dropped_bytes = 0
        self._listener = UnixListener(path, "console socket")
        self._worker = self._start_worker()

    # ---- VirtioDevice --------------------------------------------------------------------
    def queue_max_sizes(self) -> Sequence[int]:
        return (self.queue_size, self.queue_size)

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(0, 0, 0, 0)

    def activate(self, link: DeviceLink) -> None:
        super().activate(link)
        self._ensure_worker()

    def reset(self) -> None:
        with self._lock:
            self._tx_chain = None  # a reference to guest buffers of the old driver
            self._tx_off = 0
        super().reset()

    def close(self) -> None:
        self._worker.stop()
        with self._lock:
            socks = self._closing + ([self._client] if self._client is not None else [])
            self._client = None
            self._closing = []
            self._tx_chain = None
        for s in socks:
            s.close()
        self._listener.close()

    def handle_queue(self, index: int) -> None:
        with self._lock:
            if index == RX_QUEUE:
                was_full = len(self._rx_buf) >= self._rx_limit
                self._fill_rx()
                wake = was_full and len(self._rx_buf) < self._rx_limit
            elif index == TX_QUEUE:
                self._pump_tx()
                wake = (bool(self._tx_buf) and self._client is not None) or self._tx_chain is not None
            else:
                return
        if wake:
            self._worker.wake()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                **super().summary(),
                "socket": self.path,
                "connected": self._client is not None,
                "clients": self.clients,
                "rejected_clients": self.rejected_clients,
                "rx_buffered": len(self._rx_buf),
                "tx_buffered": len(self._tx_buf),
                "tx_dropped_bytes": self.tx_dropped_bytes,
            }

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._client is not None

    # ---- guest side (transport lock and self._lock held) ------------------------------------
    def _fill_rx(self) -> None:
        link = self.link
        if link is None or not self._rx_buf:
            return
        q = link.queues[RX_QUEUE]
        m = self.metrics
        for _ in range(q.size):
            if not self._rx_buf:
                return
            chain = q.pop()
            if chain is None:
                return
            if chain.readable_len:
                m.error("rx-readable-buffer")
            n = min(chain.writable_len, len(self._rx_buf))
            if n == 0:
                m.error("rx-no-writable-buffer")
            else:
                chain.write(0, memoryview(self._rx_buf)[:n])
                del self._rx_buf[:n]
                m.bytes_written += n
            q.add_used(chain, n)

    def _pump_tx(self) -> None:
        link = self.link
        if link is None:
            return
        q = link.queues[TX_QUEUE]
        m = self.metrics
        chains = q.size
        budget = _TX_BUDGET_BUFFERS * self._tx_limit
        while budget > 0:
            if self._tx_chain is None:
                if not chains:
                    break
                chain = q.pop()
                if chain is None:
                    break
                chains -= 1
                m.requests += 1
                if chain.writable_len:
                    m.error("tx-writable-buffer")
                if not chain.readable_len:
                    m.ops["tx-empty"] += 1
                self._tx_chain, self._tx_off = chain, 0
            chain = self._tx_chain
            left = chain.readable_len - self._tx_off
            room = self._tx_limit - len(self._tx_buf)
            if self._client is not None and room < min(left, self._tx_limit):
                self._flush()
                room = self._tx_limit - len(self._tx_buf)
            take = min(left, room) if self._client is None else min(left, room, budget)
            if take:
                self._tx_buf += chain.read(self._tx_off, take)
                self._tx_off += take
                budget -= take
                m.bytes_read += take
            if self._client is None and self._tx_off < chain.readable_len:
                # Nobody to wait for: keep what fits, drop the rest (counted).
                dropped = chain.readable_len - self._tx_off
                self.tx_dropped_bytes += dropped
                m.error("tx-dropped-no-client")
                self._tx_off = chain.readable_len
            if self._tx_off == chain.readable_len:
                q.add_used(chain, 0)
                self._tx_chain = None
            elif not take:
                break  # the client has not read yet: back-pressure
        self._flush()

    # ---- host side (self._lock held) ---------------------------------------------------------
    def _flush(self) -> None:
        c = self._client
        if c is None or not self._tx_buf:
            return
        try:
            n = c.send(self._tx_buf, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._disconnect()
            return
        del self._tx_buf[:n]

    def _disconnect(self) -> None:
        if self._client is not None:
            self._closing.append(self._client)
            self._client = None
            self._worker.wake()

    def _accept(self) -> None:
        while True:
            try:
                sock = self._listener.accept()
            except OSError:
                self.metrics.error("accept-failed")
                return
            if sock is None:
                return
            with self._lock:
                if self._client is None:
                    self._client = sock
                    self.clients += 1
                    continue
                self.rejected_clients += 1
            sock.close()  # never registered: safe to close here

    def _receive(self) -> None:
        with self._lock:
            c = self._client
            room = self._rx_limit - len(self._rx_buf)
            if c is None or room <= 0:
                return
            try:
                data = c.recv(room)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._disconnect()
                return
            self._rx_buf += data

    def _loop(self, worker: DeviceWorker) -> None:
        while not worker.stopping:
            with self._lock:
                for s in self._closing:
                    worker.discard(s)
                    s.close()
                self._closing = []
                rx_pending = bool(self._rx_buf)
                tx_pending = self._tx_chain is not None
            if rx_pending:
                worker.run_locked(self.link, self._locked(self._fill_rx))
            if tx_pending:
                worker.run_locked(self.link, self._locked(self._pump_tx))
            with self._lock:
                interest: dict[Any, int] = {self._listener: EVENT_READ}
                c = self._client
                if c is not None:
                    ev = EVENT_READ if len(self._rx_buf) < self._rx_limit else 0
                    if self._tx_buf:
                        ev |= EVENT_WRITE
                    interest[c] = ev
                # A chain cut short by the per-call budget continues at once.
                again = self._tx_chain is not None and len(self._tx_buf) < self._tx_limit and self.link is not None
            for obj, events in worker.poll(interest, 0 if again else None):
                if obj is self._listener:
                    self._accept()
                    continue
                if events & EVENT_WRITE:
                    with self._lock:
                        if obj is self._client:
                            self._flush()
                if events & EVENT_READ and obj is c:
                    self._receive()

    def _locked(self, fn: Any) -> Any:
        def run() -> None:
            with self._lock:
                fn()

        return run



def from_spec(spec: Any) -> VirtioConsole:
    """``--console socket=PATH`` (``spec.ConsoleSpec``)."""
    return VirtioConsole(spec.socket)
