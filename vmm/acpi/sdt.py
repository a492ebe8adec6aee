"""ACPI table plumbing: the common header, checksums, GAS, the RSDP and the XSDT.

ACPI 6.4 §5.2.5 (RSDP), §5.2.6 (System Description Table Header), §5.2.3.2
(Generic Address Structure), §5.2.8 (XSDT).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

OEM_ID = b"PYMVM "  # 6 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYMV"
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")
HEADER_SIZE = HEADER.size  # 36
OFF_LENGTH = 4
OFF_CHECKSUM = 9

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION_2 = 2
#: struct: Signature, Checksum, OEMID, Revision, RsdtAddress, Length, XsdtAddress,
#: Extended Checksum, 3 reserved bytes.
RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_V1_SIZE = 20
RSDP_SIZE = RSDP.size  # 36

# Generic Address Structure address space IDs (§5.2.3.2, Table 5.25).
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
# Access sizes.
GAS_ACCESS_BYTE = 1
GAS = struct.Struct("<BBBBQ")


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def table_checksum_ok(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (length and checksum filled in) + body."""
    if len(signature) != 4:
        raise ValueError(f"ACPI signature {signature!r} is not 4 bytes")
    table_id = b"PYMV" + signature
    raw = bytearray(
        HEADER.pack(
            signature,
            HEADER_SIZE + len(body),
            revision,
            0,
            OEM_ID,
            table_id,
            OEM_REVISION,
            CREATOR_ID,
            CREATOR_REVISION,
        )
        + body
    )
    raw[OFF_CHECKSUM] = checksum(raw)
    return bytes(raw)


def gas(space: int, address: int, bit_width: int = 8, access_size: int = GAS_ACCESS_BYTE) -> bytes:
    """A Generic Address Structure for a register of ``bit_width`` bits at ``address``."""
    return GAS.pack(space, bit_width, 0, access_size, address)


def rsdp(xsdt_addr: int) -> bytes:
    """An ACPI 2.0+ RSDP pointing at the XSDT only (RsdtAddress 0)."""
    raw = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION_2, 0, RSDP_SIZE, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(raw[:RSDP_V1_SIZE])
    raw[32] = checksum(raw)
    return bytes(raw)


def xsdt(entries: Sequence[int]) -> bytes:
    """The XSDT: 64-bit addresses of every table except the DSDT (which the FADT names)."""
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))
