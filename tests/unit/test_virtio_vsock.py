"""virtio-vsock through the mmio transport; the host side is real Unix sockets (Firecracker's hybrid form)."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from typing import NamedTuple

import pytest
from virtio_rig import Rig, wait_for

from vmm.devices.virtio.attach import build_device
from vmm.devices.virtio.device import VIRTIO_ID_VSOCK
from vmm.devices.virtio.mmio import VIRTIO_MMIO_DEVICE_ID
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.devices.virtio.spec import VsockSpec
from vmm.devices.virtio.testing import Segment
from vmm.devices.virtio.vsock import (
    EVENT_QUEUE,
    HDR_SIZE,
    LOCAL_PORT_END,
    LOCAL_PORT_FIRST,
    MAX_PKT_PAYLOAD,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_VSOCK_F_STREAM,
    VIRTIO_VSOCK_HDR,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE,
    VIRTIO_VSOCK_SHUTDOWN_F_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    VirtioVsock,
)
from vmm.errors import DeviceError

CID = 42
RX_BUF = HDR_SIZE + 4096


class Pkt(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes = b""


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed + i // 251) & 0xFF for i in range(n))


class Guest(Rig):
    """A vsock driver: keeps receive buffers posted, parses what the device sends."""

    def __init__(self, path: str, *, rx_buffers: int = 16, rx_size: int = RX_BUF, start: bool = True, **kw) -> None:
        super().__init__(VirtioVsock(CID, path, **kw))
        self.path = path
        self.rx_buffers = rx_buffers
        self.rx_size = rx_size
        self.inbox: deque[Pkt] = deque()
        if start:
            self.start()

    def start(self) -> None:
        self.restart(queues=(RX_QUEUE, TX_QUEUE, EVENT_QUEUE))
        self.inbox.clear()
        self.rx_segments: dict[int, Segment] = {}
        for _ in range(self.rx_buffers):
            seg = Segment(self.alloc.alloc(self.rx_size), self.rx_size, True)
            self._post(seg)
        self.drv.kick(RX_QUEUE)
        self.tx_mark = self.alloc.mark()

    def _post(self, seg: Segment) -> None:
        head = self.drv.queues[RX_QUEUE].add_chain([seg])
        self.rx_segments[head] = seg

    def collect(self) -> None:
        used = self.drv.used(RX_QUEUE)
        for head, n in used:
            seg = self.rx_segments.pop(head)
            raw = self.mem.read(seg.addr, n)
            assert n >= HDR_SIZE, f"used length {n} shorter than a header"
            hdr = VIRTIO_VSOCK_HDR.unpack(raw[:HDR_SIZE])
            pkt = Pkt(*hdr, data=raw[HDR_SIZE:])
            assert pkt.len == n - HDR_SIZE, pkt
            self.inbox.append(pkt)
            self._post(seg)
        if used:
            self.drv.kick(RX_QUEUE)

    def recv(self) -> Pkt:
        def ready():
            self.collect()
            return bool(self.inbox)

        wait_for(ready, "a packet from the device")
        return self.inbox.popleft()

    def no_packet(self) -> bool:
        self.collect()
        return not self.inbox

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        data: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = 65536,
        fwd_cnt: int = 0,
        type_: int = VIRTIO_VSOCK_TYPE_STREAM,
        src_cid: int = CID,
        dst_cid: int = VMADDR_CID_HOST,
        length: int | None = None,
        parts: tuple[bytes, ...] | None = None,
    ) -> None:
        hdr = VIRTIO_VSOCK_HDR.pack(
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len(data) if length is None else length,
            type_,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        )
        if parts is None:
            parts = (hdr, data) if data else (hdr,)
        self.send_raw(*parts)

    def send_raw(self, *parts: bytes) -> None:
        req = self.drv.submit(TX_QUEUE, parts)
        used = self.drv.used(TX_QUEUE)  # tx is handled synchronously, in the kick
        assert used == [(req.head, 0)], used
        self.alloc.release(self.tx_mark)


def host_connect(path: str, port: int, extra: bytes = b"") -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.settimeout(10)
    c.sendall(b"CONNECT %d\n" % port + extra)
    return c


def read_line(c: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        ch = c.recv(1)
        if not ch:
            return out
        out += ch
    return out


def recv_exactly(c: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = c.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def is_closed(c: socket.socket) -> bool:
    """The device closed its end (EOF, or a reset)."""
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def guest(path):
    g = Guest(path)
    yield g
    # Whatever the test sent: after a reset, a new connection works.
    g.start()
    assert g.dev.connection_count() == 0
    c, local = open_from_host(g, 9999)
    g.send(VIRTIO_VSOCK_OP_RW, 9999, local, b"still alive")
    assert recv_exactly(c, 11) == b"still alive"
    c.close()
    g.close()


def open_from_host(
    g: Guest, guest_port: int, *, buf_alloc: int = 65536, extra: bytes = b""
) -> tuple[socket.socket, int]:
    """Host-initiated connection to ``guest_port``; returns the host socket and the host's port."""
    c = host_connect(g.path, guest_port, extra)
    req = g.recv()
    assert req.op == VIRTIO_VSOCK_OP_REQUEST and req.dst_port == guest_port, req
    g.send(VIRTIO_VSOCK_OP_RESPONSE, guest_port, req.src_port, buf_alloc=buf_alloc)
    assert read_line(c) == b"OK %d\n" % req.src_port
    return c, req.src_port


def open_from_guest(
    g: Guest, host_port: int, guest_port: int = 1000, buf_alloc: int = 65536
) -> tuple[socket.socket, Pkt]:
    """Guest-initiated connection to a listener at ``<path>_<host_port>``; returns the accepted socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{g.path}_{host_port}")
    listener.listen(4)
    listener.settimeout(10)
    g.send(VIRTIO_VSOCK_OP_REQUEST, guest_port, host_port, buf_alloc=buf_alloc)
    resp = g.recv()
    conn, _ = listener.accept()
    conn.settimeout(10)
    listener.close()
    os.unlink(f"{g.path}_{host_port}")
    return conn, resp


# ---- identity -------------------------------------------------------------------------------------
def test_identity_features_and_config(guest):
    assert guest.t.read(VIRTIO_MMIO_DEVICE_ID, 4) == VIRTIO_ID_VSOCK == 19
    assert guest.drv.device_features() & 0xFFFFFF == 1 << VIRTIO_VSOCK_F_STREAM
    assert guest.drv.config_read(0, 8) == CID
    assert guest.drv.config_read(0, 4) == CID and guest.drv.config_read(4, 4) == 0
    guest.drv.config_write(0, 4, 7)
    assert guest.drv.config_read(0, 8) == CID and guest.t.faults["config-write-refused"] == 1


# ---- connections both ways -----------------------------------------------------------------------
def test_host_initiated_connection_with_data_both_ways(guest):
    c = host_connect(guest.path, 1234, extra=b"sent right after the line")
    req = guest.recv()
    assert req.op == VIRTIO_VSOCK_OP_REQUEST
    assert (req.src_cid, req.dst_cid, req.dst_port, req.type) == (VMADDR_CID_HOST, CID, 1234, VIRTIO_VSOCK_TYPE_STREAM)
    assert LOCAL_PORT_FIRST <= req.src_port < LOCAL_PORT_END
    assert req.buf_alloc == 256 * 1024 and req.fwd_cnt == 0
    guest.send(VIRTIO_VSOCK_OP_RESPONSE, 1234, req.src_port, buf_alloc=65536)
    assert read_line(c) == b"OK %d\n" % req.src_port
    data = guest.recv()
    assert (data.op, data.data) == (VIRTIO_VSOCK_OP_RW, b"sent right after the line")
    assert (data.src_port, data.dst_port) == (req.src_port, 1234)
    guest.send(VIRTIO_VSOCK_OP_RW, 1234, req.src_port, b"hello host")
    assert recv_exactly(c, 10) == b"hello host"
    c.sendall(b"hello guest")
    pkt = guest.recv()
    assert (pkt.op, pkt.data) == (VIRTIO_VSOCK_OP_RW, b"hello guest")
    assert guest.dev.metrics.ops["host-connected"] == 1
    c.close()


def test_guest_initiated_connection_with_data_both_ways(guest):
    conn, resp = open_from_guest(guest, 5000, guest_port=777)
    assert resp.op == VIRTIO_VSOCK_OP_RESPONSE
    assert (resp.src_cid, resp.src_port, resp.dst_cid, resp.dst_port) == (VMADDR_CID_HOST, 5000, CID, 777)
    assert resp.buf_alloc == 256 * 1024
    guest.send(VIRTIO_VSOCK_OP_RW, 777, 5000, b"from the guest", parts=None)
    assert recv_exactly(conn, 14) == b"from the guest"
    conn.sendall(b"from the host")
    pkt = guest.recv()
    assert (pkt.op, pkt.src_port, pkt.dst_port, pkt.data) == (VIRTIO_VSOCK_OP_RW, 5000, 777, b"from the host")
    conn.close()


def test_guest_connect_without_listener_gets_rst(guest):
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 1000, 4444)
    rst = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port, rst.src_cid) == (VIRTIO_VSOCK_OP_RST, 4444, 1000, VMADDR_CID_HOST)
    assert guest.dev.metrics.errors["guest-connect-refused"] == 1
    assert guest.dev.connection_count() == 0


def test_multi_descriptor_packet_header_split(guest):
    c, local = open_from_host(guest, 80)
    hdr = VIRTIO_VSOCK_HDR.pack(
        CID, VMADDR_CID_HOST, 80, local, 9, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0, 65536, 0
    )
    guest.send_raw(hdr[:10], hdr[10:44] + b"abc", b"def", b"ghi")
    assert recv_exactly(c, 9) == b"abcdefghi"
    c.close()


# ---- flow control ------------------------------------------------------------------------------------
def test_host_to_guest_respects_guest_credit(guest):
    c, local = open_from_host(guest, 81, buf_alloc=4096)
    data = pattern(10_000)
    c.sendall(data)
    got = bytearray()
    fwd = 0
    while len(got) < len(data):
        pkt = guest.recv()
        if pkt.op == VIRTIO_VSOCK_OP_RW:
            got += pkt.data
            assert len(got) - fwd <= 4096, "device sent beyond the guest's credit"
            continue
        assert pkt.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST and len(got) - fwd == 4096, pkt
        assert guest.no_packet()  # nothing more until the guest frees space
        fwd = len(got)
        guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 81, local, buf_alloc=4096, fwd_cnt=fwd)
    assert bytes(got) == data
    c.close()


def test_guest_to_host_credit_updates_and_overrun(guest):
    guest.dev.buf_alloc = 1024
    guest.dev._credit_threshold = 512
    c, local = open_from_host(guest, 82)
    guest.send(VIRTIO_VSOCK_OP_RW, 82, local, b"x" * 600)
    upd = guest.recv()  # half the buffer was forwarded: the guest hears about it
    assert (upd.op, upd.buf_alloc, upd.fwd_cnt) == (VIRTIO_VSOCK_OP_CREDIT_UPDATE, 1024, 600)
    assert recv_exactly(c, 600) == b"x" * 600
    guest.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 82, local)
    upd = guest.recv()
    assert (upd.op, upd.fwd_cnt) == (VIRTIO_VSOCK_OP_CREDIT_UPDATE, 600)
    guest.send(VIRTIO_VSOCK_OP_RW, 82, local, b"y" * 1025)  # more than buf_alloc
    rst = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, local, 82)
    assert guest.dev.metrics.errors["tx-credit-exceeded"] == 1
    assert is_closed(c)
    c.close()


def test_bulk_transfer_both_ways(guest):
    c, local = open_from_host(guest, 83, buf_alloc=1 << 20)
    data = pattern(300_000, seed=5)
    t = threading.Thread(target=c.sendall, args=(data,))
    t.start()
    got = bytearray()
    while len(got) < len(data):
        pkt = guest.recv()
        assert pkt.op == VIRTIO_VSOCK_OP_RW
        got += pkt.data
    t.join()
    assert bytes(got) == data
    out = pattern(200_000, seed=9)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(recv_exactly(c, len(out))))
    reader.start()
    fwd = 0
    for i in range(0, len(out), MAX_PKT_PAYLOAD // 2):
        chunk = out[i : i + MAX_PKT_PAYLOAD // 2]
        while (i + len(chunk)) - fwd > 256 * 1024:  # respect the device's credit
            pkt = guest.recv()
            fwd = pkt.fwd_cnt
        guest.send(VIRTIO_VSOCK_OP_RW, 83, local, chunk, fwd_cnt=len(got))
    reader.join(10)
    assert bytes(received) == out
    assert guest.dev.metrics.errors == {}
    c.close()


# ---- shutdown and reset --------------------------------------------------------------------------------
def test_guest_shutdown_send_then_both_gets_rst(guest):
    c, local = open_from_host(guest, 84)
    guest.send(VIRTIO_VSOCK_OP_RW, 84, local, b"last words")
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 84, local, flags=VIRTIO_VSOCK_SHUTDOWN_F_SEND)
    assert recv_exactly(c, 10) == b"last words"
    assert c.recv(1) == b""  # the host sees EOF but may still send
    c.sendall(b"reply")
    assert guest.recv().data == b"reply"
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 84, local, flags=VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE)
    rst = guest.recv()
    assert rst.op == VIRTIO_VSOCK_OP_RST
    wait_for(lambda: guest.dev.connection_count() == 0, "connection removed")
    c.close()


def test_host_close_becomes_shutdown_after_the_data(guest):
    c, local = open_from_host(guest, 85)
    c.sendall(b"goodbye")
    c.close()
    pkt = guest.recv()
    assert (pkt.op, pkt.data) == (VIRTIO_VSOCK_OP_RW, b"goodbye")
    sd = guest.recv()
    assert (sd.op, sd.flags) == (VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_F_SEND)
    guest.send(
        VIRTIO_VSOCK_OP_SHUTDOWN, 85, local, flags=VIRTIO_VSOCK_SHUTDOWN_F_SEND | VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE
    )
    assert guest.recv().op == VIRTIO_VSOCK_OP_RST
    wait_for(lambda: guest.dev.connection_count() == 0, "connection removed")


def test_guest_rst_closes_the_host_socket(guest):
    c, local = open_from_host(guest, 86)
    guest.send(VIRTIO_VSOCK_OP_RST, 86, local)
    assert is_closed(c)
    assert guest.no_packet()  # an RST is never answered
    assert guest.dev.connection_count() == 0
    c.close()


def test_guest_rejects_host_connection(guest):
    c = host_connect(guest.path, 87)
    req = guest.recv()
    guest.send(VIRTIO_VSOCK_OP_RST, 87, req.src_port)
    assert read_line(c) == b""  # closed without OK
    c.close()


def test_driver_reset_drops_every_connection(guest):
    c1, _ = open_from_host(guest, 88)
    c2, _ = open_from_guest(guest, 6000)
    assert guest.dev.connection_count() == 2
    guest.start()
    assert guest.dev.connection_count() == 0
    assert is_closed(c1) and is_closed(c2)
    c1.close()
    c2.close()


def test_guest_that_never_answers_times_out(path):
    g = Guest(path, connect_timeout=0.05)
    try:
        c = host_connect(path, 89)
        req = g.recv()
        assert req.op == VIRTIO_VSOCK_OP_REQUEST
        assert is_closed(c)
        rst = g.recv()
        assert (rst.op, rst.src_port) == (VIRTIO_VSOCK_OP_RST, req.src_port)
        assert g.dev.metrics.errors["guest-connect-timeout"] == 1
        c.close()
    finally:
        g.close()


def test_host_connection_waits_for_the_driver(path):
    g = Guest(path, start=False)
    try:
        c = host_connect(path, 90)
        wait_for(lambda: g.dev.summary()["connections"].get("connecting") == 1, "connect line parsed")
        g.start()
        req = g.recv()
        assert (req.op, req.dst_port) == (VIRTIO_VSOCK_OP_REQUEST, 90)
        c.close()
    finally:
        g.close()


# ---- malformed input (checklist item 18) ------------------------------------------------------------------
def test_short_header_is_dropped(guest):
    guest.send_raw(b"\0" * (HDR_SIZE - 1))
    guest.send_raw(b"")
    assert guest.no_packet()
    assert guest.dev.metrics.errors["tx-short-header"] == 2


@pytest.mark.parametrize("length,kind", [(100, "tx-len-exceeds-buffer"), (MAX_PKT_PAYLOAD + 1, "tx-len-too-large")])
def test_header_len_beyond_the_buffer_resets_the_connection(guest, length, kind):
    c, local = open_from_host(guest, 91)
    payload = b"z" * (10 if length == 100 else MAX_PKT_PAYLOAD + 1)
    guest.send(VIRTIO_VSOCK_OP_RW, 91, local, payload, length=length)
    assert guest.dev.metrics.errors[kind] == 1
    rst = guest.recv()
    assert rst.op == VIRTIO_VSOCK_OP_RST
    assert is_closed(c)  # nothing of the bad packet reached the host
    c.close()
    guest.send(VIRTIO_VSOCK_OP_RW, 91, local, b"", length=0xFFFF_FFFF)  # no connection: dropped, counted
    assert guest.no_packet() and guest.dev.metrics.errors["tx-len-too-large"] == (2 if length > 100 else 1)


@pytest.mark.parametrize("type_", [0, 2, 0xFFFF])
def test_unknown_type_gets_rst(guest, type_):
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 1000, 5001, type_=type_)
    rst = guest.recv()
    assert (rst.op, rst.type, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, type_, 5001, 1000)
    guest.send(VIRTIO_VSOCK_OP_RST, 1000, 5001, type_=type_)
    assert guest.no_packet()
    assert guest.dev.metrics.errors["tx-unknown-type"] == 2


def test_addressing_errors(guest):
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 1000, 5002, dst_cid=77)
    rst = guest.recv()
    assert (rst.op, rst.src_cid, rst.dst_cid) == (VIRTIO_VSOCK_OP_RST, 77, CID)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 1000, 5002, src_cid=CID + 1)  # spoofed source: dropped
    guest.send(VIRTIO_VSOCK_OP_RW, 1000, 5002, b"nobody")  # unknown connection
    rst = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 5002, 1000)
    guest.send(VIRTIO_VSOCK_OP_RST, 1000, 5002)  # never answered
    assert guest.no_packet()
    errors = guest.dev.metrics.errors
    assert (errors["tx-unroutable-cid"], errors["tx-bad-src-cid"], errors["tx-unknown-connection"]) == (1, 1, 1)


@pytest.mark.parametrize(
    "op,kind",
    [
        (0, "tx-unknown-op"),
        (99, "tx-unknown-op"),
        (VIRTIO_VSOCK_OP_REQUEST, "tx-request-on-connection"),
        (VIRTIO_VSOCK_OP_RESPONSE, "tx-unexpected-response"),
    ],
)
def test_protocol_errors_reset_the_connection(guest, op, kind):
    conn, _ = open_from_guest(guest, 6001, guest_port=2000)
    guest.send(op, 2000, 6001)
    rst = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 6001, 2000)
    assert guest.dev.metrics.errors[kind] == 1
    assert is_closed(conn)
    conn.close()


def test_data_before_response_resets(guest):
    c = host_connect(guest.path, 92)
    req = guest.recv()
    guest.send(VIRTIO_VSOCK_OP_RW, 92, req.src_port, b"too early")
    assert guest.recv().op == VIRTIO_VSOCK_OP_RST
    assert guest.dev.metrics.errors["tx-rw-before-established"] == 1
    assert read_line(c) == b""
    c.close()


def test_data_after_shutdown_send_resets(guest):
    c, local = open_from_host(guest, 93)
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 93, local, flags=VIRTIO_VSOCK_SHUTDOWN_F_SEND)
    guest.send(VIRTIO_VSOCK_OP_RW, 93, local, b"liar")
    assert guest.recv().op == VIRTIO_VSOCK_OP_RST
    assert guest.dev.metrics.errors["tx-rw-after-shutdown"] == 1
    c.close()


def test_connection_limit_both_ways(path):
    g = Guest(path, max_connections=2)
    try:
        c1, _ = open_from_host(g, 94)
        conn, _ = open_from_guest(g, 6002)
        g.send(VIRTIO_VSOCK_OP_REQUEST, 3000, 6003)  # a third one from the guest
        rst = g.recv()
        assert (rst.op, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 3000)
        c3 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c3.connect(path)
        c3.settimeout(10)
        assert is_closed(c3)  # and one from the host
        assert g.dev.metrics.errors["connection-limit"] == 1
        assert g.dev.metrics.errors["host-connection-limit"] == 1
        c1.close()
        assert g.recv().op == VIRTIO_VSOCK_OP_SHUTDOWN  # host EOF; the connection stays until the guest closes
        for c in (conn, c3):
            c.close()
    finally:
        g.close()


def test_local_ports_wrap_and_skip_ports_in_use(guest):
    guest.dev._next_port = LOCAL_PORT_END - 1
    c1, p1 = open_from_host(guest, 95)
    guest.dev._next_port = LOCAL_PORT_END - 1  # in use now: skipped
    c2, p2 = open_from_host(guest, 95)
    assert (p1, p2) == (LOCAL_PORT_END - 1, LOCAL_PORT_FIRST)
    c1.close()
    c2.close()


@pytest.mark.parametrize(
    "line",
    [b"HELLO 1\n", b"CONNECT\n", b"CONNECT abc\n", b"CONNECT 4294967296\n", b"CONNECT -1\n", b"C" * 40, b""],
)
def test_bad_connect_lines_close_the_host_socket(guest, line):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(guest.path)
    c.settimeout(10)
    c.sendall(line)
    if not line:
        c.shutdown(socket.SHUT_WR)
    assert is_closed(c)
    assert guest.no_packet()
    c.close()


def test_silent_host_client_times_out(path):
    g = Guest(path, line_timeout=0.05)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        c.settimeout(10)
        c.sendall(b"CONNECT 1")  # no newline, ever
        assert is_closed(c)
        assert g.dev.metrics.errors["host-connect-line-timeout"] == 1
        c.close()
    finally:
        g.close()


def test_small_and_readable_receive_buffers(path):
    g = Guest(path, rx_buffers=0)
    try:
        q = g.drv.queues[RX_QUEUE]
        tiny = Segment(g.alloc.alloc(HDR_SIZE - 1), HDR_SIZE - 1, True)
        q.add_chain([tiny])
        g.drv.kick(RX_QUEUE)
        g.send(VIRTIO_VSOCK_OP_REQUEST, 1000, 5003)  # answered with an RST that does not fit
        assert g.drv.used(RX_QUEUE) == [(0, 0)]
        assert g.dev.metrics.errors["rx-buffer-too-small"] == 1
        ro = Segment(g.alloc.alloc(16), 16, False)
        buf = Segment(g.alloc.alloc(RX_BUF), RX_BUF, True)
        head = q.add_chain([ro, buf])
        g.drv.kick(RX_QUEUE)
        [(h, n)] = g.drv.used(RX_QUEUE)
        assert (h, n) == (head, HDR_SIZE)
        assert VIRTIO_VSOCK_HDR.unpack(g.mem.read(buf.addr, HDR_SIZE))[6] == VIRTIO_VSOCK_OP_RST
        assert g.dev.metrics.errors["rx-readable-buffer"] == 1
    finally:
        g.close()


def test_malformed_ring_needs_reset_then_recovers(guest):
    q = guest.drv.queues[TX_QUEUE]
    b = guest.alloc.alloc(64)
    q.write_desc(0, b, 64, VIRTQ_DESC_F_NEXT, 0)
    q.publish(0)
    guest.drv.kick(TX_QUEUE)
    assert guest.needs_reset  # the fixture's teardown resets and connects again


def test_event_queue_buffers_are_kept(guest):
    req = guest.drv.submit(EVENT_QUEUE, (), (4,))
    assert guest.drv.used(EVENT_QUEUE) == [] and req.head is not None


# ---- life cycle -------------------------------------------------------------------------------------------
def test_close_releases_socket_thread_and_fds(tmp_path):
    path = str(tmp_path / "v.sock")
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    g = Guest(path)
    c, local = open_from_host(g, 96)
    g.send(VIRTIO_VSOCK_OP_RW, 96, local, b"x")
    assert recv_exactly(c, 1) == b"x"
    g.close()
    assert not os.path.exists(path)
    assert is_closed(c)
    c.close()
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_construction_errors(tmp_path):
    with pytest.raises(DeviceError, match="CID 2"):
        VirtioVsock(2, str(tmp_path / "a.sock"))
    with pytest.raises(DeviceError, match="suffix"):
        VirtioVsock(3, str(tmp_path / ("x" * (100 - len(str(tmp_path))))))


def test_built_from_the_cli_spec(path):
    dev = build_device(VsockSpec(cid=5, path=path))
    try:
        assert isinstance(dev, VirtioVsock) and dev.cid == 5 and os.path.exists(path)
    finally:
        dev.close()


def test_a_bug_in_the_device_thread_needs_reset_and_recovers(guest, monkeypatch):
    c, _ = open_from_host(guest, 97)

    def broken(conn) -> None:
        raise RuntimeError("injected device bug")

    monkeypatch.setattr(guest.dev, "_read_host", broken)
    c.sendall(b"boom")
    wait_for(lambda: guest.needs_reset, "DEVICE_NEEDS_RESET")
    assert guest.t.errors["device"] == 1 and "thread failed" in guest.t.last_error
    monkeypatch.undo()  # the fixture resets (which restarts the thread) and connects again
    c.close()


def test_clean_close_still_flushes_what_the_host_has_not_read(guest):
    guest.dev.buf_alloc = 1 << 20
    c, local = open_from_host(guest, 98)
    data = pattern(900_000, seed=1)
    for i in range(0, len(data), MAX_PKT_PAYLOAD):
        guest.send(VIRTIO_VSOCK_OP_RW, 98, local, data[i : i + MAX_PKT_PAYLOAD])
    both = VIRTIO_VSOCK_SHUTDOWN_F_SEND | VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 98, local, flags=both)
    while (pkt := guest.recv()).op != VIRTIO_VSOCK_OP_RST:
        assert pkt.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE
    assert guest.dev.summary()["connections"] == {"closing": 1}  # the host has not read it all yet
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 98, local)  # the pair is still in use
    assert guest.recv().op == VIRTIO_VSOCK_OP_RST
    assert recv_exactly(c, len(data)) == data
    assert c.recv(1) == b""
    wait_for(lambda: guest.dev.connection_count() == 0, "the connection to go")
    c.close()
