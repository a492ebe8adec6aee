"""Queue notifications that do not stop the vCPU: KVM ioeventfds and a thread per transport.

Without this, a driver's write of queue index ``i`` to QueueNotify is an MMIO
exit: the vCPU thread leaves KVM_RUN, runs the device's ``handle_queue`` and
only then re-enters the guest.  With it, KVM turns that 4-byte write into a
signal on eventfd ``i`` (KVM_IOEVENTFD with a data match, as QEMU and
Firecracker wire virtio-mmio) and resumes the guest at once; the
``IoeventfdNotifier`` thread waits on the eventfds and delivers each
notification through ``VirtioMmioTransport.notify``, under the transport
lock, exactly as the register write would have (the same state checks, the
same counters, the same interrupts).  The guest can thus fill the ring while
the device works on it.

Writes that do not match (another width, a value that names no queue) still
exit and reach the transport's register code, which counts them as before.
An eventfd counts signals, so none is lost while the thread is busy; several
become one delivery, which is what a notification means (§2.7.13: "there are
buffers to process").

``attach.py`` wires blk and rng this way when the machine has ``ioeventfd=True``.
The thread never calls KVM; registering and removing the eventfds is done
through the two callables the machine hands over.  ``close()`` stops the
thread before the transport takes its lock to close the device, removes the
registrations and closes the eventfds.  A machine that is paused keeps its
vCPUs out of the guest, but notifications already signalled may still be
delivered.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

#: How long ``close`` waits for the thread.
JOIN_TIMEOUT_S = 10.0


class Notifiable(Protocol):
    name: str

    def notify(self, queue_index: int) -> None: ...


#: ``register(fd, address, queue_index)`` / ``unregister(fd, address, queue_index)``.
IoeventfdHook = Callable[[int, int, int], None]


class IoeventfdNotifier:
    """One eventfd per queue of ``transport``, registered at ``notify_addr``, and a delivery thread."""

    def __init__(
        self,
        transport: Notifiable,
        queue_count: int,
        notify_addr: int,
        register: IoeventfdHook,
        unregister: IoeventfdHook,
    ) -> None:
        self.transport = transport
        self.notify_addr = notify_addr
        self._unregister = unregister
        #: Notifications delivered (each may stand for several guest writes).
        self.deliveries = 0
        self._fds: list[int] = []
        self._registered: list[tuple[int, int]] = []
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._closed = False
        try:
            for index in range(queue_count):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._fds.append(fd)
                register(fd, notify_addr, index)
                self._registered.append((fd, index))
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError(f"{self.transport.name}: notifier started twice")
        self._thread = threading.Thread(target=self._run, name=f"{self.transport.name}-notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        index_of = {fd: i for i, fd in enumerate(self._fds)}
        for fd in (*self._fds, self._stop_fd):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _events in poller.poll():
                if fd == self._stop_fd:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:  # nothing left: an earlier wake-up took it
                    continue
                self.deliveries += 1
                try:
                    self.transport.notify(index_of[fd])
                except Exception:  # the transport answers guest errors itself; this is a VMM bug
                    log.exception(
                        "%s: delivering a notification for queue %d failed", self.transport.name, index_of[fd]
                    )

    def close(self) -> None:
        """Stop the thread, remove the ioeventfds, close the eventfds.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        t = self._thread
        if t is not None:
            os.eventfd_write(self._stop_fd, 1)
            t.join(JOIN_TIMEOUT_S)
            if t.is_alive():
                log.error("%s: notification thread did not stop within %.1f s", self.transport.name, JOIN_TIMEOUT_S)
        for fd, index in self._registered:
            try:
                self._unregister(fd, self.notify_addr, index)
            except Exception as exc:  # the VM may be gone already; its ioeventfds went with it
                log.debug("%s: removing the ioeventfd of queue %d: %s", self.transport.name, index, exc)
        self._registered = []
        if t is None or not t.is_alive():
            for fd in (*self._fds, self._stop_fd):
                os.close(fd)
        self._fds = []
