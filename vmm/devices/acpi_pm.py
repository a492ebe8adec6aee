"""Hardware-reduced ACPI power and reset registers.

A hardware-reduced ACPI platform (FADT flag HW_REDUCED_ACPI) has no PM1
blocks; the OS powers off through the FADT's SLEEP_CONTROL_REG and resets
through its RESET_REG.  Our FADT points them at the ports in ``layout``:

* Sleep Control Register (ACPI 6.4 §4.8.3.7, Table 4.19), 8 bits:
  SLP_TYPx in bits 4:2, SLP_EN in bit 5 (write-only).  Writing SLP_EN with
  SLP_TYP equal to the DSDT's \\_S5 value (``layout.ACPI_S5_SLP_TYP``)
  powers the VM off.  Other sleep types are not supported (we cannot sleep)
  and are ignored and counted; writes without SLP_EN only choose a type.
* Sleep Status Register (§4.8.3.7, Table 4.20): WAK_STS in bit 7, write 1
  to clear.  We never sleep, so it never wakes: reads 0, writes ignored.
* Reset Register (§4.8.3.6): writing the FADT's RESET_VALUE
  (``layout.ACPI_RESET_VALUE``) resets the system; other values are ignored
  and counted.

All three are 8-bit registers read as 0.  The device covers the ports from
the lowest to the highest of the three; wider accesses are split into byte
cycles (see ``byteio``).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from .. import layout
from ..exitstatus import ExitReason
from . import VmControl
from .byteio import UNDECODED_BYTE, split_read, split_write, valid_size

#: Sleep Control Register fields (ACPI 6.4 Table 4.19).
SLEEP_CONTROL_SLP_TYP_SHIFT = 2
SLEEP_CONTROL_SLP_TYP_MASK = 0x1C
SLEEP_CONTROL_SLP_EN = 0x20
#: Sleep Status Register field (ACPI 6.4 Table 4.20).
SLEEP_STATUS_WAK_STS = 0x80

#: The bus range: from the lowest to the highest of the three ports.
ACPI_PM_BASE = min(layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT)
ACPI_PM_SIZE = (
    max(layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT)
    - ACPI_PM_BASE
    + 1
)
SLEEP_CONTROL_OFFSET = layout.ACPI_SLEEP_CONTROL_PORT - ACPI_PM_BASE
SLEEP_STATUS_OFFSET = layout.ACPI_SLEEP_STATUS_PORT - ACPI_PM_BASE
RESET_OFFSET = layout.ACPI_RESET_PORT - ACPI_PM_BASE


@dataclass
class AcpiPmStats:
    poweroffs: int = 0
    resets: int = 0
    #: SLP_EN writes with a sleep type other than S5.
    unsupported_sleeps: int = 0
    #: Reset-register writes of a value other than RESET_VALUE.
    ignored_resets: int = 0
    #: Bytes on offsets that are none of the three registers, and bad widths.
    ignored_accesses: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class AcpiPm:
    """Register at ``BASE`` with ``SIZE`` ports."""

    BASE = ACPI_PM_BASE
    SIZE = ACPI_PM_SIZE

    def __init__(self, control: VmControl) -> None:
        self._control = control
        self._lock = threading.Lock()
        self.stats = AcpiPmStats()
        #: The sleep type most recently written to the Sleep Control Register.
        self.last_slp_typ: int | None = None

    def metrics(self) -> dict[str, int]:
        with self._lock:
            return self.stats.as_dict()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if not valid_size(size):
                self.stats.ignored_accesses += 1
                return 0
            return split_read(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        requests: list[tuple[ExitReason, str]] = []
        with self._lock:
            if not valid_size(size):
                self.stats.ignored_accesses += 1
                return
            split_write(lambda off, v: self._write_byte(off, v, requests), offset, size, value)
        # Outside the lock: the machine may stop vCPUs that are waiting for it.
        for reason, detail in requests:
            self._control.request_exit(reason, detail=detail)

    def _read_byte(self, offset: int) -> int:
        if offset in (SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, RESET_OFFSET):
            return 0
        self.stats.ignored_accesses += 1
        return UNDECODED_BYTE

    def _write_byte(self, offset: int, value: int, requests: list[tuple[ExitReason, str]]) -> None:
        if offset == SLEEP_CONTROL_OFFSET:
            slp_typ = (value & SLEEP_CONTROL_SLP_TYP_MASK) >> SLEEP_CONTROL_SLP_TYP_SHIFT
            self.last_slp_typ = slp_typ
            if not value & SLEEP_CONTROL_SLP_EN:
                return
            if slp_typ == layout.ACPI_S5_SLP_TYP:
                self.stats.poweroffs += 1
                requests.append(
                    (
                        ExitReason.POWEROFF,
                        f"ACPI: SLP_EN with SLP_TYP {slp_typ} (S5) written to the sleep control register",
                    )
                )
            else:
                self.stats.unsupported_sleeps += 1
        elif offset == SLEEP_STATUS_OFFSET:
            pass  # WAK_STS is never set; clearing it changes nothing.
        elif offset == RESET_OFFSET:
            if value == layout.ACPI_RESET_VALUE:
                self.stats.resets += 1
                requests.append(
                    (ExitReason.REBOOT, f"ACPI: RESET_VALUE {value:#x} written to the reset register")
                )
            else:
                self.stats.ignored_resets += 1
        else:
            self.stats.ignored_accesses += 1
