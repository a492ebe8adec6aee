"""A small, strict ELF reader for kernel images (ELF32 and ELF64, little-endian).

Shared by every loader that takes an ELF: vmlinux, PVH, multiboot, Hermit.
It only parses; placing segments in guest memory is the loader's job.  Every
offset and size read from the file is checked against the file's length, and
a malformed image raises ``ImageError`` naming the file and the field.

Reference: System V ABI, "ELF Object File Format" (gABI), chapters 4 and 5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62

PT_NULL = 0
PT_LOAD = 1
PT_DYNAMIC = 2
PT_NOTE = 4
PT_TLS = 7

SHT_NOTE = 7
SHT_RELA = 4

# Dynamic section tags used to find relocations (gABI §5 "Dynamic Section").
DT_NULL = 0
DT_RELA = 7
DT_RELASZ = 8
DT_RELAENT = 9

R_X86_64_RELATIVE = 8


@dataclass(frozen=True)
class ProgramHeader:
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class SectionHeader:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int


@dataclass(frozen=True)
class Note:
    owner: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class Rela:
    offset: int
    type: int
    sym: int
    addend: int


class ElfImage:
    """A parsed ELF file: header fields, program headers, notes."""

    def __init__(self, data: bytes, path: str | Path = "<memory>") -> None:
        self.data = data
        self.path = str(path)
        if len(data) < 16 or data[:4] != ELF_MAGIC:
            raise self.error("not an ELF file (bad magic)")
        self.elf_class = data[4]
        if self.elf_class not in (ELFCLASS32, ELFCLASS64):
            raise self.error(f"unknown ELF class {self.elf_class}")
        if data[5] != ELFDATA2LSB:
            raise self.error("not a little-endian ELF file")
        self.is64 = self.elf_class == ELFCLASS64
        if self.is64:
            fmt = "<HHIQQQIHHHHHH"
        else:
            fmt = "<HHIIIIIHHHHHH"
        hdr_size = 16 + struct.calcsize(fmt)
        if len(data) < hdr_size:
            raise self.error("truncated ELF header")
        (
            self.type,
            self.machine,
            self.version,
            self.entry,
            self.phoff,
            self.shoff,
            self.flags,
            self.ehsize,
            self.phentsize,
            self.phnum,
            self.shentsize,
            self.shnum,
            self.shstrndx,
        ) = struct.unpack_from(fmt, data, 16)
        if self.version != EV_CURRENT:
            raise self.error(f"unsupported ELF version {self.version}")
        self.program_headers = self._read_program_headers()

    # ---- errors ------------------------------------------------------------
    def error(self, problem: str) -> ImageError:
        return ImageError(self.path, problem)

    @classmethod
    def from_file(cls, path: str | Path) -> ElfImage:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageError(path, f"cannot read: {exc.strerror}") from None
        return cls(data, path)

    def _slice(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise self.error(
                f"{what} at file offset {offset:#x}+{size:#x} runs past the end of the file "
                f"({len(self.data):#x} bytes): truncated image?"
            )
        return self.data[offset : offset + size]

    # ---- program headers ----------------------------------------------------
    def _read_program_headers(self) -> list[ProgramHeader]:
        if self.phnum == 0:
            return []
        if self.is64:
            fmt, order = "<IIQQQQQQ", "type flags offset vaddr paddr filesz memsz align"
        else:
            fmt, order = "<IIIIIIII", "type offset vaddr paddr filesz memsz flags align"
        size = struct.calcsize(fmt)
        if self.phentsize < size:
            raise self.error(f"program header entry size {self.phentsize} is smaller than {size}")
        table = self._slice(self.phoff, self.phentsize * self.phnum, "program header table")
        headers = []
        names = order.split()
        for i in range(self.phnum):
            values = dict(zip(names, struct.unpack_from(fmt, table, i * self.phentsize)))
            ph = ProgramHeader(**values)
            if ph.type == PT_LOAD:
                if ph.filesz > ph.memsz:
                    raise self.error(f"segment {i}: p_filesz {ph.filesz:#x} exceeds p_memsz {ph.memsz:#x}")
                self._slice(ph.offset, ph.filesz, f"segment {i}")
            headers.append(ph)
        return headers

    def load_segments(self) -> list[ProgramHeader]:
        return [ph for ph in self.program_headers if ph.type == PT_LOAD and ph.memsz > 0]

    def segment_bytes(self, ph: ProgramHeader) -> bytes:
        return self._slice(ph.offset, ph.filesz, "segment")

    # ---- sections -------------------------------------------------------------
    def section_headers(self) -> list[SectionHeader]:
        if self.shnum == 0 or self.shoff == 0:
            return []
        if self.is64:
            fmt = "<IIQQQQIIQQ"
        else:
            fmt = "<IIIIIIIIII"
        size = struct.calcsize(fmt)
        if self.shentsize < size:
            raise self.error(f"section header entry size {self.shentsize} is smaller than {size}")
        table = self._slice(self.shoff, self.shentsize * self.shnum, "section header table")
        raw = [struct.unpack_from(fmt, table, i * self.shentsize) for i in range(self.shnum)]
        strtab = b""
        if 0 < self.shstrndx < len(raw):
            s = raw[self.shstrndx]
            strtab = self._slice(s[4], s[5], "section name table")
        out = []
        for name_off, typ, flags, addr, offset, sz, *_ in raw:
            end = strtab.find(b"\0", name_off)
            name = strtab[name_off:end].decode("latin-1") if 0 <= name_off < len(strtab) and end >= 0 else ""
            out.append(SectionHeader(name, typ, flags, addr, offset, sz))
        return out

    def section_bytes(self, sh: SectionHeader) -> bytes:
        """The file contents of a section (checked against the file's length)."""
        return self._slice(sh.offset, sh.size, f"section {sh.name or '?'}")

    # ---- notes --------------------------------------------------------------
    def notes(self) -> list[Note]:
        """Every note in PT_NOTE segments (or SHT_NOTE sections when there are none)."""
        blobs = [self._slice(ph.offset, ph.filesz, "note segment") for ph in self.program_headers if ph.type == PT_NOTE]
        if not blobs:
            blobs = [self._slice(s.offset, s.size, f"note section {s.name}") for s in self.section_headers() if s.type == SHT_NOTE]
        notes: list[Note] = []
        for blob in blobs:
            notes.extend(parse_notes(blob, self))
        return notes

    def find_note(self, owner: bytes, note_type: int) -> Note | None:
        for n in self.notes():
            if n.owner == owner and n.type == note_type:
                return n
        return None

    # ---- relocations (static-pie images) ------------------------------------
    def dynamic_relocations(self) -> list[Rela]:
        """RELA entries named by the PT_DYNAMIC segment (ELF64 only)."""
        dyn = [ph for ph in self.program_headers if ph.type == PT_DYNAMIC]
        if not dyn or not self.is64:
            return []
        blob = self._slice(dyn[0].offset, dyn[0].filesz, "dynamic segment")
        tags: dict[int, int] = {}
        for off in range(0, len(blob) - 15, 16):
            tag, val = struct.unpack_from("<qQ", blob, off)
            if tag == DT_NULL:
                break
            tags[tag] = val
        if DT_RELA not in tags:
            return []
        rela_off = self.vaddr_to_offset(tags[DT_RELA])
        size = tags.get(DT_RELASZ, 0)
        ent = tags.get(DT_RELAENT, 24)
        if ent != 24:
            raise self.error(f"DT_RELAENT is {ent}, expected 24")
        table = self._slice(rela_off, size, "relocation table")
        out = []
        for off in range(0, size - size % 24, 24):
            r_offset, r_info, r_addend = struct.unpack_from("<QQq", table, off)
            out.append(Rela(r_offset, r_info & 0xFFFFFFFF, r_info >> 32, r_addend))
        return out

    def vaddr_to_offset(self, vaddr: int) -> int:
        for ph in self.load_segments():
            if ph.vaddr <= vaddr < ph.vaddr + ph.filesz:
                return ph.offset + (vaddr - ph.vaddr)
        raise self.error(f"virtual address {vaddr:#x} is not inside any loaded segment's file data")


def parse_notes(blob: bytes, image: ElfImage | None = None) -> list[Note]:
    """Parse a sequence of ELF notes (namesz, descsz, type, name, desc; 4-byte aligned)."""
    notes = []
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        off += 12
        name_end = off + namesz
        desc_off = off + ((namesz + 3) & ~3)
        desc_end = desc_off + descsz
        if desc_end > len(blob):
            problem = f"note of type {ntype:#x} runs past the end of its segment"
            if image is not None:
                raise image.error(problem)
            raise ImageError("<note>", problem)
        owner = blob[off:name_end].rstrip(b"\0")
        notes.append(Note(owner, ntype, blob[desc_off:desc_end]))
        off = (desc_end + 3) & ~3
    return notes
