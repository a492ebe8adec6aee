"""A Linux tap device opened for virtio-net (linux/if_tun.h, Documentation/networking/tuntap.rst).

The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a vnet header
size of 12 bytes, so every read and write is one Ethernet frame preceded by
exactly the ``struct virtio_net_hdr_v1`` a modern virtio-net driver uses
(virtio 1.2 §5.1.6): the kernel parses the header we write (checksum
offload) and fills in the one it reads (partial checksums, DATA_VALID).
The vnet header is little-endian (TUNSETVNETLE), as virtio 1.x requires.

The device is attached in the network namespace of the thread that opens it;
afterwards the file descriptor works from any thread.  Opening a tap needs
CAP_NET_ADMIN, or a persistent tap owned by the caller.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys

from ...errors import DeviceError

TUN_DEVICE = "/dev/net/tun"

# ---- linux/if_tun.h: ioctls (_IOW/_IOR('T', nr, int)) -------------------------
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC

# ---- linux/if_tun.h: TUNSETIFF flags -------------------------------------------
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# ---- linux/if_tun.h: TUNSETOFFLOAD flags (what the kernel may hand us) -------------
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

#: IFNAMSIZ includes the terminating NUL.
IFNAMSIZ = 16
#: struct ifreq: char ifr_name[IFNAMSIZ]; union { short ifr_flags; ... } (24 bytes).
_IFREQ = struct.Struct("16sH22x")
#: sizeof(struct virtio_net_hdr_mrg_rxbuf) == sizeof(struct virtio_net_hdr_v1).
VNET_HDR_SIZE = 12


def check_ifname(name: str) -> bytes:
    """The interface name as bytes, or DeviceError if Linux would refuse it (dev_valid_name)."""
    raw = name.encode("ascii", "replace")
    if not raw or len(raw) >= IFNAMSIZ or raw in (b".", b"..") or any(c in b"/:?\0 \t\n" for c in raw):
        raise DeviceError(f"tap {name!r}: not a valid interface name (1-15 characters, no '/', ':' or spaces)")
    return raw


class Tap:
    """An open tap device delivering vnet-header-prefixed frames; non-blocking."""

    def __init__(self, name: str) -> None:
        raw = check_ifname(name)
        self.name = name
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"tap {name}: cannot open {TUN_DEVICE}: {e.strerror}") from None
        self.fd = fd
        try:
            features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
            if not features & IFF_VNET_HDR:
                raise DeviceError(f"tap {name}: {TUN_DEVICE} does not support IFF_VNET_HDR")
            self._ioctl("TUNSETIFF", TUNSETIFF, _IFREQ.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            self._ioctl("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            try:
                self._ioctl("TUNSETVNETLE", TUNSETVNETLE, struct.pack("i", 1))
            except DeviceError:
                if sys.byteorder != "little":  # on a little-endian host the header is little-endian anyway
                    raise
            self.set_offload(0)
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise

    def _ioctl(self, what: str, request: int, arg: bytes | int) -> bytes | int:
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            hint = " (needs CAP_NET_ADMIN or a persistent tap owned by this user)" if e.errno == errno.EPERM else ""
            raise DeviceError(f"tap {self.name}: {what} failed: {e.strerror}{hint}") from None

    def set_offload(self, flags: int) -> None:
        """Which partially checksummed or segmented frames the kernel may hand us (TUN_F_*)."""
        self._ioctl("TUNSETOFFLOAD", TUNSETOFFLOAD, flags)  # the value itself, not a pointer

    def read_into(self, buf: bytearray) -> int | None:
        """Read one frame (vnet header first) into ``buf``; None if none is waiting."""
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return None

    def write(self, parts: list) -> int:
        """Write one frame given as buffers (vnet header first); raises OSError on failure."""
        return os.writev(self.fd, parts)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
