"""The tiny-guest build driver (guests/tiny/build.py): cache, concurrency, errors, image layout.

These tests compile the kit with gcc and binutils but boot nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2] / "guests" / "tiny"

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("gcc", "ld", "objcopy")),
    reason="building the tiny guests needs gcc, ld and objcopy",
)


def load_kit(kit: Path = KIT, name: str = "tiny_build_under_test"):
    """Import a kit's build.py by file path, as vmm.guestkit does."""
    spec = importlib.util.spec_from_file_location(name, kit / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def built(shared_cache):
    """Every guest in every format, built once into a cache the module shares."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROVM_CACHE_DIR", str(shared_cache))
        mod = load_kit()
        return mod, mod.build()


@pytest.fixture
def warm_cache(built, shared_cache, monkeypatch) -> Path:
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(shared_cache))
    return shared_cache


def copy_kit(dst: Path) -> Path:
    shutil.copytree(KIT, dst, ignore=shutil.ignore_patterns("build", "__pycache__"))
    return dst


# ---- cache -----------------------------------------------------------------------
def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    mod = load_kit()
    monkeypatch.delenv("MICROVM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mod.cache_root() == tmp_path / "xdg" / "pytest-microvm" / "tiny"
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(tmp_path / "mine"))
    assert mod.cache_root() == tmp_path / "mine" / "tiny"
    assert mod.cache_dir().parent == tmp_path / "mine" / "tiny"


def test_second_build_is_a_cache_hit(cache, caplog):
    mod = load_kit()
    with caplog.at_level(logging.INFO, logger="tiny-guests"):
        first = mod.build(["hello"])
    assert any("compiling" in r.getMessage() for r in caplog.records)
    assert set(first) == {"hello.pvh", "hello.bzimage", "hello.multiboot"}
    stats = {k: p.stat() for k, p in first.items()}
    assert all(str(p).startswith(str(cache)) for p in first.values())

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tiny-guests"):
        again = mod.build(["hello"])
        path = mod.guest_path("hello", "bzimage")
    assert again == first
    assert path == first["hello.bzimage"]
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]
    for key, p in again.items():
        st = p.stat()
        assert (st.st_ino, st.st_mtime_ns) == (stats[key].st_ino, stats[key].st_mtime_ns), key


def test_out_dir_gets_copies(warm_cache, tmp_path):
    mod = load_kit()
    out = mod.build(["exitcode"], out_dir=tmp_path / "out")
    assert sorted(p.name for p in out.values()) == ["exitcode.bzImage", "exitcode.multiboot.elf", "exitcode.pvh.elf"]
    cached = mod.build(["exitcode"])
    for key, p in out.items():
        assert p.parent == tmp_path / "out"
        assert p.read_bytes() == cached[key].read_bytes()


def test_a_changed_source_changes_the_cache_key(tmp_path, cache):
    kit = copy_kit(tmp_path / "kit")
    before = load_kit(kit, "tiny_copy_a").cache_dir()
    hello = kit / "programs" / "hello.c"
    hello.write_text(hello.read_text() + "\n/* a comment */\n")
    after = load_kit(kit, "tiny_copy_b").cache_dir()
    assert before != after
    assert before.parent == after.parent == cache / "tiny"


def test_concurrent_builds_compile_once(cache, tmp_path):
    """Several processes (xdist workers) asking at once: one compiles, all get the images."""
    script = textwrap.dedent(
        f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        spec = importlib.util.spec_from_file_location("tiny_build", {str(KIT / "build.py")!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for key, path in sorted(mod.build(["hello", "exitcode"]).items()):
            print(key, path)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for _out, err, rc in results:
        assert rc == 0, err
    outputs = {out for out, _, _ in results}
    assert len(outputs) == 1
    compiles = sum(err.count("compiling tiny guests") for _, err, _ in results)
    assert compiles == 1
    mod = load_kit()
    for line in outputs.pop().splitlines():
        key, path = line.split(" ", 1)
        data = Path(path).read_bytes()
        if key.endswith(".pvh"):
            mod.check_pvh(data)
        elif key.endswith(".multiboot"):
            mod.check_multiboot(data)
        else:
            assert data[0x202:0x206] == b"HdrS"
    leftovers = [p.name for p in (cache / "tiny").iterdir() if p.name.startswith("build-")]
    assert leftovers == []


# ---- errors ----------------------------------------------------------------------
def test_broken_source_raises_a_clear_error(tmp_path, cache):
    kit = copy_kit(tmp_path / "kit")
    hello = kit / "programs" / "hello.c"
    hello.write_text(hello.read_text().replace("return 0;", "return undefined_symbol_here;"))
    mod = load_kit(kit, "tiny_broken")
    with pytest.raises(mod.GuestBuildError) as info:
        mod.build(["hello"])
    message = str(info.value)
    assert "compiling programs/hello.c failed" in message
    assert "gcc " in message and str(hello.resolve()) in message  # the command
    assert "undefined_symbol_here" in message  # the compiler's own diagnostic
    target = mod.cache_dir()
    assert not target.exists() or not any(target.iterdir())
    assert not [p for p in target.parent.iterdir() if p.name.startswith("build-")]


def test_broken_link_raises_a_clear_error(tmp_path, cache):
    kit = copy_kit(tmp_path / "kit")
    hello = kit / "programs" / "hello.c"
    hello.write_text(hello.read_text().replace("return 0;", "extern int nowhere(void); return nowhere();"))
    mod = load_kit(kit, "tiny_broken_link")
    with pytest.raises(mod.GuestBuildError, match=r"(?s)linking hello .*failed.*undefined reference to .nowhere"):
        mod.build(["hello"])


def test_unknown_guest_and_format_are_rejected(cache):
    mod = load_kit()
    with pytest.raises(mod.GuestBuildError, match="unknown tiny guest.*nosuch.*known: hello"):
        mod.build(["nosuch"])
    with pytest.raises(mod.GuestBuildError, match="unknown image format 'iso'"):
        mod.guest_path("hello", "iso")


def test_missing_tool_is_named(cache, monkeypatch):
    mod = load_kit(name="tiny_no_tools")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(mod.GuestBuildError, match="gcc not found on PATH"):
        mod.build(["hello"])


def test_unusable_cache_dir_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(blocker / "cache"))
    mod = load_kit()
    with pytest.raises(mod.GuestBuildError, match=r"cannot create the guest cache .*a-file/cache/tiny"):
        mod.build(["hello"])


def test_cli_prints_paths_and_reports_errors(warm_cache, tmp_path):
    ok = subprocess.run(
        [sys.executable, str(KIT / "build.py"), "--out", str(tmp_path / "o"), "hello"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert sorted(Path(p).name for p in ok.stdout.split()) == ["hello.bzImage", "hello.multiboot.elf", "hello.pvh.elf"]
    bad = subprocess.run([sys.executable, str(KIT / "build.py"), "bogus"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "unknown tiny guest(s) bogus" in bad.stderr


# ---- what the images contain -------------------------------------------------------
def test_every_guest_in_every_format(built):
    mod, paths = built
    assert set(paths) == {f"{n}.{f}" for n in mod.GUESTS for f in ("pvh", "bzimage", "multiboot")}


def elf_header(data: bytes) -> dict:
    if data[4] == 2:
        e_type, e_machine, _, e_entry = struct.unpack_from("<HHIQ", data, 16)
    else:
        e_type, e_machine, _, e_entry = struct.unpack_from("<HHII", data, 16)
    return {"class": data[4], "type": e_type, "machine": e_machine, "entry": e_entry}


def test_pvh_image(built):
    mod, paths = built
    data = paths["hello.pvh"].read_bytes()
    hdr = elf_header(data)
    assert (hdr["class"], hdr["machine"]) == (2, 62)  # ELF64, x86-64
    assert hdr["entry"] == 0x100200  # the Linux 64-bit entry, for vmlinux-style loaders
    entry = mod.check_pvh(data)
    assert 0x100000 < entry < 0x200000
    assert b"\x02\xb0\xad\x1b" not in data[:8192]  # no multiboot header: QEMU would prefer it


def test_multiboot_image(built):
    mod, paths = built
    data = paths["hello.multiboot"].read_bytes()
    hdr = elf_header(data)
    assert (hdr["class"], hdr["machine"]) == (1, 3)  # ELF32, i386
    offset = mod.check_multiboot(data)
    assert offset % 4 == 0 and offset < 8192
    _, flags, _ = struct.unpack_from("<III", data, offset)
    assert flags & 0x3 == 0x3 and not flags & 0x10000  # page-aligned modules, memory info; ELF, no a.out kludge
    assert 0x100000 < hdr["entry"] < 0x200000


def test_bzimage_setup_header(built):
    """The fields boot.rst defines, as a loader reads them."""
    _, paths = built
    data = paths["hello.bzimage"].read_bytes()
    setup_sects = data[0x1F1]
    setup_len = (setup_sects + 1) * 512
    (syssize,) = struct.unpack_from("<I", data, 0x1F4)
    assert struct.unpack_from("<H", data, 0x1FE)[0] == 0xAA55
    assert data[0x200] == 0xEB and 0x202 + data[0x201] == 0x26C  # jump doubles as the header length
    assert data[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", data, 0x206)[0] == 0x020F
    assert data[0x211] & 0x01  # LOADED_HIGH
    assert struct.unpack_from("<I", data, 0x214)[0] == 0x100000  # code32_start
    assert data[0x234] == 0  # not relocatable: linked for 1 MiB
    assert struct.unpack_from("<H", data, 0x236)[0] & 0x1  # XLF_KERNEL_64
    assert struct.unpack_from("<I", data, 0x238)[0] >= 255  # cmdline_size
    assert struct.unpack_from("<Q", data, 0x258)[0] == 0x100000  # pref_address
    init_size = struct.unpack_from("<I", data, 0x260)[0]
    assert len(data) == setup_len + syssize * 16
    assert init_size >= syssize * 16
    assert zlib.crc32(data) ^ 0xFFFFFFFF == 0  # boot.rst "The Image Checksum"
    payload = data[setup_len:]
    (kernel_info_offset,) = struct.unpack_from("<I", data, 0x268)
    assert payload[kernel_info_offset : kernel_info_offset + 4] == b"LToP"
    # The first 4 KiB double as a zero page: nothing but the header is non-zero.
    assert not any(data[:0x1F1]) and not any(data[0x270:0x1000])


# ---- host-side twins and shared constants -----------------------------------------
def test_initrd_checksum_is_zlib_crc32():
    mod = load_kit()
    data = bytes(range(256)) * 7
    assert mod.initrd_checksum(data) == zlib.crc32(data)
    assert mod.initrd_checksum(b"123456789") == 0xCBF43926  # the CRC-32 check value
    assert mod.initrd_cmdline(b"abc") == f"initrd_size=3 initrd_sum={zlib.crc32(b'abc'):08x}"


def test_layout_header_matches_vmm_layout():
    """include/tiny_layout.h duplicates vmm/layout.py; every value must agree."""
    from vmm import layout

    text = (KIT / "include" / "tiny_layout.h").read_text()
    defines = dict(re.findall(r"^#define\s+([A-Z0-9_]+)\s+(0x[0-9A-Fa-f]+|\d+)\s*$", text, re.MULTILINE))
    assert len(defines) >= 20
    for name, value in defines.items():
        assert hasattr(layout, name), f"{name} is not in vmm/layout.py"
        assert int(value, 0) == getattr(layout, name), name


def test_abi_constants_match_build_py():
    mod = load_kit()
    text = (KIT / "include" / "tiny_abi.h").read_text()
    defines = dict(re.findall(r"^#define\s+([A-Z0-9_]+)\s+(0x[0-9A-Fa-f]+|\d+)\b", text, re.MULTILINE))
    for name in (
        "KERNEL_BASE",
        "IMAGE_INFO_OFFSET",
        "IMAGE_INFO_MAGIC",
        "EXIT_EXCEPTION_BASE",
        "EXIT_SMP_FAILED",
        "EXIT_BAD_CMDLINE",
        "BENCH_MARK_BEGIN",
        "BENCH_MARK_END",
    ):
        assert int(defines[name], 0) == getattr(mod, name), name
