"""Interrupt lines: how a device signals the guest without knowing about KVM.

A device holds an ``IrqLine`` and drives its level, exactly like the INTR pin
of a chip: ``set_level(True)`` while it has a pending interrupt condition,
``set_level(False)`` when the condition is gone.  The line forwards changes
only.  The machine gives devices a line bound to the in-kernel irqchip; unit
tests give them a ``RecordingIrqLine``.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol


class IrqLine(Protocol):
    def set_level(self, high: bool) -> None: ...

    @property
    def level(self) -> bool: ...


class CallbackIrqLine:
    """An IRQ line that calls ``sink(gsi, level)`` whenever its level changes."""

    def __init__(self, gsi: int, sink: Callable[[int, int], None]) -> None:
        self.gsi = gsi
        self._sink = sink
        self._level = False
        self._lock = threading.Lock()
        self.raised = 0  # rising edges, for metrics and tests

    @property
    def level(self) -> bool:
        return self._level

    def set_level(self, high: bool) -> None:
        high = bool(high)
        with self._lock:
            if high == self._level:
                return
            self._level = high
            if high:
                self.raised += 1
            self._sink(self.gsi, int(high))


class RecordingIrqLine(CallbackIrqLine):
    """For tests: records every level change as (gsi, level)."""

    def __init__(self, gsi: int = 0) -> None:
        self.events: list[tuple[int, int]] = []
        super().__init__(gsi, lambda g, lv: self.events.append((g, lv)))
