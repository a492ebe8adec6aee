"""The part of the 8042 keyboard controller a VM needs: its reset line.

Guests (Linux's ``reboot=k``, many bootloaders and unikernels) reset a PC by
writing a "pulse output port" command to the controller's command port; output
port bit 0 is wired to the CPU's reset line.  This model has no keyboard and
no controller RAM: the status register always says "output buffer empty,
input buffer empty, self-test passed", so a guest that polls before writing a
command never waits, and a driver probing for a keyboard finds none.

The controller answers on two ports, data (0x60) and command/status (0x64),
with port 0x61 (the PC's system control port) between them, so it is
registered as two one-port ranges; ``register(bus)`` does both.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from .. import layout
from ..bus import Bus, BusRange
from ..exitstatus import ExitReason
from . import VmControl
from .byteio import UNDECODED_BYTE, split_read, split_write, valid_size

# ---- status register (read from the command port) ------------------------
#: Output buffer full: a byte waits at the data port (never, here).
I8042_STATUS_OBF = 0x01
#: Input buffer full: the controller has not taken the last byte written (never, here).
I8042_STATUS_IBF = 0x02
#: System flag: set by the controller after a successful self-test.
I8042_STATUS_SYS = 0x04
#: Command/data: the last byte written went to the command port (1) or data port (0).
I8042_STATUS_CMD = 0x08

# ---- commands ---------------------------------------------------------------
#: Commands 0xF0-0xFF pulse the output-port bits whose command bit is 0 (low nibble).
I8042_CMD_PULSE_OUTPUT_BASE = 0xF0
#: Output-port bit 0 drives the CPU reset line.
I8042_OUTPUT_RESET_LINE = 0x01
#: The usual reset command: pulse bit 0 only.
I8042_CMD_RESET_CPU = 0xFE


@dataclass
class I8042Stats:
    #: Reset pulses (each one requested a REBOOT).
    resets: int = 0
    #: Command-port bytes this model does not implement (ignored).
    unknown_commands: int = 0
    #: Bytes written to the data port (ignored: there is no keyboard).
    data_writes: int = 0
    #: Accesses to offsets the one-port ranges do not decode, and bad widths.
    ignored_accesses: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class I8042:
    """The controller; ``data_port`` and ``command_port`` are its two bus devices."""

    def __init__(self, control: VmControl) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._last_write_was_command = False
        self.stats = I8042Stats()
        self.data_port = _Port(self, is_command=False)
        self.command_port = _Port(self, is_command=True)
        #: The last command byte written, for diagnostics.
        self.last_command: int | None = None

    def register(
        self,
        bus: Bus,
        data_port: int = layout.I8042_DATA_PORT,
        command_port: int = layout.I8042_COMMAND_PORT,
    ) -> list[BusRange]:
        """Register both ports on a port-I/O bus; returns their ranges."""
        return [
            bus.register(data_port, 1, self.data_port, "i8042-data"),
            bus.register(command_port, 1, self.command_port, "i8042-command"),
        ]

    def metrics(self) -> dict[str, int]:
        with self._lock:
            return self.stats.as_dict()

    def save_state(self) -> dict:
        with self._lock:
            return {"last_write_was_command": self._last_write_was_command}

    def load_state(self, state: dict) -> None:
        with self._lock:
            self._last_write_was_command = bool(state["last_write_was_command"])

    @property
    def status(self) -> int:
        """The status register as a guest reads it from the command port."""
        with self._lock:
            return self._status()

    def _status(self) -> int:
        return I8042_STATUS_SYS | (I8042_STATUS_CMD if self._last_write_was_command else 0)

    def _read_byte(self, is_command: bool, offset: int) -> int:
        if offset != 0:
            self.stats.ignored_accesses += 1
            return UNDECODED_BYTE
        # The data port has no keyboard behind it: nothing to read (OBF is never set).
        return self._status() if is_command else 0

    def _write_byte(self, is_command: bool, offset: int, value: int, requests: list[str]) -> None:
        if offset != 0:
            self.stats.ignored_accesses += 1
            return
        self._last_write_was_command = is_command
        if not is_command:
            self.stats.data_writes += 1
            return
        self.last_command = value
        if value >= I8042_CMD_PULSE_OUTPUT_BASE:
            # A 0 in bits 3:0 pulses that output-port bit; 0xFF pulses nothing.
            if not value & I8042_OUTPUT_RESET_LINE:
                self.stats.resets += 1
                requests.append(f"i8042: reset pulse (command {value:#04x} on the command port)")
            return
        self.stats.unknown_commands += 1

    def _read(self, is_command: bool, offset: int, size: int) -> int:
        with self._lock:
            if not valid_size(size):
                self.stats.ignored_accesses += 1
                return 0
            return split_read(lambda off: self._read_byte(is_command, off), offset, size)

    def _write(self, is_command: bool, offset: int, size: int, value: int) -> None:
        requests: list[str] = []
        with self._lock:
            if not valid_size(size):
                self.stats.ignored_accesses += 1
                return
            split_write(lambda off, v: self._write_byte(is_command, off, v, requests), offset, size, value)
        # Outside the lock: the machine may stop vCPUs that are waiting for it.
        for detail in requests:
            self._control.request_exit(ExitReason.REBOOT, detail=detail)


class _Port:
    """One of the controller's two ports, as a bus device (offset 0 is the port)."""

    def __init__(self, controller: I8042, is_command: bool) -> None:
        self._controller = controller
        self._is_command = is_command

    def read(self, offset: int, size: int) -> int:
        return self._controller._read(self._is_command, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._controller._write(self._is_command, offset, size, value)
