"""A minimal flattened-device-tree (DTB) writer.

Some boot protocols (uhyve's Hermit boot among them) hand the guest a
device tree instead of, or next to, their own structures.  This writer
emits the binary form a guest parses: a header, an (empty or given) memory
reservation block, the structure block and the strings block.

Reference: Devicetree Specification v0.4, chapter 5 "Flattened Devicetree
(DTB) Format".  Every multi-byte field is big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# §5.2 header.
FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
FDT_HEADER_SIZE = 40
# §5.4.1 structure block tokens.
FDT_BEGIN_NODE = 0x1
FDT_END_NODE = 0x2
FDT_PROP = 0x3
FDT_END = 0x9


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


@dataclass
class FdtNode:
    """A node: a name (``memory@0``), properties in insertion order, children."""

    name: str
    properties: list[tuple[str, bytes]] = field(default_factory=list)
    children: list[FdtNode] = field(default_factory=list)

    def child(self, name: str) -> FdtNode:
        node = FdtNode(name)
        self.children.append(node)
        return node

    # Property encodings, §2.2.4 "Property Values".
    def prop_empty(self, name: str) -> FdtNode:
        self.properties.append((name, b""))
        return self

    def prop_u32(self, name: str, *values: int) -> FdtNode:
        self.properties.append((name, b"".join(struct.pack(">I", v & 0xFFFFFFFF) for v in values)))
        return self

    def prop_u64(self, name: str, *values: int) -> FdtNode:
        self.properties.append((name, b"".join(struct.pack(">Q", v & (2**64 - 1)) for v in values)))
        return self

    def prop_string(self, name: str, *values: str) -> FdtNode:
        self.properties.append((name, b"".join(v.encode() + b"\0" for v in values)))
        return self


def build_dtb(root: FdtNode, reservations: list[tuple[int, int]] = (), boot_cpuid_phys: int = 0) -> bytes:
    """Serialize ``root`` (whose name must be empty) into a DTB blob."""
    if root.name:
        raise ValueError("the root node of a device tree has an empty name")
    strings = bytearray()
    offsets: dict[str, int] = {}

    def string_offset(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    structure = bytearray()

    def emit(node: FdtNode) -> None:
        structure.extend(struct.pack(">I", FDT_BEGIN_NODE))
        structure.extend(_pad4(node.name.encode() + b"\0"))
        for name, value in node.properties:
            structure.extend(struct.pack(">III", FDT_PROP, len(value), string_offset(name)))
            structure.extend(_pad4(value))
        for child in node.children:
            emit(child)
        structure.extend(struct.pack(">I", FDT_END_NODE))

    emit(root)
    structure.extend(struct.pack(">I", FDT_END))

    rsvmap = b"".join(struct.pack(">QQ", a, s) for a, s in reservations) + struct.pack(">QQ", 0, 0)
    off_rsvmap = FDT_HEADER_SIZE  # already 8-byte aligned (§5.3)
    off_struct = off_rsvmap + len(rsvmap)
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings)
    header = struct.pack(
        ">10I",
        FDT_MAGIC,
        total,
        off_struct,
        off_strings,
        off_rsvmap,
        FDT_VERSION,
        FDT_LAST_COMP_VERSION,
        boot_cpuid_phys,
        len(strings),
        len(structure),
    )
    return header + rsvmap + bytes(structure) + bytes(strings)
