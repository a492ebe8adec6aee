"""Device models.  Each device knows only its registers, an ``IrqLine``, guest
memory (if it does DMA) and, where the guest can end the VM through it, a
``VmControl``.  Devices never call KVM.
"""

from __future__ import annotations

from typing import Protocol

from ..exitstatus import ExitReason


class VmControl(Protocol):
    """What a device may ask of the machine that owns it."""

    def request_exit(self, reason: ExitReason, code: int | None = None, detail: str = "") -> None:
        """End the VM (the first request wins; later ones are ignored)."""
        ...

    def note_boot_time(self) -> None:
        """Record 'the guest has booted' (boot-timer port) at the current time."""
        ...


class RecordingVmControl:
    """For unit tests: records requests instead of ending anything."""

    def __init__(self) -> None:
        self.exits: list[tuple[ExitReason, int | None, str]] = []
        self.boot_times = 0

    def request_exit(self, reason: ExitReason, code: int | None = None, detail: str = "") -> None:
        self.exits.append((reason, code, detail))

    def note_boot_time(self) -> None:
        self.boot_times += 1
