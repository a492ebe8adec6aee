"""Wide accesses to devices whose registers are one byte each.

The legacy PC devices (16550 UART, i8042, ACPI power ports) sit on an 8-bit
bus.  A 16- or 32-bit ``in``/``out`` to such a device reaches it, on a PC, as
consecutive byte cycles at port, port+1, ... lowest byte first, each with its
normal side effects.  These helpers give every byte-register device that
behaviour, so that a 2/4/8-byte access from the bus never raises: bytes that
fall on an offset the device does not decode read as 0xFF and are dropped on
write, as on an undecoded ISA address.
"""

from __future__ import annotations

from typing import Callable

#: Widest access split into byte cycles (the bus sends 1, 2, 4 or 8).
MAX_ACCESS_SIZE = 8
#: What a byte cycle on an undecoded offset reads (nothing drives the data lines).
UNDECODED_BYTE = 0xFF


def valid_size(size: int) -> bool:
    """True for access widths the helpers split (1..8 bytes)."""
    return 1 <= size <= MAX_ACCESS_SIZE


def split_read(read_byte: Callable[[int], int], offset: int, size: int) -> int:
    """Read ``size`` consecutive byte registers from ``offset``, little-endian.

    ``read_byte(offset)`` is called once per byte, lowest offset first.  A size
    outside 1..8 reads 0 without touching the device.
    """
    if not valid_size(size):
        return 0
    value = 0
    for i in range(size):
        value |= (read_byte(offset + i) & 0xFF) << (8 * i)
    return value


def split_write(write_byte: Callable[[int, int], None], offset: int, size: int, value: int) -> None:
    """Write ``value``'s low ``size`` bytes to consecutive byte registers from ``offset``.

    A size outside 1..8 writes nothing.
    """
    if not valid_size(size):
        return
    for i in range(size):
        write_byte(offset + i, (value >> (8 * i)) & 0xFF)
