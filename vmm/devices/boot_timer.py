"""Firecracker's boot-timer port: the guest says "booted" by writing a magic byte.

A guest (Firecracker's init, our guest agent, a test guest) writes
``layout.BOOT_TIMER_MAGIC`` (123) to ``layout.BOOT_TIMER_PORT`` when it is
ready; the machine records the time since start.  Any other value is ignored
and counted; reads return 0.  The value is compared as written, at any width.
"""

from __future__ import annotations

import threading

from .. import layout
from . import VmControl


class BootTimer:
    """Register at ``layout.BOOT_TIMER_PORT`` with ``SIZE`` ports."""

    SIZE = 1

    def __init__(self, control: VmControl) -> None:
        self._control = control
        self._lock = threading.Lock()
        #: Magic writes seen (each one called ``note_boot_time``).
        self.signals = 0
        #: Writes of any other value.
        self.ignored_writes = 0

    def metrics(self) -> dict[str, int]:
        with self._lock:
            return {"signals": self.signals, "ignored_writes": self.ignored_writes}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size < 1 or value & ((1 << (8 * size)) - 1) != layout.BOOT_TIMER_MAGIC:
            with self._lock:
                self.ignored_writes += 1
            return
        with self._lock:
            self.signals += 1
        self._control.note_boot_time()
