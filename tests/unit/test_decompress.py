"""Host-side decompression of bzImage payloads, the cache, and direct ELF boot."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import sys
from pathlib import Path

import pytest
from boot_images import Segment, make_bzimage, make_elf, make_pvh_elf

from vmm import layout
from vmm.boot import decompress, load
from vmm.boot import setup_header as sh
from vmm.boot.types import BootRequest
from vmm.errors import ConfigError, ImageError
from vmm.memory import GuestMemory

MiB = layout.MiB

#: An ELF big enough to span several lz4 legacy blocks would be slow to build;
#: this one spans several compressor buffers and has structure to compress.
VMLINUX = make_elf(
    [Segment(0x100_0000, bytes(range(256)) * 2048 + b"\x90" * 70000, memsz=0xA0000, vaddr=0xFFFF_FFFF_8100_0000)],
    0x100_0000,
)


def _lz4_legacy(data: bytes) -> bytes:
    import lz4.block

    out = bytearray(decompress.LZ4_LEGACY_MAGIC)
    block = 1 << 17  # smaller than the kernel's 8 MiB, to exercise several blocks
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i : i + block], store_size=False)
        out += struct.pack("<I", len(c)) + c
    return bytes(out)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress,
    "lz4": _lz4_legacy,
    "zstd": _zstd,
}


def kernel_payload(fmt: str, elf: bytes = VMLINUX) -> bytes:
    """What the kernel build makes: compressed data + size_append (gzip's ISIZE is the same)."""
    packed = COMPRESSORS[fmt](elf)
    if fmt != "gzip":
        packed += struct.pack("<I", len(elf))
    return packed


def bzimage_with(fmt: str, elf: bytes = VMLINUX) -> bytes:
    return make_bzimage(payload=kernel_payload(fmt, elf), init_size=4 * MiB)


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_each_format_decompresses(fmt):
    payload = kernel_payload(fmt)
    assert decompress.detect_format(payload) == fmt
    assert decompress.decompress(payload, "bzImage") == VMLINUX


def test_payload_is_found_through_the_header():
    img = bzimage_with("gzip")
    hdr = sh.parse_setup_header(img, "bzImage")
    assert decompress.payload_of(img, hdr, "bzImage") == kernel_payload("gzip")


def test_unknown_magic():
    with pytest.raises(ImageError, match="payload magic 00 11 22"):
        decompress.decompress(b"\x00\x11\x22\x33\x44\x55\x66\x77\x88", "bzImage")


def test_lzo_is_refused_clearly():
    with pytest.raises(ImageError, match="lzo"):
        decompress.decompress(decompress.LZO_MAGIC + bytes(20), "bzImage")


def test_size_trailer_mismatch():
    bad = COMPRESSORS["xz"](VMLINUX) + struct.pack("<I", len(VMLINUX) + 1)
    with pytest.raises(ImageError, match="size trailer says"):
        decompress.decompress(bad, "bzImage")


def test_corrupt_stream():
    good = kernel_payload("bzip2")
    bad = good[:40] + bytes(len(good) - 44) + good[-4:]
    with pytest.raises(ImageError, match="bzip2 payload"):
        decompress.decompress(bad, "bzImage")


def test_corrupt_lz4_block():
    good = kernel_payload("lz4")
    bad = good[:12] + b"\xff" * 64 + good[76:]
    with pytest.raises(ImageError, match="lz4 payload does not decompress"):
        decompress.decompress(bad, "bzImage")


def test_corrupt_zstd_frame():
    good = kernel_payload("zstd")
    bad = good[:4] + bytes([good[4] | 0x08]) + good[5:]  # reserved frame header bit
    with pytest.raises(ImageError, match="zstd payload"):
        decompress.decompress(bad, "bzImage")


def test_truncated_stream():
    good = COMPRESSORS["gzip"](VMLINUX)
    with pytest.raises(ImageError, match="gzip payload"):
        decompress.decompress(good[: len(good) // 2] + good[-4:], "bzImage")


def test_output_is_bounded_by_the_trailer():
    """A payload that expands past what its trailer claims stops there (no decompression bomb)."""
    bomb = gzip.compress(bytes(50 * MiB), mtime=0)
    bomb = bomb[:-4] + struct.pack("<I", 1000)
    with pytest.raises(ImageError, match="decompressed to 1001 bytes"):
        decompress.decompress(bomb, "bzImage")


@pytest.mark.parametrize(
    "module, magic, package",
    [("zstandard", decompress.ZSTD_MAGIC, "zstandard"), ("lz4", decompress.LZ4_LEGACY_MAGIC, "lz4")],
)
def test_missing_module_gives_install_hint(monkeypatch, module, magic, package):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.block", None)
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        decompress.decompress(magic + bytes(8) + struct.pack("<I", 100), "bzImage")


def test_cache_by_sha256(tmp_path):
    img = bzimage_with("xz")
    hdr = sh.parse_setup_header(img, "bzImage")
    elf, cached = decompress.extract_vmlinux(img, hdr, "bzImage", tmp_path)
    assert elf == VMLINUX
    import hashlib

    assert cached == tmp_path / f"{hashlib.sha256(img).hexdigest()}.elf"
    assert cached.read_bytes() == VMLINUX
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary files left
    # A second extraction reads the cache instead of decompressing: prove it by
    # putting a different ELF there.
    other = make_elf([Segment(0x100_0000, b"other")], 0x100_0000)
    cached.write_bytes(other)
    assert decompress.extract_vmlinux(img, hdr, "bzImage", tmp_path)[0] == other
    # A damaged cache entry is replaced.
    cached.write_bytes(b"garbage")
    assert decompress.extract_vmlinux(img, hdr, "bzImage", tmp_path)[0] == VMLINUX


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert decompress.default_cache_dir() == tmp_path / "pytest-microvm" / "vmlinux"


def test_payload_that_is_not_elf(tmp_path):
    img = make_bzimage(payload=kernel_payload("gzip", b"not an elf at all" * 10))
    hdr = sh.parse_setup_header(img, "bzImage")
    with pytest.raises(ImageError, match="not an ELF"):
        decompress.extract_vmlinux(img, hdr, "bzImage", tmp_path)


# ---- direct ELF boot -----------------------------------------------------------
@pytest.fixture
def memory():
    mem = GuestMemory([(0, 64 * MiB)])
    yield mem
    mem.close()


def boot(tmp_path: Path, memory, image: bytes, **kw):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(image)
    return load(BootRequest(kernel=kernel, memory=memory, direct_elf=True, cache_dir=tmp_path / "cache", **kw))


def test_direct_elf_enters_vmlinux_in_64bit_mode(tmp_path, memory):
    setup = boot(tmp_path, memory, bzimage_with("gzip"), cmdline="console=ttyS0")
    assert setup.protocol == "linux-elf"
    assert setup.entry.mode == "long64" and setup.entry.rip == 0x100_0000
    assert memory.read(0x100_0000, 512) == bytes(range(256)) * 2
    assert setup.details["decompressed_from"] == str(tmp_path / "bzImage")
    assert Path(setup.details["vmlinux_cache"]).parent == tmp_path / "cache"


def test_direct_elf_prefers_pvh(tmp_path, memory):
    setup = boot(tmp_path, memory, bzimage_with("xz", make_pvh_elf(0x100_0040)))
    assert setup.protocol == "pvh"
    assert setup.entry.mode == "protected32" and setup.entry.rip == 0x100_0040


def test_direct_elf_keeps_the_headers_cmdline_limit(tmp_path, memory):
    img = make_bzimage(payload=kernel_payload("gzip"), cmdline_size=100)
    with pytest.raises(ConfigError, match="at most 100 \\(setup header cmdline_size\\)"):
        boot(tmp_path, memory, img, cmdline="z" * 101)


def test_direct_elf_without_payload(tmp_path, memory):
    with pytest.raises(ImageError, match="payload_length is 0"):
        boot(tmp_path, memory, make_bzimage(payload=b"", payload_length=0))
