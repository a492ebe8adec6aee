"""virtio-net, virtio-console and virtio-vsock inside a real KVM machine, host sides real.

As in test_virtio_kvm.py the host lays the queues out and a few guest
instructions notify a queue from a vCPU; here the request leaves the VM for
a tap in a private network namespace or a Unix socket, and the receive side
completes from the device's own thread, raising the interrupt through the
in-kernel irqchip from outside any vCPU.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from test_virtio_kvm import EXIT_CODE, driver_for, machine_with, notify_then_exit

from tests.integration.netns import NetNamespace, TapNetwork, unavailable_reason
from vmm import layout
from vmm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY
from vmm.devices.virtio.net import VIRTIO_NET_HDR, inet_checksum
from vmm.devices.virtio.spec import ConsoleSpec, NetSpec, VsockSpec
from vmm.devices.virtio.vsock import (
    VIRTIO_VSOCK_HDR,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
)

NOTIFY = layout.virtio_mmio_slot(0)[0] + VIRTIO_MMIO_QUEUE_NOTIFY


def wait_used(drv, queue: int, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        used = drv.used(queue)
        if used:
            return used
        time.sleep(0.002)
    raise AssertionError(f"no used buffer on queue {queue}")


def udp_frame(net: TapNetwork, payload: bytes) -> bytes:
    src, dst = socket.inet_aton(net.guest_ip), socket.inet_aton(net.host_ip)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0, 64, 17, 0, src, dst))
    ip[10:12] = inet_checksum(ip).to_bytes(2, "big")
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    eth = bytes.fromhex(net.host_mac.replace(":", "") + net.guest_mac.replace(":", "")) + b"\x08\x00"
    return eth + bytes(ip) + udp


def test_net_frame_out_from_a_vcpu_and_in_from_the_device_thread():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs a private network namespace with a tap: {reason}")
    with NetNamespace() as ns:
        net = TapNetwork.create(ns)
        m = ns.run(machine_with, NetSpec(tap=net.name, mac=net.guest_mac), notify_then_exit(NOTIFY, queue=1))
        with m:
            net.wait_operational()
            host = ns.socket()
            host.bind((net.host_ip, 5000))
            host.settimeout(10)
            drv = driver_for(m, layout.virtio_mmio_slot(0)[0])
            drv.initialize(queues=(0, 1))
            tx = drv.submit(1, (bytes(VIRTIO_NET_HDR.size), udp_frame(net, b"from a vcpu")), kick=False)
            rx = drv.submit(0, (), (1526,))
            m.start()
            status = m.wait(60)
            assert status is not None and status.code == EXIT_CODE, status
            assert drv.used(1) == [(tx.head, 0)]
            assert host.recvfrom(2048) == (b"from a vcpu", (net.guest_ip, 4000))
            transport = m.devices["virtio-net0"]
            raised = transport.irq.raised
            host.sendto(b"to the guest", (net.guest_ip, 4000))
            [(head, n)] = wait_used(drv, 0)
            data = drv.read_segment(rx.writable()[0], n)
            assert head == rx.head and data.endswith(b"to the guest")
            assert transport.irq.level and transport.irq.raised >= raised
            host.close()


def test_console_bytes_out_from_a_vcpu(tmp_path):
    path = str(tmp_path / "console.sock")
    with machine_with(ConsoleSpec(path), notify_then_exit(NOTIFY, queue=1)) as m:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.settimeout(10)
        drv = driver_for(m, layout.virtio_mmio_slot(0)[0])
        drv.initialize(queues=(0, 1))
        req = drv.submit(1, (b"hello ", b"from ", b"the guest"), kick=False)
        rx = drv.submit(0, (), (64,))
        client.sendall(b"typed")
        [(head, n)] = wait_used(drv, 0)
        assert (head, drv.read_segment(rx.writable()[0], n)) == (rx.head, b"typed")
        m.start()
        status = m.wait(60)
        assert status is not None and status.code == EXIT_CODE, status
        assert drv.used(1) == [(req.head, 0)]
        got = b""
        while len(got) < 20:
            got += client.recv(64)
        assert got == b"hello from the guest"
        client.close()


def test_vsock_connect_from_a_vcpu(tmp_path):
    path = str(tmp_path / "v.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + "_5000")
    listener.listen(1)
    listener.settimeout(10)
    with machine_with(VsockSpec(cid=3, path=path), notify_then_exit(NOTIFY, queue=1)) as m:
        drv = driver_for(m, layout.virtio_mmio_slot(0)[0])
        drv.initialize(queues=(0, 1, 2))
        rx = drv.submit(0, (), (4096,))
        hdr = VIRTIO_VSOCK_HDR.pack(
            3, VMADDR_CID_HOST, 1234, 5000, 0, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0
        )
        drv.submit(1, (hdr,), kick=False)
        m.start()
        status = m.wait(60)
        assert status is not None and status.code == EXIT_CODE, status
        conn, _ = listener.accept()
        [(head, n)] = drv.used(0)
        resp = VIRTIO_VSOCK_HDR.unpack(drv.read_segment(rx.writable()[0], n))
        assert head == rx.head and resp[6] == VIRTIO_VSOCK_OP_RESPONSE and resp[2:4] == (5000, 1234)
        conn.close()
    listener.close()
