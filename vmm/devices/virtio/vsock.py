"""virtio-vsock in Firecracker's hybrid form: guest AF_VSOCK <-> host AF_UNIX (virtio 1.2 §5.10).

Queues: rx = 0, tx = 1, event = 2.  The guest's CID comes from ``cid=N``
(configuration space, le64).  Only stream sockets (VIRTIO_VSOCK_F_STREAM) are
offered; the event queue's buffers are kept for VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
which nothing here sends (there is no migration).

Host side (Firecracker's vsock design, ``docs/vsock.md``):

* host-initiated: a host process connects to the Unix socket at ``path`` and
  writes ``CONNECT <port>\\n``; the device sends OP_REQUEST from the host
  (CID 2) and a local port in [2**30, 2**31) to guest port ``port``; on the
  guest's OP_RESPONSE the host reads ``OK <local port>\\n`` and the stream
  is connected; on OP_RST, or no answer within ``connect_timeout``, the host
  socket is closed.  The line is read without consuming what follows it; a
  line that is not ``CONNECT <u32>`` within 32 bytes, or none within
  ``line_timeout``, closes the socket.
* guest-initiated: OP_REQUEST to CID 2 port P connects to the Unix socket
  ``<path>_<P>``; OP_RESPONSE if that works, OP_RST if not.

Connections are keyed by (host port, guest port).  Flow control (§5.10.6.3)
goes both ways: every packet to the guest carries our ``buf_alloc``/``fwd_cnt``
(``fwd_cnt`` counts bytes handed to the host socket), a CREDIT_UPDATE goes out
when half the buffer was freed since the guest last heard, or on
CREDIT_REQUEST; toward the guest we never send more than its
``buf_alloc - (rx_cnt - fwd_cnt)`` and ask with CREDIT_REQUEST when it is 0.
Shutdown (§5.10.6.5): the guest's SHUTDOWN flags stick; SEND shuts the host
socket for writing once the buffered bytes are out, RECEIVE for reading; both
make the device answer RST and close the host socket after flushing (at most
``linger`` seconds).  Host EOF becomes SHUTDOWN(SEND) after the bytes
before it.

Everything is bounded: ``max_connections`` (host sockets still sending their
CONNECT line included), per connection ``buf_alloc`` bytes toward the host and
64 KiB staged toward the guest, and a queue of at most 256 RSTs for
unknown connections.  What a hostile driver gets, counted in
``metrics.errors``:

* a tx chain shorter than the 44-byte header, ``len`` larger than the
  chain's payload bytes (CVE-2019-18960) or than 64 KiB: dropped; if it
  names a connection, that connection is reset (RST to the guest, host
  socket closed), since its stream has a hole;
* a source CID other than the guest's: dropped;
* a destination CID other than the host's, an unknown ``type`` (§5.10.6.4:
  RST), any op but REQUEST/RST for an unknown connection: RST reply, never
  in answer to an RST;
* RW beyond the credit we gave, RW before the connection is established or
  after the guest's SHUTDOWN(SEND), RESPONSE or REQUEST on an established
  connection, unknown ops: the connection is reset;
* no listener at ``<path>_<P>`` or the connection limit reached: RST.
rx chains shorter than the header are returned with used length 0; readable
descriptors in rx chains and writable ones in tx chains are ignored.  A
driver reset drops every connection (their host sockets are closed); host
connections whose REQUEST has not reached the driver yet wait for the next.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable

from ...errors import DeviceError
from .device import VIRTIO_ID_VSOCK, DeviceLink, VirtioDevice, bit
from .queue import DescriptorChain
from .unixsock import UNIX_PATH_MAX, UnixListener, check_path, connect_unix
from .worker import EVENT_READ, EVENT_WRITE, DeviceWorker, HostSideWorkerMixin

# ---- §5.10.3 Feature bits -------------------------------------------------------------
VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1

# ---- §5.10.4 Device configuration layout: le64 guest_cid --------------------------------
_CONFIG = struct.Struct("<Q")

# ---- §5.10.2 Virtqueues --------------------------------------------------------------------
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

# ---- §5.10.6 struct virtio_vsock_hdr -----------------------------------------------------------
#: le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
#: le32 flags, le32 buf_alloc, le32 fwd_cnt
VIRTIO_VSOCK_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = VIRTIO_VSOCK_HDR.size  # 44

VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
OP_NAMES = {
    VIRTIO_VSOCK_OP_INVALID: "invalid",
    VIRTIO_VSOCK_OP_REQUEST: "request",
    VIRTIO_VSOCK_OP_RESPONSE: "response",
    VIRTIO_VSOCK_OP_RST: "rst",
    VIRTIO_VSOCK_OP_SHUTDOWN: "shutdown",
    VIRTIO_VSOCK_OP_RW: "rw",
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: "credit-update",
    VIRTIO_VSOCK_OP_CREDIT_REQUEST: "credit-request",
}

#: §5.10.6.5 SHUTDOWN flags: bit 0 the sender will receive no more, bit 1 it will send no more.
VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE = 1
VIRTIO_VSOCK_SHUTDOWN_F_SEND = 2
_SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | VIRTIO_VSOCK_SHUTDOWN_F_SEND

VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

#: The host's well-known CID (§5.10.4).
VMADDR_CID_HOST = 2
U32_MASK = 0xFFFF_FFFF

#: Largest payload of one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_PAYLOAD = 64 * 1024
#: Host ports for host-initiated connections (Firecracker's range).
LOCAL_PORT_FIRST = 1 << 30
LOCAL_PORT_END = 1 << 31
#: "CONNECT 4294967295\n" is 19 bytes.
CONNECT_LINE_MAX = 32
#: Bytes read from a host socket and not yet sent to the guest, per connection.
STAGE_MAX = MAX_PKT_PAYLOAD
#: RSTs for unknown connections waiting for an rx buffer.
RST_QUEUE_MAX = 256

DEFAULT_QUEUE_SIZE = 256
DEFAULT_BUF_ALLOC = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_LINE_TIMEOUT = 10.0
DEFAULT_LINGER = 10.0

# Connection states.
CONNECTING = "connecting"  # host-initiated: REQUEST pending or sent, no RESPONSE yet
ESTABLISHED = "established"
CLOSING = "closing"  # RST pending or sent; host-bound bytes may still be flushing


class _Conn:
    """One stream between a guest port and a host Unix socket."""

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket, *, host_initiated: bool, buf_alloc: int):
        self.local_port = local_port
        self.peer_port = peer_port
        self.sock = sock
        self.host_initiated = host_initiated
        self.state = CONNECTING if host_initiated else ESTABLISHED
        # guest -> host
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.last_fwd_sent = 0
        self.tx_buf = bytearray()
        self.shut_wr_done = False
        # host -> guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.rx_cnt = 0
        self.staged = bytearray()
        self.host_eof = False
        self.peer_shutdown = 0
        # packets owed to the guest
        self.pend_request = host_initiated
        self.pend_response = False
        self.pend_rst = False
        self.pend_credit_update = False
        self.pend_credit_request = False
        self.pend_shutdown = 0
        self.credit_requested = False
        self.deadline: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def peer_free(self) -> int:
        """Bytes the guest can take now: peer_buf_alloc - (rx_cnt - peer_fwd_cnt), never negative."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    def wants_rx(self) -> bool:
        if self.pend_rst or self.pend_request or self.pend_response:
            return True
        if self.state != ESTABLISHED:
            return False
        if self.staged and self.peer_free() > 0:
            return True
        return bool((self.pend_shutdown and not self.staged) or self.pend_credit_update or self.pend_credit_request)

    def can_read_host(self) -> bool:
        return (
            self.state == ESTABLISHED
            and not self.host_eof
            and not self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE
            and len(self.staged) < STAGE_MAX
        )


class VirtioVsock(HostSideWorkerMixin, VirtioDevice):
    """A vsock device for guest ``cid`` whose host side is the Unix socket ``path``."""

    device_id = VIRTIO_ID_VSOCK
    worker_label = "virtio-vsock"
    name = "vsock"

    def __init__(
        self,
        cid: int,
        path: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        line_timeout: float = DEFAULT_LINE_TIMEOUT,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        super().__init__()
        if not 3 <= cid < U32_MASK:
            raise DeviceError(f"vsock: guest CID {cid} is reserved or out of range (3..{U32_MASK - 1})")
        if not 0 < buf_alloc <= U32_MASK or max_connections < 1:
            raise ValueError(f"virtio-vsock: bad limits buf_alloc={buf_alloc} max_connections={max_connections}")
        check_path(path, "vsock socket")
        if len(path.encode()) + len(f"_{U32_MASK}") >= UNIX_PATH_MAX:
            raise DeviceError(
                f"vsock socket {path!r}: leaves no room for the _<port> suffix in a {UNIX_PATH_MAX}-byte path"
            )
        self.cid = cid
        self.path = path
        self.queue_size = queue_size
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.line_timeout = line_timeout
        self.linger = linger
        self._credit_threshold = max(1, buf_alloc // 2)
        #: Guards everything below; taken after the transport lock, never before it.
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, int], _Conn] = {}
        #: Accepted host sockets that have not sent their whole CONNECT line yet -> (deadline, line so far).
        self._pending_hosts: dict[socket.socket, tuple[float, bytearray]] = {}
        self._rx_ready: deque[tuple[int, int]] = deque()
        self._rx_ready_set: set[tuple[int, int]] = set()
        #: RSTs for unknown connections: (src_cid, src_port, dst_port, type).
        self._rst_queue: deque[tuple[int, int, int, int]] = deque()
        #: Sockets the device thread must unregister and close.
        self._closing: list[socket.socket] = []
        self._next_port = LOCAL_PORT_FIRST
        self._listener = UnixListener(path, "vsock socket")
        self._worker = self._start_worker()

    # ---- VirtioDevice ----------------------------------------------------------------------------
    def device_features(self) -> int:
        return bit(VIRTIO_VSOCK_F_STREAM)

    def queue_max_sizes(self) -> Sequence[int]:
        return (self.queue_size, self.queue_size, self.queue_size)

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.cid)

    def activate(self, link: DeviceLink) -> None:
        super().activate(link)
        self._ensure_worker()

    def reset(self) -> None:
        """Every connection the driver knew of is gone; host connections it never heard of wait on."""
        with self._lock:
            self._rx_ready.clear()
            self._rx_ready_set.clear()
            self._rst_queue.clear()
            for conn in list(self._conns.values()):
                if conn.pend_request:
                    self._want_rx(conn)
                else:
                    self._remove(conn)
        super().reset()
        self._worker.wake()

    def close(self) -> None:
        self._worker.stop()
        with self._lock:
            socks = self._closing + [c.sock for c in self._conns.values()] + list(self._pending_hosts)
            self._closing = []
            self._conns.clear()
            self._pending_hosts.clear()
        for s in socks:
            s.close()
        self._listener.close()

    def handle_queue(self, index: int) -> None:
        with self._lock:
            if index == TX_QUEUE:
                self._transmit()
            elif index != RX_QUEUE:
                return  # event queue: buffers stay for TRANSPORT_RESET
            self._deliver()
        self._worker.wake()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            states: dict[str, int] = {}
            for c in self._conns.values():
                states[c.state] = states.get(c.state, 0) + 1
            return {
                **super().summary(),
                "cid": self.cid,
                "path": self.path,
                "connections": states,
                "pending_host_connects": len(self._pending_hosts),
            }

    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    # ---- guest -> device (transport lock and self._lock held) ----------------------------------
    def _transmit(self) -> None:
        assert self.link is not None
        q = self.link.queues[TX_QUEUE]
        for chain in q.drain():
            self._packet(chain)
            q.add_used(chain, 0)

    def _packet(self, chain: DescriptorChain) -> None:
        m = self.metrics
        m.requests += 1
        if chain.writable_len:
            m.error("tx-writable-buffer")
        if chain.readable_len < HDR_SIZE:
            m.error("tx-short-header")
            return
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt) = VIRTIO_VSOCK_HDR.unpack(
            chain.read(0, HDR_SIZE)
        )
        m.ops[OP_NAMES.get(op, "unknown-op")] += 1
        if src_cid != self.cid:
            m.error("tx-bad-src-cid")
            return
        # Connections are (host port, guest port) pairs behind the host's CID only.
        conn = self._conns.get((dst_port, src_port)) if dst_cid == VMADDR_CID_HOST else None
        bad_len = None
        if length > MAX_PKT_PAYLOAD:
            bad_len = "tx-len-too-large"
        elif length > chain.readable_len - HDR_SIZE:
            bad_len = "tx-len-exceeds-buffer"  # CVE-2019-18960
        if bad_len is not None:
            m.error(bad_len)
            if conn is not None and conn.state != CLOSING:
                self._abort(conn)
            return
        if dst_cid != VMADDR_CID_HOST:
            m.error("tx-unroutable-cid")
            if op != VIRTIO_VSOCK_OP_RST:
                self._queue_rst(dst_cid, dst_port, src_port, type_)
            return
        if type_ != VIRTIO_VSOCK_TYPE_STREAM:
            m.error("tx-unknown-type")  # §5.10.6.4: answered with RST
            if op != VIRTIO_VSOCK_OP_RST:
                self._queue_rst(VMADDR_CID_HOST, dst_port, src_port, type_)
            return
        if conn is None:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(src_port, dst_port, buf_alloc, fwd_cnt)
            elif op != VIRTIO_VSOCK_OP_RST:
                m.error("tx-unknown-connection")
                self._queue_rst(VMADDR_CID_HOST, dst_port, src_port, type_)
            return
        if conn.state == CLOSING:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                m.error("tx-request-on-closing-connection")
                self._queue_rst(VMADDR_CID_HOST, dst_port, src_port, type_)
            elif op != VIRTIO_VSOCK_OP_RST:
                m.error("tx-on-closing-connection")
            elif conn.pend_rst:  # both sides reset: ours need not go out
                conn.pend_rst = False
                if not conn.tx_buf:
                    self._remove(conn)
            return
        self._update_peer_credit(conn, buf_alloc, fwd_cnt)
        if op == VIRTIO_VSOCK_OP_RST:
            self._remove(conn)
        elif op == VIRTIO_VSOCK_OP_RESPONSE:
            self._guest_response(conn)
        elif op == VIRTIO_VSOCK_OP_RW:
            self._guest_data(conn, chain, length)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            pass  # the credit fields were taken above
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.pend_credit_update = True
            self._want_rx(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        elif op == VIRTIO_VSOCK_OP_REQUEST:
            m.error("tx-request-on-connection")
            self._abort(conn)
        else:
            m.error("tx-unknown-op")
            self._abort(conn)

    def _update_peer_credit(self, conn: _Conn, buf_alloc: int, fwd_cnt: int) -> None:
        before = conn.peer_free()
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if conn.peer_free() > before:
            conn.credit_requested = False
        if conn.staged and conn.peer_free():
            self._want_rx(conn)

    def _guest_connect(self, guest_port: int, host_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        m = self.metrics
        if len(self._conns) + len(self._pending_hosts) >= self.max_connections:
            m.error("connection-limit")
            self._queue_rst(VMADDR_CID_HOST, host_port, guest_port, VIRTIO_VSOCK_TYPE_STREAM)
            return
        try:
            sock = connect_unix(f"{self.path}_{host_port}")
        except OSError:
            m.error("guest-connect-refused")
            self._queue_rst(VMADDR_CID_HOST, host_port, guest_port, VIRTIO_VSOCK_TYPE_STREAM)
            return
        conn = _Conn(host_port, guest_port, sock, host_initiated=False, buf_alloc=self.buf_alloc)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        conn.pend_response = True
        self._conns[conn.key] = conn
        m.ops["guest-connected"] += 1
        self._want_rx(conn)

    def _guest_response(self, conn: _Conn) -> None:
        if conn.state != CONNECTING or conn.pend_request:
            self.metrics.error("tx-unexpected-response")
            self._abort(conn)
            return
        line = f"OK {conn.local_port}\n".encode()
        try:
            # The socket has carried nothing toward the host yet: a short line always fits.
            sent = conn.sock.send(line, socket.MSG_NOSIGNAL)
        except OSError:
            sent = -1
        if sent != len(line):
            self.metrics.error("host-gone")
            self._abort(conn)
            return
        conn.state = ESTABLISHED
        conn.deadline = None
        self.metrics.ops["host-connected"] += 1
        self._want_rx(conn)

    def _guest_data(self, conn: _Conn, chain: DescriptorChain, length: int) -> None:
        m = self.metrics
        if conn.state != ESTABLISHED:
            m.error("tx-rw-before-established")
            self._abort(conn)
            return
        if conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND:
            m.error("tx-rw-after-shutdown")
            self._abort(conn)
            return
        if length > conn.buf_alloc - len(conn.tx_buf):
            m.error("tx-credit-exceeded")
            self._abort(conn)
            return
        if not length:
            return
        m.bytes_read += length
        if conn.tx_buf:
            for view in chain.readable_views(HDR_SIZE, length):
                conn.tx_buf += view
                view.release()
            return
        sent = 0
        views = list(chain.readable_views(HDR_SIZE, length))
        try:
            for i, view in enumerate(views):
                try:
                    n = conn.sock.send(view, socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    n = 0
                sent += n
                if n < len(view):
                    conn.tx_buf += view[n:]
                    for rest in views[i + 1 :]:
                        conn.tx_buf += rest
                    break
        except OSError:
            m.error("host-send-failed")
            self._abort(conn)
            return
        finally:
            for view in views:
                view.release()
        self._forwarded(conn, sent)

    def _guest_shutdown(self, conn: _Conn, flags: int) -> None:
        conn.peer_shutdown |= flags & _SHUTDOWN_BOTH
        if conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE:
            conn.staged.clear()
            conn.pend_credit_request = False
            self._shutdown_host(conn, socket.SHUT_RD)
        if conn.peer_shutdown == _SHUTDOWN_BOTH:
            # §5.10.6.5 clean disconnect: answer with RST; host-bound bytes still go out.
            conn.state = CLOSING
            conn.pend_rst = True
            conn.deadline = time.monotonic() + self.linger
            self._want_rx(conn)
        elif conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND and not conn.tx_buf:
            self._shutdown_host(conn, socket.SHUT_WR)

    def _shutdown_host(self, conn: _Conn, how: int) -> None:
        if how == socket.SHUT_WR:
            if conn.shut_wr_done:
                return
            conn.shut_wr_done = True
        try:
            conn.sock.shutdown(how)
        except OSError:
            pass

    # ---- connection bookkeeping (self._lock held) ------------------------------------------------
    def _want_rx(self, conn: _Conn) -> None:
        if conn.key not in self._rx_ready_set:
            self._rx_ready_set.add(conn.key)
            self._rx_ready.append(conn.key)

    def _queue_rst(self, src_cid: int, src_port: int, dst_port: int, type_: int) -> None:
        if len(self._rst_queue) >= RST_QUEUE_MAX:
            self.metrics.error("rst-queue-full")
            return
        self._rst_queue.append((src_cid, src_port, dst_port, type_))

    def _abort(self, conn: _Conn) -> None:
        """Reset ``conn``: RST to the guest, host socket closed, nothing more flushed."""
        if conn.pend_request:  # the guest never heard of it
            self._remove(conn)
            return
        conn.state = CLOSING
        conn.pend_rst = True
        conn.pend_request = conn.pend_response = False
        conn.tx_buf.clear()
        conn.staged.clear()
        conn.deadline = None
        self._want_rx(conn)

    def _remove(self, conn: _Conn) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._closing.append(conn.sock)
        self._worker.wake()

    def _check_credit(self, conn: _Conn) -> None:
        """Ask the guest for credit once when bytes wait and it has no room (§5.10.6.3)."""
        if conn.state == ESTABLISHED and conn.staged and not conn.peer_free() and not conn.credit_requested:
            conn.credit_requested = True
            conn.pend_credit_request = True
            self._want_rx(conn)

    def _forwarded(self, conn: _Conn, n: int) -> None:
        """``n`` guest bytes reached the host socket: count them and maybe tell the guest."""
        conn.fwd_cnt = (conn.fwd_cnt + n) & U32_MASK
        if ((conn.fwd_cnt - conn.last_fwd_sent) & U32_MASK) >= self._credit_threshold:
            conn.pend_credit_update = True
            self._want_rx(conn)
        if not conn.tx_buf:
            if conn.state == CLOSING and not conn.pend_rst:
                self._remove(conn)
            elif conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND:
                self._shutdown_host(conn, socket.SHUT_WR)

    def _alloc_port(self) -> int:
        used = {k[0] for k in self._conns}
        while True:  # at most len(used) + 1 rounds
            port = self._next_port
            self._next_port = port + 1 if port + 1 < LOCAL_PORT_END else LOCAL_PORT_FIRST
            if port not in used:
                return port

    # ---- device -> guest (transport lock and self._lock held) -------------------------------------
    def _deliver(self) -> None:
        link = self.link
        if link is None:
            return
        q = link.queues[RX_QUEUE]
        m = self.metrics
        for _ in range(q.size):
            # RSTs for unknown connections first: they are few, bounded, and free their queue slots.
            conn = None if self._rst_queue else self._next_rx_conn()
            if conn is None and not self._rst_queue:
                return
            chain = q.pop()
            if chain is None:
                return
            if chain.readable_len:
                m.error("rx-readable-buffer")
            room = chain.writable_len - HDR_SIZE
            if room < 0:
                m.error("rx-buffer-too-small")
                q.add_used(chain, 0)
                continue
            if conn is None:
                src_cid, src_port, dst_port, type_ = self._rst_queue.popleft()
                hdr = VIRTIO_VSOCK_HDR.pack(
                    src_cid, self.cid, src_port, dst_port, 0, type_, VIRTIO_VSOCK_OP_RST, 0, 0, 0
                )
                chain.write(0, hdr)
                q.add_used(chain, HDR_SIZE)
                m.ops["rx-rst"] += 1
                continue
            n = self._write_packet(conn, chain, room)
            q.add_used(chain, HDR_SIZE + n)
            if conn.wants_rx():
                self._rx_ready.rotate(-1)
            else:
                self._rx_ready.popleft()
                self._rx_ready_set.discard(conn.key)

    def _next_rx_conn(self) -> _Conn | None:
        """The connection at the front of the ready queue that has something to send."""
        while self._rx_ready:
            key = self._rx_ready[0]
            conn = self._conns.get(key)
            if conn is not None and conn.wants_rx():
                return conn
            self._rx_ready.popleft()
            self._rx_ready_set.discard(key)
        return None

    def _write_packet(self, conn: _Conn, chain: DescriptorChain, room: int) -> int:
        """Write the next packet ``conn`` owes the guest into ``chain``; returns its payload length."""
        m = self.metrics
        op, flags, payload = VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, b""
        free = conn.peer_free()
        if conn.pend_rst:
            op = VIRTIO_VSOCK_OP_RST
            conn.pend_rst = False
        elif conn.pend_request:
            op = VIRTIO_VSOCK_OP_REQUEST
            conn.pend_request = False
            conn.deadline = time.monotonic() + self.connect_timeout
        elif conn.pend_response:
            op = VIRTIO_VSOCK_OP_RESPONSE
            conn.pend_response = False
        elif conn.staged and free > 0 and room > 0:
            op = VIRTIO_VSOCK_OP_RW
            n = min(len(conn.staged), free, room, MAX_PKT_PAYLOAD)
            payload = bytes(conn.staged[:n])
            del conn.staged[:n]
            conn.rx_cnt = (conn.rx_cnt + n) & U32_MASK
            m.bytes_written += n
            self._check_credit(conn)
            self._worker.wake()  # room to read more from the host socket
        elif conn.staged and free > 0:
            m.error("rx-buffer-too-small")  # a header-only buffer cannot carry data: send credit instead
        elif conn.pend_shutdown and not conn.staged:
            op, flags = VIRTIO_VSOCK_OP_SHUTDOWN, conn.pend_shutdown
            conn.pend_shutdown = 0
        elif conn.pend_credit_request and not conn.pend_credit_update:
            op = VIRTIO_VSOCK_OP_CREDIT_REQUEST
            conn.pend_credit_request = False
        conn.pend_credit_update = False  # every packet carries buf_alloc and fwd_cnt
        conn.last_fwd_sent = conn.fwd_cnt
        hdr = VIRTIO_VSOCK_HDR.pack(
            VMADDR_CID_HOST,
            self.cid,
            conn.local_port,
            conn.peer_port,
            len(payload),
            VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            conn.buf_alloc,
            conn.fwd_cnt,
        )
        chain.write(0, hdr + payload)
        m.ops[f"rx-{OP_NAMES[op]}"] += 1
        if op == VIRTIO_VSOCK_OP_RST and (not conn.tx_buf or conn.peer_shutdown != _SHUTDOWN_BOTH):
            self._remove(conn)
        return len(payload)

    # ---- host side: the device thread ------------------------------------------------------------
    def _loop(self, worker: DeviceWorker) -> None:
        while not worker.stopping:
            with self._lock:
                for s in self._closing:
                    worker.discard(s)
                    s.close()
                self._closing = []
                timeout = self._expire(time.monotonic())
                deliver = bool(self._rx_ready or self._rst_queue)
            if deliver:
                worker.run_locked(self.link, self._locked(self._deliver))
            with self._lock:
                interest = self._interest()
            for obj, events in worker.poll(interest, timeout):
                if obj is self._listener:
                    self._accept()
                    continue
                with self._lock:
                    if obj in self._pending_hosts:
                        self._read_connect_line(obj)
                        continue
                    conn = self._conn_by_sock(obj)
                    if conn is None:
                        continue
                    if events & EVENT_WRITE:
                        self._flush(conn)
                    if events & EVENT_READ and conn.can_read_host():
                        self._read_host(conn)

    def _locked(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self._lock:
                fn()

        return run

    def _conn_by_sock(self, sock: Any) -> _Conn | None:
        for c in self._conns.values():
            if c.sock is sock:
                return c
        return None

    def _interest(self) -> dict[Any, int]:
        interest: dict[Any, int] = {self._listener: EVENT_READ}
        for s in self._pending_hosts:
            interest[s] = EVENT_READ
        for c in self._conns.values():
            ev = EVENT_READ if c.can_read_host() else 0
            if c.tx_buf:
                ev |= EVENT_WRITE
            interest[c.sock] = ev
        return interest

    def _expire(self, now: float) -> float | None:
        """Act on passed deadlines; return seconds until the next one (None: none)."""
        nearest: float | None = None
        for s, (deadline, _) in list(self._pending_hosts.items()):
            if deadline <= now:
                self.metrics.error("host-connect-line-timeout")
                del self._pending_hosts[s]
                self._closing.append(s)
            elif nearest is None or deadline < nearest:
                nearest = deadline
        for c in list(self._conns.values()):
            if c.deadline is None:
                continue
            if c.deadline <= now:
                c.deadline = None
                if c.state == CONNECTING:
                    self.metrics.error("guest-connect-timeout")
                    self._abort(c)
                elif c.state == CLOSING:
                    self.metrics.error("linger-timeout")
                    self._remove(c)
            elif nearest is None or c.deadline < nearest:
                nearest = c.deadline
        if self._closing:
            self._worker.wake()
        return None if nearest is None else max(0.0, nearest - now)

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
                if len(self._conns) + len(self._pending_hosts) < self.max_connections:
                    self._pending_hosts[sock] = (time.monotonic() + self.line_timeout, bytearray())
                    continue
                self.metrics.error("host-connection-limit")
            sock.close()  # never registered: safe to close here

    def _read_connect_line(self, sock: socket.socket) -> None:
        """Parse ``CONNECT <port>\\n`` without consuming the bytes after it (self._lock held).

        Bytes are peeked first; only those up to and including the newline
        are taken, and a partial line (no newline yet) is taken and kept.
        """
        _, line = self._pending_hosts[sock]
        try:
            peek = sock.recv(CONNECT_LINE_MAX - len(line), socket.MSG_PEEK)
            nl = peek.find(b"\n")
            if peek:
                line += sock.recv(nl + 1 if nl >= 0 else len(peek))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek, nl = b"", -1
        if peek and nl < 0 and len(line) < CONNECT_LINE_MAX:
            return  # the rest of the line is still coming
        del self._pending_hosts[sock]
        words = line.split() if nl >= 0 else []
        port = None
        if len(words) == 2 and words[0] == b"CONNECT" and words[1].isdigit() and int(words[1]) <= U32_MASK:
            port = int(words[1])
        if port is None:
            self.metrics.error("host-bad-connect-line")
            self._closing.append(sock)
            return
        conn = _Conn(self._alloc_port(), port, sock, host_initiated=True, buf_alloc=self.buf_alloc)
        self._conns[conn.key] = conn
        self.metrics.ops["host-connect"] += 1
        self._want_rx(conn)

    def _read_host(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(STAGE_MAX - len(conn.staged))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.metrics.error("host-recv-failed")
            self._abort(conn)
            return
        if not data:
            conn.host_eof = True
            conn.pend_shutdown |= VIRTIO_VSOCK_SHUTDOWN_F_SEND  # after the bytes before it
        else:
            conn.staged += data
            self._check_credit(conn)
        self._want_rx(conn)

    def _flush(self, conn: _Conn) -> None:
        if not conn.tx_buf:
            return
        try:
            n = conn.sock.send(conn.tx_buf, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.metrics.error("host-send-failed")
            if conn.state == CLOSING:
                conn.tx_buf.clear()
                self._remove(conn)
            else:
                self._abort(conn)
            return
        del conn.tx_buf[:n]
        self._forwarded(conn, n)



def from_spec(spec: Any) -> VirtioVsock:
    """``--vsock cid=N,path=PATH`` (``spec.VsockSpec``)."""
    return VirtioVsock(spec.cid, spec.path)
