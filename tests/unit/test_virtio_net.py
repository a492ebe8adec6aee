"""virtio-net through the mmio transport on a real tap in a private network namespace.

The host side is the Linux kernel itself: a UDP socket in the namespace
receives what the guest transmits and sends what the guest receives, so a
frame with a wrong checksum or a bad header is visibly dropped by the kernel.
Without root (or /dev/net/tun, or iproute2) these tests are skipped with the
reason; nothing is faked.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from virtio_rig import Rig, wait_for

from tests.integration.netns import NetNamespace, TapNetwork, unavailable_reason, unique_ifname
from vmm.devices.virtio.attach import build_device
from vmm.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_NET, bit
from vmm.devices.virtio.mmio import VIRTIO_MMIO_DEVICE_ID
from vmm.devices.virtio.net import (
    MAX_FRAME,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
    inet_checksum,
    parse_mac,
)
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.devices.virtio.spec import NetSpec
from vmm.devices.virtio.tap import Tap
from vmm.errors import ConfigError, DeviceError

HDR = VIRTIO_NET_HDR.size
GUEST_PORT = 4000
HOST_PORT = 5000
ALL_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
)
NO_OFFLOADS = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS)


@pytest.fixture(scope="module", autouse=True)
def _need_namespaces():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"virtio-net tests need a private network namespace with a tap: {reason}")


# ---- frames -----------------------------------------------------------------------------------------
def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def ip_bytes(text: str) -> bytes:
    return socket.inet_aton(text)


def udp_frame(
    net: TapNetwork, payload: bytes, *, partial: bool = False, sport: int = GUEST_PORT, dport: int = HOST_PORT
) -> bytes:
    """Ethernet + IPv4 + UDP from the guest to the host; ``partial``: only the pseudo-header sum."""
    src, dst = ip_bytes(net.guest_ip), ip_bytes(net.host_ip)
    udp_len = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst))
    ip[10:12] = inet_checksum(ip).to_bytes(2, "big")
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = bytearray(struct.pack("!HHHH", sport, dport, udp_len, 0) + payload)
    if partial:
        # What a driver with CSUM puts there: the folded, uncomplemented pseudo-header sum.
        udp[6:8] = (~inet_checksum(pseudo) & 0xFFFF).to_bytes(2, "big")
    else:
        udp[6:8] = (inet_checksum(pseudo + udp) or 0xFFFF).to_bytes(2, "big")
    eth = mac_bytes(net.host_mac) + mac_bytes(net.guest_mac) + b"\x08\x00"
    return eth + bytes(ip) + bytes(udp)


def net_hdr(flags: int = 0, gso_type: int = 0, csum_start: int = 0, csum_offset: int = 0, hdr_len: int = 0) -> bytes:
    return VIRTIO_NET_HDR.pack(flags, gso_type, hdr_len, 0, csum_start, csum_offset, 0)


def parse_udp(frame: bytes) -> tuple[bytes, int, int, bytes]:
    """(payload, sport, dport, pseudo header + udp segment) of an Ethernet/IPv4/UDP frame."""
    assert frame[12:14] == b"\x08\x00" and frame[14 + 9] == 17, frame[:40].hex()
    ihl = (frame[14] & 0xF) * 4
    ip = frame[14 : 14 + ihl]
    udp = frame[14 + ihl :]
    sport, dport, length, _ = struct.unpack("!HHHH", udp[:8])
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, length)
    return udp[8:length], sport, dport, pseudo + udp[:length]


def udp_csum_ok(frame: bytes) -> bool:
    _, _, _, covered = parse_udp(frame)
    return inet_checksum(covered) == 0


def snmp(ns: NetNamespace, proto: str, field: str) -> int:
    """A counter of /proc/net/snmp in the namespace (thread-self: the namespace thread's view)."""

    def read() -> int:
        with open("/proc/thread-self/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith(proto + ":")]
        return int(rows[1][rows[0].index(field)])

    return ns.run(read)


# ---- the rig ------------------------------------------------------------------------------------------
class NetRig(Rig):
    def __init__(self, ns: NetNamespace, net: TapNetwork, features: int | None = ALL_FEATURES, **kw) -> None:
        dev = ns.run(VirtioNet, net.name, mac=parse_mac(net.guest_mac), **kw)
        super().__init__(dev)
        net.wait_operational()
        self.ns, self.net = ns, net
        self.features = features
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((net.host_ip, HOST_PORT))
        self.sock.settimeout(10)
        self.drv.initialize(features, queues=(RX_QUEUE, TX_QUEUE))

    def transmit(self, *parts: bytes) -> None:
        req = self.drv.submit(TX_QUEUE, parts)
        assert self.drv.used(TX_QUEUE) == [(req.head, 0)]  # transmit completes in the kick

    def host_receive(self) -> tuple[bytes, tuple[str, int]]:
        return self.sock.recvfrom(70000)

    def host_send(self, payload: bytes, port: int = GUEST_PORT) -> None:
        self.sock.sendto(payload, (self.net.guest_ip, port))

    def post_rx(self, size: int = 1526, count: int = 1):
        return [self.drv.submit(RX_QUEUE, (), (size,)) for _ in range(count)]

    def guest_receive(self, size: int = 1526) -> tuple[tuple[int, ...], bytes]:
        """Post one buffer, wait for a UDP frame for GUEST_PORT, return (virtio_net_hdr, frame)."""
        while True:
            req = self.post_rx(size)[0]
            [(head, n)] = self.wait_used(RX_QUEUE)
            assert head == req.head
            data = self.written(req, n)
            hdr, frame = VIRTIO_NET_HDR.unpack(data[:HDR]), data[HDR:]
            if frame[12:14] == b"\x08\x00" and frame[23] == 17 and parse_udp(frame)[2] == GUEST_PORT:
                return hdr, frame

    def close(self) -> None:
        self.sock.close()
        super().close()


@pytest.fixture
def ns():
    with NetNamespace() as n:
        yield n


@pytest.fixture
def net(ns):
    return TapNetwork.create(ns)


@pytest.fixture
def rig(ns, net):
    r = NetRig(ns, net)
    yield r
    # Whatever the test sent: after a reset, frames go out and come in again.
    r.restart(r.features, queues=(RX_QUEUE, TX_QUEUE))
    r.transmit(net_hdr() + udp_frame(net, b"after reset"))
    assert r.host_receive()[0] == b"after reset"
    r.host_send(b"and back")
    assert parse_udp(r.guest_receive()[1])[0] == b"and back"
    r.close()


# ---- identity ---------------------------------------------------------------------------------------------
def test_identity_features_and_config(rig, net):
    assert rig.t.read(VIRTIO_MMIO_DEVICE_ID, 4) == VIRTIO_ID_NET == 1
    assert rig.drv.device_features() & 0xFFFFFF == ALL_FEATURES & 0xFFFFFF
    mac = bytes(rig.drv.config_read(i, 1) for i in range(6))
    assert mac == mac_bytes(net.guest_mac)
    assert rig.drv.config_read(6, 2) == VIRTIO_NET_S_LINK_UP
    rig.drv.config_write(0, 1, 0xFF)
    assert rig.drv.config_read(0, 1) == mac[0] and rig.t.faults["config-write-refused"] == 1
    assert "LOWER_UP" in net.link_state()  # the device holds the tap open: carrier is up


# ---- transmit ------------------------------------------------------------------------------------------------
def test_frames_out(rig, net):
    rig.transmit(net_hdr(), udp_frame(net, b"hello host"))
    payload, (ip, port) = rig.host_receive()
    assert (payload, ip, port) == (b"hello host", net.guest_ip, GUEST_PORT)
    frame = udp_frame(net, b"split over descriptors " * 20)
    rig.transmit(net_hdr()[:5], net_hdr()[5:] + frame[:10], frame[10:100], frame[100:])
    assert rig.host_receive()[0] == b"split over descriptors " * 20
    assert rig.dev.metrics.bytes_read == len(udp_frame(net, b"hello host")) + len(frame)


def test_checksum_offload_on_transmit(rig, net):
    frame = udp_frame(net, b"checksum me", partial=True)
    start = 14 + 20
    rig.transmit(net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=6) + frame)
    assert rig.host_receive()[0] == b"checksum me"
    # The same frame without NEEDS_CSUM carries a wrong checksum: the kernel drops it.
    before = snmp(rig.ns, "Udp", "InCsumErrors")
    rig.transmit(net_hdr() + frame)
    wait_for(lambda: snmp(rig.ns, "Udp", "InCsumErrors") == before + 1, "the kernel to count a bad checksum")


def test_needs_csum_without_the_feature_is_dropped(ns, net):
    r = NetRig(ns, net, features=NO_OFFLOADS)
    try:
        frame = udp_frame(net, b"x", partial=True)
        r.transmit(net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6) + frame)
        assert r.dev.metrics.errors["tx-csum-not-negotiated"] == 1
        r.transmit(net_hdr(VIRTIO_NET_HDR_F_DATA_VALID | 0x80) + udp_frame(net, b"unknown flags ignored"))
        assert r.host_receive()[0] == b"unknown flags ignored"
    finally:
        r.close()


@pytest.mark.parametrize(
    "build,kind",
    [
        (lambda net: b"\0" * (HDR - 1), "tx-short-header"),
        (lambda net: net_hdr(), "tx-header-only"),
        (lambda net: net_hdr() + b"\0" * 13, "tx-runt-frame"),
        (lambda net: net_hdr() + udp_frame(net, b"")[:14] + bytes(MAX_FRAME - 13), "tx-frame-too-long"),
        (lambda net: net_hdr(gso_type=1, hdr_len=54) + udp_frame(net, b"gso"), "tx-gso-not-negotiated"),
        (
            lambda net: net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=40, csum_offset=6) + udp_frame(net, b""),
            "tx-csum-outside-frame",
        ),
        (
            lambda net: (
                net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=0xFFFF, csum_offset=0xFFFF) + udp_frame(net, b"x")
            ),
            "tx-csum-outside-frame",
        ),
    ],
)
def test_malformed_transmit_is_dropped_and_counted(rig, net, build, kind):
    rig.transmit(build(net))
    assert rig.dev.metrics.errors == {kind: 1}
    rig.transmit(net_hdr() + udp_frame(net, b"next one"))
    assert rig.host_receive()[0] == b"next one"


def test_largest_frame_goes_out(ns, net):
    ns.ip("link", "set", "dev", net.name, "mtu", "65521")
    r = NetRig(ns, net)
    try:
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        payload = os.urandom(65521 - 28)
        frame = udp_frame(net, payload)
        assert len(frame) == 65535 < MAX_FRAME
        r.transmit(net_hdr(), frame)
        assert r.host_receive()[0] == payload
    finally:
        r.close()


def test_writable_transmit_descriptors_are_ignored(rig, net):
    req = rig.drv.submit(TX_QUEUE, (net_hdr() + udp_frame(net, b"rw"),), (64,))
    assert rig.drv.used(TX_QUEUE) == [(req.head, 0)]
    assert rig.host_receive()[0] == b"rw"
    assert rig.dev.metrics.errors["tx-writable-buffer"] == 1


# ---- receive -----------------------------------------------------------------------------------------------
def test_frames_in_fully_checksummed_without_guest_csum(ns, net):
    r = NetRig(ns, net, features=NO_OFFLOADS)
    try:
        r.host_send(b"hello guest")
        hdr, frame = r.guest_receive()
        flags, gso, _hl, _gs, cstart, coff, num_buffers = hdr
        assert (flags, gso, cstart, coff, num_buffers) == (0, 0, 0, 0, 1)
        payload, sport, dport, _ = parse_udp(frame)
        assert (payload, sport, dport) == (b"hello guest", HOST_PORT, GUEST_PORT)
        assert frame[:6] == mac_bytes(net.guest_mac) and frame[6:12] == mac_bytes(net.host_mac)
        assert udp_csum_ok(frame)
    finally:
        r.close()


def test_partial_checksums_reach_a_guest_that_takes_them(rig, net):
    rig.host_send(b"finish my checksum")
    hdr, frame = rig.guest_receive()
    flags, _gso, _hl, _gs, cstart, coff, num_buffers = hdr
    assert num_buffers == 1
    assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, hdr
    assert (cstart, coff) == (34, 6)
    data = bytearray(frame)
    data[cstart + coff : cstart + coff + 2] = (inet_checksum(data[cstart:]) or 0xFFFF).to_bytes(2, "big")
    assert udp_csum_ok(bytes(data))
    assert parse_udp(frame)[0] == b"finish my checksum"


def test_receive_buffer_too_small_or_read_only(rig, net):
    small = rig.post_rx(HDR + 40)[0]  # too small for a 12 + 14 + 20 + 8 + 100 byte frame
    rig.host_send(b"y" * 100)
    [(head, n)] = rig.wait_used(RX_QUEUE)
    assert (head, n) == (small.head, 0)
    assert rig.dev.metrics.errors["rx-buffer-too-small"] == 1
    assert rig.written(small, HDR + 40) == bytes([0xA5]) * (HDR + 40)  # nothing written
    rig.host_send(b"fits")
    req = rig.drv.submit(RX_QUEUE, (b"readable junk",), (1526,))
    [(head, n)] = rig.wait_used(RX_QUEUE)
    assert head == req.head and parse_udp(rig.written(req, n)[HDR:])[0] == b"fits"
    assert rig.dev.metrics.errors["rx-readable-buffer"] == 1


def test_receive_backlog_is_bounded_and_loses_nothing(ns, net):
    r = NetRig(ns, net, rx_backlog_frames=8)
    try:
        for i in range(100):
            r.host_send(b"frame %03d" % i)
        wait_for(lambda: r.dev.summary()["rx_backlog"] == 8, "the backlog to fill")
        got = []
        while len(got) < 100:
            got.append(parse_udp(r.guest_receive()[1])[0])
            assert r.dev.summary()["rx_backlog"] <= 8
        assert got == [b"frame %03d" % i for i in range(100)]  # the rest waited in the tap's queue
    finally:
        r.close()


def test_malformed_ring_needs_reset_then_recovers(rig):
    q = rig.drv.queues[RX_QUEUE]
    b = rig.alloc.alloc(2048)
    q.write_desc(0, b, 2048, VIRTQ_DESC_F_NEXT | 2, 0)  # a writable descriptor looping to itself
    q.publish(0)
    rig.drv.kick(RX_QUEUE)
    rig.host_send(b"into the loop")
    wait_for(lambda: rig.needs_reset, "DEVICE_NEEDS_RESET")
    assert rig.mem.read(b, 16) == bytes(16)  # the fixture resets and checks frames flow again


# ---- life cycle ------------------------------------------------------------------------------------------------
def test_reset_and_close_stop_the_thread_and_release_the_tap(ns, net):
    threads_before = threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    r = NetRig(ns, net)
    assert threading.active_count() == threads_before + 1  # the receive thread
    r.drv.reset()
    assert threading.active_count() == threads_before
    r.drv.initialize(ALL_FEATURES, queues=(RX_QUEUE, TX_QUEUE))
    assert threading.active_count() == threads_before + 1
    r.close()
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert "NO-CARRIER" in net.link_state()  # nobody holds the tap any more


def test_namespace_never_touches_the_host(ns, net):
    host_links = socket.if_nameindex()
    assert net.name not in [name for _, name in host_links]
    assert net.name in ns.run(lambda: [name for _, name in socket.if_nameindex()])
    ns.close()
    assert socket.if_nameindex() == host_links


def test_tap_names_are_checked():
    for bad in ("", "a" * 16, "has space", "sl/ash"):
        with pytest.raises(DeviceError, match="not a valid interface name"):
            Tap(bad)
    assert unique_ifname() != unique_ifname()


def test_built_from_the_cli_spec(ns, net):
    dev = ns.run(build_device, NetSpec(tap=net.name, mac="02:11:22:33:44:55"))
    try:
        assert isinstance(dev, VirtioNet)
        assert dev.config_bytes()[:6] == bytes.fromhex("021122334455")
    finally:
        dev.close()
    with pytest.raises(ConfigError, match="--net: mac"):
        build_device(NetSpec(tap=net.name, mac="01:00:00:00:00:00"))
    with pytest.raises(ConfigError, match="--net: mac"):
        build_device(NetSpec(tap=net.name, mac="zz"))


def test_a_bug_in_the_receive_thread_needs_reset_and_recovers(rig, monkeypatch):
    def broken(buf) -> None:
        raise RuntimeError("injected device bug")

    monkeypatch.setattr(rig.dev, "_read_tap", broken)
    rig.host_send(b"boom", port=GUEST_PORT + 1)  # stays in the tap queue; the teardown skips it
    wait_for(lambda: rig.needs_reset, "DEVICE_NEEDS_RESET")
    assert rig.t.errors["device"] == 1 and "thread failed" in rig.t.last_error
    monkeypatch.undo()  # the fixture resets, which starts a new thread, and checks frames flow
