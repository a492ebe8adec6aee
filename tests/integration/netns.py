"""Private network namespaces and taps for tests; nothing here touches the host's own network.

``NetNamespace`` owns one thread that leaves the process's network namespace
with ``unshare(CLONE_NEWNET)`` and then runs whatever it is asked to: opening
a tap (``/dev/net/tun`` attaches the tap in the namespace of the thread that
opens it), creating sockets (a socket belongs to the namespace it was created
in), or starting a process (a child inherits the namespace of the thread that
forks it, so a whole VMM can run inside with ``popen``).  File descriptors
made there keep working from any thread.  The namespace is anonymous: it
vanishes when the thread ends and the last socket or tap opened in it is
closed, so a crashed test leaves nothing behind in ``ip netns`` or on the
host's interfaces.

``TapNetwork`` is one tap in such a namespace with a host address, a fixed
host MAC and a permanent neighbour entry for the guest, so the kernel sends
to the guest address without ARP.  Interface names come from
``pytest_microvm.workers.tap_name`` (the xdist worker's index and a
counter), so workers never pick the same name even outside a namespace.

Both need root (CAP_SYS_ADMIN for unshare, CAP_NET_ADMIN for the tap) and
``ip`` from iproute2; ``unavailable_reason()`` says why not, for a skip.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pytest_microvm.workers import tap_name

CLONE_NEWNET = 0x40000000

_counter = itertools.count()
_libc = None


def _unshare_net() -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def unique_ifname(prefix: str = "mvt") -> str:
    """An interface name unique to this pytest-xdist worker and this process's counter."""
    return tap_name(next(_counter), prefix)


_reason: str | None = None
_probed = False


def unavailable_reason() -> str | None:
    """Why private network namespaces with taps cannot be made here, or None if they can."""
    global _reason, _probed
    if _probed:
        return _reason
    _probed = True
    if shutil.which("ip") is None:
        _reason = "iproute2's ip is not installed"
    elif not os.path.exists("/dev/net/tun"):
        _reason = "/dev/net/tun does not exist"
    else:
        try:
            with NetNamespace() as ns:
                TapNetwork.create(ns).close()
        except (OSError, subprocess.CalledProcessError) as e:
            _reason = f"cannot create a network namespace with a tap: {e}"
    return _reason


class NetNamespace:
    """A private network namespace held by one thread; see the module docstring."""

    def __init__(self) -> None:
        self._calls: queue.Queue[Any] = queue.Queue()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._cleanups: list[Callable[[], object]] = []
        self._thread = threading.Thread(target=self._serve, name="netns", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        self.run(self._ip_raw, "link", "set", "dev", "lo", "up")

    def _serve(self) -> None:
        try:
            _unshare_net()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor
            self._error = e
            self._started.set()
            return
        self._started.set()
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args, kwargs, box, done = item
            try:
                box.append((True, fn(*args, **kwargs)))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box.append((False, e))
            done.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` in the namespace's thread and return its result (or raise its exception)."""
        if not self._thread.is_alive():
            raise RuntimeError("network namespace is closed")
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        self._calls.put((fn, args, kwargs, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    @staticmethod
    def _ip_raw(*args: str) -> str:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if r.returncode:
            raise subprocess.CalledProcessError(r.returncode, ["ip", *args], r.stdout, r.stderr)
        return r.stdout

    def ip(self, *args: str) -> str:
        """Run ``ip ARGS`` inside the namespace; raises CalledProcessError with ip's stderr."""
        return self.run(self._ip_raw, *args)

    def sysctl(self, key: str, value: str) -> None:
        """Write a net.* sysctl of this namespace (/proc/sys/net resolves per opening thread)."""
        path = "/proc/sys/" + key.replace(".", "/")

        def write() -> None:
            with open(path, "w") as f:
                f.write(value)

        self.run(write)

    def socket(self, family: int = socket.AF_INET, type_: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
        """A socket that lives in this namespace."""
        return self.run(socket.socket, family, type_, proto)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process inside the namespace (it inherits the thread's namespace)."""
        return self.run(subprocess.Popen, argv, **kwargs)

    def on_close(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the namespace when it is closed (last registered, first run)."""
        self._cleanups.append(fn)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        errors = []
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                self.run(fn)
            except Exception as e:  # noqa: BLE001 - the first one is raised after all ran
                errors.append(e)
        self._calls.put(None)
        self._thread.join()
        if errors:
            raise errors[0]

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class TapNetwork:
    """A tap in a ``NetNamespace``: host side HOST_IP/24 with HOST_MAC; the guest is GUEST_IP/GUEST_MAC."""

    ns: NetNamespace
    name: str
    host_mac: str = "02:00:00:00:00:01"
    guest_mac: str = "52:54:00:00:00:02"
    host_ip: str = "10.0.2.1"
    guest_ip: str = "10.0.2.2"
    prefix: int = 24

    @classmethod
    def create(cls, ns: NetNamespace, name: str | None = None, **kw: Any) -> TapNetwork:
        net = cls(ns, name or unique_ifname(), **kw)
        ns.ip("tuntap", "add", "dev", net.name, "mode", "tap")
        ns.on_close(net._delete)
        try:
            # No router solicitations or MLD reports on the wire: tests see only their own frames.
            ns.sysctl(f"net.ipv6.conf.{net.name}.disable_ipv6", "1")
            ns.ip("link", "set", "dev", net.name, "address", net.host_mac, "up")
            ns.ip("addr", "add", f"{net.host_ip}/{net.prefix}", "dev", net.name)
            ns.ip("neigh", "add", net.guest_ip, "lladdr", net.guest_mac, "dev", net.name, "nud", "permanent")
        except BaseException:
            net.close()
            raise
        return net

    def _delete(self) -> None:
        r = subprocess.run(["ip", "link", "del", "dev", self.name], capture_output=True, text=True, check=False)
        if r.returncode and "Cannot find device" not in r.stderr:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)

    def close(self) -> None:
        """Delete the tap now (it is also deleted when the namespace closes)."""
        if self.ns.alive:
            self.ns.run(self._delete)

    def link_state(self) -> str:
        return self.ns.ip("-o", "link", "show", "dev", self.name)

    def wait_operational(self, timeout: float = 10.0) -> None:
        """Wait until the kernel transmits to the tap after a file attached to it.

        The carrier comes on when a file attaches, but the kernel's link
        watcher activates the transmit queue asynchronously (up to a second
        later under load); until then frames toward the tap are dropped by the
        noop qdisc.  The operational state turns UP in the same step.
        """
        deadline = time.monotonic() + timeout
        while " state UP " not in self.link_state():
            if time.monotonic() > deadline:
                raise TimeoutError(f"tap {self.name} did not become operational: {self.link_state()}")
            time.sleep(0.005)
