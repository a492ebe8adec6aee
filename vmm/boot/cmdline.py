"""The kernel command line: what we add to it, how long it may be, where it goes.

The command line is written NUL-terminated at ``layout.CMDLINE_ADDR`` for every
protocol.  Its length limit depends on the kernel: a bzImage says it in the
setup header (``cmdline_size``, boot protocol 2.06+; 255 before), an x86 Linux
vmlinux accepts ``COMMAND_LINE_SIZE`` - 1, and a PVH kernel has no declared
limit beyond our buffer.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import layout
from ..errors import ConfigError
from ..memory import GuestMemory
from .types import MmioDeviceInfo

#: arch/x86/include/uapi/asm/setup.h (COMMAND_LINE_SIZE), including the NUL.
LINUX_COMMAND_LINE_SIZE = 2048
#: The most our buffer at CMDLINE_ADDR holds, without the NUL.
BUFFER_LIMIT = layout.CMDLINE_MAX - 1


def virtio_mmio_arg(dev: MmioDeviceInfo) -> str:
    """``virtio_mmio.device=<size>@<base>:<irq>`` (drivers/virtio/virtio_mmio.c, vm_cmdline_set)."""
    size = f"{dev.size // 1024}K" if dev.size % 1024 == 0 else str(dev.size)
    return f"virtio_mmio.device={size}@{dev.base:#x}:{dev.gsi}"


def linux_cmdline(base: str, mmio_devices: Iterable[MmioDeviceInfo], add_virtio: bool) -> str:
    """The user's command line plus one ``virtio_mmio.device=`` per device, when asked."""
    parts = [base.strip()] if base.strip() else []
    if add_virtio:
        parts.extend(virtio_mmio_arg(d) for d in mmio_devices if d.hid == "LNRO0005")
    return " ".join(parts)


def encode_cmdline(cmdline: str, limit: int, limit_source: str) -> bytes:
    """The command line as the guest reads it (no NUL), or ConfigError naming --append."""
    data = cmdline.encode("utf-8")
    if b"\0" in data:
        raise ConfigError("--append: command line contains a NUL byte")
    limit = min(limit, BUFFER_LIMIT)
    if len(data) > limit:
        raise ConfigError(
            f"--append: command line is {len(data)} bytes, the kernel accepts at most {limit} ({limit_source})"
        )
    return data


def write_cmdline(memory: GuestMemory, cmdline: str, limit: int, limit_source: str) -> int:
    """Write the NUL-terminated command line at CMDLINE_ADDR; return its address."""
    data = encode_cmdline(cmdline, limit, limit_source)
    memory.write(layout.CMDLINE_ADDR, data + b"\0")
    return layout.CMDLINE_ADDR
