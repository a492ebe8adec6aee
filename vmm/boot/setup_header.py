"""The bzImage real-mode setup header (Documentation/arch/x86/boot.rst).

``parse_setup_header`` reads and checks every field the 64-bit boot protocol
depends on and raises ``ImageError`` naming the file and the field for each
thing that makes the image unusable.  Offsets are file offsets, which are also
the offsets inside ``struct boot_params`` (the header is copied verbatim into
the zero page at 0x1f1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ImageError

# ---- field offsets (boot.rst, "The Real-Mode Kernel Header") ---------------
OFF_SETUP_SECTS = 0x1F1
OFF_SYSSIZE = 0x1F4
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_KERNEL_VERSION = 0x20E
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE_KERNEL = 0x234
OFF_MIN_ALIGNMENT = 0x235
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248
OFF_PAYLOAD_LENGTH = 0x24C
OFF_SETUP_DATA = 0x250
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
#: One past the last field we read (kernel_info_offset ends here).
HEADER_END_2_15 = 0x26C
#: struct boot_params leaves room for the header up to edd_mbr_sig_buffer (0x290).
SETUP_HEADER_MAX_END = 0x290

BOOT_FLAG_MAGIC = 0xAA55
HEADER_MAGIC = b"HdrS"
SECTOR_SIZE = 512
#: "If this field is 0, the real value is 4." (setup_sects)
DEFAULT_SETUP_SECTS = 4

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

#: type_of_loader 0xFF: "undefined" boot loader (boot.rst, "Details of Header Fields").
TYPE_OF_LOADER_UNDEFINED = 0xFF

#: 2.12 added xloadflags (XLF_KERNEL_64), which the 64-bit entry relies on.
MIN_VERSION_64BIT = 0x020C
#: Kernels older than 2.06 have no cmdline_size: their limit is 255.
OLD_CMDLINE_SIZE = 255
#: Before 2.03 there is no initrd_addr_max; the documented default.
OLD_INITRD_ADDR_MAX = 0x37FF_FFFF


def format_version(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    """True if ``data`` carries the boot_flag and "HdrS" magic of a Linux boot image."""
    return (
        len(data) >= OFF_HEADER + 4
        and struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0] == BOOT_FLAG_MAGIC
        and data[OFF_HEADER : OFF_HEADER + 4] == HEADER_MAGIC
    )


@dataclass(frozen=True)
class SetupHeader:
    """The header fields a loader needs, already checked."""

    setup_sects: int
    syssize: int
    version: int
    kernel_version: str
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    #: The raw header bytes from 0x1f1 to its end (0x202 + the byte at 0x201).
    raw: bytes

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code (boot sector + setup sectors) before the kernel proper."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def version_str(self) -> str:
        return format_version(self.version)


def parse_setup_header(data: bytes, path: str) -> SetupHeader:
    """Parse and check a bzImage's setup header; raise ImageError naming the field."""

    def fail(problem: str) -> ImageError:
        return ImageError(path, problem)

    if len(data) < OFF_HEADER + 4:
        raise fail(
            f"truncated: {len(data)} bytes is too short for a Linux setup header (boot_flag at {OFF_BOOT_FLAG:#x})"
        )
    boot_flag = struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0]
    if boot_flag != BOOT_FLAG_MAGIC:
        raise fail(f"setup header boot_flag is {boot_flag:#06x}, expected {BOOT_FLAG_MAGIC:#06x}")
    magic = data[OFF_HEADER : OFF_HEADER + 4]
    if magic != HEADER_MAGIC:
        raise fail(f"setup header magic at {OFF_HEADER:#x} is {magic!r}, expected {HEADER_MAGIC!r}")
    if len(data) < HEADER_END_2_15:
        raise fail(f"truncated: {len(data)} bytes ends inside the setup header (which runs to {HEADER_END_2_15:#x})")

    def u8(off: int) -> int:
        return data[off]

    def u16(off: int) -> int:
        return struct.unpack_from("<H", data, off)[0]

    def u32(off: int) -> int:
        return struct.unpack_from("<I", data, off)[0]

    def u64(off: int) -> int:
        return struct.unpack_from("<Q", data, off)[0]

    version = u16(OFF_VERSION)
    if version < MIN_VERSION_64BIT:
        raise fail(
            f"setup header version is {format_version(version)}; the 64-bit boot protocol needs "
            f"{format_version(MIN_VERSION_64BIT)} or newer (Linux 3.8+)"
        )
    setup_sects = u8(OFF_SETUP_SECTS) or DEFAULT_SETUP_SECTS
    loadflags = u8(OFF_LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise fail("setup header loadflags has LOADED_HIGH clear: a zImage loaded at 0x10000 is not supported")
    xloadflags = u16(OFF_XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise fail(
            "setup header xloadflags has XLF_KERNEL_64 clear: the kernel has no 64-bit entry point (32-bit kernel?)"
        )

    # "The end of setup header can be calculated as follows: 0x0202 + byte value
    # at offset 0x0201".  Version 2.12 headers reach at least past init_size.
    header_end = OFF_JUMP + 2 + u8(OFF_JUMP + 1)
    if not OFF_INIT_SIZE + 4 <= header_end <= SETUP_HEADER_MAX_END:
        raise fail(
            f"setup header length (0x202 + byte at 0x201) ends at {header_end:#x}, "
            f"outside {OFF_INIT_SIZE + 4:#x}..{SETUP_HEADER_MAX_END:#x}"
        )

    setup_size = (setup_sects + 1) * SECTOR_SIZE
    if setup_size >= len(data):
        raise fail(
            f"truncated: setup_sects {setup_sects} puts the kernel at {setup_size:#x}, past the end of the {len(data)}-byte file"
        )
    syssize = u32(OFF_SYSSIZE)
    pm_size = len(data) - setup_size
    if syssize * 16 > pm_size:
        raise fail(
            f"truncated: setup header syssize says {syssize * 16} bytes of protected-mode code, "
            f"the file has {pm_size} after the {setup_sects} setup sectors"
        )

    kernel_alignment = u32(OFF_KERNEL_ALIGNMENT)
    relocatable = bool(u8(OFF_RELOCATABLE_KERNEL))
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise fail(f"setup header kernel_alignment {kernel_alignment:#x} is not a power of two")
    init_size = u32(OFF_INIT_SIZE)
    if init_size == 0:
        raise fail("setup header init_size is 0")
    payload_offset = u32(OFF_PAYLOAD_OFFSET)
    payload_length = u32(OFF_PAYLOAD_LENGTH)
    if payload_length and payload_offset + payload_length > pm_size:
        raise fail(
            f"setup header payload_offset {payload_offset:#x} + payload_length {payload_length:#x} "
            f"runs past the protected-mode code ({pm_size:#x} bytes): truncated image?"
        )
    cmdline_size = u32(OFF_CMDLINE_SIZE)
    if cmdline_size == 0:
        raise fail("setup header cmdline_size is 0")
    initrd_addr_max = u32(OFF_INITRD_ADDR_MAX) or OLD_INITRD_ADDR_MAX

    kv_off = u16(OFF_KERNEL_VERSION)
    kernel_version = ""
    if kv_off and kv_off + OFF_JUMP < setup_size:
        raw_kv = data[kv_off + OFF_JUMP : min(setup_size, kv_off + OFF_JUMP + 256)]
        kernel_version = raw_kv.split(b"\0", 1)[0].decode("latin-1")

    return SetupHeader(
        setup_sects=setup_sects,
        syssize=syssize,
        version=version,
        kernel_version=kernel_version,
        loadflags=loadflags,
        code32_start=u32(OFF_CODE32_START),
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable_kernel=relocatable,
        min_alignment=u8(OFF_MIN_ALIGNMENT),
        xloadflags=xloadflags,
        cmdline_size=cmdline_size,
        payload_offset=payload_offset,
        payload_length=payload_length,
        pref_address=u64(OFF_PREF_ADDRESS),
        init_size=init_size,
        raw=data[OFF_SETUP_SECTS:header_end],
    )
