"""virtio-console, virtio-net and virtio-vsock: devices with a host side and a worker thread.

These devices complete guest work on their own thread (``link.run_locked``)
whenever their host side (a Unix socket, a tap) is ready, so the exact order
of completions is not a function of the guest's steps.  Their machines reuse
``VirtioMachine``'s driver rules (set-up, hostile chains, kicks, resets,
TOCTOU edits) and host events (a client connecting and sending, frames from
the tap), and check safety instead of a byte-exact model:

* every guest byte the device writes (at any time, from any thread) lies in a
  buffer some published descriptor marked device-writable, or in a ready
  queue's used ring (``writes-only-to-writable-and-used``);
* after a reset, nothing touches guest memory until the driver sets the
  device up again (``no-writes-after-reset``);
* no exception escapes into the transport or kills the worker thread
  (``closed-error-set``: ``device-exception`` count, ``DeviceWorker.crashed``);
* Status gains nothing but DEVICE_NEEDS_RESET on its own, InterruptStatus
  nothing but its two defined bits (``status-machine``);
* host memory per step stays bounded and no step blocks (as everywhere).

The tap of virtio-net is a ``SOCK_SEQPACKET`` socket pair (one frame per
message, like a tap), so no network privileges are needed.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from ..models.virtio import NEEDS_RESET, REG
from ..oracles import covered, violation
from ..strategies import Access, interesting_ints, net_frames
from ..tracing import READ, VIEW, WRITE
from .virtio import RING_AREA, VirtioMachine, _RequestRules, writable_anywhere


class AsyncDeviceMachine(_RequestRules, VirtioMachine):
    """Safety oracles for devices that work on their own thread."""

    queue_max = 8
    #: DRIVER_OK starts the device thread and its host buffers (virtio-net: a 64 KiB frame buffer).
    memory_net = 512 * 1024

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fuzz-async-")
        self.clients: list[socket.socket] = []
        super().__init__()
        self.mem.max_reads = 1 << 30  # the worker reads between steps: bounded per step below instead
        self.allowed_writes: list[tuple[int, int]] = []
        #: Buffers published as device-readable: a view of one may be a read (TX data).
        self.readable_ever: list[tuple[int, int]] = []
        self.log_pos = 0
        self.quiet_since: int | None = None

    def teardown(self) -> None:
        try:
            super().teardown()  # transport.close(): the device stops its worker
        finally:
            for s in self.clients:
                s.close()
            for name in os.listdir(self.tmp):
                os.unlink(os.path.join(self.tmp, name))
            os.rmdir(self.tmp)

    # ---- bookkeeping -------------------------------------------------------------------------
    def _remember_writable(self) -> None:
        """Everything the driver has offered as writable so far (the device may use it later)."""
        for q in self.model.queues:
            if 0 < q.size <= self.queue_max and self.ram.contains(q.used, 6 + 8 * q.size):
                self.allowed_writes.append(q.used_area())
                self.allowed_writes.extend(writable_anywhere(self.ram, q))
                self.readable_ever.extend(writable_anywhere(self.ram, q, readable=True))
        if len(self.allowed_writes) > 4096:
            self.allowed_writes = sorted(set(self.allowed_writes))
        if len(self.readable_ever) > 4096:
            self.readable_ever = sorted(set(self.readable_ever))

    def _sync_from_device(self) -> None:
        """Adopt what the device changed on its own: NEEDS_RESET and interrupt bits."""
        t = self.transport
        with t.lock:
            status, ints = t.status, t.interrupt_status
            queues = [(q.next_avail, q.next_used, q.signalled_used) for q in t.queues]
        if status & ~self.model.status & ~NEEDS_RESET:
            raise violation(
                "status-machine", f"status {status:#x} gained bits other than NEEDS_RESET over {self.model.status:#x}"
            )
        if ints & ~3:
            raise violation("interrupt-status-real-events", f"InterruptStatus {ints:#x}")
        self.model.status, self.model.interrupt_status = status, ints
        # Ring indices are not adopted: rules draw from the driver's own state only, so that a
        # replay draws the same data whatever the device thread did meanwhile.
        del queues

    def apply(self, a: Access) -> int:
        self._sync_from_device()
        self.mem.new_step()
        if a.kind == "r":
            with self.step(f"read({a.offset:#x}, {a.size})"):
                got = self.transport.read(a.offset, a.size)
            want = self.model.read(a.offset, a.size)
            if a.size == 4 and a.offset in (REG["status"], REG["interrupt_status"], REG["queue_ready"]):
                return got  # may change under us; checked by _sync_from_device
            if got != want:
                raise violation(
                    "mmio-registers-match-model", f"read({a.offset:#x}, {a.size}) = {got:#x}, model {want:#x}"
                )
            return got
        value = a.value & ((1 << (8 * a.size)) - 1) if a.size else 0
        if a.offset == REG["queue_notify"] and a.size == 4:
            self.notify(value)
            return 0
        self._remember_writable()
        with self.step(f"write({a.offset:#x}, {a.size}, {value:#x})"):
            self.transport.write(a.offset, a.size, value)
        event = self.model.write(a.offset, a.size, value, self.ram)
        if event == "reset":
            for s in self.in_flight:
                s.clear()
            self.quiet_since = len(self.mem.log)
        elif self.model.status & 4 or event == "activate":
            self.quiet_since = None
        return 0

    def notify(self, index: int) -> None:
        self._sync_from_device()
        self._remember_writable()
        self.mem.new_step()
        with self.step(f"notify({index})"):
            self.transport.write(REG["queue_notify"], 4, index)
        reads = sum(1 for a in self.mem.log[self.log_pos :] if a.kind == READ)
        if reads > 64 * self.queue_max * self.queue_max + 4096:
            raise violation("bounded-work-per-kick", f"notify({index}) made {reads} guest reads")

    @rule(data=st.data())
    def restore_ring_state(self, data: st.DataObject) -> None:
        """As in VirtioMachine, but drawing first: which queues are ready depends on the device thread."""
        na = data.draw(interesting_ints(16), label="next_avail")
        nu = data.draw(interesting_ints(16), label="next_used")
        ready = [i for i, q in enumerate(self.model.queues) if q.ready]
        if ready:
            with self.step("restore_state"):
                self.transport.queues[ready[0]].restore_state(na, nu)

    @rule(data=st.data())
    def toctou_kick(self, data: st.DataObject) -> None:
        """As in VirtioMachine, but every draw happens whatever the device's (asynchronous) state."""
        nth = data.draw(st.integers(0, 12), label="after read")
        value = data.draw(interesting_ints(64), label="value")
        ready = [i for i, q in enumerate(self.model.queues) if q.ready]
        if not ready:
            return
        qi = ready[0]
        q = self.model.queues[qi]
        start = self.mem.reads_served
        ram = self.ram

        def hook(n: int, gpa: int, length: int) -> None:
            if n - start == nth and ram.contains(q.desc, 16 * q.size):
                ram.write(q.desc + 16 * (value % q.size), struct.pack("<QQ", value, value >> 5))

        self.mem.add_read_hook(hook)
        try:
            self._remember_writable()
            self.notify(qi)
        finally:
            self.mem.clear_read_hooks()
        self._remember_writable()

    # ---- invariants -------------------------------------------------------------------------------
    @invariant()
    def registers_match(self) -> None:
        self._sync_from_device()
        t = self.transport
        with self.step("register check"):
            magic, version, devid = (t.read(REG[n], 4) for n in ("magic", "version", "device_id"))
        if (magic, version, devid) != (0x74726976, 2, self.device.device_id):
            raise violation("mmio-registers-match-model", f"magic/version/id {magic:#x}/{version}/{devid}")
        if t.errors.get("device-exception"):
            raise violation("closed-error-set", f"the transport caught a device exception: {t.last_error}")
        worker = getattr(self.device, "_worker", None)
        crashed = getattr(worker, "crashed", None)
        if crashed is not None:
            raise violation("closed-error-set", f"the device thread died: {type(crashed).__name__}: {crashed}")

    @invariant()
    def device_memory_accesses(self) -> None:
        log = self.mem.log
        end = len(log)
        self._remember_writable()
        allowed = self.allowed_writes
        for acc in log[self.log_pos : end]:
            if self.quiet_since is not None and self.log_pos + 0 >= self.quiet_since and acc.kind in (WRITE, VIEW):
                raise violation(
                    "no-writes-after-reset", f"device {acc.kind} at {acc.gpa:#x}+{acc.length:#x} after a reset"
                )
            if acc.kind == WRITE and not covered(allowed, acc.gpa, acc.length):
                raise violation("writes-only-to-writable-and-used", f"device wrote {acc.gpa:#x}+{acc.length:#x}")
            if (
                acc.kind == VIEW
                and acc.gpa < RING_AREA[1]
                and not covered(allowed, acc.gpa, acc.length)
                and not covered(self.readable_ever, acc.gpa, acc.length)
            ):
                raise violation(
                    "writes-only-to-writable-and-used",
                    f"device took a view of ring memory {acc.gpa:#x}+{acc.length:#x}",
                )
        self.log_pos = end
        if end > 200_000:
            self.mem.clear()
            self.log_pos = 0
            if self.quiet_since is not None:
                self.quiet_since = 0

    @rule()
    def settle(self) -> None:
        """Give the device thread a moment (host data in flight, deferred completions)."""
        time.sleep(0.002)


# ---- virtio-console ------------------------------------------------------------------------------------
class ConsoleMachine(AsyncDeviceMachine):
    target = "virtio-console"

    def make_device(self) -> Any:
        from vmm.devices.virtio.console import VirtioConsole

        self.sock_path = os.path.join(self.tmp, "console.sock")
        return VirtioConsole(self.sock_path, queue_size=self.queue_max, rx_buffer=256, tx_buffer=256)

    @rule(data=st.binary(max_size=600), new_client=st.booleans())
    def client_sends(self, data: bytes, new_client: bool) -> None:
        """A host client connects (a second one is refused) and sends bytes toward the guest."""
        if new_client or not self.clients:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(self.sock_path)
            except OSError:
                s.close()
                return
            self.clients.append(s)
        try:
            self.clients[-1].send(data)
        except OSError:
            pass

    @rule()
    def client_reads_and_leaves(self) -> None:
        if not self.clients:
            return
        s = self.clients.pop(0)
        try:
            s.recv(1 << 16)
        except OSError:
            pass
        s.close()


# ---- virtio-vsock -----------------------------------------------------------------------------------------
class VsockMachine(AsyncDeviceMachine):
    target = "virtio-vsock"

    def make_device(self) -> Any:
        from vmm.devices.virtio.vsock import VirtioVsock

        self.sock_path = os.path.join(self.tmp, "vsock.sock")
        return VirtioVsock(3, self.sock_path, queue_size=self.queue_max, buf_alloc=512, max_connections=4,
                           connect_timeout=0.2, line_timeout=0.2, linger=0.1)  # fmt: skip

    @rule(
        line=st.one_of(
            st.integers(0, 2**32 - 1).map(lambda p: f"CONNECT {p}\n".encode()),
            st.binary(max_size=40),
        ),
        data=st.binary(max_size=300),
    )
    def host_connects(self, line: bytes, data: bytes) -> None:
        """A host program connects through the Unix socket (valid or garbage CONNECT line) and sends."""
        if len(self.clients) > 8:
            self.clients.pop(0).close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(self.sock_path)
            s.send(line + data)
        except OSError:
            s.close()
            return
        self.clients.append(s)

    @rule()
    def host_closes(self) -> None:
        if self.clients:
            self.clients.pop(0).close()


# ---- virtio-net -------------------------------------------------------------------------------------------
class NetMachine(AsyncDeviceMachine):
    target = "virtio-net"

    def make_device(self) -> Any:
        from vmm.devices.virtio.net import VirtioNet
        from vmm.devices.virtio.tap import Tap

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        b.setblocking(False)
        self.host_end = b
        self.clients.append(b)

        class PairTap(Tap):
            """A tap stand-in: one frame (vnet header first) per SEQPACKET message."""

            def __init__(self) -> None:
                self.name = "fuzz0"
                self._sock = a
                self.fd = a.fileno()

            def set_offload(self, flags: int) -> None:
                pass

            def close(self) -> None:
                self._sock.close()
                self.fd = -1

        return VirtioNet(PairTap(), queue_size=self.queue_max, rx_backlog_frames=4, rx_backlog_bytes=1 << 18)

    @rule(frame=net_frames(max_frame=400))
    def host_sends_frame(self, frame: bytes) -> None:
        """A frame arrives on the tap (vnet header first), valid or hostile (checklist 17)."""
        try:
            self.host_end.send(frame[:65000])
        except OSError:
            pass

    @rule()
    def host_drains(self) -> None:
        for _ in range(16):
            try:
                self.host_end.recv(1 << 17)
            except OSError:
                return
