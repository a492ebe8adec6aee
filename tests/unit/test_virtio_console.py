"""virtio-console through the mmio transport, its host side a real Unix socket."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from virtio_rig import Rig, wait_for

from vmm.devices.virtio.attach import build_device
from vmm.devices.virtio.console import RX_QUEUE, TX_QUEUE, VirtioConsole
from vmm.devices.virtio.device import VIRTIO_ID_CONSOLE
from vmm.devices.virtio.mmio import VIRTIO_MMIO_DEVICE_ID
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.devices.virtio.spec import ConsoleSpec
from vmm.errors import DeviceError


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed + i // 251) & 0xFF for i in range(n))


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "console.sock")


class ConsoleRig(Rig):
    def __init__(self, path: str, init: bool = True, **kw) -> None:
        super().__init__(VirtioConsole(path, **kw))
        self.path = path
        if init:
            self.drv.initialize(queues=(RX_QUEUE, TX_QUEUE))

    def connect(self) -> socket.socket:
        """A client the device has accepted."""
        before = self.dev.summary()["clients"]
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(self.path)
        c.settimeout(10)
        wait_for(lambda: self.dev.summary()["clients"] > before, "the device to accept the client")
        return c

    def send(self, *parts: bytes) -> None:
        """Transmit one chain made of ``parts`` (one descriptor each) and wait for its completion."""
        req = self.drv.submit(TX_QUEUE, parts)
        used = self.wait_used(TX_QUEUE)
        assert used == [(req.head, 0)]

    def receive(self, size: int = 4096) -> bytes:
        """Post one receive buffer and return what the device put in it."""
        req = self.drv.submit(RX_QUEUE, (), (size,))
        [(head, n)] = self.wait_used(RX_QUEUE)
        assert head == req.head
        return self.written(req, n)

    def receive_exactly(self, total: int, size: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < total:
            out += self.receive(size)
        assert len(out) == total
        return bytes(out)


def recv_exactly(c: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = c.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


@pytest.fixture
def rig(sock_path):
    r = ConsoleRig(sock_path)
    yield r
    r.close()


def test_identity_features_and_config(rig):
    assert rig.t.read(VIRTIO_MMIO_DEVICE_ID, 4) == VIRTIO_ID_CONSOLE == 3
    assert rig.drv.device_features() & 0xFFFFFF == 0  # no SIZE, MULTIPORT or EMERG_WRITE
    assert [rig.drv.config_read(off, 4) for off in (0, 4, 8)] == [0, 0, 0]
    rig.drv.config_write(8, 4, ord("x"))  # emerg_wr without the feature: refused
    assert rig.t.faults["config-write-refused"] == 1
    assert rig.drv.config_read(12, 1) == 0 and rig.t.faults["config-read-out-of-range"] == 1


def test_echo_both_directions(rig):
    c = rig.connect()
    c.sendall(b"ping from host\n")
    got = rig.receive()
    assert got == b"ping from host\n"
    rig.send(b"pong: " + got)
    assert recv_exactly(c, 21) == b"pong: ping from host\n"
    assert rig.irq.level
    c.close()


def test_multi_descriptor_transmit_delivers_every_descriptor(rig):
    c = rig.connect()
    parts = [b"first ", b"second ", b"", b"third ", pattern(3000), b"!"]
    rig.send(*parts)
    assert recv_exactly(c, sum(map(len, parts))) == b"".join(parts)
    # The same through an indirect table.
    req = rig.drv.submit(TX_QUEUE, parts, indirect=True)
    assert rig.wait_used(TX_QUEUE) == [(req.head, 0)]
    assert recv_exactly(c, sum(map(len, parts))) == b"".join(parts)
    c.close()


def test_receive_is_scattered_over_writable_descriptors(rig):
    c = rig.connect()
    c.sendall(b"0123456789")
    req = rig.drv.submit(RX_QUEUE, (), (3, 3, 100))
    [(head, n)] = rig.wait_used(RX_QUEUE)
    assert (head, n) == (req.head, 10)
    assert rig.written(req, 10) == b"0123456789"
    c.close()


def test_host_bytes_sent_before_the_driver_are_delivered_after(sock_path):
    r = ConsoleRig(sock_path, init=False)
    try:
        c = r.connect()
        c.sendall(b"early bytes")
        wait_for(lambda: r.dev.summary()["rx_buffered"] == 11, "bytes buffered")
        r.drv.initialize(queues=(RX_QUEUE, TX_QUEUE))
        assert r.receive() == b"early bytes"
        c.close()
    finally:
        r.close()


def test_zero_length_transmit(rig):
    c = rig.connect()
    req = rig.drv.submit(TX_QUEUE, (b"",))
    assert rig.wait_used(TX_QUEUE) == [(req.head, 0)]
    assert rig.dev.metrics.ops["tx-empty"] == 1
    rig.send(b"after")
    assert recv_exactly(c, 5) == b"after"
    c.close()


def test_huge_transmit_with_a_client_arrives_whole_and_in_order(sock_path):
    r = ConsoleRig(sock_path, tx_buffer=4096)
    try:
        c = r.connect()
        data = pattern(1 << 20, seed=7)
        parts = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
        got = bytearray()

        def reader():
            while len(got) < len(data):
                chunk = c.recv(65536)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        req = r.drv.submit(TX_QUEUE, parts)
        assert r.wait_used(TX_QUEUE) == [(req.head, 0)]
        t.join(10)
        assert bytes(got) == data
        assert r.dev.summary()["tx_dropped_bytes"] == 0
        c.close()
    finally:
        r.close()


def test_slow_client_backpressures_the_guest(sock_path):
    r = ConsoleRig(sock_path, tx_buffer=4096)
    try:
        c = r.connect()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        data = pattern(2 << 20, seed=3)
        req = r.drv.submit(TX_QUEUE, (data,))
        # Nobody reads: the chain cannot complete, and the device holds at most its bound.
        wait_for(lambda: r.dev.summary()["tx_buffered"] == 4096, "device buffer full")
        assert r.drv.used(TX_QUEUE) == []
        assert recv_exactly(c, len(data)) == data
        assert r.wait_used(TX_QUEUE) == [(req.head, 0)]
        c.close()
    finally:
        r.close()


def test_transmit_without_client_is_bounded_then_delivered(sock_path):
    r = ConsoleRig(sock_path, tx_buffer=1000)
    try:
        r.send(b"x" * 600)
        r.send(b"y" * 600, b"z" * 10)  # 400 of these fit, the other 210 bytes are dropped
        assert r.dev.summary()["tx_dropped_bytes"] == 210
        assert r.dev.metrics.errors["tx-dropped-no-client"] == 1
        c = r.connect()
        assert recv_exactly(c, 1000) == b"x" * 600 + b"y" * 400
        r.send(b"live")
        assert recv_exactly(c, 4) == b"live"
        c.close()
    finally:
        r.close()


def test_client_input_is_backpressured_and_complete(sock_path):
    r = ConsoleRig(sock_path, rx_buffer=2048)
    try:
        c = r.connect()
        c.setblocking(False)
        data = pattern(300_000, seed=11)
        sent = 0
        try:
            while sent < len(data):
                sent += c.send(data[sent : sent + 65536])
        except BlockingIOError:
            pass
        assert sent < len(data), "the socket never pushed back"
        wait_for(lambda: r.dev.summary()["rx_buffered"] == 2048, "device buffer full")
        got = bytearray()
        while len(got) < len(data):
            if sent < len(data):
                try:
                    sent += c.send(data[sent : sent + 65536])
                except BlockingIOError:
                    pass
            got += r.receive(8192)
            assert r.dev.summary()["rx_buffered"] <= 2048
        assert bytes(got) == data
        c.close()
    finally:
        r.close()


def test_one_client_at_a_time(rig):
    first = rig.connect()
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.connect(rig.path)
    second.settimeout(10)
    assert second.recv(1) == b""  # closed at once
    wait_for(lambda: rig.dev.summary()["rejected_clients"] == 1, "rejection counted")
    rig.send(b"to the first")
    assert recv_exactly(first, 12) == b"to the first"
    first.close()
    wait_for(lambda: not rig.dev.connected, "disconnect noticed")
    third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    third.connect(rig.path)
    third.settimeout(10)
    wait_for(lambda: rig.dev.connected, "third client")
    rig.send(b"to the third")
    assert recv_exactly(third, 12) == b"to the third"
    second.close()
    third.close()


def test_wrong_direction_buffers_are_ignored_and_counted(rig):
    c = rig.connect()
    req = rig.drv.submit(TX_QUEUE, (b"data",), (8,))
    assert rig.wait_used(TX_QUEUE) == [(req.head, 0)]
    assert recv_exactly(c, 4) == b"data"
    assert rig.dev.metrics.errors["tx-writable-buffer"] == 1
    c.sendall(b"in")
    req = rig.drv.submit(RX_QUEUE, (b"junk",), (8,))
    [(head, n)] = rig.wait_used(RX_QUEUE)
    assert (head, n) == (req.head, 2) and rig.written(req, 2) == b"in"
    assert rig.dev.metrics.errors["rx-readable-buffer"] == 1
    c.close()


@pytest.mark.parametrize("queue", [RX_QUEUE, TX_QUEUE])
def test_malformed_chain_needs_reset_then_recovers(rig, queue):
    c = rig.connect()
    q = rig.drv.queues[queue]
    b = rig.alloc.alloc(16)
    q.write_desc(0, b, 16, VIRTQ_DESC_F_NEXT, 0)  # a descriptor that loops to itself
    q.publish(0)
    c.sendall(b"wake the receive side")
    rig.drv.kick(queue)
    wait_for(lambda: rig.needs_reset, "DEVICE_NEEDS_RESET")
    rig.restart()
    assert rig.receive() == b"wake the receive side"
    rig.send(b"ok")
    assert recv_exactly(c, 2) == b"ok"
    c.close()


def test_reset_keeps_the_client_and_drops_the_old_chain(sock_path):
    r = ConsoleRig(sock_path, tx_buffer=1024)
    try:
        c = r.connect()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        r.drv.submit(TX_QUEUE, (b"a" * 200_000,))
        wait_for(lambda: r.dev.summary()["tx_buffered"] == 1024, "device buffer full")
        r.restart()  # the chain in progress belongs to the old driver
        req = r.drv.submit(TX_QUEUE, (b"NEW",))
        got = bytearray()
        while not got.endswith(b"NEW"):
            chunk = c.recv(65536)
            assert chunk
            got += chunk
        assert r.wait_used(TX_QUEUE) == [(req.head, 0)]
        assert set(got[:-3]) == {ord("a")} and len(got) - 3 < 200_000
        assert r.t.summary()["queues"][TX_QUEUE]["stale_completions"] == 0
        c.close()
    finally:
        r.close()


def test_close_releases_socket_thread_and_fds(tmp_path):
    path = str(tmp_path / "c.sock")
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    r = ConsoleRig(path)
    c = r.connect()
    r.send(b"bye")
    assert recv_exactly(c, 3) == b"bye"
    r.close()
    assert not os.path.exists(path)
    assert c.recv(1) == b""
    c.close()
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_stale_socket_is_replaced_but_other_files_are_kept(tmp_path):
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # bound, nobody listening
    dev = VirtioConsole(stale)
    dev.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(DeviceError, match="already exists"):
        VirtioConsole(str(regular))
    assert regular.read_text() == "keep me"
    live = str(tmp_path / "live.sock")
    dev = VirtioConsole(live)
    with pytest.raises(DeviceError, match="already exists"):
        VirtioConsole(live)
    dev.close()


def test_built_from_the_cli_spec(sock_path):
    dev = build_device(ConsoleSpec(sock_path))
    try:
        assert isinstance(dev, VirtioConsole) and dev.path == sock_path
        assert os.path.exists(sock_path)
    finally:
        dev.close()


def test_a_bug_in_the_device_thread_needs_reset_and_recovers(rig, monkeypatch):
    c = rig.connect()

    def broken() -> None:
        raise RuntimeError("injected device bug")

    monkeypatch.setattr(rig.dev, "_receive", broken)
    c.sendall(b"survives")
    wait_for(lambda: rig.needs_reset, "DEVICE_NEEDS_RESET")
    assert rig.t.errors["device"] == 1 and "thread failed" in rig.t.last_error
    monkeypatch.undo()
    rig.restart()  # the driver's answer to NEEDS_RESET restarts the thread
    assert rig.receive() == b"survives"
    rig.send(b"and out")
    assert recv_exactly(c, 7) == b"and out"
    c.close()


def test_attach_errors_name_the_option_and_the_path(tmp_path):
    from test_virtio_attach import FakeMachine

    from vmm.devices.virtio.attach import attach_virtio_device
    from vmm.errors import ConfigError
    from vmm.layout import virtio_mmio_slot

    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    m = FakeMachine()
    base, gsi = virtio_mmio_slot(0)
    with pytest.raises(ConfigError, match=f"^--console: console socket {taken}: already exists"):
        attach_virtio_device(m, ConsoleSpec(str(taken)), 0, base, gsi)
    assert m.mmio_bus.ranges() == []
    m.memory.close()
