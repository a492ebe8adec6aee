"""The guest's console output: kept (bounded) and fanned out to listeners.

Every byte the guest prints is appended here from the start of the VM, before
anyone reads it, so no console byte is lost between ``start()`` and a test's
first ``expect`` (listeners added later can replay the whole log first).
Memory is bounded: past ``limit`` bytes the oldest are dropped and counted.
"""

from __future__ import annotations

import threading
from typing import Callable

Listener = Callable[[bytes], None]


class ConsoleLog:
    def __init__(self, limit: int = 16 << 20) -> None:
        self.limit = limit
        self._buf = bytearray()
        self.total = 0  # bytes ever written
        self.dropped = 0  # bytes dropped from the front to respect the limit
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self._buf += data
            self.total += len(data)
            excess = len(self._buf) - self.limit
            if excess > 0:
                del self._buf[:excess]
                self.dropped += excess
            listeners = list(self._listeners)
        for fn in listeners:
            fn(data)

    def add_listener(self, fn: Listener, *, replay: bool = True) -> None:
        """Call ``fn`` with every new chunk; with ``replay``, first with what is kept so far.

        Replay and registration happen under the lock, so no chunk is missed or
        delivered twice.
        """
        with self._lock:
            if replay and self._buf:
                fn(bytes(self._buf))
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._buf)

    def text(self) -> str:
        return self.getvalue().decode("utf-8", "replace")

    def tail(self, n: int = 2000) -> str:
        with self._lock:
            return bytes(self._buf[-n:]).decode("utf-8", "replace")
