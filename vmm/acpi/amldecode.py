"""Decode the AML subset ``vmm.acpi.aml`` writes back into the same objects.

Used by tests (and by anyone adding DSDT devices) to check what a table says
without an external disassembler: ``decode_terms(aml) == [Device(...), ...]``.
Anything outside the subset raises ``AmlDecodeError`` with the offset.
"""

from __future__ import annotations

import struct

from . import aml


class AmlDecodeError(ValueError):
    pass


class _Reader:
    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def fail(self, what: str) -> AmlDecodeError:
        return AmlDecodeError(f"AML offset {self.pos:#x}: {what}")

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.fail("unexpected end of data")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise self.fail(f"{n} bytes run past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def pkg_end(self) -> int:
        """Read a PkgLength; return the offset where the package ends."""
        start = self.pos
        lead = self.byte()
        extra = lead >> 6
        if extra == 0:
            length = lead & 0x3F
        else:
            length = lead & 0x0F
            for i in range(extra):
                length |= self.byte() << (4 + 8 * i)
        end = start + length
        if end > self.end:
            raise self.fail(f"package length {length} runs past its parent")
        return end

    def name_seg(self) -> str:
        raw = self.take(4)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"bad name segment {raw!r}") from None

    def name_string(self) -> str:
        prefix = ""
        b = self.data[self.pos] if self.pos < self.end else None
        if b == aml.ROOT_CHAR:
            prefix = "\\"
            self.pos += 1
        else:
            while self.pos < self.end and self.data[self.pos] == aml.PARENT_PREFIX_CHAR:
                prefix += "^"
                self.pos += 1
        b = self.byte()
        if b == aml.ZERO_OP:
            segs: list[str] = []
        elif b == aml.DUAL_NAME_PREFIX:
            segs = [self.name_seg(), self.name_seg()]
        elif b == aml.MULTI_NAME_PREFIX:
            segs = [self.name_seg() for _ in range(self.byte())]
        else:
            self.pos -= 1
            segs = [self.name_seg()]
        return prefix + ".".join(segs)


def _data(r: _Reader):
    op = r.byte()
    if op == aml.ZERO_OP:
        return aml.Integer(0)
    if op == aml.ONE_OP:
        return aml.Integer(1)
    if op == aml.ONES_OP:
        return aml.Integer(0xFFFFFFFFFFFFFFFF)
    if op == aml.BYTE_PREFIX:
        return aml.Integer(r.byte())
    if op == aml.WORD_PREFIX:
        return aml.Integer(struct.unpack("<H", r.take(2))[0])
    if op == aml.DWORD_PREFIX:
        return aml.Integer(struct.unpack("<I", r.take(4))[0])
    if op == aml.QWORD_PREFIX:
        return aml.Integer(struct.unpack("<Q", r.take(8))[0])
    if op == aml.STRING_PREFIX:
        end = r.data.find(b"\0", r.pos, r.end)
        if end < 0:
            raise r.fail("unterminated string")
        s = r.data[r.pos : end].decode("ascii")
        r.pos = end + 1
        return aml.String(s)
    if op == aml.BUFFER_OP:
        end = r.pkg_end()
        size = _data(r)
        if not isinstance(size, aml.Integer):
            raise r.fail("buffer size is not an integer constant")
        raw = r.take(end - r.pos)
        return aml.Buffer(raw[: size.value].ljust(size.value, b"\0"))
    if op == aml.PACKAGE_OP:
        end = r.pkg_end()
        count = r.byte()
        inner = _Reader(r.data, r.pos, end)
        elements = []
        while inner.pos < end:
            elements.append(_data(inner))
        r.pos = end
        if len(elements) > count:
            raise r.fail(f"package declares {count} elements but holds {len(elements)}")
        return aml.Package(elements)
    raise AmlDecodeError(f"AML offset {r.pos - 1:#x}: unsupported data opcode {op:#04x}")


def _terms(r: _Reader, end: int) -> list:
    out = []
    while r.pos < end:
        op = r.byte()
        if op == aml.NAME_OP:
            name = r.name_string()
            out.append(aml.Name(name, _data(r)))
        elif op == aml.SCOPE_OP:
            pend = r.pkg_end()
            name = r.name_string()
            out.append(aml.Scope(name, _terms(r, pend)))
        elif op == aml.EXT_OP_PREFIX and r.pos < end and r.data[r.pos] == aml.DEVICE_OP:
            r.pos += 1
            pend = r.pkg_end()
            name = r.name_string()
            out.append(aml.Device(name, _terms(r, pend)))
        elif op == aml.METHOD_OP:
            pend = r.pkg_end()
            name = r.name_string()
            flags = r.byte()
            out.append(aml.Method(name, _terms(r, pend), args=flags & 7, serialized=bool(flags & 8)))
        elif op == aml.RETURN_OP:
            out.append(aml.Return(_data(r)))
        else:
            raise AmlDecodeError(f"AML offset {r.pos - 1:#x}: unsupported opcode {op:#04x}")
    return out


def decode_terms(data: bytes) -> list:
    """Decode a TermList (e.g. a DSDT body after its 36-byte header)."""
    r = _Reader(bytes(data))
    return _terms(r, len(r.data))


def decode_resources(buf: bytes) -> list:
    """Decode a resource template buffer into Io/Memory32Fixed/Interrupt objects.

    Checks that it ends with an End Tag and nothing follows it.
    """
    out: list = []
    pos = 0
    while pos < len(buf):
        tag = buf[pos]
        if tag == aml.END_TAG:
            if pos + 2 != len(buf):
                raise AmlDecodeError(f"resource template: {len(buf) - pos - 2} bytes after the end tag")
            return out
        if tag == aml.IO_PORT_DESCRIPTOR:
            _, info, lo, hi, align, length = struct.unpack_from("<BBHHBB", buf, pos)
            if info != aml.IO_DECODE_16:
                raise AmlDecodeError(f"resource template: IO descriptor decode flag {info:#x}")
            out.append(aml.Io(lo, hi, align, length))
            pos += 8
        elif tag == aml.MEMORY32_FIXED_DESCRIPTOR:
            _, length_field, info, base, size = struct.unpack_from("<BHBII", buf, pos)
            if length_field != 9:
                raise AmlDecodeError(f"resource template: Memory32Fixed length {length_field}")
            out.append(aml.Memory32Fixed(base, size, bool(info & aml.MEMORY_READ_WRITE)))
            pos += 12
        elif tag == aml.EXTENDED_INTERRUPT_DESCRIPTOR:
            _, length_field, flags, count = struct.unpack_from("<BHBB", buf, pos)
            if length_field != 2 + 4 * count:
                raise AmlDecodeError(
                    f"resource template: interrupt descriptor length {length_field} for {count} interrupts"
                )
            gsis = struct.unpack_from(f"<{count}I", buf, pos + 5)
            out.append(
                aml.Interrupt(
                    tuple(gsis),
                    edge=bool(flags & aml.INT_EDGE),
                    active_low=bool(flags & aml.INT_ACTIVE_LOW),
                    shared=bool(flags & aml.INT_SHARED),
                    consumer=bool(flags & aml.INT_CONSUMER),
                )
            )
            pos += 3 + length_field
        else:
            raise AmlDecodeError(f"resource template: unsupported descriptor {tag:#04x} at {pos}")
    raise AmlDecodeError("resource template has no end tag")
