"""A device's host-side thread: one selector, a wakeup pipe and a stop flag.

virtio-net, virtio-console and virtio-vsock wait for their host side (a tap
fd, Unix sockets) on a thread of their own and complete guest work through
``link.run_locked(fn)``.  ``DeviceWorker`` holds what they share:

* ``poll(interest, timeout)`` makes the selector's registrations equal to
  ``interest`` (file object -> selector events) and waits; only the worker
  thread registers, unregisters and closes what it polls, so a file
  descriptor is never closed while registered (``discard`` before closing);
* ``wake()`` interrupts a ``poll`` from any thread (a self-pipe), so that
  another thread can change what the worker should wait for;
* ``stop()`` ends the thread and releases the selector and the pipe.  It may
  be called while holding the transport lock (``reset`` and ``close`` run
  under it), so the worker never blocks on that lock for good:
  ``run_locked`` acquires it with a short timeout and gives up once a stop
  was asked for;
* an exception escaping the device's loop is logged and reported through
  ``on_crash`` (the device then asks for DEVICE_NEEDS_RESET); it never ends
  the process.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

#: How long ``run_locked`` waits for the transport lock before it looks at the stop flag again.
LOCK_POLL_S = 0.05
#: How long ``stop`` waits for the thread.
JOIN_TIMEOUT_S = 10.0

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class DeviceWorker:
    """One thread running ``body(worker)`` until ``stop()``; see the module docstring."""

    def __init__(
        self,
        name: str,
        body: Callable[[DeviceWorker], None],
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self._on_crash = on_crash
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, EVENT_READ)
        self._registered: dict[Any, int] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._release_lock = threading.Lock()
        #: The exception that ended the loop, if one did.
        self.crashed: BaseException | None = None

    # ---- life cycle ---------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError(f"{self.name}: worker started twice")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """End the thread and release the selector and the pipe; True if the thread is gone.

        Called from the worker thread itself (a crash handler that resets the
        device), it only asks the loop to end; the thread releases on its way out.
        """
        self._stop.set()
        self.wake()
        t = self._thread
        if t is threading.current_thread():
            return True
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                log.error("%s: worker thread did not stop within %.1f s", self.name, timeout)
                return False
        self._release()
        return True

    def _release(self) -> None:
        with self._release_lock:
            if self._closed:
                return
            self._closed = True
            self._registered.clear()
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def wake(self) -> None:
        """Interrupt ``poll`` (from any thread)."""
        with self._release_lock:
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass  # the pipe is full: a wakeup is pending anyway

    def _run(self) -> None:
        try:
            self._body(self)
        except Exception as e:  # a device bug must not vanish silently
            self.crashed = e
            log.exception("%s: worker thread failed", self.name)
            if self._on_crash is not None:
                try:
                    self._on_crash(e)
                except Exception:
                    log.exception("%s: crash handler failed", self.name)
        finally:
            if self._stop.is_set():
                self._release()

    # ---- waiting --------------------------------------------------------------
    def poll(self, interest: dict[Any, int], timeout: float | None = None) -> list[tuple[Any, int]]:
        """Register exactly ``interest`` (events 0 = not polled), wait, return ready (fileobj, events)."""
        sel = self._selector
        for obj in [o for o in self._registered if not interest.get(o)]:
            self.discard(obj)
        for obj, events in interest.items():
            if not events:
                continue
            old = self._registered.get(obj)
            if old is None:
                sel.register(obj, events)
            elif old != events:
                sel.modify(obj, events)
            self._registered[obj] = events
        if self._stop.is_set():
            return []
        ready = []
        for key, events in sel.select(timeout):
            if key.fileobj == self._wake_r:
                self._drain_wakeups()
            else:
                ready.append((key.fileobj, events))
        return ready

    def discard(self, obj: Any) -> None:
        """Stop polling ``obj`` (call before closing it)."""
        if self._registered.pop(obj, None) is not None:
            try:
                self._selector.unregister(obj)
            except (KeyError, ValueError, OSError):
                pass

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # ---- completing guest work -------------------------------------------------
    def run_locked(self, link: Any, fn: Callable[[], object]) -> bool:
        """``link.run_locked(fn)`` unless the worker is stopping; never waits on the lock for good."""
        if link is None:
            return False
        lock = link.lock
        while not lock.acquire(timeout=LOCK_POLL_S):
            if self._stop.is_set():
                return False
        try:
            if self._stop.is_set():
                return False
            return bool(link.run_locked(fn))
        finally:
            lock.release()


class HostSideWorkerMixin:
    """For virtio devices whose host side outlives drivers (console, vsock): one worker
    thread from construction to ``close()``, restarted at ``activate`` when a bug ended
    it, and a crash asks the driver for DEVICE_NEEDS_RESET.

    The device sets ``worker_label`` and ``path`` and defines ``_loop(worker)``.
    """

    worker_label: str
    path: str
    _worker: DeviceWorker

    def _start_worker(self) -> DeviceWorker:
        worker = DeviceWorker(f"{self.worker_label} {self.path}", self._loop, self._worker_crashed)  # type: ignore[attr-defined]
        worker.start()
        return worker

    def _ensure_worker(self) -> None:
        """Called from ``activate``: a bug ended the thread (the driver saw NEEDS_RESET): start afresh."""
        if not self._worker.alive:
            self._worker.stop()
            self._worker = self._start_worker()
        self._worker.wake()  # host work may be waiting for the new driver

    def _worker_crashed(self, exc: BaseException) -> None:
        link = self.link  # type: ignore[attr-defined]
        if link is not None:
            self._worker.run_locked(link, lambda: link.needs_reset(f"{self.worker_label} thread failed: {exc!r}"))
