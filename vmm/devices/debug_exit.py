"""The debug-exit port: a guest ends its VM with an exit code.

QEMU's isa-debug-exit reports ``(V << 1) | 1`` for a written value V; this
device reports V itself, masked to the access width, so a test guest's
``outl(code, DEBUG_EXIT_PORT)`` comes back as ``code``.  Any write, at any
offset of the range and any width, ends the VM; reads return 0.
"""

from __future__ import annotations

import threading

from .. import layout
from ..exitstatus import ExitReason
from . import VmControl


class DebugExit:
    """Register at ``layout.DEBUG_EXIT_PORT`` with ``SIZE`` ports."""

    SIZE = 1

    def __init__(self, control: VmControl, port: int = layout.DEBUG_EXIT_PORT) -> None:
        self._control = control
        self._port = port
        self._lock = threading.Lock()
        #: Exit requests made (normally one: the machine stops after the first).
        self.exits = 0
        #: The code of the last write, for diagnostics.
        self.last_code: int | None = None

    def metrics(self) -> dict[str, int]:
        with self._lock:
            return {"exits": self.exits}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size < 1:
            return
        code = value & ((1 << (8 * size)) - 1)
        with self._lock:
            self.exits += 1
            self.last_code = code
        self._control.request_exit(
            ExitReason.GUEST_EXIT,
            code=code,
            detail=f"debug-exit: {size}-byte write of {code:#x} to port {self._port + offset:#x}",
        )
