"""Decompressing a bzImage's payload on the host.

boot.rst ("payload_offset", "payload_length"): the protected-mode part holds
a compressed payload whose format is told by its magic number, and "the
uncompressed payload is currently always ELF".  The kernel build appends the
decompressed size as a 4-byte little-endian trailer (scripts/Makefile.lib,
``size_append``; gzip's own ISIZE trailer is the same thing), which we use to
bound and check the output.

Decompressing on the host lets a VMM enter the ELF directly and skip the
in-guest decompressor, which is slow where guest ring 0 is emulated.  The
result is cached by the bzImage's sha256.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import struct
import tempfile
import zlib
from pathlib import Path

from ..errors import ConfigError, ImageError
from .elf import ELF_MAGIC
from .setup_header import SetupHeader

# Magic numbers (lib/decompress.c, compressed_formats[]).
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZO_MAGIC = b"\x89LZO"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: lz4 -l ("legacy") frames: 8 MiB blocks (lib/decompress_unlz4.c, LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE).
LZ4_LEGACY_BLOCK_SIZE = 8 << 20
#: Linux builds with `zstd -22 --ultra` (window log 27); allow a little more.
ZSTD_MAX_WINDOW = 1 << 28
#: A kernel larger than this is certainly a corrupt trailer, not a kernel.
MAX_DECOMPRESSED_SIZE = 1 << 30


def detect_format(payload: bytes) -> str | None:
    for name, magic in (
        ("gzip", GZIP_MAGIC),
        ("xz", XZ_MAGIC),
        ("bzip2", BZIP2_MAGIC),
        ("lzma", LZMA_MAGIC),
        ("lzo", LZO_MAGIC),
        ("lz4", LZ4_LEGACY_MAGIC),
        ("zstd", ZSTD_MAGIC),
    ):
        if payload.startswith(magic):
            return name
    return None


def payload_of(data: bytes, hdr: SetupHeader, path: str) -> bytes:
    if hdr.payload_length == 0:
        raise ImageError(path, "setup header payload_length is 0: no payload to decompress")
    start = hdr.setup_size + hdr.payload_offset
    return data[start : start + hdr.payload_length]


def decompress(payload: bytes, path: str) -> bytes:
    """Decompress a kernel payload; ImageError names the file and the format."""
    fmt = detect_format(payload)
    if fmt is None:
        raise ImageError(path, f"payload magic {payload[:6].hex(' ')} is not gzip, xz, bzip2, lzma, lz4 or zstd")
    if len(payload) < 8:
        raise ImageError(path, f"{fmt} payload is truncated ({len(payload)} bytes)")
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if expected == 0 or expected > MAX_DECOMPRESSED_SIZE:
        raise ImageError(path, f"{fmt} payload's size trailer says {expected} bytes: corrupt payload?")
    try:
        out = _DECODERS[fmt](payload, expected, path)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise ImageError(path, f"{fmt} payload does not decompress: {exc}") from None
    if len(out) != expected:
        raise ImageError(path, f"{fmt} payload decompressed to {len(out)} bytes, its size trailer says {expected}")
    return out


def _gzip(payload: bytes, limit: int, path: str) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(payload, limit + 1)
    if not d.eof and len(out) <= limit:
        raise EOFError("compressed stream ends early")
    return out


def _stream(factory):
    def run(payload: bytes, limit: int, path: str) -> bytes:
        d = factory()
        out = d.decompress(payload, limit + 1)
        if not d.eof and len(out) <= limit:
            raise EOFError("compressed stream ends early")
        return out

    return run


def _lzma_alone():
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)


def _lz4(payload: bytes, limit: int, path: str) -> bytes:
    """lz4 legacy frames: magic, then (u32 size, block) pairs; the trailer ends it."""
    try:
        import lz4.block
    except ImportError:
        raise ConfigError(
            f"{path}: the payload is lz4-compressed; install the 'lz4' package (pip install lz4)"
        ) from None
    out = bytearray()
    pos = 0
    while pos + 4 <= len(payload):
        word = payload[pos : pos + 4]
        if word == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        size = struct.unpack("<I", word)[0]
        if pos + 4 + size > len(payload):
            break  # the 4-byte size trailer (or garbage) ends the stream
        block = payload[pos + 4 : pos + 4 + size]
        try:
            out += lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK_SIZE)
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"block at payload offset {pos:#x}: {exc}") from None
        pos += 4 + size
        if len(out) > limit:
            break
    return bytes(out)


def _zstd(payload: bytes, limit: int, path: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise ConfigError(
            f"{path}: the payload is zstd-compressed; install the 'zstandard' package (pip install zstandard)"
        ) from None
    # Without the size trailer: the reader would take it for the start of a next frame.
    frame = payload[:-4]
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(frame, read_across_frames=False)
    try:
        out = bytearray()
        while len(out) <= limit:
            chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from None
    finally:
        reader.close()
    return bytes(out)


def _lzo(payload: bytes, limit: int, path: str) -> bytes:
    raise ImageError(path, "lzo-compressed payloads are not supported; rebuild with another KERNEL_* compression")


_DECODERS = {
    "gzip": _gzip,
    "xz": _stream(lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
    "lzma": _stream(_lzma_alone),
    "bzip2": _stream(bz2.BZ2Decompressor),
    "lz4": _lz4,
    "zstd": _zstd,
    "lzo": _lzo,
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-microvm" / "vmlinux"


def extract_vmlinux(data: bytes, hdr: SetupHeader, path: str, cache_dir: Path | None = None) -> tuple[bytes, Path]:
    """The bzImage's uncompressed ELF, from the cache or freshly decompressed (and cached).

    Returns (ELF bytes, cache file).  The cache file is written atomically, so
    parallel test workers never see half a file.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(data).hexdigest()
    target = cache / f"{digest}.elf"
    try:
        cached = target.read_bytes()
    except OSError:
        cached = None
    if cached is not None and cached.startswith(ELF_MAGIC):
        return cached, target
    elf = decompress(payload_of(data, hdr, path), path)
    if not elf.startswith(ELF_MAGIC):
        raise ImageError(path, f"decompressed payload is not an ELF file (starts with {elf[:4].hex(' ')})")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{digest}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(elf)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise ConfigError(f"cache directory {cache}: cannot write the decompressed kernel: {exc.strerror}") from None
    return elf, target
