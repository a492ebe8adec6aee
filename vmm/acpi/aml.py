"""A small encoder for ACPI Machine Language (ACPI 6.4 §20, "ACPI Machine Language Specification").

Enough of AML to describe a microVM's devices in a DSDT: names, scopes,
devices, methods that return constants, integers, strings, buffers, packages,
EISA IDs and resource templates with I/O, fixed 32-bit memory and extended
interrupt descriptors (§6.4).  Every object is a plain value with an
``encode()`` method; Python ints, strings, bytes and lists are accepted
wherever a data object is expected and converted by ``to_aml``.

    Device("COM1", [
        Name("_HID", EisaId("PNP0501")),
        Name("_CRS", ResourceTemplate([Io(0x3F8, 0x3F8, 1, 8), Interrupt([4])])),
    ]).encode()
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

# ---- opcodes (§20.3, Table 20.2) -------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
RETURN_OP = 0xA4
ONES_OP = 0xFF

# ---- resource descriptors (§6.4) --------------------------------------------
#: Small item: I/O port descriptor (§6.4.2.5), type 0x08, length 7.
IO_PORT_DESCRIPTOR = 0x47
IO_DECODE_16 = 0x01
#: Small item: end tag (§6.4.2.9), type 0x0F, length 1.
END_TAG = 0x79
#: Large item: 32-bit fixed memory range (§6.4.3.4).
MEMORY32_FIXED_DESCRIPTOR = 0x86
MEMORY_READ_WRITE = 0x01
#: Large item: extended interrupt (§6.4.3.6).
EXTENDED_INTERRUPT_DESCRIPTOR = 0x89
INT_CONSUMER = 1 << 0
INT_EDGE = 1 << 1
INT_ACTIVE_LOW = 1 << 2
INT_SHARED = 1 << 3
INT_WAKE = 1 << 4

_NAME_SEG = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")
_EISA_ID = re.compile(r"^[A-Z]{3}[0-9A-F]{4}$")


@runtime_checkable
class AmlObject(Protocol):
    def encode(self) -> bytes: ...


DataLike = Union[AmlObject, int, str, bytes, Sequence["DataLike"]]


# ---- encodings ---------------------------------------------------------------
def pkg_length(payload_len: int) -> bytes:
    """PkgLength (§20.2.4) for ``payload_len`` bytes following it; counts its own bytes."""
    for extra in range(4):
        total = payload_len + 1 + extra
        if extra == 0 and total <= 0x3F:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"AML package of {payload_len} bytes is too large")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg, padded with '_' (§20.2.2)."""
    if not _NAME_SEG.match(seg):
        raise ValueError(f"invalid AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(name: str) -> bytes:
    r"""NameString (§20.2.2): optional '\' or '^'s, then dot-separated segments."""
    out = bytearray()
    rest = name
    if rest.startswith("\\"):
        out.append(ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            out.append(PARENT_PREFIX_CHAR)
            rest = rest[1:]
    segs = [s for s in rest.split(".")] if rest else []
    if not segs:
        out.append(ZERO_OP)  # NullName
    elif len(segs) == 1:
        out += name_seg(segs[0])
    elif len(segs) == 2:
        out.append(DUAL_NAME_PREFIX)
        out += name_seg(segs[0]) + name_seg(segs[1])
    else:
        if len(segs) > 255:
            raise ValueError(f"AML name {name!r} has too many segments")
        out += bytes([MULTI_NAME_PREFIX, len(segs)])
        for s in segs:
            out += name_seg(s)
    return bytes(out)


def to_aml(value: DataLike) -> AmlObject:
    """Wrap a Python value as an AML data object."""
    if isinstance(value, bool):
        return Integer(int(value))
    if isinstance(value, int):
        return Integer(value)
    if isinstance(value, str):
        return String(value)
    if isinstance(value, (bytes, bytearray)):
        return Buffer(bytes(value))
    if isinstance(value, AmlObject):
        return value
    if isinstance(value, (list, tuple)):
        return Package(list(value))
    raise TypeError(f"cannot encode {value!r} as AML")


# ---- data objects ------------------------------------------------------------
@dataclass(frozen=True)
class Integer:
    """An integer constant, in the shortest encoding (§20.2.3)."""

    value: int

    def encode(self) -> bytes:
        v = self.value
        if v < 0 or v >= 1 << 64:
            raise ValueError(f"AML integer {v} out of range")
        if v == 0:
            return bytes([ZERO_OP])
        if v == 1:
            return bytes([ONE_OP])
        if v <= 0xFF:
            return bytes([BYTE_PREFIX, v])
        if v <= 0xFFFF:
            return bytes([WORD_PREFIX]) + struct.pack("<H", v)
        if v <= 0xFFFFFFFF:
            return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
        return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


@dataclass(frozen=True)
class String:
    """An ASCII string constant (§20.2.3, String := StringPrefix AsciiCharList NullChar)."""

    value: str

    def encode(self) -> bytes:
        data = self.value.encode("ascii")
        if b"\0" in data or any(b > 0x7F for b in data):
            raise ValueError(f"AML strings are 7-bit ASCII without NUL: {self.value!r}")
        return bytes([STRING_PREFIX]) + data + b"\0"


@dataclass(frozen=True)
class EisaId:
    """A compressed EISA ID such as PNP0501, as the DWORD integer _HID expects (§6.1.5)."""

    value: str

    def as_int(self) -> int:
        s = self.value
        if not _EISA_ID.match(s):
            raise ValueError(f"invalid EISA ID {s!r} (three letters, four hex digits)")
        c = [ord(ch) - 0x40 for ch in s[:3]]
        b0 = (c[0] << 2) | (c[1] >> 3)
        b1 = ((c[1] & 7) << 5) | c[2]
        digits = int(s[3:], 16)
        return b0 | (b1 << 8) | (((digits >> 8) & 0xFF) << 16) | ((digits & 0xFF) << 24)

    def encode(self) -> bytes:
        return Integer(self.as_int()).encode()


def hardware_id(hid: str) -> AmlObject:
    """_HID value: an EISA ID when it looks like one (PNP0501), else a string (LNRO0005)."""
    return EisaId(hid) if _EISA_ID.match(hid) else String(hid)


@dataclass(frozen=True)
class Buffer:
    """A buffer of bytes (§19.6.10)."""

    data: bytes

    def encode(self) -> bytes:
        body = Integer(len(self.data)).encode() + self.data
        return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


@dataclass(frozen=True)
class Package:
    """A package of up to 255 data objects or names (§19.6.101)."""

    elements: list

    def encode(self) -> bytes:
        if len(self.elements) > 255:
            raise ValueError("an AML Package holds at most 255 elements")
        body = bytes([len(self.elements)]) + b"".join(to_aml(e).encode() for e in self.elements)
        return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# ---- named objects and scopes -----------------------------------------------
@dataclass(frozen=True)
class Name:
    """Name(NAME, value): binds a data object to a name (§19.6.90)."""

    name: str
    value: DataLike

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.name) + to_aml(self.value).encode()


@dataclass
class Scope:
    """Scope(name) { terms } (§19.6.122)."""

    name: str
    children: list = field(default_factory=list)

    def encode(self) -> bytes:
        body = name_string(self.name) + b"".join(c.encode() for c in self.children)
        return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


@dataclass
class Device:
    """Device(name) { terms } (§19.6.31)."""

    name: str
    children: list = field(default_factory=list)

    def encode(self) -> bytes:
        body = name_string(self.name) + b"".join(c.encode() for c in self.children)
        return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


@dataclass(frozen=True)
class Return:
    """Return(value) (§19.6.120)."""

    value: DataLike

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + to_aml(self.value).encode()


@dataclass
class Method:
    """Method(name, args, serialized) { terms } (§19.6.85); for constant-returning methods."""

    name: str
    body: list = field(default_factory=list)
    args: int = 0
    serialized: bool = False

    @classmethod
    def returning(cls, name: str, value: DataLike) -> Method:
        """Method(NAME, 0, NotSerialized) { Return (value) }"""
        return cls(name, [Return(value)])

    def encode(self) -> bytes:
        if not 0 <= self.args <= 7:
            raise ValueError("an AML method takes 0 to 7 arguments")
        flags = self.args | (0x08 if self.serialized else 0)
        body = name_string(self.name) + bytes([flags]) + b"".join(c.encode() for c in self.body)
        return bytes([METHOD_OP]) + pkg_length(len(body)) + body


# ---- resource templates ------------------------------------------------------
@dataclass(frozen=True)
class Io:
    """IO(Decode16, min, max, alignment, length) (§6.4.2.5)."""

    minimum: int
    maximum: int
    alignment: int
    length: int

    def descriptor(self) -> bytes:
        return struct.pack(
            "<BBHHBB", IO_PORT_DESCRIPTOR, IO_DECODE_16, self.minimum, self.maximum, self.alignment, self.length
        )


@dataclass(frozen=True)
class Memory32Fixed:
    """Memory32Fixed(ReadWrite, base, length) (§6.4.3.4)."""

    base: int
    length: int
    writable: bool = True

    def descriptor(self) -> bytes:
        info = MEMORY_READ_WRITE if self.writable else 0
        return struct.pack("<BHBII", MEMORY32_FIXED_DESCRIPTOR, 9, info, self.base, self.length)


@dataclass(frozen=True)
class Interrupt:
    """Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|Low, Exclusive|Shared) {gsis} (§6.4.3.6)."""

    gsis: tuple
    edge: bool = True
    active_low: bool = False
    shared: bool = False
    consumer: bool = True

    def descriptor(self) -> bytes:
        if not 1 <= len(self.gsis) <= 255:
            raise ValueError("an extended interrupt descriptor lists 1 to 255 interrupts")
        flags = (
            (INT_CONSUMER if self.consumer else 0)
            | (INT_EDGE if self.edge else 0)
            | (INT_ACTIVE_LOW if self.active_low else 0)
            | (INT_SHARED if self.shared else 0)
        )
        body = bytes([flags, len(self.gsis)]) + b"".join(struct.pack("<I", g) for g in self.gsis)
        return struct.pack("<BH", EXTENDED_INTERRUPT_DESCRIPTOR, len(body)) + body


@dataclass
class ResourceTemplate:
    """ResourceTemplate() { descriptors }: a Buffer ending in an End Tag (§19.3.3)."""

    descriptors: list = field(default_factory=list)

    def encode(self) -> bytes:
        data = b"".join(d.descriptor() for d in self.descriptors)
        # End tag; a checksum byte of 0 means "treat the checksum as valid" (§6.4.2.9).
        return Buffer(data + bytes([END_TAG, 0])).encode()
