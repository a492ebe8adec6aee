#!/usr/bin/env python3
"""Build the tiny test guests: freestanding C + GNU as, gcc and binutils only.

Every guest program in ``programs/`` is linked three times from the same
objects, one image per entry protocol:

- ``<name>.pvh.elf``: ELF64 with the XEN_ELFNOTE_PHYS32_ENTRY note (PVH); its
  ELF entry point is the Linux 64-bit entry, so vmlinux-style loaders boot it too;
- ``<name>.bzImage``: setup area + flat payload (Linux boot protocol 2.15, with
  a real-mode entry, a 32-bit entry at +0 and a 64-bit entry at +0x200);
- ``<name>.multiboot.elf``: ELF32 carrying the multiboot v1 header.

Images land in a cache directory keyed by the sha256 of every kit source and
the tool versions, so a cached build costs a hash and a few ``stat`` calls.
Concurrent builds (pytest-xdist workers) take an ``fcntl`` lock and publish
each file with an atomic rename.

Usable as a script (``python3 guests/tiny/build.py [--out DIR] [names...]``)
or imported by file path: ``build(names=None, out_dir=None)`` and
``guest_path(name, fmt)``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
log = logging.getLogger("tiny-guests")

#: Every guest program (programs/<name>.c).
GUESTS = (
    "hello",
    "exitcode",
    "bootcheck",
    "ktap",
    "echo",
    "panic",
    "triple",
    "portloop",
    "mmioloop",
    "smp",
    "virtio_blk",
    "virtio_rng",
    "virtio_console",
    "virtio_net",
    "virtio_vsock",
    "blkbench",
    "agent",
    "fuzzagent",
)
#: Sources outside ``programs/`` that a guest links in, relative to the kit's
#: parent (``guests/``): the exec agent shares its protocol core with the
#: Linux guest's agent.
PROGRAM_EXTRA_SOURCES = {"agent": ("agent/agent_proto.c",)}
#: Directories (relative to ``guests/``) whose headers every kit source may include.
SHARED_INCLUDE_DIRS = ("agent",)
#: Image formats and their file names.
FORMATS = {
    "pvh": "{name}.pvh.elf",
    "bzimage": "{name}.bzImage",
    "multiboot": "{name}.multiboot.elf",
}

CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-mgeneral-regs-only",  # no x87/SSE anywhere: ring-0 FPU set-up is not emulated everywhere
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",  # keep memset() from compiling into a call to itself
    "-Wall",
    "-Wextra",
)
ASFLAGS = ("-Wa,--noexecstack",)
LDFLAGS = ("-nostdlib", "-static", "-no-pie", "-z", "max-page-size=0x1000", "-z", "noexecstack", "--build-id=none")
TOOLS = ("gcc", "ld", "objcopy")

# Mirrors of include/tiny_abi.h and arch/setup.S, for the bzImage assembly.
KERNEL_BASE = 0x100000
IMAGE_INFO_OFFSET = 0x20
IMAGE_INFO_MAGIC = 0x594E4954  # "TINY"
SECTOR = 512
SETUP_SECTS_OFFSET = 0x1F1
SYSSIZE_OFFSET = 0x1F4
INIT_SIZE_OFFSET = 0x260
HDRS_OFFSET = 0x202
HDRS_MAGIC = b"HdrS"
XEN_ELFNOTE_PHYS32_ENTRY = 18
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH_BYTES = 8192

#: Exit codes and markers the guests use (include/tiny_abi.h).
EXIT_EXCEPTION_BASE = 0x40
EXIT_SMP_FAILED = 0x3D
EXIT_BAD_CMDLINE = 0x3E
BENCH_MARK_BEGIN = 124
BENCH_MARK_END = 125

#: Bump to invalidate every cached build when the build recipe changes in a
#: way the hashed sources do not show.
RECIPE_VERSION = "1"


class GuestBuildError(RuntimeError):
    """A compiler, assembler or linker step failed, or a tool is missing."""


# ---- host-side twins of guest computations ---------------------------------
def initrd_checksum(data: bytes) -> int:
    """The checksum bootcheck computes over the initrd: CRC-32 as zlib defines it."""
    return zlib.crc32(data) & 0xFFFFFFFF


def initrd_cmdline(data: bytes) -> str:
    """The ``initrd_size=N initrd_sum=<hex>`` words bootcheck verifies ``data`` against."""
    return f"initrd_size={len(data)} initrd_sum={initrd_checksum(data):08x}"


def blk_pattern(seed: int, length: int) -> bytes:
    """The bytes virtio_blk writes for ``blk_seed=<seed>``: xorshift32 words, little-endian."""
    mask = 0xFFFFFFFF
    x = (seed & mask) or 0x9E3779B9
    out = bytearray()
    for _ in range(length // 4):
        x ^= (x << 13) & mask
        x ^= x >> 17
        x ^= (x << 5) & mask
        out += x.to_bytes(4, "little")
    return bytes(out)


# ---- cache location and key --------------------------------------------------
def cache_root() -> Path:
    """``$MICROVM_CACHE_DIR/tiny``, else ``$XDG_CACHE_HOME/pytest-microvm/tiny``, else ``~/.cache/...``."""
    base = os.environ.get("MICROVM_CACHE_DIR")
    if base:
        return Path(base) / "tiny"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pytest-microvm" / "tiny"


def _rel(path: Path, kit: Path) -> str:
    """``path`` relative to the kit, or to ``guests/`` for the sources the kit shares."""
    try:
        return path.relative_to(kit).as_posix()
    except ValueError:
        return "../" + path.relative_to(kit.parent).as_posix()


def _source_files(kit: Path) -> list[Path]:
    files = [kit / "build.py"]
    for sub in ("include", "arch", "lib", "programs"):
        files += sorted(p for p in (kit / sub).rglob("*") if p.is_file() and p.suffix in (".c", ".h", ".S", ".ld"))
    for shared in SHARED_INCLUDE_DIRS:
        files += sorted(p for p in (kit.parent / shared).glob("*") if p.is_file() and p.suffix in (".c", ".h"))
    return files


@functools.cache
def _tool_versions() -> str:
    lines = []
    for tool in TOOLS:
        path = shutil.which(tool)
        if path is None:
            raise GuestBuildError(f"{tool} not found on PATH: the tiny guests are built with gcc, ld and objcopy")
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
        lines.append(f"{tool}: {out.splitlines()[0] if out else '?'}")
    return "\n".join(lines)


def source_hash(kit: Path = KIT_DIR) -> str:
    """sha256 over the kit's sources, the tool versions and the recipe version."""
    h = hashlib.sha256()
    h.update(f"recipe {RECIPE_VERSION}\n{_tool_versions()}\n".encode())
    for path in _source_files(kit):
        rel = _rel(path, kit)
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def cache_dir() -> Path:
    return cache_root() / source_hash()[:24]


# ---- the build itself ---------------------------------------------------------
def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise GuestBuildError(f"{what}: cannot run {cmd[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        output = (proc.stderr + proc.stdout).strip()
        raise GuestBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{output}")


class _Builder:
    """One build of some guests into a scratch directory."""

    def __init__(self, kit: Path, work: Path, jobs: int) -> None:
        self.kit = kit
        self.work = work
        self.jobs = jobs
        self.include = ["-I", str(kit / "include")]
        for shared in SHARED_INCLUDE_DIRS:
            self.include += ["-I", str(kit.parent / shared)]

    def _parallel(self, jobs: list[tuple[list[str], str]]) -> None:
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(_run, cmd, what) for cmd, what in jobs]
            for fut in futures:
                fut.result()  # the first failure, in submission order

    def compile(self, sources: list[Path]) -> dict[Path, Path]:
        objs: dict[Path, Path] = {}
        jobs = []
        for src in sources:
            obj = self.work / (src.parent.name + "_" + src.name + ".o")
            flags = list(CFLAGS) + (list(ASFLAGS) if src.suffix == ".S" else [])
            jobs.append(
                (
                    ["gcc", *flags, *self.include, "-c", str(src), "-o", str(obj)],
                    f"compiling {_rel(src, self.kit)}",
                )
            )
            objs[src] = obj
        self._parallel(jobs)
        return objs

    def build(self, names: list[str]) -> dict[str, Path]:
        arch = self.kit / "arch"
        lib_srcs = sorted((self.kit / "lib").glob("*.c"))
        prog_srcs = [self.kit / "programs" / f"{n}.c" for n in names]
        for src in prog_srcs:
            if not src.is_file():
                raise GuestBuildError(f"guest program {src} is missing")
        asm = {n: arch / f"{n}.S" for n in ("head", "trampoline", "pvh", "multiboot", "setup")}
        extra_srcs = {n: [self.kit.parent / rel for rel in PROGRAM_EXTRA_SOURCES.get(n, ())] for n in names}
        objs = self.compile([*asm.values(), *lib_srcs, *prog_srcs, *sorted({s for v in extra_srcs.values() for s in v})])
        common = [str(objs[asm["head"]]), str(objs[asm["trampoline"]])] + [str(objs[s]) for s in lib_srcs]
        script = ["-T", str(arch / "tiny.ld")]

        # The setup area is the same for every guest.
        setup_elf = self.work / "setup.elf"
        setup_bin = self.work / "setup.bin"
        _run(
            ["ld", *LDFLAGS, "-T", str(arch / "setup.ld"), str(objs[asm["setup"]]), "-o", str(setup_elf)],
            "linking the bzImage setup",
        )
        _run(["objcopy", "-O", "binary", str(setup_elf), str(setup_bin)], "extracting the bzImage setup")

        links = []
        for name, src in zip(names, prog_srcs):
            prog = [str(objs[src]), *(str(objs[e]) for e in extra_srcs[name])]
            w = self.work
            links.append(
                (
                    ["ld", *LDFLAGS, *script, *common, *prog, "-o", str(w / f"{name}.payload.elf")],
                    f"linking {name} (bzImage payload)",
                )
            )
            links.append(
                (
                    ["ld", *LDFLAGS, *script, *common, str(objs[asm["pvh"]]), *prog, "-o", str(w / f"{name}.pvh.elf")],
                    f"linking {name} (PVH)",
                )
            )
            links.append(
                (
                    [
                        "ld",
                        *LDFLAGS,
                        *script,
                        "-e",
                        "multiboot_start",
                        *common,
                        str(objs[asm["multiboot"]]),
                        *prog,
                        "-o",
                        str(w / f"{name}.mb64.elf"),
                    ],
                    f"linking {name} (multiboot)",
                )
            )
        self._parallel(links)
        converts = []
        for name in names:
            w = self.work
            converts.append(
                (
                    ["objcopy", "-O", "binary", str(w / f"{name}.payload.elf"), str(w / f"{name}.payload.bin")],
                    f"extracting the {name} payload",
                )
            )
            converts.append(
                (
                    ["objcopy", "-O", "elf32-i386", str(w / f"{name}.mb64.elf"), str(w / f"{name}.multiboot.elf")],
                    f"converting {name} to ELF32 for multiboot",
                )
            )
        self._parallel(converts)

        out: dict[str, Path] = {}
        setup = setup_bin.read_bytes()
        for name in names:
            bz = self.work / FORMATS["bzimage"].format(name=name)
            bz.write_bytes(make_bzimage(setup, (self.work / f"{name}.payload.bin").read_bytes(), name))
            out[f"{name}.bzimage"] = bz
            out[f"{name}.pvh"] = self.work / FORMATS["pvh"].format(name=name)
            out[f"{name}.multiboot"] = self.work / FORMATS["multiboot"].format(name=name)
            check_pvh(out[f"{name}.pvh"].read_bytes(), name)
            check_multiboot(out[f"{name}.multiboot"].read_bytes(), name)
        return out


def make_bzimage(setup: bytes, payload: bytes, name: str = "guest") -> bytes:
    """Setup area + payload, as Linux's arch/x86/boot/tools/build.c lays a bzImage out.

    Fills setup_sects, syssize and init_size, pads the payload so the file ends
    on a 16-byte paragraph, and appends the boot protocol's CRC-32 (boot.rst
    "The Image Checksum": the CRC of the whole file up to syssize is then 0).
    """
    if len(setup) % SECTOR:
        setup += bytes(SECTOR - len(setup) % SECTOR)
    if setup[HDRS_OFFSET : HDRS_OFFSET + 4] != HDRS_MAGIC:
        raise GuestBuildError(f"{name}: setup area lacks the HdrS header at {HDRS_OFFSET:#x}")
    setup_sects = len(setup) // SECTOR - 1
    if not 1 <= setup_sects <= 0xFF:
        raise GuestBuildError(f"{name}: setup area of {len(setup)} bytes does not fit setup_sects")
    magic, init_size, file_size, base = struct.unpack_from("<IIII", payload, IMAGE_INFO_OFFSET)
    if magic != IMAGE_INFO_MAGIC or base != KERNEL_BASE:
        raise GuestBuildError(f"{name}: payload lacks the image info block at {IMAGE_INFO_OFFSET:#x}")
    if file_size != len(payload):
        raise GuestBuildError(f"{name}: payload is {len(payload)} bytes but the image says {file_size}")
    syssize = (len(payload) + 4 + 15) // 16
    if syssize * 16 > init_size:
        raise GuestBuildError(f"{name}: init_size {init_size:#x} is smaller than the payload")
    hdr = bytearray(setup)
    hdr[SETUP_SECTS_OFFSET] = setup_sects
    struct.pack_into("<I", hdr, SYSSIZE_OFFSET, syssize)
    struct.pack_into("<I", hdr, INIT_SIZE_OFFSET, init_size)
    body = bytes(hdr) + payload + bytes(syssize * 16 - 4 - len(payload))
    crc = zlib.crc32(body) ^ 0xFFFFFFFF  # build.c's raw CRC: seeded with ~0, never inverted
    return body + struct.pack("<I", crc)


def _elf_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, desc) of every note in the PT_NOTE segments of an ELF32/ELF64 file."""
    is64 = data[4] == 2
    if is64:
        phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    else:
        phoff, phentsize, phnum = struct.unpack_from("<I", data, 28)[0], *struct.unpack_from("<HH", data, 42)
    notes = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if is64:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, off)
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack_from("<IIIII", data, off)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            notes.append((data[name_at : name_at + namesz].rstrip(b"\0"), ntype, data[desc_at : desc_at + descsz]))
            pos = desc_at + ((descsz + 3) & ~3)
    return notes


def check_pvh(data: bytes, name: str = "guest") -> int:
    """The PVH entry address, after checking the image is an ELF64 with the Xen note."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{name}: PVH image is not an ELF64 file")
    for owner, ntype, desc in _elf_notes(data):
        if owner == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return struct.unpack_from("<I", desc)[0]
    raise GuestBuildError(f"{name}: PVH image has no XEN_ELFNOTE_PHYS32_ENTRY note")


def check_multiboot(data: bytes, name: str = "guest") -> int:
    """File offset of the multiboot header, after checking the image is an i386 ELF32 with one."""
    if data[:4] != b"\x7fELF" or data[4] != 1 or struct.unpack_from("<H", data, 18)[0] != 3:
        raise GuestBuildError(f"{name}: multiboot image is not an ELF32 i386 file")
    for off in range(0, min(len(data), MULTIBOOT_SEARCH_BYTES) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    raise GuestBuildError(f"{name}: no multiboot header in the first {MULTIBOOT_SEARCH_BYTES} bytes")


# ---- public API ------------------------------------------------------------------
def _output_paths(directory: Path, names: list[str]) -> dict[str, Path]:
    return {f"{n}.{fmt}": directory / pattern.format(name=n) for n in names for fmt, pattern in FORMATS.items()}


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(names=None, out_dir=None) -> dict[str, Path]:
    """Build ``names`` (default: every guest) in all formats; return ``{"<name>.<fmt>": path}``.

    ``fmt`` is one of ``pvh``, ``bzimage``, ``multiboot``.  The paths are in
    the cache unless ``out_dir`` is given, in which case the images are copied
    there and those copies are returned.
    """
    names = list(GUESTS if names is None else names)
    unknown = [n for n in names if n not in GUESTS]
    if unknown:
        raise GuestBuildError(f"unknown tiny guest(s) {', '.join(unknown)}; known: {', '.join(GUESTS)}")
    target = cache_dir()
    paths = _output_paths(target, names)
    if not all(p.exists() for p in paths.values()):
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GuestBuildError(
                f"cannot create the guest cache {target}: {exc.strerror} (set MICROVM_CACHE_DIR elsewhere)"
            ) from None
        with _locked(target.parent / (target.name + ".lock")):
            missing = sorted({n for n in names if not all(p.exists() for p in _output_paths(target, [n]).values())})
            if missing:
                with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
                    log.info("compiling tiny guests %s into %s", ", ".join(missing), target)
                    built = _Builder(KIT_DIR, Path(tmp), os.cpu_count() or 1).build(missing)
                    for key, src in built.items():
                        os.replace(src, paths[key])  # atomic: readers see all or nothing
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        copies = {}
        for key, src in paths.items():
            dst = out / src.name
            tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            copies[key] = dst
        return copies
    return paths


def guest_path(name: str, fmt: str = "pvh") -> Path:
    """Path of one built image (building it if needed); ``fmt``: pvh, bzimage or multiboot."""
    if fmt not in FORMATS:
        raise GuestBuildError(f"unknown image format {fmt!r}; known: {', '.join(FORMATS)}")
    return build([name])[f"{name}.{fmt}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test guests (PVH ELF, bzImage, multiboot ELF).")
    parser.add_argument("--out", type=Path, help="copy the images into this directory")
    parser.add_argument("names", nargs="*", help=f"guests to build (default: all of {', '.join(GUESTS)})")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        paths = build(args.names or None, args.out)
    except GuestBuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    for key in sorted(paths):
        print(paths[key])
    return 0


if __name__ == "__main__":
    sys.exit(main())
