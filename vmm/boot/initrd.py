"""Reading an initrd and choosing where it goes.

Like Firecracker and QEMU, the initrd is placed page-aligned as high as it can
go: below ``initrd_addr_max`` (the highest byte the kernel accepts, from the
setup header) and below the end of low RAM, and above everything the loader
has already placed (the kernel's ``init_size`` range, the ELF segments).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError
from ..memory import GuestMemory

PAGE_SIZE = 4096

#: Linux's INITRD_ADDR_MAX default for kernels whose header does not say
#: (boot protocol < 2.03 and ELF kernels without a header): 0x37FFFFFF is the
#: old default; 64-bit kernels have declared 0x7FFFFFFF since 2.6.
LINUX_ELF_INITRD_ADDR_MAX = 0x7FFF_FFFF


def read_image(path: Path, what: str) -> bytes:
    """The whole file, or ImageError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read {what}: {exc.strerror}") from None


def place_initrd(
    memory: GuestMemory,
    path: Path,
    data: bytes,
    *,
    lowest: int,
    addr_max: int,
    ram_end: int,
) -> int:
    """Copy ``data`` into guest RAM as high as allowed and return its address.

    ``lowest`` is the first byte it may use (end of the kernel), ``addr_max``
    the highest byte address it may occupy, ``ram_end`` one past the last byte
    of the RAM region it goes in.
    """
    size = len(data)
    top = min(addr_max + 1, ram_end)
    start = ((top - size) // PAGE_SIZE) * PAGE_SIZE
    if size == 0:
        return 0
    if start < lowest or top <= lowest:
        room = max(0, top - _page_up(lowest))
        raise ImageError(
            path,
            f"initrd is {size} bytes ({size / 2**20:.1f} MiB), too large for a guest with "
            f"{memory.size // 2**20} MiB of memory: only {room} bytes are free between the kernel's "
            f"end {lowest:#x} and {top:#x}",
        )
    memory.write(start, data)
    return start


def _page_up(value: int) -> int:
    return -(-value // PAGE_SIZE) * PAGE_SIZE
